"""Weight compander (Cakaj, Mehnert & Yang, "Weight Compander: A Simple Weight Reparameterization for
Regularization", IJCNN 2023, arXiv 2306.16993) -- a STAND-IN, not the paper's Eq. 1.

The paper reparameterises every weight as w = wc(v) with a nonlinear odd function that (a) restricts the magnitude
of large weights and (b) forces small weights away from zero, and optionally learns the function's two
hyper-parameters. The exact formula (the paper's Eq. 1) could not be retrieved from any copy available while this
was written (only the abstract), so this module implements the abstract's description with the simplest smooth
function that has all three stated properties (the paper's learnable-hyper-parameter extension is left out: its
update rule was not retrievable either, and learning this stand-in's alpha, beta by plain SGD with the weights --
tried on the digits card -- drove alpha to ~0 and beta up within two epochs, collapsing the network to chance):

    wc(v) = alpha * tanh(v / beta),   alpha > beta > 0

odd; bounded, |wc(v)| < alpha (large weights are compressed); slope alpha / beta > 1 at zero, so |wc(v)| > |v|
for small v (small weights are expanded away from zero, and their gradient is amplified by the same factor).
Results obtained with it are results of this stand-in, not of the paper's function.
"""

import torch
from torch import nn
from torch.nn.utils import parametrize


class WeightCompanderStandIn(nn.Module):
    """w = alpha * tanh(v / beta): the stand-in for the paper's (unretrieved) Eq. 1, see the module docstring.

    ``right_inverse`` maps a weight to the v that gives it, so registering the parametrisation keeps a layer's
    initial weights unchanged (as long as they lie inside (-alpha, alpha)).
    """

    def __init__(self, alpha: float = 1.0, beta: float = 0.5):
        super().__init__()
        if not (isinstance(alpha, (int, float)) and isinstance(beta, (int, float)) and alpha > beta > 0):
            raise ValueError(f"need alpha > beta > 0 (so that small weights are pushed away from zero), "
                             f"got alpha={alpha!r}, beta={beta!r}")
        self.alpha, self.beta = float(alpha), float(beta)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.alpha * torch.tanh(v / self.beta)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        ratio = w / self.alpha
        if ratio.abs().max() >= 1:
            raise ValueError(f"weights must lie strictly inside (-alpha, alpha), alpha = {self.alpha:.4g}, to be "
                             f"reparameterised, got max |w| = {w.abs().max().item():.4g}")
        return self.beta * torch.atanh(ratio)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}"


def apply_weight_compander(model: nn.Module, alpha: float = 1.0, beta: float = 0.5) -> nn.Module:
    """Reparameterise the weight of every ``nn.Linear`` / ``nn.Conv*d`` in ``model`` in place (biases untouched: the
    paper speaks of weights), each with its own ``WeightCompanderStandIn``; the initial weights are preserved. Returns
    ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if not layers:
        raise ValueError("model has no Linear or Conv layer to reparameterise")
    for layer in layers:
        parametrize.register_parametrization(layer, "weight", WeightCompanderStandIn(alpha, beta))
    return model
