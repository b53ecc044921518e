"""ModalityBlendPipeline: image completion guided by any combination of modalities (MaGIC, Yu et al., ICLR 2024).

The masked region of an image is filled by the pipeline's diffusion model with diffkit's solvers and guidance,
steered by control images (edges, low resolution, ink mask, ... each with its own T2I-Adapter in
``pipe.adapters``) either by consistent modality blending (``blend="cmb"``, the paper's method) or by summing the
adapters' features (``blend="sum"``, what diffusers' MultiAdapter does). Pixel-space models only: the known region
is kept RePaint-style, as diffusers' inpainting pipelines do for UNets without mask channels.
"""

from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel, UNet2DModel
from transformers import CLIPTextModel, CLIPTokenizer

from diffkit.blend import MODES, Modality, adapter_features, complete, load_adapters
from diffkit.denoiser import Denoiser
from diffkit.guidance import make_guidance
from diffkit.solvers import get_solver, make_timesteps

from .base import GuidedPipelineOutput, check_finite, check_output_type, check_solver_options
from .guided import GuidedPipeline

ADAPTERS_FOLDER = "adapters"  # beside the diffusers components in a saved pipeline


def _as_batch(value, name: str, channels: int, shape: tuple[int, int], batch: int | None, device, binary=False) -> torch.Tensor:
    """A (B, C, H, W) tensor from a tensor (images in [-1, 1]; masks in {0, 1}) or PIL image(s)."""
    if isinstance(value, PIL.Image.Image) or (isinstance(value, list) and value and isinstance(value[0], PIL.Image.Image)):
        images = value if isinstance(value, list) else [value]
        mode = "L" if channels == 1 else "RGB"
        arrays = [np.asarray(im.convert(mode), dtype=np.float32) / 255 for im in images]
        value = torch.from_numpy(np.stack(arrays)).reshape(len(arrays), *arrays[0].shape[:2], channels).permute(0, 3, 1, 2)
        value = value.round() if binary else value * 2 - 1
    if not torch.is_tensor(value):
        raise TypeError(f"{name} must be a tensor or PIL image(s), got {type(value).__name__}")
    if value.ndim == 3:
        value = value.unsqueeze(0)
    if value.ndim != 4 or value.shape[1] != channels or tuple(value.shape[-2:]) != shape:
        raise ValueError(f"{name} must have shape (B, {channels}, {shape[0]}, {shape[1]}), got {tuple(value.shape)}")
    if batch is not None and value.shape[0] not in (1, batch):
        raise ValueError(f"{name} holds {value.shape[0]} images for a batch of {batch}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or inf")
    if not binary and (value.min() < -1 - 1e-3 or value.max() > 1 + 1e-3):
        raise ValueError(f"{name} must hold values in [-1, 1] (images), got [{value.min():.3g}, {value.max():.3g}]")
    if binary and not torch.all((value == 0) | (value == 1)):
        raise ValueError(f"{name} must hold only 0 (keep) and 1 (fill)")
    value = value.float().to(device)
    return value.expand(batch, -1, -1, -1) if batch is not None else value


class ModalityBlendPipeline(GuidedPipeline):
    r"""Fill the masked part of images, guided by any subset of the modalities in ``pipe.adapters``.

    Example:
        >>> pipe = ModalityBlendPipeline.from_pipe(diffkit.load_pipeline())
        >>> pipe.adapters = diffkit.blend.load_adapters()        # edges, low_resolution, ink_mask
        >>> controls = {name: diffkit.blend.extract(name, reference) for name in ("edges", "low_resolution")}
        >>> images = pipe(image, mask_image, control_images=controls, generator=torch.manual_seed(0)).images
    """

    def __init__(
        self,
        unet: UNet2DModel | UNet2DConditionModel,
        scheduler: SchedulerMixin,
        text_encoder: CLIPTextModel | None = None,
        tokenizer: CLIPTokenizer | None = None,
        vae: AutoencoderKL | None = None,
    ):
        super().__init__(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae)
        self.adapters = {}

    def load_adapters(self, folder=None, names=None) -> None:
        """Add the adapters under ``folder`` (default: the ones trained for the default model)."""
        self.adapters.update(load_adapters(folder, names))

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """diffusers' save, plus every adapter in ``pipe.adapters`` under ``adapters/<modality>`` (safetensors), so
        ``from_pretrained`` of the folder comes back with them."""
        super().save_pretrained(save_directory, **kwargs)
        for name, adapter in self.adapters.items():
            adapter.save_pretrained(Path(save_directory) / ADAPTERS_FOLDER / name, safe_serialization=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' load; a local folder's ``adapters/`` (written by ``save_pretrained``) fills ``pipe.adapters``."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        folder = Path(pretrained_model_name_or_path) / ADAPTERS_FOLDER
        if folder.is_dir():
            pipe.load_adapters(folder)
        return pipe

    @torch.no_grad()
    def __call__(
        self,
        image,
        mask_image,
        control_images: dict | None = None,
        adapter_conditioning_scale: float | dict = 1.0,
        blend: str = "cmb",
        blend_steps: int | None = None,
        blend_iterations: int = 5,
        blend_step_scale: float = 1.0,
        blend_max_step_size: float | None = 10.0,
        blend_layers: list[int] | None = None,
        class_labels: int | list[int] | None = None,
        num_inference_steps: int = 50,
        solver: str = "ddim",
        eta: float = 0.0,
        guidance: str | None = None,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
    ) -> GuidedPipelineOutput | tuple:
        r"""Complete ``image`` where ``mask_image`` is 1.

        Args:
            image: the images to complete, (B, 3, H, W) in [-1, 1] or PIL; the masked region is ignored.
            mask_image: 1 where to fill, 0 where to keep; (B or 1, 1, H, W) or PIL (white = fill).
            control_images (`dict`, *optional*): {modality: control image(s)}, one entry per modality to use; each
                modality needs an adapter in ``pipe.adapters``. None or {}: plain completion.
            adapter_conditioning_scale (`float` or `dict`): each modality's strength, which scales its adapter's
                features (one value for all, or {modality: value}).
            blend (`str`, defaults to "cmb"): "cmb" (consistent modality blending) or "sum" (summed features).
            blend_steps (`int`, *optional*): P, the number of first steps with blending (default 60% of the steps,
                MaGIC's 30 of 50); 0 gives plain completion.
            blend_iterations (`int`, defaults to 5): Q, gradient steps on the latent per blended step.
            blend_step_scale (`float`, defaults to 1.0): multiplies the step size sigma_t^2 / alpha_t^2.
            blend_max_step_size (`float`, *optional*, defaults to 10): caps the step size; the cosine schedule's
                sigma_t^2 / alpha_t^2 reaches 4e8 at t = 999 where Stable Diffusion's stays below 220. None: no cap.
            blend_layers (`list[int]`, *optional*): which encoder features the blending matches (default all).
            class_labels: condition a class-conditional model on these classes (default: the null class).
            num_inference_steps, solver, eta, guidance, guidance_scale, generator, latents, output_type,
            return_dict, callback_on_step_end: as in GuidedPipeline.
        """
        if self.vae is not None:
            raise ValueError("ModalityBlendPipeline needs a pixel-space UNet; latent models need an inpainting UNet")
        if blend not in MODES:
            raise ValueError(f"blend must be one of {MODES}, got {blend!r}")
        check_solver_options(solver, num_inference_steps, eta)
        check_output_type(output_type)
        check_finite("guidance_scale", guidance_scale)
        control_images = dict(control_images or {})
        unknown = sorted(set(control_images) - set(self.adapters))
        if unknown:
            raise ValueError(f"no adapter for modalities {unknown}; pipe.adapters has {sorted(self.adapters)}")
        scales = adapter_conditioning_scale if isinstance(adapter_conditioning_scale, dict) else {
            name: adapter_conditioning_scale for name in control_images}
        extra = sorted(set(scales) - set(control_images))
        if extra:
            raise ValueError(f"adapter_conditioning_scale names {extra}, which have no control image")
        for name, scale in scales.items():
            check_finite(f"adapter_conditioning_scale[{name!r}]", scale)
        blend_steps = round(0.6 * num_inference_steps) if blend_steps is None else blend_steps
        if not (isinstance(blend_steps, int) and not isinstance(blend_steps, bool) and 0 <= blend_steps <= num_inference_steps):
            raise ValueError(f"blend_steps must be in [0, {num_inference_steps}] (an integer), got {blend_steps!r}")

        device = self._execution_device
        shape = self.default_size()
        channels = self.unet.config.in_channels
        known = _as_batch(image, "image", channels, shape, None, device)
        batch = known.shape[0]
        mask = _as_batch(mask_image, "mask_image", 1, shape, batch, device, binary=True)
        modalities = []
        for name, control in control_images.items():
            control = _as_batch(control, f"control_images[{name!r}]", self.adapters[name].config.in_channels, shape, batch, device)
            feats = adapter_features(self.adapters[name].to(device), control)
            modalities.append(Modality(feats, float(scales.get(name, 1.0))))

        if self.num_classes is None:
            raise ValueError("ModalityBlendPipeline supports class-conditional UNets (such as the default model)")
        labels = self.num_classes if class_labels is None else class_labels  # default: the null class, unconditional
        cond, uncond, n = self.encode_condition(class_labels=labels, device=device, null_class_labels=True)
        if n == 1 and batch > 1:
            cond, uncond = ({"class_labels": c["class_labels"].expand(batch)} for c in (cond, uncond))
        elif n != batch:
            raise ValueError(f"class_labels must give one label per image ({batch}), got {class_labels}")
        rule = make_guidance(guidance, guidance_scale)
        if rule is None:
            uncond = None
        latents = self.prepare_latents(batch, *shape, generator, latents, device)

        denoiser = Denoiser.from_pipeline_components(self.unet, self.scheduler)
        timesteps = make_timesteps(denoiser.schedule, solver, num_inference_steps, self.scheduler.config)
        opts = {"eta": eta} if solver == "ddim" else {}
        with self.progress_bar(total=num_inference_steps) as bar:
            result = complete(
                denoiser, get_solver(solver).fn, latents, timesteps, known, mask, modalities, mode=blend,
                blend_steps=blend_steps, blend_iterations=blend_iterations, step_scale=blend_step_scale,
                max_step_size=blend_max_step_size, layers=blend_layers, cond=cond, uncond=uncond, guidance=rule,
                generator=generator, callback=self.step_callback(bar, callback_on_step_end, rule, cond, uncond), **opts,
            )
        self.blend_losses = result.blend_losses  # (P, Q) diagnostics of the last call
        images = self.decode(result.sample, output_type)
        self.maybe_free_model_hooks()
        return GuidedPipelineOutput(images=images) if return_dict else (images,)
