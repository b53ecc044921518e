"""GuidedPipeline: class- or text-conditional sampling with a diffkit solver and a guidance rule.

Class-conditional: a UNet2DModel with ``num_class_embeds = classes + 1``; the last class index is the null
class used for the unconditional pass (the embedded default model). Text-conditional: the components of a
Stable Diffusion 1.x / 2.x, SDXL, SD3 or Flux pipeline (``GuidedPipeline.from_pipe(diffusers_pipe)``, or
``diffkit.load_pipeline(folder_or_repo_id)``), called with that pipeline's arguments.
"""

import torch

from diffkit.guidance import Guidance

from .base import OUTPUT_TYPES, DiffkitPipeline, GuidedPipelineOutput, make_rule


__all__ = ["OUTPUT_TYPES", "GuidedPipeline", "GuidedPipelineOutput"]


class GuidedPipeline(DiffkitPipeline):
    r"""Sampling with diffkit's solvers (``solver=``) and guidance rules (``guidance=``).

    By default it walks its scheduler's own steps (class, timestep spacing, Karras / exponential / beta / flow sigmas,
    shifts), reproduced by ``diffkit.solvers.solver_for``, which refuses a scheduler option it does not reproduce;
    ``solver=`` runs another of diffkit's solvers on the same schedule. With ``guidance="cfg"`` a call gives what the
    source diffusers pipeline gives for the same arguments. How the arguments map for Flux: ``guidance_scale`` is
    diffusers' ``true_cfg_scale`` (CFG over the negative prompt, "" by default; off at the default 1.0) and
    ``embedded_guidance_scale`` is what ``FluxPipeline`` calls ``guidance_scale``: the guidance embedding of a
    guidance-distilled model (default 3.5, as there).

    Example:
        >>> import diffkit
        >>> pipe = diffkit.load_pipeline()  # the embedded default: coloured 16x16 digits
        >>> images = pipe(class_labels=[3, 7], guidance_scale=3.0, generator=torch.manual_seed(0)).images
        >>> sd = GuidedPipeline.from_pipe(StableDiffusionXLPipeline.from_pretrained(...))  # or load_pipeline(folder)
        >>> images = sd("a red fox", guidance="apg", guidance_kwargs={"eta": 0.0}).images
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
        guidance_scale: float | None = None,
        guidance: str | Guidance | None = "cfg",
        guidance_kwargs: dict | None = None,
        guidance_rescale: float = 0.0,
        solver: str | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        *,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        embedded_guidance_scale: float | None = None,
        sigmas: list[float] | None = None,
        clip_skip: int | None = None,
        max_sequence_length: int | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
    ) -> GuidedPipelineOutput | tuple:
        r"""Generate images.

        Args:
            class_labels (`int` or `list[int]`, *optional*): classes to sample (class-conditional models).
            prompt (`str` or `list[str]`, *optional*): prompts (text-conditional models).
            negative_prompt (`str` or `list[str]`, *optional*, defaults to ""): the unconditional branch's prompt
                (SDXL: zero embeddings where its config says ``force_zeros_for_empty_prompt``, as in diffusers).
            num_images_per_prompt (`int`, defaults to 1): images per label or prompt.
            height, width (`int`, *optional*): the image size, multiples of ``pipe.size_multiple`` (default: the
                model's own); non-square sizes work for every family.
            num_inference_steps (`int`, defaults to 25): solver steps.
            guidance_scale (`float`, *optional*): w in uncond + w (cond - uncond); 1 disables guidance. Default: the
                family's diffusers default (7.5 SD, 5.0 SDXL, 7.0 SD3, 1.0 Flux, whose CFG is diffusers'
                ``true_cfg_scale``; 3.0 for pixel models).
            guidance (`str` or `Guidance`, defaults to "cfg"): a registered rule name or an instance; `None` = none.
            guidance_kwargs (`dict`, *optional*): extra arguments for the named rule, e.g. APG's `eta`,
                `norm_threshold`, `momentum`, or a guidance interval `sigma_range=(lo, hi)` / `step_range`.
            guidance_rescale (`float`, defaults to 0): CFG-rescale's phi (Lin et al. 2024), around any rule, on the
                network's own prediction as diffusers' ``guidance_rescale`` (eps, v or the flow velocity).
            solver (`str`, *optional*): None follows the scheduler (its class and sigma options); "ddim", "dpmpp_2m",
                "euler" or "heun" runs that solver on the scheduler's schedule instead.
            eta (`float`, defaults to 0): DDIM's stochasticity (solver "ddim" only).
            generator (`torch.Generator` or a list, one per image, *optional*): seeds the initial noise (and DDIM's
                noise when eta > 0).
            latents (`torch.Tensor`, *optional*): initial noise, (B, C, H / f, W / f), instead of drawing it (Flux: also
                its packed form); scaled by the scheduler's initial noise sigma, as diffusers does.
            prompt_embeds, negative_prompt_embeds (`torch.Tensor`, *optional*): text embeddings instead of prompts
                (the text encoders may then be absent); SDXL, SD3 and Flux also take ``pooled_prompt_embeds`` /
                ``negative_pooled_prompt_embeds``.
            output_type (`str`, defaults to "pil"): "pil", "np", "pt" or "latent" (spatial latents, also for Flux).
            return_dict (`bool`, defaults to True): a `GuidedPipelineOutput` or a tuple `(images,)`.
            callback_on_step_end (`Callable`, *optional*): `f(pipe, step, timestep, callback_kwargs) -> dict`
                after every step; a returned "latents" replaces the current sample; setting `pipe._interrupt = True`
                stops the run there (the sample so far is decoded), as in diffusers.
            prompt_2, prompt_3, negative_prompt_2, negative_prompt_3, clip_skip, max_sequence_length, original_size,
                crops_coords_top_left, target_size: the SDXL / SD3 / Flux pipelines' arguments of the same names.
            embedded_guidance_scale (`float`, *optional*): a guidance-distilled Flux's embedded guidance, FluxPipeline's
                ``guidance_scale`` (default 3.5).
            sigmas (`list[float]`, *optional*): custom flow sigmas (SD3, Flux), as their pipelines take them.
        """
        if hasattr(callback_on_step_end, "tensor_inputs"):  # diffusers' PipelineCallback names what it needs
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        text_options = dict(
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            prompt_2=prompt_2, prompt_3=prompt_3, negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
            embedded_guidance_scale=embedded_guidance_scale, clip_skip=clip_skip, max_sequence_length=max_sequence_length,
            original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size,
        )
        setup = self.check_inputs(
            class_labels, prompt, negative_prompt, num_images_per_prompt, height, width, num_inference_steps,
            guidance_scale, guidance, guidance_kwargs, guidance_rescale, solver, eta, generator, latents, prompt_embeds,
            negative_prompt_embeds, output_type, callback_on_step_end_tensor_inputs, sigmas, **text_options,
        )
        device = self._execution_device
        height, width = self.check_size(height, width)
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        rule = make_rule(guidance, guidance_scale, guidance_rescale, guidance_kwargs)
        text_options = {k: v for k, v in text_options.items() if v is not None}
        cond, uncond, batch = self.encode_condition(
            class_labels, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt, device,
            do_guidance=self.uses_guidance(rule, guidance_scale), height=height, width=width, **text_options)
        latents = setup.grid.init_noise_scale * self.prepare_latents(batch, height, width, generator, latents, device)
        opts = {**setup.options, **({"eta": eta} if setup.solver == "ddim" else {})}
        self._guidance_scale, self._num_timesteps, self._interrupt = guidance_scale, num_inference_steps, False

        with self.progress_bar(total=num_inference_steps) as bar:
            callback = self.step_callback(bar, callback_on_step_end, rule, cond, uncond, callback_on_step_end_tensor_inputs)
            latents = setup.fn(self.denoiser(), latents, setup.grid, cond=cond, uncond=uncond, guidance=rule,
                               generator=generator, callback=callback, **opts)

        images = self.decode(latents, output_type)
        self.maybe_free_model_hooks()
        return GuidedPipelineOutput(images=images) if return_dict else (images,)
