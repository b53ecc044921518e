"""GuidedPipeline: class- or text-conditional sampling with a diffkit solver and a guidance rule.

Class-conditional: a UNet2DModel with ``num_class_embeds = classes + 1``; the last class index is the null
class used for the unconditional pass (the embedded default model). Text-conditional: Stable Diffusion
components (UNet2DConditionModel, CLIP text encoder and tokenizer, optional VAE).
"""

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, SchedulerMixin, UNet2DConditionModel, UNet2DModel
from transformers import CLIPTextModel, CLIPTokenizer
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from diffkit.denoiser import Denoiser
from diffkit.guidance import Guidance, make_guidance
from diffkit.solvers import get_solver, make_timesteps


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class GuidedPipelineOutput(BaseOutput):
    """``images``: a list of PIL images, an (N, H, W, C) array, an (N, C, H, W) tensor or the latents."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class GuidedPipeline(DiffusionPipeline):
    r"""Sampling with diffkit's solvers (``solver=``) and guidance rules (``guidance=``).

    Example:
        >>> import diffkit
        >>> pipe = diffkit.load_pipeline()  # the embedded default: coloured 16x16 digits
        >>> images = pipe(class_labels=[3, 7], guidance_scale=3.0, generator=torch.manual_seed(0)).images
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["text_encoder", "tokenizer", "vae"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        unet: UNet2DModel | UNet2DConditionModel,
        scheduler: SchedulerMixin,
        text_encoder: CLIPTextModel | None = None,
        tokenizer: CLIPTokenizer | None = None,
        vae: AutoencoderKL | None = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def num_classes(self) -> int | None:
        """Number of real classes of a class-conditional UNet (its last class embedding is the null class)."""
        n = getattr(self.unet.config, "num_class_embeds", None)
        return n - 1 if n else None

    # -- conditioning ---------------------------------------------------------------------------

    def _class_conditioning(self, class_labels, num_images_per_prompt, device):
        if self.num_classes is None:
            raise ValueError("this UNet has no class embeddings; pass `prompt` for a text-conditional model")
        labels = torch.as_tensor([class_labels] if isinstance(class_labels, int) else class_labels).flatten().long()
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"class_labels must lie in [0, {self.num_classes - 1}], got {labels.tolist()}")
        labels = labels.repeat_interleave(num_images_per_prompt).to(device)
        return {"class_labels": labels}, {"class_labels": torch.full_like(labels, self.num_classes)}

    def encode_prompt(self, prompt: str | list[str], device) -> torch.Tensor:
        ids = self.tokenizer(
            prompt, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return self.text_encoder(ids.to(device))[0]

    def _text_conditioning(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, n, device):
        if prompt_embeds is None:
            if self.text_encoder is None or self.tokenizer is None:
                raise ValueError("`prompt` needs a text_encoder and a tokenizer in the pipeline")
            prompt = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds = self.encode_prompt(prompt, device)
        if negative_prompt_embeds is None:
            negative_prompt = negative_prompt if negative_prompt is not None else ""
            negative_prompt = [negative_prompt] * len(prompt_embeds) if isinstance(negative_prompt, str) else negative_prompt
            if len(negative_prompt) != len(prompt_embeds):
                raise ValueError(
                    f"negative_prompt has {len(negative_prompt)} entries for {len(prompt_embeds)} prompts; give one per prompt"
                )
            negative_prompt_embeds = self.encode_prompt(negative_prompt, device)
        dtype = self.unet.dtype
        cond = prompt_embeds.to(device, dtype).repeat_interleave(n, dim=0)
        uncond = negative_prompt_embeds.to(device, dtype).repeat_interleave(n, dim=0)
        return {"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond}

    # -- sampling -------------------------------------------------------------------------------

    def check_inputs(self, class_labels, prompt, prompt_embeds, num_inference_steps, output_type, callback_inputs):
        if (class_labels is None) == (prompt is None and prompt_embeds is None):
            raise ValueError("pass exactly one of `class_labels` (class-conditional) or `prompt`/`prompt_embeds` (text)")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        bad = [k for k in callback_inputs or [] if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be among {self._callback_tensor_inputs}, got {bad}")

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        guidance: str | Guidance | None = "cfg",
        guidance_kwargs: dict | None = None,
        guidance_rescale: float = 0.0,
        solver: str = "dpmpp_2m",
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> GuidedPipelineOutput | tuple:
        r"""Generate images.

        Args:
            class_labels (`int` or `list[int]`, *optional*): classes to sample (class-conditional models).
            prompt (`str` or `list[str]`, *optional*): prompts (text-conditional models).
            negative_prompt (`str` or `list[str]`, *optional*, defaults to ""): the unconditional branch's prompt.
            num_images_per_prompt (`int`, defaults to 1): images per label or prompt.
            num_inference_steps (`int`, defaults to 25): solver steps.
            guidance_scale (`float`, defaults to 3.0): w in uncond + w (cond - uncond); 1 disables guidance.
            guidance (`str` or `Guidance`, defaults to "cfg"): a registered rule name or an instance; `None` = none.
            guidance_kwargs (`dict`, *optional*): extra arguments for the named rule, e.g. APG's `eta`,
                `norm_threshold`, `momentum`, or a guidance interval `sigma_range=(lo, hi)` / `step_range`.
            guidance_rescale (`float`, defaults to 0): CFG-rescale's phi (Lin et al. 2024), around any rule.
            solver (`str`, defaults to "dpmpp_2m"): "ddim", "dpmpp_2m", "euler" or "heun".
            eta (`float`, defaults to 0): DDIM's stochasticity (solver "ddim" only).
            generator (`torch.Generator`, *optional*): seeds the initial noise (and DDIM's noise when eta > 0).
            latents (`torch.Tensor`, *optional*): initial noise, shape (B, C, H, W), instead of drawing it.
            output_type (`str`, defaults to "pil"): "pil", "np", "pt" or "latent".
            return_dict (`bool`, defaults to True): a `GuidedPipelineOutput` or a tuple `(images,)`.
            callback_on_step_end (`Callable`, *optional*): `f(pipe, step, timestep, callback_kwargs) -> dict`
                after every step; a returned "latents" replaces the current sample.
        """
        self.check_inputs(class_labels, prompt, prompt_embeds, num_inference_steps, output_type, callback_on_step_end_tensor_inputs)
        spec = get_solver(solver)
        device = self._execution_device
        if class_labels is not None:
            cond, uncond = self._class_conditioning(class_labels, num_images_per_prompt, device)
            batch = len(cond["class_labels"])
        else:
            cond, uncond = self._text_conditioning(
                prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt, device
            )
            batch = len(cond["encoder_hidden_states"])
        rule = make_guidance(guidance, guidance_scale, guidance_rescale, **(guidance_kwargs or {}))
        if rule is None:
            uncond = None

        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        # every downsampling block halves the latent, so both sides must divide evenly all the way down
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

        denoiser = Denoiser.from_pipeline_components(self.unet, self.scheduler)
        timesteps = make_timesteps(denoiser.schedule, solver, num_inference_steps, self.scheduler.config)
        opts = {"eta": eta} if solver == "ddim" else {}

        with self.progress_bar(total=num_inference_steps) as bar:
            latents = spec.fn(
                denoiser, latents.to(device), timesteps, cond=cond, uncond=uncond, guidance=rule,
                generator=generator, callback=self._step_callback(bar, callback_on_step_end), **opts,
            )

        images = self._decode(latents, output_type)
        self.maybe_free_model_hooks()
        return GuidedPipelineOutput(images=images) if return_dict else (images,)

    def _step_callback(self, bar, callback_on_step_end):
        """A solver callback that advances the progress bar and runs diffusers' ``callback_on_step_end``, whose
        returned "latents" replace the sample."""

        def on_step(info):
            bar.update()
            if callback_on_step_end is None:
                return None
            out = callback_on_step_end(self, info["step"], info["t"], {"latents": info["x"]})
            return {"x": out["latents"]} if out and "latents" in out else None

        return on_step

    def _decode(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        images = latents
        if self.vae is not None:
            images = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        images = images.permute(0, 2, 3, 1).cpu().numpy()
        return self.numpy_to_pil(images) if output_type == "pil" else images
