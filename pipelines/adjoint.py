"""AdjointDPMPipeline: sampling whose images are differentiable with respect to the initial noise, the
conditioning and chosen network parameters, by the adjoint ODE (Pan et al., ICLR 2024).

The same components and conditioning as GuidedPipeline (every family: pixel class-conditional, SD 1.x / 2.x,
SDXL, SD3 and Flux, the last two in flow time); ``__call__`` keeps autograd on, and ``optimize`` runs the paper's
use: gradient steps on any of those inputs against a loss on the generated images.
"""

import torch

from diffkit.adjoint import RhoODE, adjoint_timesteps

from .base import (
    GuidedPipelineOutput,
    check_finite,
    check_output_type,
    check_positive_int,
    check_solver_options,
    make_rule,
)
from .guided import GuidedPipeline


class AdjointDPMPipeline(GuidedPipeline):
    r"""Differentiable sampling (DPM-Solver++(2M) or DDIM in rho) with a choice of gradient backend.

    Example:
        >>> pipe = AdjointDPMPipeline.from_pipe(diffkit.load_pipeline())
        >>> x_T = torch.randn(4, 3, 16, 16, requires_grad=True)
        >>> images = pipe(class_labels=[1, 2, 3, 4], latents=x_T, num_inference_steps=25).images
        >>> images.mean().backward()  # x_T.grad via the adjoint ODE, memory independent of the steps
    """

    def __call__(
        self,
        class_labels=None,
        class_embeds: torch.Tensor | None = None,
        prompt=None,
        negative_prompt=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float | None = None,
        guidance="cfg",
        guidance_kwargs: dict | None = None,
        generator=None,
        latents: torch.Tensor | None = None,
        params=(),
        gradient_backend: str = "adjoint",
        solver_order: int = 2,
        output_type: str = "pt",
        return_dict: bool = True,
        *,
        num_images_per_prompt: int = 1,
        guidance_rescale: float = 0.0,
        **text_options,
    ):
        r"""Generate differentiable images.

        Args:
            class_labels / prompt / prompt_embeds: the conditioning, as in `GuidedPipeline`; `prompt_embeds` (and
                SDXL / SD3 / Flux's `pooled_prompt_embeds`, the negative ones too) that require grad receive gradients.
            class_embeds (`torch.Tensor`, *optional*): continuous class embeddings (B, D) replacing the label
                lookup of a class-conditional UNet; they receive gradients when they require grad.
            height, width (`int`, *optional*): the image size (default: the model's own).
            guidance_scale (`float`, *optional*): as in `GuidedPipeline` (default: the family's).
            latents (`torch.Tensor`, *optional*): the initial noise x_T; receives gradients if it requires grad.
            params (iterable of parameters): network parameters to differentiate (e.g. a LoRA or one layer).
            gradient_backend (`str`, defaults to "adjoint"): "adjoint", "torchdiffeq", "checkpoint" or "autograd".
            solver_order (`int`, defaults to 2): 2 for DPM-Solver++(2M) steps in rho and their transposes, 1 for
                DDIM (the paper's Euler in rho).
            output_type (`str`, defaults to "pt"): "pt" and "latent" keep the graph; "np" and "pil" detach.
            num_images_per_prompt, guidance_rescale, text_options (``pooled_prompt_embeds``, ``prompt_2``,
                ``max_sequence_length``, ``embedded_guidance_scale``, ...): as in `GuidedPipeline`.

        The walk is the adjoint's own grid (``diffkit.adjoint.adjoint_timesteps``): n steps evenly spaced in the
        model's timesteps, in flow time for SD3 / Flux with their scheduler's shift at this size.
        """
        self.check_conditioning(class_labels, prompt, prompt_embeds)
        check_solver_options(None, num_inference_steps, 0.0)
        check_positive_int("num_images_per_prompt", num_images_per_prompt)
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        check_finite("guidance_scale", guidance_scale)
        check_output_type(output_type)
        if solver_order not in (1, 2):
            raise ValueError(f"solver_order must be 1 (DDIM) or 2 (DPM-Solver++(2M)), got {solver_order!r}")
        device = self._execution_device
        height, width = self.check_size(height, width)
        rule = make_rule(guidance, guidance_scale, guidance_rescale, guidance_kwargs)
        cond, uncond, batch = self.encode_condition(
            class_labels, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt, device,
            do_guidance=self.uses_guidance(rule, guidance_scale), height=height, width=width, **text_options)
        if class_embeds is not None:
            if class_labels is None:
                raise ValueError("class_embeds replace the label lookup of a class-conditional model: pass class_labels too")
            if class_embeds.ndim != 2 or class_embeds.shape[0] != batch:
                raise ValueError(f"class_embeds must have one row per label ({batch}), got {tuple(class_embeds.shape)}")
            if not torch.isfinite(class_embeds).all():
                raise ValueError("class_embeds contain NaN or inf")
            cond["class_embeds"] = class_embeds
            if uncond is not None:
                uncond["class_embeds"] = self.unet.class_embedding(uncond["class_labels"]).detach()
        latents = self.prepare_latents(batch, height, width, generator, latents, device)

        denoiser = self.denoiser()
        timesteps = adjoint_timesteps(denoiser, num_inference_steps, shift=self.flow_shift(height, width))
        ode = RhoODE(denoiser, timesteps, cond, uncond, rule, order=solver_order)
        x0 = ode.sample(latents, params, gradient_backend)
        images = self.decode(x0, output_type)
        return GuidedPipelineOutput(images=images) if return_dict else (images,)

    def optimize(self, loss_fn, variables, iterations: int = 20, lr: float = 0.05, **call_kwargs) -> list[float]:
        """Adam on ``variables`` (tensors or parameters that appear in ``call_kwargs``: latents, class_embeds,
        prompt_embeds, params) against ``loss_fn(images)``; returns the loss at every iteration."""
        variables = list(variables)
        optimizer = torch.optim.Adam(variables, lr=lr)
        losses = []
        for _ in self.progress_bar(range(iterations)):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(self(**call_kwargs, output_type="pt").images)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses
