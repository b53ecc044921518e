"""Power-of-two ("shift") weights for the harness MLP.

- ``denseshift``: DenseShift (Li et al., "DenseShift: Towards Accurate and Efficient Low-Bit Power-of-Two
  Quantization", ICCV 2023, arXiv 2208.09708), with the gradient path of the official code (noah-research
  S3-Training ``dsconv2d.py``, ``DenseShiftConv2d3bit``). A b-bit weight is zero-free, w = s 2^p with s in {-1, +1}
  and p in {0, ..., 2^(b-1) - 1} (1 sign bit + b - 1 shift bits, 2^b levels, none of them zero). It is trained
  through a sign-scale decomposition: a latent tensor u for the sign, s = sign(u) (sign(0) = +1), and
  m = 2^(b-1) - 1 binary latents t_1..t_m for the shift, b_i = 1{t_i > 0}, combined as a thermometer code
  p = (...((b_1 + 1) b_2 + 1) b_3 ... + 1) b_m (the official 3-bit p = ((b_1 + 1) b_2 + 1) b_3). Both binarisations
  pass the gradient straight through (identity), and the backward pass uses the surrogate s sqrt(p + 1) in place
  of s 2^p (the forward value).
- ``pot``: the plain power-of-two quantizer the paper argues against (as in DeepShift-Q, Elhoushi et al. 2021): one
  latent tensor w, q(w) = sign(w) 2^(-round(-log2 |w|)) with b bits spent on 2^(b-1) - 1 shifts plus a zero level
  (2^b - 1 levels), weights below the smallest shift's rounding threshold become 0, identity STE.

Both layers have no weight scale: in the harness MLP each feeds a BatchNorm, which absorbs a per-layer scale
exactly (the DenseShift grid +-2^p and the PoT grid +-2^-p differ by such a factor), so the weights themselves stay on
an exact power-of-two grid (the property that lets a shift network replace multiplications by exponent additions).
"""

import torch
import torch.nn.functional as F
from torch import nn


SHIFT_QUANTIZERS = ("denseshift", "pot")


def _check_bits(bits, quantizer: str) -> int:
    # the zero level costs a code, so plain PoT needs a 2nd bit; DenseShift's thermometer code needs 2^(b-1) - 1
    # binary latents per weight, so it stops at 5 bits (15 latents)
    low, high = (1, 5) if quantizer == "denseshift" else (2, 8)
    if not (isinstance(bits, int) and not isinstance(bits, bool) and low <= bits <= high):
        raise ValueError(f"bits must be an int in [{low}, {high}] for {quantizer}, got {bits!r}")
    return bits


def denseshift_levels(bits: int) -> torch.Tensor:
    """The 2^bits zero-free DenseShift levels, ascending: +-2^p, p = 0 .. 2^(bits-1) - 1."""
    mags = 2.0 ** torch.arange(2 ** (_check_bits(bits, "denseshift") - 1), dtype=torch.float64)
    return torch.cat([-mags, mags]).sort().values


def pot_levels(bits: int) -> torch.Tensor:
    """The 2^bits - 1 levels of a plain b-bit power-of-two quantizer with zero: 0, +-2^(-p), p = 0 .. 2^(bits-1) - 2."""
    mags = 2.0 ** -torch.arange(2 ** (_check_bits(bits, "pot") - 1) - 1, dtype=torch.float64)
    return torch.cat([-mags, torch.zeros(1, dtype=torch.float64), mags]).sort().values


class _Binarize01(torch.autograd.Function):
    """1{t > 0} forward, identity backward (the official ``STEBinarize01F``)."""

    @staticmethod
    def forward(ctx, t):
        return (t > 0).to(t.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _SignPlusOne(torch.autograd.Function):
    """sign(u) with sign(0) = +1 forward, identity backward (the official ``STBinarizeF``)."""

    @staticmethod
    def forward(ctx, u):
        return torch.where(u >= 0, 1.0, -1.0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def thermometer_shift(bits: torch.Tensor) -> torch.Tensor:
    """p = (...((b_1 + 1) b_2 + 1) b_3 ... + 1) b_m from binary latents stacked on dim 0 (differentiable in the b_i):
    the number of trailing ones, b_m, b_(m-1), ..."""
    shift = bits.new_zeros(bits.shape[1:])
    for b in bits:
        shift = (shift + 1) * b
    return shift


def denseshift_weight(sign_latent: torch.Tensor, shift_latents: torch.Tensor) -> torch.Tensor:
    """DenseShift's weight s 2^p in the forward pass, with the gradient of the surrogate s sqrt(p + 1) (module
    docstring; the official ``DenseShiftConv2d3bit.forward``)."""
    shift = thermometer_shift(_Binarize01.apply(shift_latents))
    sign = _SignPlusOne.apply(sign_latent)
    surrogate = sign * torch.sqrt(shift + 1)
    return surrogate + (sign * torch.exp2(shift) - surrogate).detach()


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
    """nn.Linear's initial weights scaled so that max |w| = 1, the largest PoT level: the grid then spans the initial
    weights (the per-layer factor is what the following BatchNorm absorbs)."""
    return weight / weight.abs().max().clamp_min(torch.finfo(weight.dtype).tiny)


class ShiftLinear(nn.Module):
    """A linear layer with b-bit power-of-two weights, ``quantizer`` ``denseshift`` (a sign latent and 2^(b-1) - 1
    binary shift latents, each initialised like nn.Linear's weight, independently) or ``pot`` (one latent with a zero
    level, nn.Linear's init scaled to max |w| = 1)."""

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
        # the largest shift: 2^(b-1) - 1 for DenseShift, one fewer for PoT whose last code is zero
        self.max_shift = 2 ** (bits - 1) - (1 if quantizer == "denseshift" else 2)

        def linear_init() -> torch.Tensor:
            return nn.Linear(in_features, out_features, bias=False).weight.detach()

        if quantizer == "denseshift":
            self.sign_latent = nn.Parameter(linear_init())
            self.shift_latents = nn.Parameter(torch.stack([linear_init() for _ in range(self.max_shift)])
                                              if self.max_shift else torch.zeros(0, out_features, in_features))
        else:
            self.weight = nn.Parameter(_unit_scale_init(linear_init()))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Set the latents so that the quantised weight is ``weight`` (shape out x in) rounded to this layer's grid:
        weights already on the grid come back exactly. DenseShift: the sign latent takes ``weight``, the shift
        latents +-1/2 in the thermometer code of p = round(log2 |w|) clamped to the grid."""
        if not isinstance(weight, torch.Tensor) or weight.shape != (self.out_features, self.in_features):
            raise ValueError(f"weight must be a tensor of shape {(self.out_features, self.in_features)}, got "
                             f"{getattr(weight, 'shape', type(weight).__name__)}")
        if self.quantizer == "pot":
            self.weight.copy_(weight)
            return
        self.sign_latent.copy_(weight)
        tiny = torch.finfo(weight.dtype).tiny
        shift = torch.round(torch.log2(weight.abs().clamp_min(tiny))).clamp(0, self.max_shift)
        for i in range(self.max_shift):  # b_i = 1 for the last p latents, 0 before them
            self.shift_latents[i] = torch.where(i >= self.max_shift - shift, 0.5, -0.5)

    def quantized_weight(self) -> torch.Tensor:
        if self.quantizer == "denseshift":
            return denseshift_weight(self.sign_latent, self.shift_latents)
        return _PoTWeight.apply(self.weight, self.max_shift)

    @torch.no_grad()
    def integer_weight(self) -> torch.Tensor:
        """The stored code of each weight, one per level: DenseShift sign * (p + 1); PoT sign * (max_shift + 1 - p),
        0 for its zero level (for LevelFlips)."""
        q = self.quantized_weight()
        if self.quantizer == "denseshift":
            return torch.sign(q) * (torch.log2(q.abs()) + 1)
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
