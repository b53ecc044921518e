"""The variance-preserving noise schedule: x_t = alpha_t x_0 + sigma_t eps, lambda_t = log(alpha_t / sigma_t).

Built from any diffusers scheduler config. Time is the model's timestep t in [0, N-1], continuous: between
table entries log(alpha) is interpolated linearly, as DPM-Solver's discrete ``NoiseScheduleVP`` does. The
table is extended by t = -1 with alpha_bar = 1, the clean data (DDIM's ``set_alpha_to_one``), so every
sampling run is a walk over a decreasing timestep array that may end at t = -1.
"""

import math

import numpy as np
import torch


CLEAN = -1.0  # the timestep of clean data: alpha = 1, sigma = 0
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")


def _cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021) eq. 17, alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2), as diffusers builds it."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2024), Algorithm 1: shift and scale sqrt(alpha_bar) so the last step has zero SNR."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alphas_bar = sqrt_ab**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


class NoiseSchedule:
    """VP schedule over model timesteps; alpha, sigma and lambda are differentiable float64 functions of t."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if alphas_cumprod.ndim != 1 or len(alphas_cumprod) < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D table of length >= 2, got shape {tuple(alphas_cumprod.shape)}")
        if not torch.all((alphas_cumprod >= 0) & (alphas_cumprod <= 1)):
            raise ValueError("alphas_cumprod must lie in [0, 1]")
        self.alphas_cumprod = alphas_cumprod
        self.num_train_timesteps = len(alphas_cumprod)
        # log alpha on the grid t = -1, 0, ..., N-1; -inf where alpha_bar = 0 (zero terminal SNR).
        self._log_alpha = 0.5 * torch.cat([torch.zeros(1, dtype=torch.float64), alphas_cumprod.log()])

    @classmethod
    def from_config(cls, config, clamp_zero_snr: bool = True) -> "NoiseSchedule":
        """From a diffusers scheduler config (dict or FrozenDict): beta_schedule, beta_start/end, trained_betas,
        rescale_betas_zero_snr. Betas are computed in float32, exactly as diffusers does. With zero terminal SNR
        the last alpha_bar is set to 2^-24 so sigma/alpha stays finite, as diffusers' Euler and DPM-Solver do
        (``clamp_zero_snr=False`` keeps the exact 0, as its DDIM does)."""
        config = dict(config)
        n = int(config.get("num_train_timesteps", 1000))
        start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
        schedule = config.get("beta_schedule", "linear")
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
        elif schedule == "linear":
            betas = torch.linspace(start, end, n, dtype=torch.float32)
        elif schedule == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
        elif schedule == "squaredcos_cap_v2":
            betas = _cosine_betas(n)
        else:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES} or trained_betas given, got {schedule!r}")
        if config.get("rescale_betas_zero_snr", False):
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if clamp_zero_snr and alphas_cumprod[-1] == 0:
            alphas_cumprod[-1] = 2**-24
        return cls(alphas_cumprod)

    # -- continuous-time coefficients ---------------------------------------------------------------

    def log_alpha(self, t: torch.Tensor | float) -> torch.Tensor:
        """log alpha_t, piecewise linear in t over the table extended by t = -1 (clean)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if torch.any(t < CLEAN) or torch.any(t > self.num_train_timesteps - 1):
            raise ValueError(f"timesteps must lie in [-1, {self.num_train_timesteps - 1}], got {t}")
        pos = t + 1.0  # index into the extended table
        lo = pos.floor().clamp(max=self.num_train_timesteps - 1).long()
        frac = pos - lo
        a, b = self._log_alpha[lo], self._log_alpha[(lo + 1).clamp(max=self.num_train_timesteps)]
        # exact at grid points, also where the next entry is -inf (zero terminal SNR)
        return torch.where(frac == 0, a, a + frac * (b - a))

    def alpha(self, t) -> torch.Tensor:
        return self.log_alpha(t).exp()

    def sigma(self, t) -> torch.Tensor:
        return (-torch.expm1(2 * self.log_alpha(t))).clamp(min=0).sqrt()

    def lam(self, t) -> torch.Tensor:
        """Half log-SNR, lambda_t = log(alpha_t / sigma_t): +inf at the clean end."""
        return self.log_alpha(t) - self.sigma(t).log()

    def timestep_at_rho(self, rho: torch.Tensor | float) -> torch.Tensor:
        """The continuous t where sigma_t / alpha_t = rho: the exact inverse of the log-alpha interpolation."""
        rho = torch.as_tensor(rho, dtype=torch.float64)
        log_alpha = -0.5 * torch.log1p(rho**2)  # alpha^2 = 1 / (1 + rho^2)
        table = self._log_alpha  # decreasing over t = -1, 0, ..., N-1
        if torch.any(rho < 0) or torch.any(log_alpha < table[-1]):
            rho_max = (self.sigma(self.num_train_timesteps - 1) / self.alpha(self.num_train_timesteps - 1)).item()
            raise ValueError(f"rho must lie in [0, {rho_max:.4g}] (sigma / alpha of the schedule), got {rho}")
        hi = torch.searchsorted(-table, -log_alpha).clamp(1, len(table) - 1)  # table[hi - 1] >= log_alpha >= table[hi]
        a, b = table[hi - 1], table[hi]
        return (hi - 1) + (log_alpha - a) / (b - a) - 1

    # -- timestep arrays ----------------------------------------------------------------------------

    def timesteps(
        self,
        num_inference_steps: int,
        spacing: str = "leading",
        steps_offset: int = 0,
        end: float = CLEAN,
        grid_includes_end: bool = False,
    ) -> torch.Tensor:
        """Decreasing model timesteps (float64) with ``end`` appended: n + 1 entries, the model runs on the first n.

        ``spacing`` follows Lin et al. (2024) Table 2 as diffusers implements it. DDIM, Euler and Heun space n
        points; DPM-Solver spaces n + 1 points and replaces the lowest by the end (``grid_includes_end=True``).
        """
        n, N = int(num_inference_steps), self.num_train_timesteps
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        m = n + 1 if grid_includes_end else n
        if spacing == "linspace":
            t = np.linspace(0, N - 1, m)[::-1]
            if grid_includes_end:
                t = t.round()
        elif spacing == "leading":
            t = (np.arange(0, m) * (N // m)).round()[::-1] + steps_offset
        else:  # trailing
            t = np.arange(N, 0, -N / n).round() - 1
        t = torch.tensor(t[:n].copy(), dtype=torch.float64)
        return torch.cat([t, torch.tensor([float(end)], dtype=torch.float64)])
