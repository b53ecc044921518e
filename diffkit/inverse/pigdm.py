"""Pseudoinverse-guided diffusion models, PiGDM (Song, Vahdat, Mardani & Kautz, ICLR 2023).

p(x0 | x_t) is taken as N(x0_hat, r_t^2 I), which makes the likelihood score, for a noiseless measurement,

    grad_{x_t} log p(y | x_t) = g / r_t^2,   g = (A^+ y - A^+ A(x0_hat))^T d x0_hat / d x_t

with the paper's r_t^2 = sigma^2 / (1 + sigma^2) in VE units, i.e. s_t^2 / (a_t^2 + s_t^2) at x_t = a_t x0 + s_t eps.
Tweedie's formula turns it into a guided denoised estimate,

    x0_hat <- x0_hat + (s_t^2 / a_t) g / r_t^2 = x0_hat + (a_t^2 + s_t^2) / a_t * g,

and the solver core's DDIM step is taken from that estimate (its eps follows from it), so the conditional
score replaces the unconditional one. For a Gaussian prior of unit variance this is exact and the sampler
draws from the true posterior. (RED-Diff's PiGDM baseline, ``algos/pgdm.py``, instead keeps eps_hat and adds
a_{t-1} a_t g.)
"""

import dataclasses

import torch

from ..solvers import make_timesteps, sample_ddim
from .dps import initial_noise


class _PseudoinverseGuided:
    """A denoiser view whose x0 is PiGDM's guided estimate: what ``sample_ddim`` steps with."""

    def __init__(self, denoiser, operator, target: torch.Tensor, scale: float):
        self.denoiser, self.schedule = denoiser, denoiser.schedule
        self.operator, self.target, self.scale = operator, target, scale

    def guided_x0(self, state, cond, uncond, guidance):
        with torch.enable_grad():
            x = state.x.detach().requires_grad_(True)
            x0 = self.denoiser.guided_x0(dataclasses.replace(state, x=x), cond, uncond, guidance)
            residual = self.target - self.operator.pinv(self.operator.forward(x0.detach()))
            (g,) = torch.autograd.grad(x0, x, residual)
        a, s = state.alpha, state.sigma
        if a == 0:  # pure noise (zero terminal SNR): x0_hat does not depend on x_t, there is nothing to guide
            return x0.detach()
        return (x0 + self.scale * (a * a + s * s) / a * g).detach()


def pigdm(
    denoiser,
    y: torch.Tensor,
    operator,
    *,
    num_inference_steps: int = 100,
    guidance_scale: float = 1.0,
    eta: float = 1.0,
    x_T: torch.Tensor | None = None,
    generator=None,
    cond: dict | None = None,
    callback=None,
    timesteps=None,
) -> torch.Tensor:
    """PiGDM (Song et al. 2023), noiseless form, on the solver core's DDIM(eta) walk: needs ``operator.pinv``, a
    right inverse (A(pinv(y)) = y), and ``forward``; the operator may be nonlinear, and sigma_y is not used.
    ``callback`` and ``timesteps`` as in ``dps``."""
    if not hasattr(operator, "pinv"):
        raise ValueError(f"pigdm needs operator.pinv, a pseudo-inverse; {type(operator).__name__} has none")
    if not (isinstance(guidance_scale, (int, float)) and guidance_scale >= 0):
        raise ValueError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}")
    x = initial_noise(operator, y, x_T, generator)
    guided = _PseudoinverseGuided(denoiser, operator, operator.pinv(y), guidance_scale)
    if timesteps is None:  # a pipeline passes its scheduler's own walk (flow models have no DDIM spacing)
        timesteps = make_timesteps(denoiser.schedule, "ddim", num_inference_steps)
    return sample_ddim(guided, x, timesteps, cond=cond, generator=generator, callback=callback, eta=eta).detach()
