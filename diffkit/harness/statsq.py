"""StatsQ (Liu et al., "Oscillation-free Quantization for Low-bit Vision Transformers", ICML 2023; nbasyl/OFQ
``src/quantization/quantizer/statsq.py``) and the weight-oscillation diagnostic OFQ is about.

StatsQ quantises a weight row with a scale taken from its statistics, not learned: s = 2 mean|W| per output row
(detached), w_c = clamp(W / s, -1, 1 - 1e-6), n = 2^(b-1), integer code k = round(w_c n - 1/2) in {-n .. n-1},
Q(W) = s (k + 1/2) / n, with the straight-through estimator Q.detach() - W.detach() + W.

``LevelFlips`` counts, per epoch, how many integer weight codes change from one optimiser step to the next (sign or
level flips), per weight: late in training these changes are the oscillation around rounding boundaries that OFQ's
confidence-guided annealing freezes (CGA itself is not implemented here).
"""

import torch
import torch.nn.functional as F
from torch import nn


STATSQ_CLAMP = 1 - 1e-6  # the reference's upper clamp, so that w_c n - 1/2 never rounds up to n


def statsq_codes(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """StatsQ's integer codes k in {-2^(b-1) .. 2^(b-1) - 1} and the per-row scale s = 2 mean|W| (both detached)."""
    if not (isinstance(bits, int) and not isinstance(bits, bool) and 1 <= bits <= 8):
        raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 2):
        got = getattr(weight, "shape", type(weight).__name__)
        raise ValueError(f"weight must be a 2-D tensor (out, in), got {got}")
    n = 2 ** (bits - 1)
    w = weight.detach()
    scale = 2 * w.abs().mean(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return torch.round((w / scale).clamp(-1, STATSQ_CLAMP) * n - 0.5), scale


def statsq(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Q(W) = s (k + 1/2) / 2^(b-1) forward, identity (straight-through) backward."""
    codes, scale = statsq_codes(weight, bits)
    quantised = scale * (codes + 0.5) / 2 ** (bits - 1)
    return quantised - weight.detach() + weight


class StatsQLinear(nn.Linear):
    """A linear layer with b-bit StatsQ weights (full-precision input); ``integer_weight`` gives the codes."""

    def __init__(self, in_features: int, out_features: int, bits: int = 2, bias: bool = False):
        statsq_codes(torch.ones(1, 1), bits)  # validates bits
        super().__init__(in_features, out_features, bias=bias)
        self.bits = bits

    def integer_weight(self) -> torch.Tensor:
        return statsq_codes(self.weight, self.bits)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, statsq(self.weight, self.bits), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}"


def statsq_factory(bits: int = 2):
    """A StatsQLinear constructor (in_features, out_features) with ``bits`` bound."""
    statsq_codes(torch.ones(1, 1), bits)  # validate now, not at the first layer

    def make(in_features: int, out_features: int) -> StatsQLinear:
        return StatsQLinear(in_features, out_features, bits)

    return make


class LevelFlips:
    """Training hook: per epoch, the number of integer-code changes between consecutive optimiser steps divided by
    the number of quantised weights, over every layer with an ``integer_weight()``; the per-epoch curve goes to
    ``state.logs["curves"]["level_flips"]`` (x = epoch), the first and last epochs' rates to ``state.logs``."""

    def __init__(self):
        self.previous, self.flips, self.curve = None, 0, []

    @torch.no_grad()
    def _codes(self, state) -> list[torch.Tensor]:
        layers = [m for m in state.unwrapped_model.modules() if hasattr(m, "integer_weight")]
        if not layers:
            raise ValueError("LevelFlips needs a model with quantised layers (an integer_weight() method)")
        return [m.integer_weight().clone() for m in layers]

    def _count(self, state) -> None:
        codes = self._codes(state)
        self.flips += sum(int((c != p).sum()) for c, p in zip(codes, self.previous))
        self.previous = codes

    def on_train_start(self, state) -> None:
        self.previous = self._codes(state)

    def on_step_start(self, state) -> None:
        if state.step > 0:  # the codes after the previous optimiser step
            self._count(state)

    def on_epoch_end(self, state) -> None:
        self._count(state)  # the epoch's last step
        self.curve.append([state.epoch + 1, self.flips / sum(c.numel() for c in self.previous)])
        self.flips = 0

    def on_train_end(self, state) -> None:
        state.logs["level_flips_first_epoch"] = self.curve[0][1]
        state.logs["level_flips_last_epoch"] = self.curve[-1][1]
        state.logs.setdefault("curves", {})["level_flips"] = self.curve
