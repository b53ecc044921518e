"""Ghost Batch Normalization (Hoffer, Hubara, Soudry, "Train longer, generalize better: closing the
generalization gap in large batch training of neural networks", NeurIPS 2017, Sec. 4 / Algorithm 1).

A large batch is normalised in "ghost" chunks of ``ghost_size`` samples, each with its own mean and variance,
so the noise BN statistics inject into training stays that of a small batch while the optimiser takes one
step per large batch. The running statistics are updated once per chunk, as if each chunk had been a batch.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .algorithms import ERM


class GhostBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training-mode statistics are computed per chunk of ``ghost_size`` rows (Hoffer et al.
    2017, Alg. 1). In eval mode, and when ``ghost_size`` >= the batch, it is plain BatchNorm1d."""

    def __init__(self, num_features: int, ghost_size: int = 32, eps: float = 1e-5, momentum: float = 0.1):
        if not (isinstance(ghost_size, int) and ghost_size > 0):
            raise ValueError(f"ghost_size must be a positive int, got {ghost_size!r}")
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.ghost_size = ghost_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"input must be (N, {self.num_features}), got {tuple(x.shape)}")
        chunks = []  # when ghost_size does not divide the batch, the last chunk is shorter (as torch.split cuts it)
        for chunk in x.split(self.ghost_size):
            self.num_batches_tracked += 1
            chunks.append(F.batch_norm(chunk, self.running_mean, self.running_var, self.weight, self.bias,
                                       True, self.momentum, self.eps))
        return torch.cat(chunks)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_size={self.ghost_size}"


class GradientClipping(ERM):
    """ERM with the gradient's total norm clipped to ``max_norm`` after every backward pass
    (``torch.nn.utils.clip_grad_norm_``), as the official bigBatch ``main_gbn.py`` does with 5; a hook as well."""

    def __init__(self, max_norm: float = 5.0):
        if isinstance(max_norm, bool) or not (isinstance(max_norm, (int, float)) and max_norm > 0):
            raise ValueError(f"max_norm must be a number > 0, got {max_norm!r}")
        self.max_norm = float(max_norm)

    def after_backward(self, state) -> None:
        torch.nn.utils.clip_grad_norm_(state.unwrapped_model.parameters(), self.max_norm)
