"""Harness models: an MLP whose hidden layers take a normalisation layer (BN, Ghost BN), binary weights
(STE / ReSTE / BiPer) or another weight layer (power-of-two shift weights, StatsQ) by name, so a card varies exactly one
thing."""

from collections.abc import Callable, Sequence

import torch
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


class TwoLayerReLU(nn.Module):
    """f(x) = sum_j a_j ReLU(<w_j, x>) with the second layer fixed, a_j = +1/sqrt(m) for the first half of the m units
    and -1/sqrt(m) for the rest, and the first layer drawn from N(0, init_std^2) (Xu et al., ICLR 2024, Sec. 2). The
    output is the logit pair (0, f), so cross-entropy on it is the logistic loss log(1 + exp(-y f)) with y = +-1."""

    def __init__(self, num_features: int, num_classes: int = 2, width: int = 100, init_std: float = 1e-6):
        super().__init__()
        if num_classes != 2:
            raise ValueError(f"TwoLayerReLU is a binary classifier, got num_classes={num_classes!r}")
        if not (isinstance(width, int) and width >= 2 and width % 2 == 0):
            raise ValueError(f"width must be an even int >= 2, got {width!r}")
        if not init_std > 0:
            raise ValueError(f"init_std must be > 0, got {init_std!r}")
        self.weight = nn.Parameter(torch.randn(width, num_features) * init_std)
        sign = torch.cat([torch.ones(width // 2), -torch.ones(width // 2)])
        self.register_buffer("second_layer", sign / width ** 0.5)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.weight.T) @ self.second_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.score(x)
        return torch.stack([torch.zeros_like(f), f], 1)


class PatchCNN(nn.Module):
    """The two-layer convolutional network of the feature-learning analyses (Cao et al. 2022; Lu et al., ICLR 2024):
    the input is P patches of dimension d (flattened); F_j(x) = (1/m) sum_r sum_p ReLU(<w_{j,r}, x_p>) for the m
    filters of each class j, and the output is the logit pair (F_0, F_1), so cross-entropy on it is the logistic
    loss of f = F_1 - F_0. The second layer is fixed; filters start from N(0, init_std^2)."""

    def __init__(self, num_features: int, num_classes: int = 2, patches: int = 3, width: int = 10,
                 init_std: float = 0.01):
        super().__init__()
        if num_classes != 2:
            raise ValueError(f"PatchCNN is a binary classifier, got num_classes={num_classes!r}")
        if not (isinstance(patches, int) and patches >= 1 and num_features % patches == 0):
            raise ValueError(f"patches must be a positive int dividing the {num_features} features, got {patches!r}")
        if not (isinstance(width, int) and width >= 1) or not init_std > 0:
            raise ValueError(f"need an int width >= 1 and init_std > 0, got width={width!r}, init_std={init_std!r}")
        self.patches = patches
        self.weight = nn.Parameter(torch.randn(2, width, num_features // patches) * init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(len(x), self.patches, -1)
        return torch.relu(torch.einsum("npd,jrd->njrp", x, self.weight)).sum(3).mean(2)
