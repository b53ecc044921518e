"""ModalityBlendPipeline: image completion guided by any combination of modalities (MaGIC, Yu et al., ICLR 2024).

The masked region of an image is filled by the pipeline's diffusion model with diffkit's solvers and guidance,
steered by control images (edges, low resolution, ink mask, ... each with its own T2I-Adapter in
``pipe.adapters`` or its own ControlNet in ``pipe.controlnets``) either by consistent modality blending
(``blend="cmb"``, the paper's method) or by summing the modalities' features (``blend="sum"``: adapter features as
diffusers' MultiAdapter adds them, ControlNet residuals as its MultiControlNetModel does). The known region is kept
RePaint-style, as diffusers' inpainting pipelines do for UNets without mask channels. Pixel models (the default
model, class labels) and latent text UNets (SD 1.x / 2.x with T2I-Adapters, MaGIC's own setting; SDXL) are
supported, ControlNets on the latent text UNets (diffusers' ControlNetModel conditions a UNet2DConditionModel);
SD3 / Flux transformers have no encoder whose features could be blended and are refused.
"""

from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from diffusers import ControlNetModel

from diffkit.blend import MODES, ControlNetModality, Modality, adapter_features, complete, load_adapters, step_rule_for
from diffkit.inverse import VaeDecoder

from .base import GuidedPipelineOutput, check_eta, check_finite, check_output_type, check_solver_options, make_rule
from .guided import GuidedPipeline

ADAPTERS_FOLDER = "adapters"  # beside the diffusers components in a saved pipeline
CONTROLNETS_FOLDER = "controlnets"


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


def _scales(value, names: list[str], argument: str) -> dict:
    """{modality: scale} from one value for all or a dict naming some of ``names``."""
    scales = value if isinstance(value, dict) else {name: value for name in names}
    extra = sorted(set(scales) - set(names))
    if extra:
        raise ValueError(f"{argument} names {extra}, which have no control image")
    for name, scale in scales.items():
        check_finite(f"{argument}[{name!r}]", scale)
    return {name: float(scales.get(name, 1.0)) for name in names}


class ModalityBlendPipeline(GuidedPipeline):
    r"""Fill the masked part of images, guided by any subset of the modalities in ``pipe.adapters`` (T2I-Adapters) or
    ``pipe.controlnets`` (ControlNets, on SD 1.x / 2.x and SDXL UNets).

    Example:
        >>> pipe = ModalityBlendPipeline.from_pipe(diffkit.load_pipeline())
        >>> pipe.adapters = diffkit.blend.load_adapters()        # edges, low_resolution, ink_mask
        >>> controls = {name: diffkit.blend.extract(name, reference) for name in ("edges", "low_resolution")}
        >>> images = pipe(image, mask_image, control_images=controls, generator=torch.manual_seed(0)).images
    """

    @property
    def adapters(self) -> dict:
        """{modality: T2I-Adapter} this pipeline blends; set it, or fill it with ``load_adapters``."""
        return self.__dict__.setdefault("_adapters", {})

    @adapters.setter
    def adapters(self, value: dict) -> None:
        self.__dict__["_adapters"] = dict(value)

    @property
    def controlnets(self) -> dict:
        """{modality: diffusers ControlNetModel} this pipeline blends (MaGIC's ControlNet variant); set it, or fill it
        with ``load_controlnets``."""
        return self.__dict__.setdefault("_controlnets", {})

    @controlnets.setter
    def controlnets(self, value: dict) -> None:
        self.__dict__["_controlnets"] = dict(value)

    def load_adapters(self, folder=None, names=None) -> None:
        """Add the adapters under ``folder`` (default: the ones trained for the default model)."""
        self.adapters.update(load_adapters(folder, names))

    def load_controlnets(self, folder, names=None) -> None:
        """Add the ControlNets under ``folder``, one diffusers folder per modality (``<folder>/<modality>/``)."""
        folder = Path(folder)
        found = sorted(p.parent.name for p in folder.glob("*/config.json"))
        names = found if names is None else list(names)
        missing = sorted(set(names) - set(found))
        if missing:
            raise ValueError(f"no ControlNet for {missing} in {folder}; found {found}")
        for name in names:
            self.controlnets[name] = ControlNetModel.from_pretrained(folder / name, use_safetensors=True).eval()

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """diffusers' save, plus every adapter in ``pipe.adapters`` under ``adapters/<modality>`` and every ControlNet
        under ``controlnets/<modality>`` (safetensors), so ``from_pretrained`` of the folder comes back with them."""
        super().save_pretrained(save_directory, **kwargs)
        for name, adapter in self.adapters.items():
            adapter.save_pretrained(Path(save_directory) / ADAPTERS_FOLDER / name, safe_serialization=True)
        for name, controlnet in self.controlnets.items():
            controlnet.save_pretrained(Path(save_directory) / CONTROLNETS_FOLDER / name, safe_serialization=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' load; a local folder's ``adapters/`` and ``controlnets/`` (written by ``save_pretrained``) fill
        ``pipe.adapters`` and ``pipe.controlnets``."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        folder = Path(pretrained_model_name_or_path)
        if (folder / ADAPTERS_FOLDER).is_dir():
            pipe.load_adapters(folder / ADAPTERS_FOLDER)
        if (folder / CONTROLNETS_FOLDER).is_dir():
            pipe.load_controlnets(folder / CONTROLNETS_FOLDER)
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
        blend_step_rule="line_search",
        blend_cond_tau: float = 1.0,
        blend_layers: list[int] | None = None,
        controlnet_conditioning_scale: float | dict = 1.0,
        class_labels: int | list[int] | None = None,
        num_inference_steps: int = 50,
        solver: str | None = "ddim",
        eta: float = 0.0,
        guidance: str | None = "cfg",
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        *,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        **text_options,
    ) -> GuidedPipelineOutput | tuple:
        r"""Complete ``image`` where ``mask_image`` is 1.

        Args:
            image: the images to complete, (B, 3, H, W) in [-1, 1] or PIL; the masked region is ignored.
            mask_image: 1 where to fill, 0 where to keep; (B or 1, 1, H, W) or PIL (white = fill).
            control_images (`dict`, *optional*): {modality: control image(s)} in [-1, 1] or PIL, one entry per modality
                to use; each modality needs an adapter in ``pipe.adapters`` or a ControlNet in ``pipe.controlnets``
                (one kind per call; a ControlNet gets the image in [0, 1], as diffusers' ControlNet pipelines give
                it). None or {}: plain completion.
            adapter_conditioning_scale (`float` or `dict`): each adapter modality's strength, which scales its
                adapter's features (one value for all, or {modality: value}).
            controlnet_conditioning_scale (`float` or `dict`): each ControlNet modality's scale (diffusers' argument).
            blend (`str`, defaults to "cmb"): "cmb" (consistent modality blending) or "sum" (summed features).
            blend_steps (`int`, *optional*): P, the number of first steps with blending (default 60% of the steps,
                MaGIC's 30 of 50); 0 gives plain completion.
            blend_iterations (`int`, defaults to 5): Q, gradient steps on the latent per blended step (MaGIC's 5).
            blend_step_rule (`str` or rule, defaults to "line_search"): the step on the latent:
                "line_search" (``diffkit.blend.LineSearch``, a backtracking line search on the blending loss, free of
                the schedule's scale) or "official" (``diffkit.blend.OfficialStep``, MaGIC's sigma_t^2 / alpha_t^2,
                uncapped; the cosine schedule's reaches 4e8 at t = 999, so pass ``OfficialStep(max_step_size=10)``
                there), or an instance with other options.
            blend_cond_tau (`float`, defaults to 1.0): the modalities condition the first
                n - int((1 - cond_tau) n) of the n steps only (MaGIC's ``cond_tau``; 1.0, every step, is what its
                released code runs; 0.4, the first 20 of 50, is its sampler's unused keyword default). Applies to the
                branches of "cmb" and to the summed features of "sum".
            blend_layers (`list[int]`, *optional*): which features the blending matches (default all).
            class_labels: condition a class-conditional model on these classes (default: the null class).
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, text_options: a text model's conditioning
                (SD 1.x / 2.x: MaGIC's own setting; SDXL), one prompt per image or one for all; default the empty
                prompt. As in `GuidedPipeline`.
            height, width (`int`, *optional*): the image size (default: the model's own).
            num_inference_steps, solver, eta, guidance, guidance_scale, generator, latents, output_type,
            return_dict, callback_on_step_end: as in GuidedPipeline (``solver=None``: the scheduler's own).

        On a latent model (a VAE) the image is encoded (the posterior mean), the mask is max-pooled to the latent grid
        (a latent pixel is filled if any of its pixels is), the adapters and ControlNets see the control images at
        pixel resolution (``adapter_for(unet, downscale_factor=vae factor)``), and after decoding the known pixels are
        put back, so the known region is kept exactly as on a pixel model.

        After a call, ``pipe.blend_losses`` (P, Q + 1) holds the blending loss before each gradient step and after
        the last, ``pipe.blend_loss_removed`` (P,) the fraction of it each blended step removed,
        ``pipe.blend_residual_losses`` (P,) the part the injected features make and ``pipe.blend_floor_losses`` (P,)
        the loss's minimum over any features (``diffkit.blend.Completion``).
        """
        if self.family not in ("unet", "sd", "sdxl"):
            raise ValueError(f"modality blending injects adapter features into a UNet's encoder; this {self.family} "
                             "model is a transformer, which has no encoder to blend")
        if blend not in MODES:
            raise ValueError(f"blend must be one of {MODES}, got {blend!r}")
        check_solver_options(solver, num_inference_steps, eta)
        check_output_type(output_type)
        check_finite("guidance_scale", guidance_scale)
        step_rule = step_rule_for(blend_step_rule)
        check_finite("blend_cond_tau", blend_cond_tau)
        if not 0 <= blend_cond_tau <= 1:
            raise ValueError(f"blend_cond_tau must be in [0, 1] (the fraction of steps conditioned), got {blend_cond_tau}")
        control_images = dict(control_images or {})
        both = sorted(set(control_images) & set(self.adapters) & set(self.controlnets))
        if both:
            raise ValueError(f"modalities {both} have both an adapter and a ControlNet; keep one in pipe.adapters or "
                             "pipe.controlnets")
        unknown = sorted(set(control_images) - set(self.adapters) - set(self.controlnets))
        if unknown:
            raise ValueError(f"no adapter or ControlNet for modalities {unknown}; pipe.adapters has "
                             f"{sorted(self.adapters)}, pipe.controlnets has {sorted(self.controlnets)}")
        by_adapter = [name for name in control_images if name in self.adapters]
        by_controlnet = [name for name in control_images if name in self.controlnets]
        if by_adapter and by_controlnet:
            raise ValueError(f"control_images mixes adapter modalities {by_adapter} and ControlNet modalities "
                             f"{by_controlnet}; blend one kind per call")
        if by_controlnet and self.family not in ("sd", "sdxl"):
            raise ValueError(f"diffusers' ControlNetModel conditions a UNet2DConditionModel (SD 1.x / 2.x, SDXL); this "
                             f"{self.family} model has none, so ControlNet modalities {by_controlnet} cannot be used")
        scales = _scales(adapter_conditioning_scale, by_adapter, "adapter_conditioning_scale")
        scales.update(_scales(controlnet_conditioning_scale, by_controlnet, "controlnet_conditioning_scale"))
        blend_steps = round(0.6 * num_inference_steps) if blend_steps is None else blend_steps
        if not (isinstance(blend_steps, int) and not isinstance(blend_steps, bool) and 0 <= blend_steps <= num_inference_steps):
            raise ValueError(f"blend_steps must be in [0, {num_inference_steps}] (an integer), got {blend_steps!r}")

        device = self._execution_device
        shape = self.check_size(height, width)
        pixels = _as_batch(image, "image", 3 if self.vae is not None else self.unet.config.in_channels, shape, None, device)
        batch = pixels.shape[0]
        mask = _as_batch(mask_image, "mask_image", 1, shape, batch, device, binary=True)
        modalities = []
        for name, control in control_images.items():
            net = self.adapters[name] if name in self.adapters else self.controlnets[name]
            channels = net.config.in_channels if name in self.adapters else net.config.conditioning_channels
            control = _as_batch(control, f"control_images[{name!r}]", channels, shape, batch, device)
            if name in self.adapters:
                modalities.append(Modality(adapter_features(net.to(device), control), scales[name]))
            else:  # diffusers' ControlNet pipelines give the control image in [0, 1]
                modalities.append(ControlNetModality(net.to(device), (control + 1) / 2, scales[name]))

        rule = make_rule(guidance, guidance_scale)
        cond, uncond = self._blend_condition(class_labels, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                             batch, device, self.uses_guidance(rule, guidance_scale), shape, text_options)
        if self.vae is not None:  # complete in latent space: the encoded image, the mask on the latent grid
            known = VaeDecoder(self.vae).pinv(pixels).float()
            latent_mask = F.adaptive_max_pool2d(mask, known.shape[-2:])
        else:
            known, latent_mask = pixels, mask
        setup = self.solver_setup(solver, num_inference_steps, *shape)
        check_eta(setup, eta)
        noise = setup.grid.init_noise_scale * self.prepare_latents(batch, *shape, generator, latents, device)
        opts = {**setup.options, **({"eta": eta} if setup.solver == "ddim" else {})}
        with self.progress_bar(total=num_inference_steps) as bar:
            result = complete(
                self.denoiser(), setup.fn, noise, setup.grid, known, latent_mask, modalities, mode=blend,
                blend_steps=blend_steps, blend_iterations=blend_iterations, step_rule=step_rule, cond_tau=blend_cond_tau,
                layers=blend_layers, cond=cond, uncond=uncond, guidance=rule, generator=generator,
                callback=self.step_callback(bar, callback_on_step_end, rule, cond, uncond), **opts,
            )
        # diagnostics of the last call (diffkit.blend.Completion)
        self.blend_losses, self.blend_residual_losses = result.blend_losses, result.residual_losses
        self.blend_floor_losses = result.floor_losses
        self.blend_loss_removed = result.loss_removed
        if self.vae is None or output_type == "latent":
            images = self.decode(result.sample, output_type)
        else:  # the decoded fill, with the known pixels as given
            self.decode(result.sample, "latent")  # refuses a non-finite result
            filled = mask * self.vae_decode(result.sample).float() + (1 - mask) * pixels
            images = self.image_processor.postprocess(filled, output_type=output_type)
        self.maybe_free_model_hooks()
        return GuidedPipelineOutput(images=images) if return_dict else (images,)

    def _blend_condition(self, class_labels, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, batch,
                         device, do_guidance, shape, text_options):
        """(cond, uncond) for a batch of images: class labels (default the null class, unconditional) or prompts
        (default the empty prompt), one per image or one for all."""
        if self.num_classes is not None:
            if prompt is not None or prompt_embeds is not None or text_options:
                raise ValueError("this model is class-conditional: pass class_labels, not a prompt")
            labels = self.num_classes if class_labels is None else class_labels
            cond, uncond, n = self.encode_condition(class_labels=labels, device=device, null_class_labels=True,
                                                    do_guidance=do_guidance)
        else:
            if class_labels is not None:
                raise ValueError("this model has no class embeddings; pass a prompt")
            if prompt is None and prompt_embeds is None:
                prompt = ""
            cond, uncond, n = self.encode_condition(prompt=prompt, negative_prompt=negative_prompt,
                                                    prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                                    device=device, do_guidance=do_guidance, height=shape[0], width=shape[1],
                                                    **text_options)
        if n == 1 and batch > 1:
            widen = lambda c: {k: v.expand(batch, *v.shape[1:]) for k, v in c.items()} if c is not None else None  # noqa: E731
            cond, uncond = widen(cond), widen(uncond)
        elif n != batch:
            raise ValueError(f"give one class label or prompt per image ({batch}) or one for all, got {n}")
        return cond, uncond
