"""SIREN (Sitzmann et al., "Implicit Neural Representations with Periodic Activation Functions", NeurIPS 2020,
arXiv 2006.09661) and WINNER, its target-aware noisy initialisation (Chandravamsi et al., "Spectral Bottleneck in
Sinusoidal Representation Networks: Noise is All You Need", arXiv 2509.09719; "SIREN^2" = SIREN + WINNER).

SIREN's uniform initialisation keeps pre-activations of every sine layer distributed alike; on targets whose
energy sits at high frequencies it can stall near a zero output (the "spectral bottleneck"). WINNER adds Gaussian
noise to the weights of the first two layers, W0 += N(0, 1) s0 / omega0 and W1 += N(0, 1) s1 / omega0, with the
scales s0, s1 growing with the target's spectral centroid, so the activations carry high-frequency power from the
start.

The scales come from an EMPIRICAL formula, not a derivation: ``winner_noise_scales_empirical`` follows the code of
hemanthgrylls/SIREN-square (``modules/networks.py``, ``SIREN_square.set_noise_scales``; the repository the project
page cfdlabtechnion.github.io/siren_square points to), which the research note also quotes from a third-party
re-implementation. It is unverified against the paper's text and tied to the paper's data (audio clips, 256-512 px
images); treat the constants as someone else's fit.
"""

import math

import numpy as np
import torch
from torch import nn


class Sine(nn.Module):
    """sin(omega0 * x), SIREN's activation."""

    def __init__(self, omega0: float):
        super().__init__()
        self.omega0 = float(omega0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.omega0 * x)

    def extra_repr(self) -> str:
        return f"omega0={self.omega0}"


def siren(in_features: int, out_features: int, hidden: int = 128, layers: int = 3, omega0: float = 30.0,
          first_omega0: float | None = None) -> nn.Sequential:
    """A SIREN: ``layers`` Linear -> sin(omega .) blocks of width ``hidden`` and a linear head, with SIREN's
    initialisation (``siren_init``). The first block's frequency is ``first_omega0`` (default ``omega0``), the
    others' ``omega0``: SIREN's audio setting is first_omega0 = 3000, omega0 = 30 (Sitzmann et al. 2020, Sec. 4.2;
    the baseline of hemanthgrylls/SIREN-square ``learn_audios.py``, ``SIREN(first_w0=3000, w0=30)``)."""
    for name, value in (("in_features", in_features), ("out_features", out_features), ("hidden", hidden),
                        ("layers", layers)):
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    first_omega0 = omega0 if first_omega0 is None else first_omega0
    for name, value in (("omega0", omega0), ("first_omega0", first_omega0)):
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name} must be > 0, got {value!r}")
    blocks, width = [], in_features
    for i in range(layers):
        blocks += [nn.Linear(width, hidden), Sine(first_omega0 if i == 0 else omega0)]
        width = hidden
    model = nn.Sequential(*blocks, nn.Linear(width, out_features))
    siren_init(model)
    return model


def _linears(model: nn.Module) -> list[nn.Linear]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(linears) < 2 or not any(isinstance(m, Sine) for m in model.modules()):
        raise TypeError("model must be a SIREN (Linear and Sine layers, as built by siren())")
    return linears


def siren_omega0(model: nn.Module) -> float:
    """The hidden layers' omega0 (the last sine's): what SIREN's and WINNER's scales divide by."""
    return [m for m in model.modules() if isinstance(m, Sine)][-1].omega0


@torch.no_grad()
def siren_init(model: nn.Module) -> nn.Module:
    """SIREN's initialisation (Sitzmann et al. 2020, Sec. 3.2): first layer W ~ U(-1/fan_in, 1/fan_in) (whatever its
    frequency), every later layer W ~ U(-sqrt(6/fan_in)/omega0, sqrt(6/fan_in)/omega0) with the hidden omega0;
    biases keep PyTorch's default."""
    linears, omega0 = _linears(model), siren_omega0(model)
    first = linears[0]
    first.weight.uniform_(-1 / first.in_features, 1 / first.in_features)
    for layer in linears[1:]:
        bound = math.sqrt(6 / layer.in_features) / omega0
        layer.weight.uniform_(-bound, bound)
    return model


def spectral_centroid(target: torch.Tensor) -> float:
    """Normalised spectral centroid in [0, 1] of a (length,) signal or an (H, W) image, as in the SIREN-square code:
    the magnitude-weighted mean rfft frequency (cycles per sample, in [0, 0.5]; for an image per row, then averaged
    over rows) times 2."""
    if not (isinstance(target, torch.Tensor) and target.dim() in (1, 2) and target.shape[-1] > 1):
        raise ValueError(f"target must be a (length,) signal or an (H, W) image, got "
                         f"{getattr(target, 'shape', target)!r}")
    data = np.atleast_2d(target.detach().double().cpu().numpy())
    spectrum = np.abs(np.fft.rfft(data, axis=1))
    freqs = np.fft.rfftfreq(data.shape[1], d=1)
    weight = spectrum.sum(1)
    rows = np.divide((spectrum * freqs).sum(1), weight, out=np.zeros_like(weight), where=weight != 0)
    return float(rows.mean() * 2)


def winner_noise_scales_empirical(centroid: float, in_features: int, channels: int = 1) -> tuple[float, float]:
    """(s0, s1) from the spectral centroid by the EMPIRICAL, unverified formula of the SIREN-square code
    (see the module docstring): 1-D signals s0 = 3500 (1 - exp(-7 c)), s1 = 3 c; images s0 = 50 (1 - exp(-5 c)),
    s1 = 0.4 c; with c = centroid / sqrt(channels)."""
    if not 0 <= centroid <= 1:
        raise ValueError(f"centroid must be a normalised spectral centroid in [0, 1], got {centroid!r}")
    if not (isinstance(channels, int) and channels > 0):
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    c = centroid / math.sqrt(channels)
    if in_features == 1:
        return 3500 * (1 - math.exp(-7 * c)), 3 * c
    if in_features == 2:
        return 50 * (1 - math.exp(-5 * c)), 0.4 * c
    raise ValueError(f"the empirical formula covers 1-D signals and images (in_features 1 or 2), got {in_features!r}")


@torch.no_grad()
def winner_init(model: nn.Module, s0: float, s1: float, generator: torch.Generator | None = None) -> nn.Module:
    """WINNER (Chandravamsi et al. 2025, Sec. 3): SIREN's initialisation, then W0 += N(0, 1) s0 / omega0 and
    W1 += N(0, 1) s1 / omega0 on the first two layers (omega0 the hidden layers' frequency, as ``SIREN_square``)."""
    if not (s0 >= 0 and s1 >= 0):
        raise ValueError(f"noise scales must be >= 0, got s0={s0!r}, s1={s1!r}")
    siren_init(model)
    linears, omega0 = _linears(model), siren_omega0(model)
    for layer, scale in ((linears[0], s0), (linears[1], s1)):
        noise = torch.randn(layer.weight.shape, generator=generator, dtype=layer.weight.dtype)
        layer.weight.add_(noise.to(layer.weight.device) * (scale / omega0))
    return model
