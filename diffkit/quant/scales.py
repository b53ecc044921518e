"""Uniform quantisers and how their ranges are chosen (PTQ4DM, Shang et al. 2023, on QDrop's quantiser).

Weights: symmetric, one scale per output channel, integers in [-2^(b-1), 2^(b-1) - 1].
Activations: affine (scale and zero point), one range per tensor, integers in [0, 2^b - 1]: post-SiLU and
post-GroupNorm tensors are lopsided, and x86 int8 backends take uint8 affine activations the same way.

Range rules: "absmax" (the observed extremes), "percentile" (the 0.01% / 99.99% quantiles) and "lp", PTQ4DM's
search: shrink the extremes by 1%, 2%, ... 99% (100 candidates) and keep the one whose quantise-dequantise
error sum |x - Q(x)|^p is smallest, with p = 2.4.

``symmetric_range`` is the activation search as the released PTQ4DM code runs it (QDrop's
``UniformAffineQuantizer.perform_1D_search`` with ``symmetric=True``): candidate ranges [-c, c] for
c = max|x| * i / 100, i = 1..100, or [0, c] / [-c, 0] for a tensor that is one-sided, error mean |x - Q(x)|^2.4.
"""

import torch


METHODS = ("absmax", "percentile", "lp")
LP_NORM = 2.4
CANDIDATES = 100
PERCENTILE = 1e-4


def _check(bits: int, method: str) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [2, 8], got {bits!r}")
    if method not in METHODS:
        raise ValueError(f"range method must be one of {METHODS}, got {method!r}")


# -- weights: symmetric, per output channel ----------------------------------------------------------------


def quantize_symmetric(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers round(w / scale) clamped to the signed b-bit range; ``scale`` broadcasts over w."""
    top = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(w / scale), -top - 1, top)


def weight_scales(weight: torch.Tensor, bits: int, method: str = "lp", p: float = LP_NORM) -> torch.Tensor:
    """One scale per output channel (dim 0) of a Conv/Linear weight, shape (C_out,)."""
    _check(bits, method)
    w = weight.detach().flatten(1).float()
    top = 2 ** (bits - 1) - 1
    absmax = w.abs().amax(1)
    if method == "absmax":
        bound = absmax
    elif method == "percentile":
        bound = torch.quantile(w.abs(), 1 - PERCENTILE, dim=1)
    else:
        shrink = 1 - 0.01 * torch.arange(CANDIDATES, dtype=w.dtype)  # 1.00, 0.99, ..., 0.01
        scales = (absmax[None] * shrink[:, None] / top).clamp_min(1e-12)[..., None]  # (K, C, 1)
        error = (w[None] - quantize_symmetric(w[None], scales, bits) * scales).abs().pow(p).sum(-1)  # (K, C)
        bound = absmax * shrink[error.argmin(0)]
    return (bound / top).clamp_min(1e-12).float()


# -- activations: affine, per tensor ------------------------------------------------------------------------


def quantize_affine(x: torch.Tensor, scale, zero_point, bits: int) -> torch.Tensor:
    """Integers round(x / scale) + zero_point clamped to [0, 2^b - 1]."""
    return torch.clamp(torch.round(x / scale) + zero_point, 0, 2**bits - 1)


def affine_params(low: torch.Tensor, high: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point that map [low, high] (widened to hold 0, so zero stays exact) to [0, 2^b-1]."""
    low, high = torch.minimum(low, torch.zeros_like(low)), torch.maximum(high, torch.zeros_like(high))
    scale = ((high - low) / (2**bits - 1)).clamp_min(1e-12)
    return scale, torch.round(-low / scale)


def fake_quantize_affine(x: torch.Tensor, scale, zero_point, bits: int) -> torch.Tensor:
    """Quantise then dequantise: what a uint8 affine backend computes with."""
    return (quantize_affine(x, scale, zero_point, bits) - zero_point) * scale


def activation_range(samples: torch.Tensor, bits: int, method: str = "lp", p: float = LP_NORM):
    """(low, high) of one activation tensor from observed values (any shape), by the chosen rule."""
    _check(bits, method)
    x = samples.detach().flatten().float()
    if not torch.isfinite(x).all():
        raise ValueError("activation samples contain NaN or inf")
    low, high = x.min(), x.max()
    if method == "percentile":
        low, high = torch.quantile(x, PERCENTILE), torch.quantile(x, 1 - PERCENTILE)
    elif method == "lp":
        best = None
        for shrink in 1 - 0.01 * torch.arange(CANDIDATES, dtype=x.dtype):
            scale, zero = affine_params(low * shrink, high * shrink, bits)
            error = (x - fake_quantize_affine(x, scale, zero, bits)).abs().pow(p).mean()
            if best is None or error < best[0]:
                best = (error, low * shrink, high * shrink)
        low, high = best[1], best[2]
    return low.float(), high.float()


def one_sided(x: torch.Tensor) -> str:
    """"pos" if every value is >= 0, "neg" if every value is <= 0, else "no" (QDrop's ``one_side_dist``)."""
    return "pos" if x.min() >= 0 else "neg" if x.max() <= 0 else "no"


def symmetric_range(samples: torch.Tensor, bits: int, side: str = "no", p: float = LP_NORM, bound=None):
    """(low, high) by PTQ4DM's symmetric 1-D search: the best of [-c, c] (``side`` "no"), [0, c] ("pos") or
    [-c, 0] ("neg") for c = bound * i / 100, i = 1..100, by mean |x - Q(x)|^p over ``samples``. ``bound``
    defaults to max |samples|; pass the whole tensor's when ``samples`` is a subset of it."""
    _check(bits, "lp")
    if side not in ("no", "pos", "neg"):
        raise ValueError(f"side must be 'no', 'pos' or 'neg', got {side!r}")
    x = samples.detach().flatten().float()
    if not torch.isfinite(x).all():
        raise ValueError("activation samples contain NaN or inf")
    bound = x.abs().max() if bound is None else torch.as_tensor(bound, dtype=x.dtype)
    best = None
    for c in bound * torch.arange(1, CANDIDATES + 1, dtype=x.dtype) / CANDIDATES:
        low = torch.zeros_like(c) if side == "pos" else -c
        high = torch.zeros_like(c) if side == "neg" else c
        scale, zero = affine_params(low, high, bits)
        error = (x - fake_quantize_affine(x, scale, zero, bits)).abs().pow(p).mean()
        if best is None or error < best[0]:
            best = (error, low, high)
    return best[1].float(), best[2].float()
