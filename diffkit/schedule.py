"""Gaussian paths x_t = alpha_t x_0 + sigma_t eps, and the step grids diffusers' schedulers walk on them.

Two paths, each over the model's own timestep t:

- ``"vp"`` (variance preserving, alpha^2 + sigma^2 = 1) from a diffusers beta table. t is continuous in
  [-1, N-1]: between table entries log(alpha) is interpolated linearly, as DPM-Solver's discrete
  ``NoiseScheduleVP`` does, and t = -1 (``CLEAN``) is clean data (alpha_bar = 1, DDIM's ``set_alpha_to_one``).
- ``"flow"`` (flow matching / rectified flow, alpha = 1 - sigma): t = N sigma in [0, N], the timestep diffusers'
  FlowMatch schedulers hand the model; t = 0 is clean data.

A sampling run walks a ``StepGrid``: per entry the model's timestep input and the path coefficients there. The
grid is built once, the way the diffusers scheduler builds its ``timesteps`` and ``sigmas`` (``*_grid`` below:
timestep spacings, Karras / exponential / beta / Lu sigmas mapped to model timesteps by diffusers' own
interpolation, flow shift and resolution-dependent dynamic shifting), because with those options the model's
timestep and the noise level are no longer one function of each other. Solvers, the adjoint and modality
blending all read the grid; none recomputes schedule maths.
"""

import math

import numpy as np
import torch


CLEAN = -1.0  # the VP timestep of clean data: alpha = 1, sigma = 0
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
PATHS = ("vp", "flow")


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


def is_flow_config(config) -> bool:
    """Whether a diffusers scheduler config describes a flow-matching model: a FlowMatch scheduler (by its
    "_class_name", or by its ``shift`` without a beta schedule), or DPM-Solver with ``use_flow_sigmas``."""
    config = dict(config)
    name = config.get("_class_name") or ""
    return (
        name.startswith("FlowMatch")
        or bool(config.get("use_flow_sigmas", False))
        or ("shift" in config and "beta_schedule" not in config and "trained_betas" not in config)
    )


class NoiseSchedule:
    """A Gaussian path over model timesteps; alpha, sigma and lambda are differentiable float64 functions of t.

    ``NoiseSchedule(alphas_cumprod)`` is the VP path of a beta table; ``NoiseSchedule.flow_matching(N)`` the flow
    path; ``NoiseSchedule.from_config(config)`` picks the one a diffusers scheduler config describes.
    """

    def __init__(self, alphas_cumprod: torch.Tensor | None = None, *, path: str = "vp", num_train_timesteps: int | None = None):
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        self.path = path
        if path == "flow":
            if alphas_cumprod is not None:
                raise ValueError("a flow-matching path has no alphas_cumprod table (alpha = 1 - t / N)")
            n = 1000 if num_train_timesteps is None else num_train_timesteps
            if not (isinstance(n, int) and n >= 1):
                raise ValueError(f"num_train_timesteps must be an integer >= 1, got {num_train_timesteps!r}")
            self.alphas_cumprod, self.num_train_timesteps = None, n
            self.t_clean, self.t_max = 0.0, float(n)
            return
        if alphas_cumprod is None:
            raise ValueError("a VP schedule needs alphas_cumprod")
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if alphas_cumprod.ndim != 1 or len(alphas_cumprod) < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D table of length >= 2, got shape {tuple(alphas_cumprod.shape)}")
        if not torch.all((alphas_cumprod >= 0) & (alphas_cumprod <= 1)):
            raise ValueError("alphas_cumprod must lie in [0, 1]")
        if num_train_timesteps is not None and num_train_timesteps != len(alphas_cumprod):
            raise ValueError(f"num_train_timesteps={num_train_timesteps} disagrees with the table's {len(alphas_cumprod)} entries")
        self.alphas_cumprod = alphas_cumprod
        self.num_train_timesteps = len(alphas_cumprod)
        self.t_clean, self.t_max = CLEAN, float(self.num_train_timesteps - 1)
        # log alpha on the grid t = -1, 0, ..., N-1; -inf where alpha_bar = 0 (zero terminal SNR).
        self._log_alpha = 0.5 * torch.cat([torch.zeros(1, dtype=torch.float64), alphas_cumprod.log()])

    @classmethod
    def flow_matching(cls, num_train_timesteps: int = 1000) -> "NoiseSchedule":
        """The flow-matching path x_t = (1 - s) x_0 + s eps with s = t / N (SD3, Flux, diffusers' FlowMatch)."""
        return cls(path="flow", num_train_timesteps=num_train_timesteps)

    @classmethod
    def from_config(cls, config, clamp_zero_snr: bool = True) -> "NoiseSchedule":
        """From a diffusers scheduler config (dict or FrozenDict). A flow-matching config (``is_flow_config``)
        gives the flow path. Otherwise the VP path of beta_schedule, beta_start/end, trained_betas and
        rescale_betas_zero_snr: betas are computed in float32, exactly as diffusers does. With zero terminal SNR the
        last alpha_bar is set to 2^-24 so sigma/alpha stays finite, as diffusers' Euler and DPM-Solver do
        (``clamp_zero_snr=False`` keeps the exact 0, as its DDIM does)."""
        config = dict(config)
        n = int(config.get("num_train_timesteps", 1000))
        if is_flow_config(config):
            return cls.flow_matching(n)
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

    def __repr__(self) -> str:
        return f"NoiseSchedule(path={self.path!r}, num_train_timesteps={self.num_train_timesteps})"

    # -- continuous-time coefficients ---------------------------------------------------------------

    def _check_t(self, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        if torch.any(t < self.t_clean) or torch.any(t > self.t_max) or torch.any(torch.isnan(t)):
            raise ValueError(f"timesteps must lie in [{self.t_clean:g}, {self.t_max:g}], got {t}")
        return t

    def log_alpha(self, t: torch.Tensor | float) -> torch.Tensor:
        """log alpha_t: VP piecewise linear in t over the table extended by t = -1 (clean); flow log(1 - t / N)."""
        t = self._check_t(t)
        if self.path == "flow":
            return torch.log1p(-t / self.num_train_timesteps)
        pos = t + 1.0  # index into the extended table
        lo = pos.floor().clamp(max=self.num_train_timesteps - 1).long()
        frac = pos - lo
        a, b = self._log_alpha[lo], self._log_alpha[(lo + 1).clamp(max=self.num_train_timesteps)]
        # exact at grid points, also where the next entry is -inf (zero terminal SNR)
        return torch.where(frac == 0, a, a + frac * (b - a))

    def alpha(self, t) -> torch.Tensor:
        if self.path == "flow":
            return 1 - self._check_t(t) / self.num_train_timesteps
        return self.log_alpha(t).exp()

    def sigma(self, t) -> torch.Tensor:
        if self.path == "flow":
            return self._check_t(t) / self.num_train_timesteps
        return (-torch.expm1(2 * self.log_alpha(t))).clamp(min=0).sqrt()

    def lam(self, t) -> torch.Tensor:
        """Half log-SNR, lambda_t = log(alpha_t / sigma_t): +inf at the clean end."""
        return self.log_alpha(t) - self.sigma(t).log()

    def coefficients(self, t, like: torch.Tensor):
        """(alpha_t, sigma_t) for one timestep ``t`` (a number or 0-d tensor: Python floats) or one per sample
        (shape (B,): tensors in ``like``'s dtype and device, shaped to broadcast over its remaining dimensions)."""
        t = torch.as_tensor(t)
        if t.ndim == 0:
            return self.alpha(t).item(), self.sigma(t).item()
        if t.ndim != 1 or len(t) != like.shape[0]:
            raise ValueError(f"t must be one timestep or one per sample ({like.shape[0]}), got shape {tuple(t.shape)}")
        shape = (len(t),) + (1,) * (like.ndim - 1)
        alpha = self.alpha(t.cpu()).to(like.device, like.dtype).view(shape)
        sigma = self.sigma(t.cpu()).to(like.device, like.dtype).view(shape)
        return alpha, sigma

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t eps, at one timestep or one per sample (see ``coefficients``)."""
        alpha, sigma = self.coefficients(t, x0)
        return alpha * x0 + sigma * eps

    def alpha_at_rho(self, rho: torch.Tensor | float) -> torch.Tensor:
        """alpha where sigma / alpha = rho: VP 1 / sqrt(1 + rho^2), flow 1 / (1 + rho)."""
        rho = torch.as_tensor(rho, dtype=torch.float64)
        return 1 / (1 + rho) if self.path == "flow" else 1 / torch.sqrt(1 + rho**2)

    def timestep_at_rho(self, rho: torch.Tensor | float) -> torch.Tensor:
        """The continuous t where sigma_t / alpha_t = rho: the exact inverse of ``alpha`` / ``sigma``."""
        rho = torch.as_tensor(rho, dtype=torch.float64)
        if self.path == "flow":
            if torch.any(rho < 0) or torch.any(torch.isnan(rho)):
                raise ValueError(f"rho must be >= 0 (sigma / alpha), got {rho}")
            return torch.where(torch.isinf(rho), torch.full_like(rho, self.t_max), self.num_train_timesteps * rho / (1 + rho))
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
        """Decreasing VP model timesteps (float64) with ``end`` appended: n + 1 entries, the model runs on the first n.

        ``spacing`` follows Lin et al. (2024) Table 2 as diffusers implements it. DDIM, Euler and Heun space n
        points; DPM-Solver spaces n + 1 points and replaces the lowest by the end (``grid_includes_end=True``).
        """
        if self.path != "vp":
            raise ValueError("timestep spacings are defined for VP schedules; a flow model's grid comes from its scheduler (step grids)")
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


# -- the step grid -----------------------------------------------------------------------------------


def _half_log_snr(alpha: float, sigma: float) -> float:
    if sigma == 0:
        return math.inf
    return math.log(alpha) - math.log(sigma) if alpha > 0 else -math.inf


class StepGrid:
    """The precomputed walk of one sampling run (diffusers' ``timesteps`` and ``sigmas`` in one object).

    Entry i = 0..n holds ``timesteps[i]``, the model's timestep input, and ``alpha[i]``, ``sigma[i]``, the path
    coefficients of the sample there (x = alpha x0 + sigma eps). The network runs at entries 0..n-1; entry n is
    where the run ends. ``rho = sigma / alpha`` (diffusers' VP "sigmas") and ``lam = log(alpha / sigma)`` come
    precomputed, as Python floats, so a solver loop never syncs with a device.

    ``targets``: where each step lands, if not on the next entry. Only diffusers' DDIM needs it: it steps from t to
    t - N // n while its timestep array may be spaced otherwise ("linspace", "trailing" with n not dividing N), and
    the next model call then reads the sample as if it were at the next entry. Only ``sample_ddim`` walks such a
    grid.

    ``init_noise_scale``: multiply unit Gaussian noise by this to start where diffusers' pipeline starts, in these
    (VP-scaled) coordinates. It is 1 except for Euler / Heun grids with "linspace" / "trailing" spacing, whose
    pipelines start at sigma_max * noise in VE units, i.e. at sigma[0] * noise here.
    """

    def __init__(self, timesteps, alpha, sigma, *, path: str = "vp", targets=None, init_noise_scale: float = 1.0):
        ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten().clone()
        alpha, sigma = [float(a) for a in alpha], [float(s) for s in sigma]
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        if not (len(ts) == len(alpha) == len(sigma) >= 2):
            raise ValueError(
                f"timesteps, alpha and sigma must have the same length >= 2 (where sampling starts and where it ends), "
                f"got {len(ts)}, {len(alpha)}, {len(sigma)}"
            )
        for name, values in (("alpha", alpha), ("sigma", sigma)):
            if not all(math.isfinite(v) and v >= 0 for v in values):
                raise ValueError(f"{name} must be finite and >= 0, got {values}")
        if any(a == 0 and s == 0 for a, s in zip(alpha, sigma)):
            raise ValueError("alpha and sigma cannot both be 0 at an entry")
        self.timesteps, self.alpha, self.sigma, self.path = ts, alpha, sigma, path
        self.num_steps = n = len(ts) - 1
        self.rho = [s / a if a > 0 else math.inf for a, s in zip(alpha, sigma)]
        self.lam = [_half_log_snr(a, s) for a, s in zip(alpha, sigma)]
        if targets is None:
            self.next_alpha, self.next_sigma = alpha[1:], sigma[1:]
        else:
            targets = [(float(a), float(s)) for a, s in targets]
            if len(targets) != n:
                raise ValueError(f"targets must hold one (alpha, sigma) per step ({n}), got {len(targets)}")
            self.next_alpha, self.next_sigma = [a for a, _ in targets], [s for _, s in targets]
        self.jumps = self.next_alpha != alpha[1:] or self.next_sigma != sigma[1:]
        # the noise level falls along the walk (the end may repeat the last level: a no-op step, as DDIM takes)
        lands = [s / a if a > 0 else math.inf for a, s in zip(self.next_alpha, self.next_sigma)]
        if any(not self.rho[i + 1] < self.rho[i] for i in range(n - 1)) or any(not r <= self.rho[i] for i, r in enumerate(lands)):
            raise ValueError(f"the noise level sigma / alpha must decrease along the grid, got {self.rho}")
        if not (isinstance(init_noise_scale, (int, float)) and math.isfinite(init_noise_scale) and init_noise_scale > 0):
            raise ValueError(f"init_noise_scale must be a finite number > 0, got {init_noise_scale!r}")
        self.init_noise_scale = float(init_noise_scale)

    @classmethod
    def from_timesteps(cls, schedule: NoiseSchedule, timesteps) -> "StepGrid":
        """The grid of a plain timestep array: the coefficients are the schedule's at each timestep."""
        ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
        if len(ts) < 2:
            raise ValueError("timesteps must hold at least 2 entries: where sampling starts and where it ends")
        # strictly decreasing; the end may repeat the last model timestep (a no-op step, as diffusers' DDIM takes)
        if torch.any(ts[1:-1] >= ts[:-2]) or ts[-1] > ts[-2]:
            raise ValueError(f"timesteps must be decreasing, got {ts.tolist()}")
        return cls(ts, schedule.alpha(ts).tolist(), schedule.sigma(ts).tolist(), path=schedule.path)

    def __len__(self) -> int:
        """Number of entries, n + 1, as the timestep array it replaces."""
        return self.num_steps + 1

    def __repr__(self) -> str:
        t = ", ".join(f"{v:g}" for v in self.timesteps.tolist())
        return f"StepGrid(path={self.path!r}, steps={self.num_steps}, timesteps=[{t}], jumps={self.jumps})"

    def model_timesteps(self, device=None) -> torch.Tensor:
        """The timestep inputs as float32 on ``device``, as the network gets them."""
        return self.timesteps.to(device=device, dtype=torch.float32)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
        """x = alpha x0 + sigma eps at entry i."""
        return self.alpha[i] * x0 + self.sigma[i] * eps


# -- sigma spacings and flow shifts, as diffusers computes them ----------------------------------------------


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n sigmas evenly spaced in log sigma (= evenly in lambda for VP)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, a: float = 0.6, b: float = 0.6) -> np.ndarray:
    """Lee et al. (2024), "Beta Sampling is All You Need": sigmas at the quantiles of a Beta(0.6, 0.6)."""
    import scipy.stats

    quantiles = scipy.stats.beta.ppf(1 - np.linspace(0, 1, n), a, b)
    return np.array([sigma_min + q * (sigma_max - sigma_min) for q in quantiles])


SIGMA_SPACINGS = {"use_karras_sigmas": karras_sigmas, "use_exponential_sigmas": exponential_sigmas, "use_beta_sigmas": beta_sigmas}


def _respace(config, in_sigmas: np.ndarray, n: int):
    """The sigma spacing the config asks for (None if none), between the config's sigma_min / sigma_max if it has
    them (Euler's), else the ends of ``in_sigmas`` (descending)."""
    on = [key for key in SIGMA_SPACINGS if config.get(key)]
    if len(on) > 1:
        raise ValueError(f"only one of {tuple(SIGMA_SPACINGS)} can be set, got {on}")
    if not on:
        return None
    lo = config.get("sigma_min") if config.get("sigma_min") is not None else float(in_sigmas[-1])
    hi = config.get("sigma_max") if config.get("sigma_max") is not None else float(in_sigmas[0])
    return SIGMA_SPACINGS[on[0]](lo, hi, n)


def shift_sigmas(sigmas, shift: float):
    """SD3's timestep shift (Esser et al. 2024, eq. 23): shift s / (1 + (shift - 1) s)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(mu: float, sigmas, kind: str = "exponential"):
    """Resolution-dependent shifting (Flux): e^mu / (e^mu + 1/s - 1), or mu / (mu + 1/s - 1) for "linear"."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    if kind == "linear":
        return mu / (mu + (1 / sigmas - 1))
    raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {kind!r}")


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The mu of dynamic shifting, linear in the number of image tokens between (base_seq_len, base_shift) and
    (max_seq_len, max_shift), as the Flux and SD3 pipelines compute it (they read the four from the scheduler
    config; SD3 falls back to max_shift 1.16)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def _sigma_to_t(sigmas: np.ndarray, log_table: np.ndarray) -> np.ndarray:
    """diffusers' map from a VE sigma to a fractional model timestep: linear in log sigma between the two table
    entries around it (``log_table`` increasing in t), clamped to the table."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    table = log_table.astype(np.float64)
    low = np.clip(np.searchsorted(table, log_sigma, side="right") - 1, 0, len(table) - 2)
    w = np.clip((table[low] - log_sigma) / (table[low] - table[low + 1]), 0, 1)
    return low + w


# -- grids of diffusers' schedulers (configs are complete: the scheduler class's defaults filled in) -----------


def _vp_tables(config, clamp_zero_snr: bool = True):
    """The schedule and diffusers' float32 tables of VE sigma = sqrt((1 - alpha_bar) / alpha_bar) and its log."""
    vp = {k: v for k, v in dict(config).items() if k not in ("_class_name", "use_flow_sigmas")}
    schedule = NoiseSchedule.from_config(vp, clamp_zero_snr=clamp_zero_snr)
    ac = schedule.alphas_cumprod.float()
    ve = (((1 - ac) / ac) ** 0.5).numpy()
    return schedule, ve, np.log(ve)


def _vp_entries(schedule, timesteps, ve_sigmas, exact):
    """alpha, sigma per entry: the schedule's own at integer timesteps whose level is the table's (``exact``), else
    from the VE sigma as diffusers' solvers do (alpha = 1 / sqrt(1 + s^2), sigma = s alpha)."""
    alpha, sigma = [], []
    for t, s in zip(timesteps, ve_sigmas):
        if exact and float(t) == round(float(t)) and schedule.t_clean <= t <= schedule.t_max:
            alpha.append(schedule.alpha(float(t)).item())
            sigma.append(schedule.sigma(float(t)).item())
        else:
            a = 1 / math.sqrt(1 + float(s) ** 2)
            alpha.append(a)
            sigma.append(float(s) * a)
    return alpha, sigma


def _end_timestep(schedule, alpha: float, sigma: float) -> float:
    if sigma == 0:
        return schedule.t_clean
    t = schedule.timestep_at_rho(sigma / alpha).item()
    return max(schedule.t_clean, round(t) if abs(t - round(t)) < 1e-6 else t)


def _spaced(config, n: int, count: int, last_timestep: int | None = None) -> np.ndarray:
    """``count`` timesteps by the config's spacing as Euler / Heun / DDIM space n steps (float64, descending)."""
    N = int(config["num_train_timesteps"])
    spacing = config["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, N - 1, count)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, count) * (N // count)).round()[::-1] + int(config["steps_offset"])
    if spacing == "trailing":
        return np.arange(N, 0, -N / n).round() - 1
    raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")


def ddim_grid(config, n: int) -> StepGrid:
    """``DDIMScheduler``: integer timesteps by the spacing; every step lands on t - N // n (``targets``), and below
    0 on the final alpha_bar (1 with ``set_alpha_to_one``, else alpha_bar_0). No zero-SNR clamp."""
    schedule, _, _ = _vp_tables(config, clamp_zero_snr=False)
    N = schedule.num_train_timesteps
    ts = _spaced(config, n, n)
    if config["timestep_spacing"] == "linspace":
        ts = ts.round()
    ts = ts.astype(np.int64)
    final = (1.0, 0.0, CLEAN) if config["set_alpha_to_one"] else (schedule.alpha(0).item(), schedule.sigma(0).item(), 0.0)

    def level(t):
        return (schedule.alpha(float(t)).item(), schedule.sigma(float(t)).item()) if t >= 0 else final[:2]

    entries = [level(t) for t in ts] + [final[:2]]
    targets = [level(t - N // n) for t in ts]
    return StepGrid(
        [float(t) for t in ts] + [final[2]], [a for a, _ in entries], [s for _, s in entries], targets=targets
    )


def dpm_grid(config, n: int, mu: float | None = None) -> StepGrid:
    """``DPMSolverMultistepScheduler``: n + 1 spaced points less the lowest (``lambda_min_clipped`` bounds them),
    or Karras / Lu / exponential / beta sigmas at diffusers' interpolated timesteps (rounded for Karras and Lu
    except on the cosine schedule), or flow sigmas (``use_flow_sigmas``, ``flow_shift``; with dynamic shifting
    ``mu`` sets the shift to e^mu); the model gets the timesteps as integers, as diffusers casts them."""
    N = int(config["num_train_timesteps"])
    flow_shift = config["flow_shift"]
    if mu is not None:
        if not (config["use_dynamic_shifting"] and config["time_shift_type"] == "exponential"):
            raise ValueError("mu is given but the scheduler has no exponential dynamic shifting (use_dynamic_shifting)")
        flow_shift = math.exp(mu)
    if config["use_flow_sigmas"]:
        s = 1.0 - np.linspace(1, 1 / N, n + 1)
        s = np.flip(shift_sigmas(s, flow_shift))[:-1].copy()
        ts = s * N
    else:
        schedule, ve, log_ve = _vp_tables(config)
        ac = schedule.alphas_cumprod.float()
        lam = torch.log(ac.sqrt()) - torch.log((1 - ac).sqrt())
        clipped = torch.searchsorted(torch.flip(lam, [0]), config["lambda_min_clipped"])
        last = int(N - clipped)
        spacing = config["timestep_spacing"]
        if spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy()
        elif spacing == "leading":
            ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1] + int(config["steps_offset"])
        elif spacing == "trailing":
            ts = np.arange(last, 0, -N / n).round() - 1
        else:
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")
        if config["use_lu_lambdas"]:
            if [k for k in SIGMA_SPACINGS if config.get(k)]:
                raise ValueError("use_lu_lambdas cannot be combined with another sigma spacing")
            # evenly spaced in lambda between the table's ends (DPM-Solver's "logSNR" steps)
            respaced = np.exp(np.linspace(float(log_ve[-1]), float(log_ve[0]), n))
        else:
            respaced = _respace(config, np.flip(ve).copy(), n)
        if respaced is not None:
            s = respaced
            ts = _sigma_to_t(s, log_ve)
            if (config["use_karras_sigmas"] or config["use_lu_lambdas"]) and config["beta_schedule"] != "squaredcos_cap_v2":
                ts = ts.round()
        else:
            s = ve[ts.astype(np.int64)]
    if config["final_sigmas_type"] == "sigma_min":
        s_end = float(_vp_tables(config)[1][0])  # VE sigma of t = 0, also on flow sigmas (as diffusers does)
    elif config["final_sigmas_type"] == "zero":
        s_end = 0.0
    else:
        raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {config['final_sigmas_type']!r}")
    s = np.asarray(s, dtype=np.float32).astype(np.float64)
    ts = torch.from_numpy(np.asarray(ts, dtype=np.float64)).to(torch.int64).double()  # diffusers' int64 cast
    if config["use_flow_sigmas"]:
        alpha, sigma = [1 - v for v in s] + [1 - s_end], list(s) + [s_end]
        return StepGrid(torch.cat([ts, torch.tensor([N * s_end])]), alpha, sigma, path="flow")
    plain = respaced is None  # the levels are table entries at integer timesteps
    alpha, sigma = _vp_entries(schedule, ts.tolist(), s, exact=plain)
    a_end, s_end_vp = _vp_entries(schedule, [0.0 if s_end else CLEAN], [s_end], exact=plain)
    alpha, sigma = alpha + a_end, sigma + s_end_vp
    return StepGrid(torch.cat([ts, torch.tensor([_end_timestep(schedule, alpha[-1], sigma[-1])])]), alpha, sigma)


def euler_grid(config, n: int) -> StepGrid:
    """``EulerDiscreteScheduler`` and ``HeunDiscreteScheduler``: timesteps by the spacing (fractional for
    "linspace"), sigmas interpolated linearly in VE sigma at them (diffusers' ``np.interp``), or Karras /
    exponential / beta sigmas at diffusers' interpolated (fractional) timesteps; ``final_sigmas_type``;
    ``timestep_type="continuous"`` with v-prediction feeds the model 0.25 log sigma (EDM's c_noise)."""
    schedule, ve, log_ve = _vp_tables(config)
    if config["timestep_spacing"] == "linspace":
        N = int(config["num_train_timesteps"])
        ts = np.linspace(0, N - 1, n, dtype=np.float32)[::-1].copy().astype(np.float64)
    else:
        ts = _spaced(config, n, n).astype(np.float32).astype(np.float64)
    s = np.interp(ts, np.arange(0, len(ve)), ve)
    respaced = _respace(config, s, n)
    if respaced is not None:
        s = respaced
        ts = _sigma_to_t(s, log_ve)
    s_end = float(ve[0]) if config.get("final_sigmas_type", "zero") == "sigma_min" else 0.0
    s = np.asarray(s, dtype=np.float32).astype(np.float64)
    ts = ts.astype(np.float32).astype(np.float64)
    exact = respaced is None  # integer timesteps keep the schedule's exact levels
    alpha, sigma = _vp_entries(schedule, ts.tolist(), s, exact=exact)
    a_end, s_end_vp = _vp_entries(schedule, [0.0 if s_end else CLEAN], [s_end], exact=exact)
    alpha, sigma = alpha + a_end, sigma + s_end_vp
    model_t = ts.tolist()
    if config.get("timestep_type", "discrete") == "continuous" and config["prediction_type"] == "v_prediction":
        model_t = [float(np.float32(0.25 * np.log(np.float32(v)))) for v in s]
    model_t.append(_end_timestep(schedule, alpha[-1], sigma[-1]))
    # diffusers' pipelines start these at init_noise_sigma * noise in VE units: sigma_max ("linspace",
    # "trailing") or sqrt(sigma_max^2 + 1) ("leading"), i.e. alpha_0 times that here
    s_max = float(max(s.max(), s_end))
    init = s_max if config["timestep_spacing"] in ("linspace", "trailing") else math.sqrt(s_max**2 + 1)
    return StepGrid(model_t, alpha, sigma, init_noise_scale=init * alpha[0])


def flow_match_grid(config, n: int | None = None, mu: float | None = None, sigmas=None) -> StepGrid:
    """``FlowMatchEulerDiscreteScheduler`` / ``FlowMatchHeunDiscreteScheduler``: flow sigmas evenly spaced from
    sigma_max to sigma_min (or the pipeline's ``sigmas``, as Flux passes them), shifted by ``shift`` or, with
    ``use_dynamic_shifting``, by ``time_shift(mu)``; ``shift_terminal`` stretches them to end there; then Karras /
    exponential / beta spacing; the model's timestep is N sigma; the run ends at sigma = 0."""
    N = int(config["num_train_timesteps"])
    shift, dynamic = float(config.get("shift", 1.0)), bool(config.get("use_dynamic_shifting", False))
    if dynamic and mu is None:
        raise ValueError("mu must be given when the scheduler shifts dynamically (use_dynamic_shifting=True); see calculate_shift")
    # the scheduler's training sigmas bound the default grid (shifted unless shifting is dynamic), in float32
    table = torch.from_numpy(np.linspace(1, N, N, dtype=np.float32)[::-1].copy()) / N
    if not dynamic:
        table = shift * table / (1 + (shift - 1) * table)
    s_max, s_min = table[0].item(), table[-1].item()
    if sigmas is None:
        if n is None:
            raise ValueError("give num_inference_steps or sigmas")
        s = np.linspace(s_max * N, s_min * N, n) / N
    else:
        s = np.asarray(sigmas, dtype=np.float32)
        if s.ndim != 1 or len(s) < 1 or not np.all(np.isfinite(s)) or np.any(s <= 0) or np.any(s > 1):
            raise ValueError(f"sigmas must be a 1-D list of numbers in (0, 1], got {sigmas!r}")
        if n is not None and len(s) != n:
            raise ValueError(f"sigmas must have num_inference_steps ({n}) entries, got {len(s)}")
    if dynamic:
        s = time_shift(mu, s, config.get("time_shift_type", "exponential"))
    else:
        s = shift_sigmas(s, shift)
    if config.get("shift_terminal"):
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - config["shift_terminal"]))
    respaced = _respace(config, s, len(s))
    if respaced is not None:
        s = respaced
    s32 = torch.from_numpy(np.asarray(s)).float()
    ts = (s32 * N).double().tolist()
    s = s32.double().tolist()
    return StepGrid(ts + [0.0], [1 - v for v in s] + [1.0], s + [0.0], path="flow")
