"""Harness models: an MLP whose hidden layers take a normalisation layer (BN, Ghost BN), binary weights
(STE / ReSTE / BiPer) or another weight layer (power-of-two shift weights, StatsQ) by name, so a card varies exactly one
thing."""

from collections.abc import Callable, Sequence

from torch import nn

from .binary import BinaryLinear


def mlp(num_features: int, num_classes: int, hidden: Sequence[int] = (256, 256),
        norm: Callable[[int], nn.Module] | None = None, binary: Callable[[int, int], nn.Module] | None = None,
        linear: Callable[[int, int], nn.Module] | None = None) -> nn.Sequential:
    """Linear -> [norm] -> ReLU blocks and a linear head. With ``binary`` (a BinaryLinear factory) each hidden block is
    binary-linear -> BN (``norm`` or BatchNorm1d) -> sign, the 1W1A layout of the ReSTE/BiPer MLP baselines; the
    head stays full precision, as in both papers. ``linear`` (a factory (in, out) -> module) replaces the hidden
    blocks' nn.Linear, keeping full-precision ReLU activations (DenseShift's setting: low-bit weights only)."""
    if not (isinstance(hidden, Sequence) and hidden and all(isinstance(h, int) and h > 0 for h in hidden)):
        raise ValueError(f"hidden must be a non-empty list of positive ints, got {hidden!r}")
    if binary is not None and linear is not None:
        raise ValueError("binary and linear both replace the hidden weight layer; give at most one")
    layers, width = [], num_features
    for h in hidden:
        if binary is not None:
            layer = binary(width, h)  # each estimator's own activation binariser (BiPer's differs)
            layers += [layer, (norm or nn.BatchNorm1d)(h), layer.activation()]
        else:
            layers += [(linear or nn.Linear)(width, h)] + ([norm(h)] if norm is not None else []) + [nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def binary_factory(estimator: str, **params) -> Callable[[int, int], BinaryLinear]:
    """A BinaryLinear constructor with ``estimator`` and its parameters (o, t for ReSTE, omega for BiPer) bound."""
    BinaryLinear(1, 1, estimator, **params)  # validate now, not at the first layer

    def make(in_features: int, out_features: int) -> BinaryLinear:
        return BinaryLinear(in_features, out_features, estimator, **params)

    return make
