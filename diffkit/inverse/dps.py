"""Diffusion posterior sampling (Chung, Kim, Mccann, Klasky & Ye, ICLR 2023).

The solver core's DDIM walk with eta = 1 (over all N timesteps, DDPM's ancestral sampler: Algorithm 1's
x'_{i-1}), followed at every step by a gradient step on the measurement residual of the denoised estimate,
backpropagated through the network:

    x_{i-1} = x'_{i-1} - zeta * grad_{x_i} ||y - A(x0_hat(x_i))||_2      (norm, not squared)

This is the official code's step (``PosteriorSampling``, its ``scale``), i.e. Algorithm 1's
zeta_i grad ||y - A(x0_hat)||^2 with zeta_i = zeta / (2 ||y - A(x0_hat)||). The norm is taken per sample (the
official code takes one norm over the whole batch, which couples the samples' step sizes).
"""

import math

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..solvers import make_timesteps, sample_ddim
from .operators import check_measurement


def initial_noise(operator, y: torch.Tensor, x_T, generator) -> torch.Tensor:
    """The starting sample: ``x_T`` if given, else N(0, I) of the image shape ``operator.input_shape(y.shape)``."""
    if x_T is None:
        if not hasattr(operator, "input_shape"):
            raise ValueError(f"{type(operator).__name__} has no input_shape: pass x_T, the starting noise")
        x_T = randn_tensor(operator.input_shape(y.shape), generator=generator, device=y.device, dtype=y.dtype)
    check_measurement(operator, y, x_T.shape)
    return x_T


def dps(
    denoiser,
    y: torch.Tensor,
    operator,
    *,
    num_inference_steps: int = 1000,
    zeta: float = 1.0,
    eta: float = 1.0,
    x_T: torch.Tensor | None = None,
    generator=None,
    cond: dict | None = None,
    callback=None,
    timesteps=None,
) -> torch.Tensor:
    """DPS (Chung et al. 2023, Algorithm 1) on the solver core's DDIM walk; ``zeta`` is the official ``scale``
    (1.0 by default; the paper's configs use 0.3-1.0). ``callback(info)`` after every guided step, as in the
    solvers ({"step", "t", "x", "x0"}; a returned {"x": ...} replaces the sample). ``timesteps``: the walk (a
    ``StepGrid`` or decreasing array; default DDIM's spacing of ``num_inference_steps`` on the schedule)."""
    if not (isinstance(zeta, (int, float)) and math.isfinite(zeta) and zeta >= 0):
        raise ValueError(f"zeta must be a finite number >= 0, got {zeta!r}")
    x = initial_noise(operator, y, x_T, generator)
    if timesteps is None:  # a pipeline passes its scheduler's own walk (flow models have no DDIM spacing)
        timesteps = make_timesteps(denoiser.schedule, "ddim", num_inference_steps)
    current = [x.detach().requires_grad_(True)]  # x_i, the leaf each step's x0_hat is differentiated against

    def guide(info):
        with torch.enable_grad():
            distance = (y - operator.forward(info["x0"])).flatten(1).norm(dim=1).sum()
            (grad,) = torch.autograd.grad(distance, current[0])
        x = (info["x"] - zeta * grad).detach()
        if callback is not None:
            out = callback({**info, "x": x, "x0": info["x0"].detach()})
            x = out["x"].detach() if isinstance(out, dict) and "x" in out else x
        current[0] = x.requires_grad_(True)
        return {"x": current[0]}

    with torch.enable_grad():
        x0 = sample_ddim(denoiser, current[0], timesteps, cond=cond, generator=generator, callback=guide, eta=eta)
    return x0.detach()
