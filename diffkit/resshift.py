"""Residual shifting for super-resolution: ResShift (Yue et al., NeurIPS 2023) and UPSR's uncertainty-guided noise
weighting (Zhang et al., "Uncertainty-guided Perturbation for Image Super-Resolution Diffusion Model", CVPR 2025;
LabShuHangGU/UPSR ``models/gaussian_diffusion.py``, ``basicsr/models/upsr_real_model.py``,
``options/000_UPSR_RealSR_x4.yml``).

Not a Gaussian path x_t = alpha_t x0 + sigma_t eps: the chain shifts the residual y - x0 between the high-resolution
image x0 and the bicubic-upsampled low-resolution image y,

    x_t = x0 + eta_t (y - x0) + kappa sqrt(eta_t) w_u * eps,      t = 0, ..., T - 1,

so it has its own schedule (``ResShiftSchedule``) and its own pure sampler (``sample_resshift``), with the solver
core's conventions: no hidden state, no ``torch.no_grad()`` inside, a ``callback`` after every step. ResShift is
w_u = 1. UPSR weights the noise per pixel by u = clamp(|g(y0) - y| / 2, 0, a) / a, w_u = b + (1 - b) u, where g is a
frozen MSE-trained SR network: flat regions (where g and bicubic agree) start closer to y (``uncertainty_weight``).

Sampling (the official ``ddim_sample`` with ddim_eta = 0) starts at y + kappa sqrt(eta_T) w_u eps and steps

    x_{t-1} = k_t x0_hat + m_t x_t + (eta_{t-1} - sqrt(eta_t eta_{t-1})) y,   m_t = sqrt(eta_{t-1} / eta_t),
    k_t = 1 - eta_{t-1} - (1 - eta_t) m_t,  eta_{-1} = 0,

the deterministic step that keeps x_t on the forward process's noise (w_u cancels from it). The network sees x_t
divided by sqrt(0.3 kappa^2 eta_t + 0.25) (the official ``normalize_input``) next to its conditioning and predicts x0.
"""

import math

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


def _number(name: str, value, low: float, high: float = math.inf, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high < math.inf else "")
        raise ValueError(f"{name} must be a number {bound}, got {value!r}")
    return float(value)


def _check_images(**tensors) -> None:
    shape = None
    for name, value in tensors.items():
        if value is None:
            continue
        if not torch.is_tensor(value) or value.ndim != 4:
            raise ValueError(f"{name} must be a (B, C, H, W) tensor, got {type(value).__name__} "
                             f"{tuple(getattr(value, 'shape', ()))}")
        if shape is not None and tuple(value.shape) != shape:
            raise ValueError(f"{name} must have the shape of the other images {shape}, got {tuple(value.shape)}")
        shape = tuple(value.shape)
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} contains NaN or inf")


class ResShiftSchedule:
    """eta_0 < ... < eta_{T-1} (float64) and kappa; ``exponential`` builds the official schedule."""

    def __init__(self, sqrt_etas, kappa: float):
        sqrt_etas = torch.as_tensor(sqrt_etas, dtype=torch.float64)
        if sqrt_etas.ndim != 1 or len(sqrt_etas) < 1 or not torch.all((sqrt_etas > 0) & (sqrt_etas <= 1)):
            raise ValueError(f"sqrt_etas must be a 1-D table of values in (0, 1], got {sqrt_etas.tolist()}")
        if torch.any(sqrt_etas[1:] <= sqrt_etas[:-1]):
            raise ValueError(f"sqrt_etas must increase, got {sqrt_etas.tolist()}")
        self.kappa = _number("kappa", kappa, 0.0, low_open=True)
        self.sqrt_etas, self.etas = sqrt_etas, sqrt_etas**2
        self.num_steps = len(sqrt_etas)
        self.etas_prev = torch.cat([torch.zeros(1, dtype=torch.float64), self.etas[:-1]])

    @classmethod
    def exponential(cls, num_steps: int = 5, kappa: float = 2.5, min_noise_level: float = 0.2, etas_end: float = 0.99,
                    power: float = 0.2) -> "ResShiftSchedule":
        """UPSR's ``get_named_eta_schedule("exponential")``: sqrt(eta_t) grows geometrically from
        min(min_noise_level / kappa, min_noise_level, sqrt(0.001)) to ``etas_end`` over a time axis warped by
        ``power``. Defaults: ``options/000_UPSR_RealSR_x4.yml`` (5 steps, kappa 2.5, min_noise_level 0.2, etas_end
        0.99, power 0.2), which give sqrt(eta) = 0.0316 ... 0.99 (UPSR's sqrt(0.001) floor is below ResShift's
        min_noise_level / kappa = 0.08)."""
        if not (isinstance(num_steps, int) and num_steps >= 2):
            raise ValueError(f"num_steps must be an integer >= 2, got {num_steps!r}")
        kappa = _number("kappa", kappa, 0.0, low_open=True)
        min_noise_level = _number("min_noise_level", min_noise_level, 0.0, low_open=True)
        etas_end = _number("etas_end", etas_end, 0.0, 1.0, low_open=True)
        power = _number("power", power, 0.0, low_open=True)
        start = min(min_noise_level / kappa, min_noise_level, math.sqrt(0.001))
        if not start < etas_end:
            raise ValueError(f"etas_end must exceed the first sqrt(eta) {start:.4g}, got {etas_end!r}")
        warped = torch.linspace(0, 1, num_steps, dtype=torch.float64) ** power
        return cls(start * (etas_end / start) ** warped, kappa)

    def _at(self, table: torch.Tensor, t, like: torch.Tensor) -> torch.Tensor:
        """table[t] per sample, cast to ``like``'s dtype (as the official ``_extract_into_tensor``) and broadcast."""
        t = torch.as_tensor(t, device=table.device).long().reshape(-1)
        if torch.any(t < 0) or torch.any(t >= self.num_steps):
            raise ValueError(f"timesteps must lie in [0, {self.num_steps - 1}], got {t.tolist()}")
        values = table[t].to(device=like.device, dtype=like.dtype)
        return values.view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, y: torch.Tensor, t, noise: torch.Tensor, weight: torch.Tensor | None = None):
        """x_t = x0 + eta_t (y - x0) + kappa sqrt(eta_t) w_u * noise (``weight`` None: w_u = 1, ResShift)."""
        _check_images(x0=x0, y=y, noise=noise, weight=weight)
        scale = self._at(self.sqrt_etas * self.kappa, t, x0)
        spread = (scale * weight if weight is not None else scale) * noise  # the official kappa sqrt(eta) * un * noise
        return x0 + self._at(self.etas, t, x0) * (y - x0) + spread

    def prior_sample(self, y: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The start of sampling, y + kappa sqrt(eta_T) w_u * noise."""
        _check_images(y=y, noise=noise, weight=weight)
        scale = self._at(self.sqrt_etas * self.kappa, self.num_steps - 1, y)
        return y + (scale * weight if weight is not None else scale) * noise

    def input_std(self, t, like: torch.Tensor) -> torch.Tensor:
        """sqrt(0.3 kappa^2 eta_t + 0.25), what the network input is divided by: the official ``_scale_input`` with its
        fixed var_un = 0.3, in ``like``'s dtype as there."""
        return torch.sqrt(self._at(self.etas, t, like) * self.kappa**2 * 0.3 + 0.5**2)


def uncertainty_weight(g_y: torch.Tensor, y: torch.Tensor, a: float = 0.1, b: float = 0.4) -> torch.Tensor:
    """UPSR's w_u = b + (1 - b) u with u = clamp(|g(y0) - y| / 2, 0, a) / a, images in [-1, 1] (so |.| / 2 is the
    difference on the [0, 1] scale). Official a = 0.1 (``un``), b = 0.4 (``min_noise``)."""
    _check_images(g_y=g_y, y=y)
    a, b = _number("a", a, 0.0, low_open=True), _number("b", b, 0.0, 1.0)
    u = ((g_y - y).abs() / 2).clamp(0.0, a) / a
    return b + (1 - b) * u


class ResShiftDenoiser:
    """A network that predicts x0 from x_t, seen through the schedule: ``model`` gets [x_t / input_std, *cond] on
    the channel axis and the integer timestep t. ``cond`` is a list of conditioning images (UPSR: [g(y0), y])."""

    def __init__(self, model, schedule: ResShiftSchedule):
        if not isinstance(schedule, ResShiftSchedule):
            raise TypeError(f"schedule must be a ResShiftSchedule, got {type(schedule).__name__}")
        self.model, self.schedule = model, schedule

    def __call__(self, x: torch.Tensor, t, cond: list[torch.Tensor] | None = None) -> torch.Tensor:
        inputs = torch.cat([x / self.schedule.input_std(t, x), *(cond or [])], dim=1)
        t = torch.as_tensor(t, device=x.device).long().reshape(-1).expand(len(x))
        out = self.model(inputs, t)
        return out.sample if hasattr(out, "sample") else out


def sample_resshift(denoiser: ResShiftDenoiser, x: torch.Tensor, y: torch.Tensor, *, cond=None, callback=None):
    """Walk the residual-shifting chain from x (= ``schedule.prior_sample(y, noise, w_u)``) at t = T - 1 to t = 0 with
    the official deterministic step (module docstring); returns the last x0 prediction. ``callback(info)`` gets
    {"step", "t", "x", "x0"} after every step and may return {"x": tensor} to replace the sample."""
    _check_images(x=x, y=y)
    schedule = denoiser.schedule
    for step, t in enumerate(reversed(range(schedule.num_steps))):
        x0 = denoiser(x, t, cond)
        eta, eta_prev = schedule._at(schedule.etas, t, x), schedule._at(schedule.etas_prev, t, x)
        m = torch.sqrt(eta_prev / eta)
        k = 1 - eta_prev - (1 - eta) * m
        x = x0 * k + x * m + (eta_prev - torch.sqrt(eta * eta_prev)) * y
        if callback is not None:
            out = callback({"step": step, "t": t, "x": x, "x0": x0})
            x = out["x"] if isinstance(out, dict) and "x" in out else x
    return x


def resshift_loss(denoiser: ResShiftDenoiser, x0: torch.Tensor, y: torch.Tensor, cond=None, weight=None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The official training loss (``training_losses`` with predict_type "xstart"): noise x0 to x_t at a uniform t,
    mean squared error of the x0 prediction. (The config's LPIPS term needs pretrained VGG weights; it is left out.)"""
    _check_images(x0=x0, y=y, weight=weight)
    t = torch.randint(0, denoiser.schedule.num_steps, (len(x0),), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    x_t = denoiser.schedule.q_sample(x0, y, t, noise, weight)
    return F.mse_loss(denoiser(x_t, t, cond).float(), x0.float())


def bicubic_upsample(y0: torch.Tensor, factor: int) -> torch.Tensor:
    """y: the low-resolution image upsampled by ``factor`` (bicubic, align_corners=False, as the official code)."""
    return F.interpolate(y0, scale_factor=factor, mode="bicubic", align_corners=False)


class SRNet(ModelMixin, ConfigMixin):
    """g: a small residual CNN for MSE super-resolution (stand-in for UPSR's ATD): convolutions at low resolution,
    a PixelShuffle upsampling, added to the bicubic upsampling of its input."""

    @register_to_config
    def __init__(self, factor: int = 2, channels: int = 3, width: int = 32, depth: int = 4):
        super().__init__()
        for name, value in (("factor", factor), ("channels", channels), ("width", width), ("depth", depth)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        layers = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        layers += [nn.Conv2d(width, channels * factor**2, 3, padding=1), nn.PixelShuffle(factor)]
        self.body = nn.Sequential(*layers)

    def forward(self, y0: torch.Tensor) -> torch.Tensor:
        return bicubic_upsample(y0, self.config.factor) + self.body(y0)


class ResShiftScheduler(SchedulerMixin, ConfigMixin):
    """The exponential schedule's settings as a diffusers config (saved with a pipeline as scheduler_config.json)."""

    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(self, num_steps: int = 5, kappa: float = 2.5, min_noise_level: float = 0.2, etas_end: float = 0.99,
                 power: float = 0.2, a: float = 0.1, b: float = 0.4):
        self.schedule = ResShiftSchedule.exponential(num_steps, kappa, min_noise_level, etas_end, power)
        _number("a", a, 0.0, low_open=True)
        _number("b", b, 0.0, 1.0)


# -- training -------------------------------------------------------------------------------------------------------


def resshift_unet(sample_size: int = 16, channels: int = 3, cond_channels: int = 6, width: int = 32):
    """The x0-predictor used for diffkit's UPSR: a small UNet2DModel that takes [x_t, g(y0), y] on the channel axis
    (the official Swin-UNet concatenates its low-resolution features the same way)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=sample_size, in_channels=channels + cond_channels, out_channels=channels,
        block_out_channels=(width, 2 * width), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=width,
    )


def upsr_inputs(sr_net, y0: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, g(y0)): the bicubic upsampling of the low-resolution images and the frozen SR network's estimate."""
    with torch.no_grad():
        return bicubic_upsample(y0, factor), sr_net(y0)


def _warmup_constant(optimizer, warmup: int):
    """A linear warm-up, then a constant learning rate (the official schedule: 5k warm-up steps, constant until its
    milestone at the last of 200k iterations)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(warmup, 1)))


def train_sr_net(sr_net: SRNet, data, steps: int, lr: float = 1e-3, progress: bool = False) -> list[float]:
    """Fit g by mean squared error: ``data(step)`` returns a batch (x0, y0) of high- and low-resolution images."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.Adam(sr_net.parameters(), lr=lr)
    losses = []
    for step in tqdm(range(steps), disable=not progress, desc="train g"):
        x0, y0 = data(step)
        loss = F.mse_loss(sr_net(y0), x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def train_resshift(
    denoiser: ResShiftDenoiser,
    sr_net,
    data,
    steps: int,
    *,
    factor: int = 2,
    weighted: bool = True,
    a: float = 0.1,
    b: float = 0.4,
    lr: float = 5e-4,
    warmup_fraction: float = 0.025,
    ema_decay: float = 0.999,
    generator: torch.Generator | None = None,
    progress: bool = False,
):
    """Train the x0-predictor of ``denoiser`` on batches ``data(step)`` = (x0, y0), conditioned on [g(y0), y] with the
    frozen ``sr_net`` g; ``weighted`` uses UPSR's w_u, otherwise w_u = 1 (ResShift). AdamW and an EMA of the weights
    (decay 0.999, diffusers' ``EMAModel`` with its warm-up) as the official config; returns (the EMA model, the
    losses)."""
    import copy

    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    model = denoiser.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = _warmup_constant(optimizer, round(warmup_fraction * steps))
    ema, losses = EMAModel(model.parameters(), decay=ema_decay), []
    sr_net.eval().requires_grad_(False)
    for step in tqdm(range(steps), disable=not progress, desc="train x0-predictor"):
        x0, y0 = data(step)
        y, g_y = upsr_inputs(sr_net, y0, factor)
        weight = uncertainty_weight(g_y, y, a, b) if weighted else None
        loss = resshift_loss(denoiser, x0, y, [g_y, y], weight, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        ema.step(model.parameters())
        losses.append(loss.item())
    averaged = copy.deepcopy(model).eval().requires_grad_(False)
    ema.copy_to(averaged.parameters())
    return averaged, losses
