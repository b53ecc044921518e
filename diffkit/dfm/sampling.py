"""Sampling signals from a generator trained by ``train_dfm``: DDIM on the target observation, with
forward(generator(...)) as its x0-prediction, returning the generator's signal (the official sampler).

Only the target observation is stochastic: the signal away from the target view comes out as the
generator's conditional mean. Several target views are sampled autoregressively, each sampled observation
joining the context of the next (as the paper's multi-view sampler does), so that views covering the
signal give samples of the whole of it.
"""

import torch

from ..denoiser import Denoiser
from ..schedule import NoiseSchedule
from ..solvers import sample_ddim
from .forward_models import merge_lifted
from .training import generator_inputs


class RenderedX0:
    """The x0-prediction of a target observation, called as a diffusers model: the generator's signal,
    guided on the context (classifier-free, in signal space), rendered at the target view."""

    def __init__(self, model, forward_model, context, target_view, guidance_scale: float = 1.0):
        self.model, self.forward_model, self.context = model, forward_model, context
        self.target_view, self.guidance_scale = target_view, guidance_scale
        self.signal = None  # the latest signal prediction

    def __call__(self, noisy_target: torch.Tensor, t: torch.Tensor, return_dict: bool = False):
        inputs = generator_inputs(self.forward_model, self.context, noisy_target, self.target_view)
        if self.guidance_scale == 1.0:
            signal = self.model(inputs, t, return_dict=False)[0]
        else:
            canvas, mask = self.context
            empty = (torch.zeros_like(canvas), torch.zeros_like(mask))
            unconditional = generator_inputs(self.forward_model, empty, noisy_target, self.target_view)
            cond, uncond = self.model(torch.cat([inputs, unconditional]), t, return_dict=False)[0].chunk(2)
            signal = uncond + self.guidance_scale * (cond - uncond)
        self.signal = signal
        return (self.forward_model(signal, self.target_view),)


def _observation_like(forward_model, batch: int, view: torch.Tensor, like: torch.Tensor) -> torch.Size:
    return forward_model(like.new_zeros(batch, *forward_model.signal_shape), view).shape


def sample_signal(
    model,
    forward_model,
    schedule: NoiseSchedule,
    context: list[tuple[torch.Tensor, torch.Tensor]],
    target_views: list[torch.Tensor],
    timesteps: torch.Tensor,
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback=None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Signals (B, *signal_shape) given context (observation, view) pairs, sampled through ``target_views``
    in turn; also returns the sampled target observations. ``timesteps``: the DDIM walk (see make_timesteps)."""
    if not context or not target_views:
        raise ValueError("need at least one context (observation, view) pair and one target view")
    batch, first = context[0][0].shape[0], context[0][0]
    if not torch.isfinite(first).all():
        raise ValueError("the context observation contains NaN or inf")
    lifted = [forward_model.lift(obs, view) for obs, view in context]
    signal, sampled = None, []
    for view in target_views:
        x0_model = RenderedX0(model, forward_model, merge_lifted(lifted), view, guidance_scale)
        denoiser = Denoiser(x0_model, schedule, prediction_type="sample")
        noise = torch.randn(_observation_like(forward_model, batch, view, first), generator=generator)
        observation = sample_ddim(denoiser, noise.to(first), timesteps, eta=eta, generator=generator, callback=callback)
        signal = x0_model.signal
        sampled.append(observation)
        lifted.append(forward_model.lift(observation, view))
    return signal, sampled


def regress_signal(model, forward_model, schedule: NoiseSchedule, context, target_view: torch.Tensor) -> torch.Tensor:
    """The deterministic regressor's signal (a generator trained with mode="regression"): one call, no target."""
    lifted = merge_lifted([forward_model.lift(obs, view) for obs, view in context])
    first = context[0][0]
    empty = torch.zeros(_observation_like(forward_model, first.shape[0], target_view, first)).to(first)
    inputs = generator_inputs(forward_model, lifted, empty, target_view)
    t = torch.full((first.shape[0],), schedule.num_train_timesteps - 1, device=first.device)
    return model(inputs, t, return_dict=False)[0]
