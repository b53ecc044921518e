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
"""

import math

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..denoiser import convert
from .operators import check_measurement, initial_estimate


WEIGHTINGS = {
    "linear": lambda r: r,
    "sqrt": math.sqrt,
    "square": lambda r: r * r,
    "log": math.log1p,
    "const": lambda r: 1.0,
}


def _positive(name, value):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def red_diff(
    denoiser,
    y: torch.Tensor,
    operator,
    *,
    num_steps: int = 1000,
    lr: float = 0.25,
    lam: float = 0.25,
    weighting: str = "linear",
    obs_weight: float = 1.0,
    generator=None,
    init="pinv",
    cond: dict | None = None,
    decoder=None,
    callback=None,
) -> torch.Tensor:
    """RED-Diff (Mardani et al. 2024, Algorithm 1): Adam on mu over ``num_steps`` descending timesteps.

    ``num_steps`` timesteps spaced as range(0, N, N // num_steps) (diffusers' "leading" spacing), visited from
    the noisiest down; lr 0.25 is the official inpainting setting (0.5 for deblurring, HDR and phase retrieval).
    ``init``: "pinv" (operator.pinv(y), the official start), "zeros", or a tensor. With a ``decoder`` (latent ->
    image, e.g. a VAE decode) mu is a latent, the data term is taken on decoder(mu) and ``init`` must be a latent
    tensor. ``callback(info)`` sees {"step", "t", "mu"} after every Adam step. Returns the image (decoder(mu)).
    """
    schedule = denoiser.schedule
    if not isinstance(num_steps, int) or not 1 <= num_steps <= schedule.num_train_timesteps:
        raise ValueError(f"num_steps must be an integer in [1, {schedule.num_train_timesteps}], got {num_steps!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {sorted(WEIGHTINGS)}, got {weighting!r}")
    for name, value in (("lr", lr), ("lam", lam), ("obs_weight", obs_weight)):
        _positive(name, value)
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

    timesteps = schedule.timesteps(num_steps, "leading")[:-1]  # descending; drop the appended clean end
    mu = mu.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([mu], lr=lr, betas=(0.9, 0.99))
    n_y, n_mu = y[0].numel(), mu[0].numel()
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
            loss_obs = (y - operator.forward(x0)).square().sum() / (2 * n_y)
            loss_prior = ((eps_hat - eps) * mu).sum() / n_mu  # gradient: (eps_hat - eps) / n_mu, network-free
            optimizer.zero_grad()
            (obs_weight * loss_obs + lam_t * loss_prior).backward()
            optimizer.step()
            if callback is not None:
                callback({"step": i, "t": t, "mu": mu.detach()})
    with torch.no_grad():
        return (mu if decoder is None else decoder(mu)).detach()
