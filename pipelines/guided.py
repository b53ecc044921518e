"""GuidedPipeline: class- or text-conditional sampling with a diffkit solver and a guidance rule.

Class-conditional: a UNet2DModel with ``num_class_embeds = classes + 1``; the last class index is the null
class used for the unconditional pass (the embedded default model). Text-conditional: Stable Diffusion
components (UNet2DConditionModel, CLIP text encoder and tokenizer, optional VAE).
"""

import torch

from diffkit.denoiser import Denoiser
from diffkit.guidance import Guidance, make_guidance
from diffkit.solvers import get_solver, make_timesteps

from .base import OUTPUT_TYPES, DiffkitPipeline, GuidedPipelineOutput


__all__ = ["OUTPUT_TYPES", "GuidedPipeline", "GuidedPipelineOutput"]


class GuidedPipeline(DiffkitPipeline):
    r"""Sampling with diffkit's solvers (``solver=``) and guidance rules (``guidance=``).

    Example:
        >>> import diffkit
        >>> pipe = diffkit.load_pipeline()  # the embedded default: coloured 16x16 digits
        >>> images = pipe(class_labels=[3, 7], guidance_scale=3.0, generator=torch.manual_seed(0)).images
    """

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
        self.check_inputs(
            class_labels, prompt, negative_prompt, num_images_per_prompt, height, width, num_inference_steps,
            guidance_scale, guidance, guidance_kwargs, guidance_rescale, solver, eta, generator, latents, prompt_embeds,
            negative_prompt_embeds, output_type, callback_on_step_end_tensor_inputs,
        )
        device = self._execution_device
        height, width = self.check_size(height, width)
        cond, uncond, batch = self.encode_condition(class_labels, prompt, negative_prompt, prompt_embeds,
                                                    negative_prompt_embeds, num_images_per_prompt, device)
        rule = make_guidance(guidance, guidance_scale, guidance_rescale, **(guidance_kwargs or {}))
        if rule is None:
            uncond = None
        latents = self.prepare_latents(batch, height, width, generator, latents, device)

        denoiser = Denoiser.from_pipeline_components(self.unet, self.scheduler)
        timesteps = make_timesteps(denoiser.schedule, solver, num_inference_steps, self.scheduler.config)
        opts = {"eta": eta} if solver == "ddim" else {}
        self._guidance_scale, self._num_timesteps, self._interrupt = guidance_scale, num_inference_steps, False

        with self.progress_bar(total=num_inference_steps) as bar:
            callback = self.step_callback(bar, callback_on_step_end, rule, cond, uncond, callback_on_step_end_tensor_inputs)
            latents = get_solver(solver).fn(
                denoiser, latents, timesteps, cond=cond, uncond=uncond, guidance=rule, generator=generator,
                callback=callback, **opts,
            )

        images = self.decode(latents, output_type)
        self.maybe_free_model_hooks()
        return GuidedPipelineOutput(images=images) if return_dict else (images,)
