"""RED-Diff (Mardani, Song, Kautz & Vahdat, ICLR 2024): a variational MAP estimate under a diffusion prior.

mu is fitted by Adam to a data term plus the diffusion model's denoising residual, visiting the timesteps once
from noisy to clean (``algos/reddiff.py`` of NVlabs/RED-diff). Per step, with fresh eps and
x_t = alpha_t mu + sigma_t eps, the loss (the paper's, with its stop-gradient score term) is

    obs_weight * mean((y - A(mu))^2) / 2  +  lambda_t * mean(sg[eps_hat(x_t) - eps] * mu),
    lambda_t = lam * w(sigma_t / alpha_t),  w = linear | sqrt | square | log (log1p) | const,

so its gradient needs no backpropagation through the network. Both terms are means per sample over that
sample's own entries (y's for the data term, mu's for the prior term), exactly as the official code at batch
size one: obs_weight and lam keep their published meaning, there is no 1/sigma_y^2, and the batch size does
not change any sample's step (Adam makes the overall scale irrelevant).

Defaults are the official benchmark run's (``sample_batch.sh``, the script behind the paper's batch results):
1,000 steps, lam 1.0 (its ``GRAD_WEIGHT``; ``_configs/algo/reddiff.yaml`` itself says 0.25), lr 0.1 (the yaml's
``lr``, which that script does not override), linear weighting, obs_weight 1. The official 10-step smoke test
``sample_test.sh`` uses lr 0.25 (noisy inpainting); its commented-out lines for deblurring, HDR, JPEG and phase
retrieval use lr 0.5 with lam 0.25.

**The same lam on any schedule.** The prior's weight at a step is lam * w(sigma_t / alpha_t), so what lam means
depends on which noise levels rho = sigma / alpha the steps visit. The paper's ADM model uses the linear-beta
schedule (1e-4 to 0.02 over 1,000 steps): over 250 steps its rho values sum to 4,395, a cosine schedule's at the
same timesteps to 989. ``noise_levels="adm"`` (the default) visits the rho values of the official timesteps
range(0, 1000, 1000 // num_steps) on that ADM schedule, each at this model's timestep of the same rho (a
continuous t; exact integers on an ADM-scheduled model, where both choices coincide), so every step sees the
noise level and the weight it has in the paper, whatever the model's schedule. Levels outside the model's
range of rho are taken at its first or last timestep (and weighted by the model's rho there). ``noise_levels="model"`` visits this model's own timesteps
range(0, N, N // num_steps) as the official code visits its schedule.

**Stopping at the noise level** (optional, off by default). RED-Diff starts from pinv(y), which fits the
measurement exactly, noise included; the prior pulls the residual ||y - A(mu)|| up, and as the prior's weight
falls toward t = 0 the data term pulls it back down, into the noise when y is noisy. With ``sigma_y`` given,
each sample stops (Morozov's discrepancy principle) the first time its RMS residual over the measured entries
comes back down to ``discrepancy * sigma_y`` after having been above it; stopped samples keep that mu.
"""

import math

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..denoiser import convert
from ..schedule import NoiseSchedule
from .operators import check_measurement, initial_estimate


WEIGHTINGS = {
    "linear": lambda r: r,
    "sqrt": math.sqrt,
    "square": lambda r: r * r,
    "log": math.log1p,
    "const": lambda r: 1.0,
}
NOISE_LEVELS = ("adm", "model")
# The paper's prior (ADM, guided-diffusion): the linear beta schedule, 1e-4 to 0.02 over 1,000 steps.
ADM_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


def _positive(name, value):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def red_diff_timesteps(schedule: NoiseSchedule, num_steps: int, noise_levels: str = "adm") -> torch.Tensor:
    """The timesteps RED-Diff visits on ``schedule``, noisiest first (float64, ``num_steps`` entries).

    "model": range(0, N, N // num_steps) of the schedule's own N timesteps (the official code's ``get_timesteps``
    on its own schedule). "adm": the timesteps of this schedule where sigma / alpha equals the ADM linear-beta
    schedule's at range(0, 1000, 1000 // num_steps), clamped to this schedule's timesteps [0, N - 1].
    """
    if noise_levels not in NOISE_LEVELS:
        raise ValueError(f"noise_levels must be one of {NOISE_LEVELS}, got {noise_levels!r}")
    n = schedule.num_train_timesteps if noise_levels == "model" else ADM_SCHEDULE["num_train_timesteps"]
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or not 1 <= num_steps <= n:
        raise ValueError(f"num_steps must be an integer in [1, {n}], got {num_steps!r}")
    grid = torch.arange(0, n, n // num_steps, dtype=torch.float64).flip(0)
    if noise_levels == "model":
        return grid
    adm = NoiseSchedule.from_config(ADM_SCHEDULE)
    rho = adm.sigma(grid) / adm.alpha(grid)
    last = schedule.num_train_timesteps - 1
    rho_max = (schedule.sigma(last) / schedule.alpha(last)).item()
    t = schedule.timestep_at_rho(rho.clamp(max=rho_max)).clamp(0, last)  # outside the model's range: its ends
    # on a schedule that shares ADM's table the inverse lands on the integers up to rounding: keep them exact
    return torch.where((t - t.round()).abs() < 1e-6, t.round(), t).abs()


def red_diff(
    denoiser,
    y: torch.Tensor,
    operator,
    *,
    num_steps: int = 1000,
    lr: float = 0.1,
    lam: float = 1.0,
    weighting: str = "linear",
    noise_levels: str = "adm",
    obs_weight: float = 1.0,
    sigma_y: float | None = None,
    discrepancy: float = 1.0,
    generator=None,
    init="pinv",
    cond: dict | None = None,
    decoder=None,
    callback=None,
) -> torch.Tensor:
    """RED-Diff (Mardani et al. 2024, Algorithm 1): Adam(betas 0.9, 0.99) on mu over ``num_steps`` descending
    timesteps. Defaults: the official benchmark run (module docstring).

    ``noise_levels``: "adm" (the paper's noise levels on any schedule, so ``lam`` means what it means in the
    paper) or "model" (the model's own timesteps); see ``red_diff_timesteps``. ``sigma_y``: the measurement
    noise std; when given, each sample stops once its RMS residual sqrt(mean((y - A(mu))^2)) over the measured
    entries falls back to ``discrepancy * sigma_y`` (entries where y and A(mu) are both exactly 0, e.g.
    Inpainting's missing pixels, are not measured). ``init``: "pinv" (operator.pinv(y), the official start),
    "zeros", or a tensor. With a ``decoder`` (latent -> image, e.g. a VAE decode) mu is a latent, the data term
    is taken on decoder(mu) and ``init`` must be a latent tensor. ``callback(info)`` sees {"step", "t", "mu",
    "residual" (per-sample RMS before the step), "stopped" (per-sample bool)} after every Adam step. Returns the
    image (decoder(mu)).
    """
    schedule = denoiser.schedule
    timesteps = red_diff_timesteps(schedule, num_steps, noise_levels)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {sorted(WEIGHTINGS)}, got {weighting!r}")
    for name, value in (("lr", lr), ("lam", lam), ("obs_weight", obs_weight), ("discrepancy", discrepancy)):
        _positive(name, value)
    if sigma_y is not None:
        _positive("sigma_y", sigma_y)
    if not torch.is_tensor(y) or y.ndim < 2:
        raise ValueError(f"y must be a batched tensor, got {type(y).__name__} of shape {getattr(y, 'shape', None)}")
    if torch.is_tensor(init):
        mu = init
    elif decoder is not None:
        raise ValueError("with a decoder, init must be a latent tensor (e.g. the encoded pinv(y), or zeros)")
    elif init == "pinv":
        mu = initial_estimate(operator, y)
    elif init == "zeros":
        mu = torch.zeros_like(initial_estimate(operator, y))
    else:
        raise ValueError(f"init must be 'pinv', 'zeros' or a tensor, got {init!r}")
    if len(mu) != len(y):
        raise ValueError(f"init has batch size {len(mu)}, but y has {len(y)}")
    with torch.no_grad():
        image_shape = mu.shape if decoder is None else decoder(mu).shape
    check_measurement(operator, y, image_shape)

    mu = mu.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([mu], lr=lr, betas=(0.9, 0.99))
    n_y, n_mu = y[0].numel(), mu[0].numel()
    armed = torch.zeros(len(y), dtype=torch.bool, device=y.device)  # residual has been above the noise level
    stopped = torch.zeros_like(armed)
    with torch.enable_grad():
        for i, t in enumerate(timesteps.tolist()):
            alpha, sigma = schedule.alpha(t).item(), schedule.sigma(t).item()
            eps = randn_tensor(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            x_t = schedule.add_noise(mu.detach(), eps, t)
            with torch.no_grad():
                out = denoiser(x_t, torch.tensor(t, device=mu.device), cond)
                eps_hat = convert(out, denoiser.prediction_type, "epsilon", x_t, alpha, sigma)
            lam_t = lam * WEIGHTINGS[weighting](sigma / alpha)
            x0 = mu if decoder is None else decoder(mu)
            error = y - operator.forward(x0)
            loss_obs = error.square().sum() / (2 * n_y)
            loss_prior = ((eps_hat - eps) * mu).sum() / n_mu  # gradient: (eps_hat - eps) / n_mu, network-free
            with torch.no_grad():
                residual = _rms_over_measured(error, y)
            if sigma_y is not None:
                level = discrepancy * sigma_y
                stopped |= armed & (residual <= level)
                armed |= residual > level
                if stopped.all():
                    break
            keep = mu.detach().clone() if stopped.any() else None
            optimizer.zero_grad()
            (obs_weight * loss_obs + lam_t * loss_prior).backward()
            optimizer.step()
            if keep is not None:
                with torch.no_grad():
                    mu[stopped] = keep[stopped]
            if callback is not None:
                callback({"step": i, "t": t, "mu": mu.detach(), "residual": residual, "stopped": stopped.clone()})
    with torch.no_grad():
        return (mu if decoder is None else decoder(mu)).detach()


def _rms_over_measured(error: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample sqrt(mean(error^2)) over the entries that measure something: an entry where y and the
    residual are both exactly 0 (A(mu) = 0 = y, e.g. a missing pixel) is not counted."""
    measured = ((y != 0) | (error != 0)).flatten(1)
    return (error.detach().square().flatten(1).sum(1) / measured.sum(1).clamp(min=1)).sqrt()
