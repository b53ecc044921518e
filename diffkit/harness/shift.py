"""Power-of-two ("shift") weights for the harness MLP.

- ``denseshift``: DenseShift (Li et al., "DenseShift: Towards Accurate and Efficient Low-Bit Power-of-Two
  Quantization", ICCV 2023, arXiv 2208.09708). A b-bit weight is zero-free, w = s * 2^(-p) with s in {-1, +1} and
  p in {0, ..., 2^(b-1) - 1} (1 sign bit + b - 1 shift bits, 2^b levels, none of them zero), and is trained through
  the sign-scale decomposition: one latent tensor u for the sign (s = sign(u), sign-STE) and one latent tensor m for
  the shift (p = round(-log2 |m|), straight through the rounding), so a weight can flip sign without passing
  through a zero level.
- ``pot``: the plain power-of-two quantizer the paper argues against (as in DeepShift-Q, Elhoushi et al. 2021): one
  latent tensor w, q(w) = sign(w) 2^(-round(-log2 |w|)) with b bits spent on 2^(b-1) - 1 shifts plus a zero level
  (2^b - 1 levels), weights below the smallest shift's rounding threshold become 0, identity STE.

Both layers have no weight scale: in the harness MLP each feeds a BatchNorm, which absorbs a per-layer scale
exactly, so the weights themselves stay on the exact power-of-two grid (the property that lets a shift network
replace multiplications by exponent additions).
"""

import torch
import torch.nn.functional as F
from torch import nn


SHIFT_QUANTIZERS = ("denseshift", "pot")


def _check_bits(bits, quantizer: str) -> int:
    low = 1 if quantizer == "denseshift" else 2  # the zero level costs a code, so plain PoT needs a 2nd bit
    if not (isinstance(bits, int) and not isinstance(bits, bool) and low <= bits <= 8):
        raise ValueError(f"bits must be an int in [{low}, 8] for {quantizer}, got {bits!r}")
    return bits


def denseshift_levels(bits: int) -> torch.Tensor:
    """The 2^bits zero-free DenseShift levels, ascending: +-2^(-p), p = 0 .. 2^(bits-1) - 1."""
    mags = 2.0 ** -torch.arange(2 ** (_check_bits(bits, "denseshift") - 1), dtype=torch.float64)
    return torch.cat([-mags, mags]).sort().values


def pot_levels(bits: int) -> torch.Tensor:
    """The 2^bits - 1 levels of a plain b-bit power-of-two quantizer with zero: 0, +-2^(-p), p = 0 .. 2^(bits-1) - 2."""
    mags = 2.0 ** -torch.arange(2 ** (_check_bits(bits, "pot") - 1) - 1, dtype=torch.float64)
    return torch.cat([-mags, torch.zeros(1, dtype=torch.float64), mags]).sort().values


def _shift(magnitude: torch.Tensor, max_shift: int) -> torch.Tensor:
    """p = round(-log2 |m|) clamped to [0, max_shift]; |m| = 0 maps to the smallest magnitude (no zero level)."""
    tiny = torch.finfo(magnitude.dtype).tiny
    return torch.round(-torch.log2(magnitude.abs().clamp_min(tiny))).clamp(0, max_shift)


class _DenseShiftWeight(torch.autograd.Function):
    """w = s 2^(-p): forward on the zero-free grid; backward dw/du = 2^(-p) 1{|u| <= 1} (the clipped sign-STE scaled
    by the magnitude the sign multiplies), dw/dm = s sign(m) (straight through round(log2 .): d2^(-p)/d|m| = 1)."""

    @staticmethod
    def forward(ctx, u, m, max_shift: int):
        sign = torch.where(u >= 0, 1.0, -1.0).to(u.dtype)  # sign(0) = +1: zero is not a level
        magnitude = torch.exp2(-_shift(m, max_shift))
        ctx.save_for_backward(u, m, sign, magnitude)
        return sign * magnitude

    @staticmethod
    def backward(ctx, grad):
        u, m, sign, magnitude = ctx.saved_tensors
        m_sign = torch.where(m >= 0, 1.0, -1.0).to(m.dtype)
        return grad * magnitude * (u.abs() <= 1).to(grad.dtype), grad * sign * m_sign, None


class _PoTWeight(torch.autograd.Function):
    """q(w) = sign(w) 2^(-round(-log2 |w|)), 0 where that shift exceeds the largest one; identity STE backward."""

    @staticmethod
    def forward(ctx, w, max_shift: int):
        tiny = torch.finfo(w.dtype).tiny
        p = torch.round(-torch.log2(w.abs().clamp_min(tiny)))
        # magnitudes above 1 saturate at 2^0; those rounding past the last shift are the zero level
        return torch.where(p > max_shift, torch.zeros_like(w), torch.sign(w) * torch.exp2(-p.clamp_min(0)))

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _unit_scale_init(weight: torch.Tensor) -> torch.Tensor:
    """nn.Linear's initial weights scaled so that max |w| = 1, the largest level: the grid then spans the initial
    weights (the per-layer factor is what the following BatchNorm absorbs)."""
    return weight / weight.abs().max().clamp_min(torch.finfo(weight.dtype).tiny)


class ShiftLinear(nn.Module):
    """A linear layer with b-bit power-of-two weights, ``quantizer`` ``denseshift`` (sign and shift latents) or ``pot``
    (one latent, with a zero level). Both start from the same latent values (nn.Linear's init scaled to max |w| = 1),
    so the two quantizers differ only in their grid and their gradient path."""

    def __init__(self, in_features: int, out_features: int, quantizer: str = "denseshift", bits: int = 3,
                 bias: bool = False):
        if quantizer not in SHIFT_QUANTIZERS:
            raise ValueError(f"quantizer must be one of {list(SHIFT_QUANTIZERS)}, got {quantizer!r}")
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        super().__init__()
        self.quantizer, self.bits = quantizer, _check_bits(bits, quantizer)
        self.in_features, self.out_features = in_features, out_features
        # the largest shift: 2^(b-1) shift codes for DenseShift, one fewer for PoT whose last code is zero
        self.max_shift = 2 ** (bits - 1) - (1 if quantizer == "denseshift" else 2)
        init = _unit_scale_init(nn.Linear(in_features, out_features, bias=False).weight.detach())
        if quantizer == "denseshift":
            self.sign_latent = nn.Parameter(init.clone())
            self.shift_latent = nn.Parameter(init.clone())
        else:
            self.weight = nn.Parameter(init.clone())
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Set the latents to ``weight`` (shape out x in): weights already on this layer's grid come back exactly."""
        if not isinstance(weight, torch.Tensor) or weight.shape != (self.out_features, self.in_features):
            raise ValueError(f"weight must be a tensor of shape {(self.out_features, self.in_features)}, got "
                             f"{getattr(weight, 'shape', type(weight).__name__)}")
        if self.quantizer == "denseshift":
            self.sign_latent.copy_(weight)
            self.shift_latent.copy_(weight)
        else:
            self.weight.copy_(weight)

    def quantized_weight(self) -> torch.Tensor:
        if self.quantizer == "denseshift":
            return _DenseShiftWeight.apply(self.sign_latent, self.shift_latent, self.max_shift)
        return _PoTWeight.apply(self.weight, self.max_shift)

    @torch.no_grad()
    def integer_weight(self) -> torch.Tensor:
        """The stored code of each weight: sign * (max_shift + 1 - p), 0 for PoT's zero level (for LevelFlips)."""
        q = self.quantized_weight()
        tiny = torch.finfo(q.dtype).tiny
        return torch.sign(q) * (self.max_shift + 1 + torch.log2(q.abs().clamp_min(tiny))).clamp_min(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, quantizer={self.quantizer}, "
                f"bits={self.bits}, bias={self.bias is not None}")


def shift_factory(quantizer: str, bits: int = 3):
    """A ShiftLinear constructor (in_features, out_features) with ``quantizer`` and ``bits`` bound."""
    ShiftLinear(1, 1, quantizer, bits)  # validate now, not at the first layer

    def make(in_features: int, out_features: int) -> ShiftLinear:
        return ShiftLinear(in_features, out_features, quantizer, bits)

    return make


def zero_weight_fraction(model: nn.Module) -> float:
    """Share of the quantised weights of all ShiftLinear layers that are exactly 0 (always 0 for DenseShift)."""
    layers = [m for m in model.modules() if isinstance(m, ShiftLinear)]
    if not layers:
        raise ValueError("zero_weight_fraction needs a model with ShiftLinear layers")
    with torch.no_grad():
        weights = [m.quantized_weight() for m in layers]
    return sum(float((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)



class ShiftDiagnostics:
    """Training hook: the share of exactly-zero quantised weights at the end of training, into ``state.logs``."""

    def on_train_end(self, state) -> None:
        state.logs["zero_weight_fraction"] = zero_weight_fraction(state.unwrapped_model)
