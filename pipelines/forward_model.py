"""ForwardModelPipeline: sample signals given an observation of them, with a generator trained by
``diffkit.dfm.train_dfm`` on observations alone (Tewari et al., NeurIPS 2023).

Components: ``signal_model`` (the generator: a UNet2DModel for images, ``diffkit.SignalMLP`` for 1-D
signals) and a DDIM ``scheduler`` (prediction_type "sample": the x0 of a target observation is the rendered
signal). The forward model is part of the config (``forward_kind`` "window" or "crop", ``signal_size``,
``view_size``, ``channels``), so the pipeline saves and loads as one folder.
"""

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.utils import BaseOutput

from diffkit.dfm import CropView, WindowView, sample_signal
from diffkit.schedule import NoiseSchedule
from diffkit.solvers import make_timesteps


FORWARD_KINDS = ("window", "crop")
OUTPUT_TYPES = ("pt", "np", "pil")


def make_forward_model(kind: str, signal_size: int, view_size: int, channels: int):
    if kind == "window":
        return WindowView(signal_size, view_size, channels)
    if kind == "crop":
        return CropView(signal_size, view_size, channels)
    raise ValueError(f"forward_kind must be one of {FORWARD_KINDS}, got {kind!r}")


@dataclass
class ForwardModelPipelineOutput(BaseOutput):
    """``signals``: the sampled signals; ``observations``: the sampled target observations, one per target view."""

    signals: torch.Tensor | np.ndarray | list
    observations: list


class ForwardModelPipeline(DiffusionPipeline):
    r"""Sample signals given context observations.

    Example:
        >>> pipe = ForwardModelPipeline.from_pretrained("path/to/dfm_model")
        >>> view = torch.zeros(8, dtype=torch.long)                 # a window at the start, 8 samples
        >>> out = pipe(observation, view, generator=torch.manual_seed(0))
        >>> out.signals.shape                                       # (8, 1, 32)
    """

    model_cpu_offload_seq = "signal_model"

    def __init__(self, signal_model, scheduler: DDIMScheduler, forward_kind: str = "window", signal_size: int = 32,
                 view_size: int = 12, channels: int = 1):
        super().__init__()
        self.forward_model = make_forward_model(forward_kind, signal_size, view_size, channels)
        self.register_modules(signal_model=signal_model, scheduler=scheduler)
        self.register_to_config(forward_kind=forward_kind, signal_size=signal_size, view_size=view_size, channels=channels)

    @torch.no_grad()
    def __call__(
        self,
        observation: torch.Tensor,
        view: torch.Tensor,
        target_views: list[torch.Tensor] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
    ) -> ForwardModelPipelineOutput | tuple:
        r"""Sample one signal per context observation.

        Args:
            observation (`torch.Tensor`): context observations (B, ...) as the forward model makes them.
            view (`torch.Tensor`): their views: start indices (B,) for "window", (top, left) corners (B, 2) for "crop".
            target_views (`list[torch.Tensor]`, *optional*): the views sampled in turn, each observation joining
                the context of the next; by default views covering the whole signal.
            num_inference_steps (`int`, defaults to 50): DDIM steps per target view.
            guidance_scale (`float`, defaults to 1.0): classifier-free guidance on the context (signal space).
            eta (`float`, defaults to 0.0): DDIM's eta.
            generator (`torch.Generator`, *optional*): seeds the noise.
            output_type (`str`, defaults to "pt"): "pt", "np", or "pil" (images in [-1, 1] only).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if output_type == "pil" and self.config.forward_kind != "crop":
            raise ValueError("output_type 'pil' needs image signals (forward_kind 'crop')")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if not torch.is_tensor(observation) or observation.ndim < 2:
            raise ValueError(f"observation must be a batched tensor, got {type(observation).__name__}")
        if not torch.isfinite(observation).all():
            raise ValueError("observation contains NaN or inf")
        batch, device = len(observation), self._execution_device
        expected = self.forward_model(torch.zeros(batch, *self.forward_model.signal_shape), view).shape
        if observation.shape != expected:
            raise ValueError(f"observation has shape {tuple(observation.shape)}; the forward model's views give {tuple(expected)}")
        targets = target_views if target_views is not None else self.forward_model.covering_views(batch)

        schedule = NoiseSchedule.from_config(self.scheduler.config)
        timesteps = make_timesteps(schedule, "ddim", num_inference_steps, self.scheduler.config)
        model = self.signal_model
        with self.progress_bar(total=num_inference_steps * len(targets)) as bar:
            signals, observations = sample_signal(
                model, self.forward_model, schedule, [(observation.to(device, model.dtype), view)], targets,
                timesteps, guidance_scale=guidance_scale, eta=eta, generator=generator, callback=lambda info: bar.update(),
            )
        if output_type != "pt":
            signals = signals.float().cpu().numpy()
            if output_type == "pil":
                signals = self.numpy_to_pil((signals.transpose(0, 2, 3, 1) / 2 + 0.5).clip(0, 1))
        self.maybe_free_model_hooks()
        return ForwardModelPipelineOutput(signals, observations) if return_dict else (signals, observations)
