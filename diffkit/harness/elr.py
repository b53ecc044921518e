"""Early-Learning Regularization (Liu, Niles-Weed, Razavian, Fernandez-Granda, "Early-Learning
Regularization Prevents Memorization of Noisy Labels", NeurIPS 2020, arXiv 2007.00151), Eq. 6 and Sec. 4.

Each training sample i keeps a target t_i, a temporal ensemble (EMA) of the model's own predictions. Early in
training the predictions follow the clean signal, so pulling later predictions towards t_i keeps the network
from memorising the wrong labels: L = CE(f(x_i), y_i) + lambda * mean_i log(1 - <t_i, p_i>).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class ELRLoss(nn.Module):
    """ELR loss (Liu et al. 2020, Eq. 6) with per-sample targets indexed by sample id.

    ``gather`` (e.g. ``accelerator.gather``) is called on the updated (index, target) rows, so that under data
    parallelism every process keeps the same full table of targets: a sample seen by another process this step
    may be seen by this one next epoch.
    """

    def __init__(self, num_samples: int, num_classes: int, beta: float = 0.7, lam: float = 3.0,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        if not (isinstance(num_samples, int) and num_samples > 0):
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if not (isinstance(num_classes, int) and num_classes > 1):
            raise ValueError(f"num_classes must be an int > 1, got {num_classes!r}")
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam!r}")
        self.beta, self.lam, self.gather = beta, lam, gather
        self.register_buffer("target", torch.zeros(num_samples, num_classes))

    def forward(self, logits: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if logits.shape != (len(y), self.target.shape[1]) or index.shape != y.shape:
            raise ValueError(f"logits must be (N, {self.target.shape[1]}) with N = len(y) = len(index), "
                             f"got logits {tuple(logits.shape)}, y {tuple(y.shape)}, index {tuple(index.shape)}")
        # the clamp keeps log(1 - <t, p>) finite when a prediction saturates (the reference code's 1e-4)
        p = logits.softmax(1).clamp(1e-4, 1 - 1e-4)
        with torch.no_grad():
            # t_i <- beta t_i + (1 - beta) p_i / sum(p_i): the renormalisation undoes the clamp
            p_hat = p / p.sum(1, keepdim=True)
            new_target = self.beta * self.target[index] + (1 - self.beta) * p_hat
            rows, values = index, new_target
            if self.gather is not None:
                rows, values = self.gather(index), self.gather(new_target)
            self.target[rows] = values
        regulariser = (1 - (new_target * p).sum(1)).log().mean()
        return F.cross_entropy(logits, y) + self.lam * regulariser
