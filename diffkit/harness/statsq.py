"""StatsQ (Liu et al., "Oscillation-free Quantization for Low-bit Vision Transformers", ICML 2023; nbasyl/OFQ
``src/quantization/quantizer/statsq.py``) and the weight-oscillation diagnostic OFQ is about.

StatsQ quantises a weight row with a scale taken from its statistics, not learned: s = 2 mean|W| per output row
(detached), w_c = clamp(W / s, -1, 1 - 1e-6), n = 2^(b-1), integer code k = round(w_c n - 1/2) in {-n .. n-1},
Q(W) = s (k + 1/2) / n, with the straight-through estimator Q.detach() - W.detach() + W.

``LevelFlips`` counts, per epoch and per weight, how many integer weight codes change from one optimiser step to the
next (``level_flips``) and how many of those changes reverse the direction of the weight's previous change
(``oscillations``): Nagel et al.'s oscillation count ("Overcoming Oscillations in Quantization-Aware Training", ICML
2022), as OFQ's ``TrackOscillation`` (nbasyl/OFQ ``src/quantization/quantizer/lsq.py``) counts it. Late in training
these reversals are the oscillation around rounding boundaries that OFQ's confidence-guided annealing (``ofq.py``)
freezes.
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
    """Training hook: per epoch, the number of integer-code changes between consecutive optimiser steps and the number
    of oscillations among them, each divided by the number of quantised weights, over every layer with an
    ``integer_weight()``. An oscillation is a change whose direction, sign(previous code - code), is opposite to the
    weight's last change (``TrackOscillation``: ``prev_switch_dir * switch_dir == -1``, the direction remembered only
    where a weight switched). Per-epoch curves go to ``state.logs["curves"]["level_flips"]`` and
    ``["oscillations"]`` (x = epoch), the first and last epochs' rates to ``state.logs``."""

    def __init__(self):
        self.previous, self.direction = None, None
        self.flips = self.oscillations = 0
        self.curve, self.oscillation_curve = [], []

    @torch.no_grad()
    def _codes(self, state) -> list[torch.Tensor]:
        layers = [m for m in state.unwrapped_model.modules() if hasattr(m, "integer_weight")]
        if not layers:
            raise ValueError("LevelFlips needs a model with quantised layers (an integer_weight() method)")
        return [m.integer_weight().clone() for m in layers]

    def _count(self, state) -> None:
        codes = self._codes(state)
        for i, (code, previous) in enumerate(zip(codes, self.previous)):
            switch = torch.sign(torch.round(previous - code))
            switched = switch != 0
            self.flips += int(switched.sum())
            self.oscillations += int((self.direction[i] * switch == -1).sum())
            self.direction[i] = torch.where(switched, switch, self.direction[i])
        self.previous = codes

    def on_train_start(self, state) -> None:
        self.previous = self._codes(state)
        self.direction = [torch.zeros_like(c) for c in self.previous]

    def on_step_start(self, state) -> None:
        if state.step > 0:  # the codes after the previous optimiser step
            self._count(state)

    def on_epoch_end(self, state) -> None:
        self._count(state)  # the epoch's last step
        total = sum(c.numel() for c in self.previous)
        self.curve.append([state.epoch + 1, self.flips / total])
        self.oscillation_curve.append([state.epoch + 1, self.oscillations / total])
        self.flips = self.oscillations = 0

    def on_train_end(self, state) -> None:
        state.logs["level_flips_first_epoch"] = self.curve[0][1]
        state.logs["level_flips_last_epoch"] = self.curve[-1][1]
        state.logs["oscillations_first_epoch"] = self.oscillation_curve[0][1]
        state.logs["oscillations_last_epoch"] = self.oscillation_curve[-1][1]
        curves = state.logs.setdefault("curves", {})
        curves["level_flips"], curves["oscillations"] = self.curve, self.oscillation_curve
