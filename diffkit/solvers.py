"""Samplers as plain functions over a decreasing timestep array (k-diffusion style, no hidden state).

``sample_<name>(denoiser, x, timesteps, *, cond=None, uncond=None, guidance=None, generator=None,
callback=None, **opts) -> x0``: x is the VP sample at ``timesteps[0]``; the network runs at every entry but
the last, which is where sampling ends (``schedule.CLEAN`` = -1 for clean data). Nothing here disables
autograd, so gradients flow through a run for AdjointDPM, DPS and modality blending; pipelines wrap
calls in ``torch.no_grad()``.

Each solver reproduces its diffusers scheduler on the same model, noise and config (tests/test_solvers.py).
``callback(info)`` is called after every step with {"step", "t", "x", "x0"}; if it returns a dict with
key "x", that tensor replaces the sample (diffusers' ``callback_on_step_end`` may edit latents).
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor

from .denoiser import Denoiser, StepState
from .schedule import CLEAN, NoiseSchedule


def _half_log_snr(alpha: float, sigma: float) -> float:
    if sigma == 0:
        return math.inf
    return math.log(alpha) - math.log(sigma) if alpha > 0 else -math.inf


class _Walk:
    """Per-run precomputed coefficients for a timestep array, as Python floats (no device syncs in the loop)."""

    def __init__(self, denoiser: Denoiser, x: torch.Tensor, timesteps):
        ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
        if len(ts) < 2:
            raise ValueError("timesteps must hold at least 2 entries: where sampling starts and where it ends")
        # strictly decreasing; the end may repeat the last model timestep (a no-op step, as diffusers' DDIM takes)
        if torch.any(ts[1:-1] >= ts[:-2]) or ts[-1] > ts[-2]:
            raise ValueError(f"timesteps must be decreasing, got {ts.tolist()}")
        schedule = denoiser.schedule
        self.alpha = schedule.alpha(ts).tolist()
        self.sigma = schedule.sigma(ts).tolist()
        self.lam = [_half_log_snr(a, s) for a, s in zip(self.alpha, self.sigma)]
        self.t_model = ts.to(device=x.device, dtype=torch.float32)
        self.n = len(ts) - 1

    def state(self, i: int, x: torch.Tensor) -> StepState:
        return StepState(i, self.n, self.t_model[i], self.alpha[i], self.sigma[i], x)


def _start(guidance, x: torch.Tensor):
    if not torch.is_tensor(x) or x.ndim < 2:
        raise ValueError(f"x must be a batched tensor, got {type(x).__name__} with shape {getattr(x, 'shape', None)}")
    if guidance is not None:
        guidance.reset()


def _after_step(callback, i, walk, x, x0):
    if callback is None:
        return x
    out = callback({"step": i, "t": walk.t_model[i], "x": x, "x0": x0})
    return out["x"] if isinstance(out, dict) and "x" in out else x


def sample_ddim(denoiser, x, timesteps, *, cond=None, uncond=None, guidance=None, generator=None, callback=None, eta=0.0):
    """DDIM (Song et al. 2021, eq. 12): re-noise the x0 estimate along its own eps, plus eta-scaled fresh noise."""
    if not 0.0 <= eta:
        raise ValueError(f"eta must be >= 0, got {eta}")
    _start(guidance, x)
    walk = _Walk(denoiser, x, timesteps)
    for i in range(walk.n):
        state = walk.state(i, x)
        a, s, a_next, s_next = walk.alpha[i], walk.sigma[i], walk.alpha[i + 1], walk.sigma[i + 1]
        x0 = denoiser.guided_x0(state, cond, uncond, guidance)
        eps = (x - a * x0) / s
        # std of the fresh noise, eq. 16: eta * sqrt((1 - a_next^2)/(1 - a^2) * (1 - a^2 / a_next^2))
        std = eta * (s_next / s) * math.sqrt(max(0.0, 1 - (a / a_next) ** 2))
        x = a_next * x0 + math.sqrt(max(0.0, s_next**2 - std**2)) * eps
        if eta > 0:
            x = x + std * randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = _after_step(callback, i, walk, x, x0)
    return x


def sample_dpmpp_2m(
    denoiser, x, timesteps, *, cond=None, uncond=None, guidance=None, generator=None, callback=None, lower_order_final=True
):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), data prediction, midpoint form as diffusers runs it.

    The first step and a step into sigma = 0 are first order; ``lower_order_final`` also makes the last step
    first order when there are fewer than 15 steps (stabilises few-step guided sampling).
    """
    _start(guidance, x)
    walk = _Walk(denoiser, x, timesteps)
    x0_prev = None
    for i in range(walk.n):
        state = walk.state(i, x)
        a_next, s, s_next = walk.alpha[i + 1], walk.sigma[i], walk.sigma[i + 1]
        x0 = denoiser.guided_x0(state, cond, uncond, guidance)
        h = walk.lam[i + 1] - walk.lam[i]
        phi = -math.expm1(-h)  # 1 - e^{-h}
        last = i == walk.n - 1
        first_order = x0_prev is None or (last and (s_next == 0 or (lower_order_final and walk.n < 15)))
        if first_order:
            d = x0
        else:
            r = (walk.lam[i] - walk.lam[i - 1]) / h
            d = x0 + (x0 - x0_prev) / (2 * r)  # D0 + D1/2, with D1 = (D0 - D_prev) / r
        x = (s_next / s) * x + a_next * phi * d
        x0_prev = x0
        x = _after_step(callback, i, walk, x, x0)
    return x


def sample_euler(denoiser, x, timesteps, *, cond=None, uncond=None, guidance=None, generator=None, callback=None):
    """Euler on the probability-flow ODE dx/dsigma = (x - D(x))/sigma in VE coordinates x/alpha
    (Karras et al. 2022, Algorithm 2 without churn)."""
    _start(guidance, x)
    walk = _Walk(denoiser, x, timesteps)
    x_ve = x / walk.alpha[0]
    for i in range(walk.n):
        sig, sig_next = walk.sigma[i] / walk.alpha[i], walk.sigma[i + 1] / walk.alpha[i + 1]
        x0 = denoiser.guided_x0(walk.state(i, x_ve * walk.alpha[i]), cond, uncond, guidance)
        d = (x_ve - x0) / sig
        x_ve = x_ve + d * (sig_next - sig)
        x_ve = _after_step(callback, i, walk, x_ve * walk.alpha[i + 1], x0) / walk.alpha[i + 1]
    return x_ve * walk.alpha[-1]


def sample_heun(denoiser, x, timesteps, *, cond=None, uncond=None, guidance=None, generator=None, callback=None):
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1); the step into
    sigma = 0 is an Euler step. 2n - 1 network evaluations for n steps."""
    _start(guidance, x)
    walk = _Walk(denoiser, x, timesteps)
    x_ve = x / walk.alpha[0]
    for i in range(walk.n):
        sig, sig_next = walk.sigma[i] / walk.alpha[i], walk.sigma[i + 1] / walk.alpha[i + 1]
        x0 = denoiser.guided_x0(walk.state(i, x_ve * walk.alpha[i]), cond, uncond, guidance)
        d = (x_ve - x0) / sig
        x_euler = x_ve + d * (sig_next - sig)
        if sig_next > 0:
            # Correct with the slope at the Euler point (trapezoidal rule).
            x0_next = denoiser.guided_x0(walk.state(i + 1, x_euler * walk.alpha[i + 1]), cond, uncond, guidance)
            d_next = (x_euler - x0_next) / sig_next
            x_ve = x_ve + 0.5 * (d + d_next) * (sig_next - sig)
        else:
            x_ve = x_euler
        x_ve = _after_step(callback, i, walk, x_ve * walk.alpha[i + 1], x0) / walk.alpha[i + 1]
    return x_ve * walk.alpha[-1]


@dataclass(frozen=True)
class Solver:
    fn: Callable
    grid_includes_end: bool  # diffusers' spacing for this scheduler counts the end point (DPM-Solver)


SOLVERS = {
    "ddim": Solver(sample_ddim, False),
    "dpmpp_2m": Solver(sample_dpmpp_2m, True),
    "euler": Solver(sample_euler, False),
    "heun": Solver(sample_heun, False),
}


def get_solver(name: str) -> Solver:
    if name not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {name!r}")
    return SOLVERS[name]


def make_timesteps(schedule: NoiseSchedule, solver: str, num_inference_steps: int, scheduler_config=None) -> torch.Tensor:
    """The timestep array diffusers' counterpart of ``solver`` would walk for this scheduler config:
    its ``timestep_spacing`` and ``steps_offset``, and where it ends (``set_alpha_to_one`` for DDIM,
    ``final_sigmas_type`` for DPM-Solver / Euler)."""
    config = dict(scheduler_config or {})
    spec = get_solver(solver)
    end = CLEAN
    if solver == "ddim" and not config.get("set_alpha_to_one", True):
        end = 0.0
    if solver in ("dpmpp_2m", "euler") and config.get("final_sigmas_type", "zero") == "sigma_min":
        end = 0.0
    spacing = config.get("timestep_spacing", "linspace" if solver != "ddim" else "leading")
    return schedule.timesteps(
        num_inference_steps, spacing, int(config.get("steps_offset", 0)), end, grid_includes_end=spec.grid_includes_end
    )
