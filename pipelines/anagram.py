"""AnagramPipeline: visual anagrams, one sample that shows a different class (or prompt) under each view.

Geng et al.'s view averaging (CVPR 2024) with the multi-task additions of Xu et al. (WACV 2025): noise-variance
rectification (``rectify=True``) and noise-vector balancing (``balance=True``; the digits classifier stands in for the
paper's noise-aware CLIP, so class-conditional pixel models only). See ``diffkit.anagram``. The same components as
GuidedPipeline; every diffkit solver and guidance rule.
"""

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from diffkit.anagram import CORRELATIONS, AnagramDenoiser, classifier_alignment
from diffkit.denoiser import Denoiser
from diffkit.guidance import Guidance, make_guidance
from diffkit.solvers import get_solver, make_timesteps
from diffkit.views import View, make_view

from .guided import GuidedPipeline


@dataclass
class AnagramPipelineOutput(BaseOutput):
    """``images``: the samples as generated (the identity frame); ``view_images``: one entry per view, the samples
    as that view shows them. Each in the requested output type."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    view_images: list


class AnagramPipeline(GuidedPipeline):
    r"""Sample visual anagrams with diffkit's solvers and guidance rules.

    Example:
        >>> pipe = AnagramPipeline.from_pipe(diffkit.load_pipeline())
        >>> out = pipe(class_labels=[6, 2], views=["identity", "rot90"], rectify=True, generator=torch.manual_seed(0))
        >>> upright, turned = out.view_images    # a 6, and turned by 90 degrees a 2
    """

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | None = None,
        views: list[str | View] = ("identity", "rot90"),
        prompt: list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 3.0,
        guidance: str | Guidance | None = "cfg",
        guidance_kwargs: dict | None = None,
        guidance_rescale: float = 0.0,
        rectify: bool = False,
        balance: bool = False,
        correlation: str = "cosine",
        solver: str = "dpmpp_2m",
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> AnagramPipelineOutput | tuple:
        r"""Generate anagrams.

        Args:
            class_labels (`list[int]`, *optional*): one class per view (class-conditional models).
            views (`list[str | View]`, defaults to ("identity", "rot90")): the views (``diffkit.views``), one per
                class or prompt: identity, rot90 / rot180 / rot270, hflip / vflip, transpose, negate, jigsaw,
                channels:<permutation>, or a ``View``; a non-orthogonal transform is refused.
            prompt (`list[str]`, *optional*): one prompt per view (text-conditional models).
            negative_prompt (`str` or `list[str]`, *optional*, defaults to ""): the unconditional branch's prompt.
            num_images_per_prompt (`int`, defaults to 1): anagrams to sample.
            num_inference_steps (`int`, defaults to 30): solver steps (the official 30).
            guidance_scale, guidance, guidance_kwargs, guidance_rescale: as in `GuidedPipeline`, applied per view.
            rectify (`bool`, defaults to False): noise-variance rectification (Xu et al.).
            balance (`bool`, defaults to False): noise-vector balancing (Xu et al.) with the digits classifier as the
                alignment score (a stand-in for the noise-aware CLIP).
            correlation (`str`, defaults to "cosine"): NVR's correlation estimate, "cosine" or the official "mean"
                (which leaves the data range on a cosine schedule; see ``diffkit.anagram``).
            solver, eta, generator, latents, output_type, return_dict, callback_on_step_end: as in `GuidedPipeline`.
        """
        self.check_inputs(class_labels, prompt, None, num_inference_steps, output_type, callback_on_step_end_tensor_inputs)
        if not (isinstance(views, (list, tuple)) and len(views) >= 1):
            raise ValueError(f"views must be a non-empty list of views, got {views!r}")
        views = [make_view(v) for v in views]
        given = class_labels if class_labels is not None else prompt
        if isinstance(given, (str, int)) or len(given) != len(views):
            what = "class_labels" if class_labels is not None else "prompt"
            raise ValueError(f"{what} must give one entry per view ({len(views)} views), got {given!r}")
        if correlation not in CORRELATIONS:
            raise ValueError(f"correlation must be one of {CORRELATIONS}, got {correlation!r}")
        if balance and (class_labels is None or self.vae is not None):
            raise ValueError("balance=True scores each view with the digits classifier: it needs class_labels and a "
                             "pixel-space model")
        if not (isinstance(num_images_per_prompt, int) and num_images_per_prompt >= 1):
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        spec = get_solver(solver)
        device, batch = self._execution_device, num_images_per_prompt
        # one condition per view, view-major: view 0's `batch` entries, then view 1's, ...
        if class_labels is not None:
            cond, uncond = self._class_conditioning(list(class_labels), batch, device)
        else:
            cond, uncond = self._text_conditioning(list(prompt), negative_prompt, None, None, batch, device)
        rule = make_guidance(guidance, guidance_scale, guidance_rescale, **(guidance_kwargs or {}))
        if rule is None:
            uncond = None

        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        multiple = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        for name, side in (("height", height), ("width", width)):
            if not (isinstance(side, int) and not isinstance(side, bool) and side > 0 and side % multiple == 0):
                raise ValueError(f"{name} must be a positive multiple of {multiple} for this model, got {side!r}")
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        if not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or inf")

        denoiser = AnagramDenoiser(
            Denoiser.from_pipeline_components(self.unet, self.scheduler), views, rectify=rectify,
            alignment=classifier_alignment() if balance else None, correlation=correlation,
        )
        timesteps = make_timesteps(denoiser.schedule, solver, num_inference_steps, self.scheduler.config)
        opts = {"eta": eta} if solver == "ddim" else {}
        with self.progress_bar(total=num_inference_steps) as bar:
            latents = spec.fn(
                denoiser, latents.to(device), timesteps, cond=cond, uncond=uncond, guidance=rule,
                generator=generator, callback=self._step_callback(bar, callback_on_step_end), **opts,
            )

        images = self._decode(latents, output_type)
        view_images = [self._decode(view.apply(latents), output_type) for view in views]
        self.maybe_free_model_hooks()
        return AnagramPipelineOutput(images=images, view_images=view_images) if return_dict else (images, view_images)
