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

from diffkit.anagram import CORRELATIONS, AnagramDenoiser, classifier_alignment
from diffkit.denoiser import Denoiser
from diffkit.guidance import Guidance, make_guidance
from diffkit.solvers import get_solver, make_timesteps
from diffkit.views import View, check_view, make_view

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
        self.check_inputs(
            class_labels, prompt, negative_prompt, num_images_per_prompt, height, width, num_inference_steps,
            guidance_scale, guidance, guidance_kwargs, guidance_rescale, solver, eta, generator, latents, None, None,
            output_type, callback_on_step_end_tensor_inputs,
        )
        height, width = self.check_size(height, width)
        views = self.check_views(views, class_labels, prompt, balance, correlation, height, width)
        device = self._execution_device
        # one condition per view, view-major: view 0's images, then view 1's, ...
        cond, uncond, _ = self.encode_condition(class_labels, prompt, negative_prompt, None, None, num_images_per_prompt,
                                                device)
        rule = make_guidance(guidance, guidance_scale, guidance_rescale, **(guidance_kwargs or {}))
        if rule is None:
            uncond = None
        latents = self.prepare_latents(num_images_per_prompt, height, width, generator, latents, device)

        denoiser = AnagramDenoiser(
            Denoiser.from_pipeline_components(self.unet, self.scheduler), views, rectify=rectify,
            alignment=classifier_alignment() if balance else None, correlation=correlation,
        )
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
        view_images = [self.decode(view.apply(latents), output_type) for view in views]
        self.maybe_free_model_hooks()
        return AnagramPipelineOutput(images=images, view_images=view_images) if return_dict else (images, view_images)

    def check_views(self, views, class_labels, prompt, balance, correlation, height=None, width=None) -> list[View]:
        """The views as ``View`` objects, one per class label or prompt, each noise-preserving on this model's
        latents of the given size; balancing needs the digits classifier's world (class labels, pixel space)."""
        if not (isinstance(views, (list, tuple)) and len(views) >= 1):
            raise ValueError(f"views must be a non-empty list of views, got {views!r}")
        views = [make_view(v) for v in views]
        given, what = (class_labels, "class_labels") if class_labels is not None else (prompt, "prompt")
        if isinstance(given, (str, int)) or torch.is_tensor(given) and given.ndim == 0 or len(given) != len(views):
            raise ValueError(f"{what} must give one entry per view ({len(views)} views), got {given!r}")
        if correlation not in CORRELATIONS:
            raise ValueError(f"correlation must be one of {CORRELATIONS}, got {correlation!r}")
        if balance and (class_labels is None or self.vae is not None):
            raise ValueError("balance=True scores each view with the digits classifier: it needs class_labels and a "
                             "pixel-space model")
        height, width = self.check_size(height, width)
        for view in views:
            check_view(view, self.latent_shape(1, height, width)[1:])
        return views
