"""Noise2Score (Kim & Ye, "Noise2Score: Tweedie's Approach to Self-Supervised Image Denoising without Clean Images",
NeurIPS 2021; cubeyoung/Noise2Score ``models/networks.py``, ``models/{Gaussian,Gamma}_model.py``).

Self-supervised denoising in two steps, neither of which sees a clean image:

1. learn the score s(y) = d/dy log p(y) of the *noisy* images with the amortised residual DAE loss (AR-DAE,
   Lim et al. 2020): L = E ||sigma_a s(y + sigma_a u) + u||^2, u ~ N(0, I). Its minimiser is the score of y
   smoothed by N(0, sigma_a^2), so sigma_a is annealed linearly from 0.05 to 0.001 (the reference's schedule);
2. denoise with Tweedie's formula for the noise's exponential family, which turns the score of the noisy
   distribution into a posterior estimate of the clean image:
   Gaussian y = x + sigma n:               x_hat = y + sigma^2 s(y)            (= E[x | y], exactly);
   Gamma y = x g, g ~ Gamma(k, rate k):    x_hat = k y / ((k - 1) - y s(y))    (= 1 / E[1 / x | y], exactly).

The supervised comparison (``SupervisedDenoiser``) is the same network trained on clean targets with MSE, read as a
residual x_hat = y + f(y).
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def _tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


class GaussianNoise:
    """Additive white Gaussian noise y = x + sigma n (the paper's sigma = 25 on 0..255 is 25 / 255 on [0, 1])."""

    def __init__(self, sigma: float = 25 / 255):
        self.sigma = _positive("sigma", sigma)

    def sample(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
        return _tensor("x", x) + self.sigma * noise.to(x.device)

    def tweedie(self, y: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """E[x | y] = y + sigma^2 s(y) (Tweedie's formula, Efron 2011; Kim & Ye 2021, Sec. 3)."""
        return _tensor("y", y) + self.sigma**2 * _tensor("score", score)


class GammaNoise:
    """Multiplicative Gamma noise y = x g with g ~ Gamma(shape k, rate k) (mean 1, variance 1 / k); the paper uses
    k = 100."""

    def __init__(self, k: float = 100.0):
        self.k = _positive("k", k)
        if self.k <= 1:
            raise ValueError(f"k must be > 1 (Tweedie's Gamma formula divides by k - 1 - y s(y)), got {k!r}")

    def sample(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        # numpy's Gamma sampler takes a seeded generator; torch's does not
        g = np.random.default_rng(seed).gamma(self.k, 1 / self.k, size=tuple(_tensor("x", x).shape))
        return x * torch.from_numpy(g).to(x.dtype).to(x.device)

    def tweedie(self, y: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """x_hat = k y / ((k - 1) - y s(y)) (Kim & Ye 2021; the reference's ``Gamma_model.py``). Given x, y is Gamma
        with natural parameter -k / x and base measure y^(k-1), so Tweedie gives E[-k / x | y] = s(y) - (k - 1) / y
        exactly; x_hat inverts that, the harmonic posterior mean 1 / E[1 / x | y]."""
        y, score = _tensor("y", y), _tensor("score", score)
        return self.k * y / ((self.k - 1) - y * score)


def ardae_loss(score_model: nn.Module, y: torch.Tensor, sigma_a: float) -> torch.Tensor:
    """AR-DAE loss mean ||sigma_a s(y + sigma_a u) + u||^2 over pixels, u ~ N(0, I) (the reference's
    ``F.mse_loss(std * log_prob, -mu)``). Its minimiser is the score of y + sigma_a u, which tends to the score of y
    as sigma_a -> 0."""
    sigma_a = _positive("sigma_a", sigma_a)
    u = torch.randn_like(_tensor("y", y))
    return F.mse_loss(sigma_a * score_model(y + sigma_a * u), -u)


def annealed_sigma(step: int, total: int, start: float, end: float) -> float:
    """The reference's linear schedule: sigma_a = start (1 - p) + end p with p = min((step + 1) / total, 1)."""
    if not (isinstance(total, int) and total > 0):
        raise ValueError(f"total must be a positive int, got {total!r}")
    if not (isinstance(step, int) and step >= 0):
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    p = min((step + 1) / total, 1.0)
    return start * (1 - p) + end * p


class Noise2Score:
    """Training algorithm: the AR-DAE loss on the noisy batch ``batch["x"]`` only (the clean ``batch["y"]`` is never
    read), sigma_a annealed linearly from ``sigma_start`` to ``sigma_end`` over the whole run; ``estimate`` applies
    the noise's Tweedie formula to the learned score (Kim & Ye 2021, Alg. 1)."""

    def __init__(self, sigma_start: float = 0.05, sigma_end: float = 0.001):
        self.sigma_start, self.sigma_end = _positive("sigma_start", sigma_start), _positive("sigma_end", sigma_end)
        if self.sigma_end > self.sigma_start:
            raise ValueError(f"sigma_end must be <= sigma_start (the schedule anneals down), got "
                             f"sigma_start={sigma_start!r}, sigma_end={sigma_end!r}")

    def __call__(self, state, batch: dict) -> tuple[torch.Tensor, None]:
        total = state.epochs * (state.train_size // state.batch_size)
        sigma_a = annealed_sigma(state.step, total, self.sigma_start, self.sigma_end)
        state.logs["sigma_a"] = sigma_a
        return ardae_loss(state.model, batch["x"], sigma_a), None

    @torch.no_grad()
    def estimate(self, model: nn.Module, y: torch.Tensor, noise) -> torch.Tensor:
        return noise.tweedie(y, model(y))


class SupervisedDenoiser:
    """The supervised reference: the same network as a residual denoiser x_hat = y + f(y), trained with the card's
    criterion (MSE) against the clean batch ``batch["y"]``."""

    def __call__(self, state, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        estimate = batch["x"] + state.model(batch["x"])
        return state.criterion(estimate, batch["y"], batch["index"]), estimate

    @torch.no_grad()
    def estimate(self, model: nn.Module, y: torch.Tensor, noise) -> torch.Tensor:
        return y + model(y)


def mse(estimate: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error with the harness loss signature (the index is unused)."""
    return F.mse_loss(estimate, target)


def image_psnr(estimate: torch.Tensor, reference: torch.Tensor, peak: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, 10 log10(peak^2 / MSE) over each image's pixels, for images in [0, peak]."""
    if not (isinstance(estimate, torch.Tensor) and isinstance(reference, torch.Tensor)
            and estimate.shape == reference.shape and estimate.dim() >= 2):
        raise ValueError(f"estimate and reference must be equal-shape (N, ...) tensors, got "
                         f"{tuple(getattr(estimate, 'shape', ()))} and {tuple(getattr(reference, 'shape', ()))}")
    return 10 * torch.log10(peak**2 / (estimate - reference).square().flatten(1).mean(1))


class ScoreUNet(nn.Module):
    """A two-level U-Net in the style of the Noise2Noise U-Net the reference uses (3x3 convolutions, leaky ReLU 0.1,
    max-pool down, transposed-convolution up, skip concatenations, He initialisation), shrunk for 16x16 images on a
    CPU. Linear output: a score or a residual, unbounded. ``zero_output`` starts the output convolution at zero, so a
    residual denoiser y + f(y) starts as the identity (the usual start of a residual network's last layer)."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, width: int = 32, zero_output: bool = False):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("width", width)):
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.LeakyReLU(0.1),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.LeakyReLU(0.1))

        self.encode = block(in_channels, width)
        self.bottom = nn.Sequential(nn.MaxPool2d(2), block(width, 2 * width),
                                    nn.ConvTranspose2d(2 * width, width, 2, stride=2))
        self.decode = nn.Sequential(block(2 * width + in_channels, width), nn.Conv2d(width, out_channels, 3, padding=1))
        if not isinstance(zero_output, bool):
            raise TypeError(f"zero_output must be a bool, got {type(zero_output).__name__}")
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_output:
            nn.init.zeros_(self.decode[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"x must be (N, C, H, W) with even H and W, got {tuple(x.shape)}")
        features = self.encode(x)
        return self.decode(torch.cat([features, self.bottom(features), x], 1))
