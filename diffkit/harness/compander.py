"""Weight Compander (Cakaj, Mehnert & Yang, "Weight Compander: A Simple Weight Reparameterization for
Regularization", IJCNN 2023, arXiv 2306.16993; equations from the paper PDF on the first author's site,
rinorcakaj/rinorcakaj.github.io ``files/WC_IJCNN_2023.pdf``).

Every weight w of a Linear / Conv layer is trained through a free parameter v,

    w = Psi(v) = a arctan(v / b),     a, b > 0                                  (Eq. 1)

bounded by +-a pi / 2 (large weights are compressed) with the derivative Psi'(v) = a / (b (1 + v^2 / b^2)) (Eq. 3),
largest near v = 0 (small weights move fastest, away from zero). Initialisation inverts Eq. 1,

    v = b tan(w / a)                                                            (Eq. 4)

so Psi(v) equals the usual initial weights. Biases and BatchNorm parameters are not reparameterised. The paper's
training rules, reproduced by ``CompanderStep``:

- weight decay acts on Psi(v), not on v: the gradient of (lambda / 2) ||Psi(v)||^2, i.e. lambda Psi(v) w.r.t. w;
- with Adam, the Powerpropagation-style step: the adaptive step is computed from dL/dPsi (the gradient w.r.t. the
  weight) and multiplied by Psi'(v); with plain SGD the chain rule needs nothing extra (``step="chain"``);
- a, b are shared by the whole network, chosen from the grid {0.5, 0.6, ..., 1.0} (a < b allowed: Table I picks
  a = 0.5, b = 0.7 for VGG19, a = 1.0, b = 0.6 for ResNet18) on a 9 : 1 validation split;
- the learnable variant: a, b per layer, initialised a = 0.5, b = 1.0, trained with the network; weight decay then
  acts on v (the paper's rule for this variant), not on a or b.
"""

import math

import torch
from torch import nn
from torch.nn.utils import parametrize


STEP_RULES = ("chain", "powerprop")
LEARNABLE_INIT = (0.5, 1.0)  # the paper's initial a, b of the learnable variant


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class WeightCompander(nn.Module):
    """The parametrisation w = Psi(v) = a arctan(v / b) (Eq. 1); ``right_inverse`` is Eq. 4, so registering it keeps a
    layer's weights. With ``learnable`` a and b are this layer's parameters (the paper's per-layer variant), otherwise
    fixed buffers."""

    def __init__(self, a: float = 1.0, b: float = 0.6, learnable: bool = False):
        super().__init__()
        a, b = _positive("a", a), _positive("b", b)
        if not isinstance(learnable, bool):
            raise TypeError(f"learnable must be a bool, got {type(learnable).__name__}")
        self.learnable = learnable
        for name, value in (("a", a), ("b", b)):
            if learnable:
                setattr(self, name, nn.Parameter(torch.tensor(value)))
            else:
                self.register_buffer(name, torch.tensor(value))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.a * torch.atan(v / self.b)

    def derivative(self, v: torch.Tensor) -> torch.Tensor:
        """Psi'(v) = a / (b (1 + v^2 / b^2)) (Eq. 3)."""
        return self.a / (self.b * (1 + (v / self.b).square()))

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        bound = (self.a * math.pi / 2).item()
        if w.abs().max() >= bound:
            raise ValueError(f"weights must lie strictly inside (-a pi/2, a pi/2) = +-{bound:.4g} to be reparameterised "
                             f"(Eq. 4), got max |w| = {w.abs().max().item():.4g}")
        return self.b * torch.tan(w / self.a)

    def extra_repr(self) -> str:
        return f"a={self.a.item():.4g}, b={self.b.item():.4g}, learnable={self.learnable}"


def compander_layers(model: nn.Module) -> list[tuple[nn.Module, WeightCompander]]:
    """(layer, compander) for every weight of ``model`` reparameterised by ``apply_weight_compander``."""
    found = []
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            found += [(module, p) for p in module.parametrizations.weight if isinstance(p, WeightCompander)]
    return found


def apply_weight_compander(model: nn.Module, a: float = 1.0, b: float = 0.6, learnable: bool = False) -> nn.Module:
    """Reparameterise the weight of every ``nn.Linear`` / ``nn.Conv*d`` of ``model`` in place by Eq. 1, keeping its
    current value (Eq. 4); biases untouched. Fixed ``a``, ``b`` are shared by every layer; ``learnable`` gives each
    layer its own a, b starting at the given values (the paper starts them at a = 0.5, b = 1.0). Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if not layers:
        raise ValueError("model has no Linear or Conv layer to reparameterise")
    if compander_layers(model):
        raise ValueError("model already has weight companders")
    for layer in layers:
        parametrize.register_parametrization(layer, "weight", WeightCompander(a, b, learnable))
    return model


class CompanderStep:
    """Training hook: the paper's update rules for compander weights, around the card's optimizer (which must add its
    weight decay to the gradient, as torch's SGD and Adam do; AdamW's decoupled decay is refused).

    - fixed a, b: the optimizer's weight decay lambda acts on Psi(v) instead of v (the gradient w.r.t. v gets
      lambda Psi(v) Psi'(v) under ``chain``, the weight-space gradient gets lambda Psi(v) under ``powerprop``);
    - learnable a, b: weight decay on v (the optimizer's own), none on a and b;
    - ``step="powerprop"``: the optimizer sees dL/dw = dL/dv / Psi'(v) and its update of v is multiplied by Psi'(v)
      (taken before the step); ``step="chain"``: the optimizer sees dL/dv (plain SGD in the paper).
    """

    def __init__(self, step: str = "chain"):
        if step not in STEP_RULES:
            raise ValueError(f"step must be one of {list(STEP_RULES)}, got {step!r}")
        self.step = step
        self.layers, self.groups, self.saved, self.handle = [], {}, [], None

    def on_train_start(self, state) -> None:
        self.layers = compander_layers(state.unwrapped_model)
        if not self.layers:
            raise ValueError("CompanderStep needs a model with weight companders (apply_weight_compander)")
        optimizer = getattr(state.optimizer, "optimizer", state.optimizer)  # accelerate wraps the torch optimizer
        if isinstance(optimizer, torch.optim.AdamW) or any(g.get("decoupled_weight_decay") for g in
                                                           optimizer.param_groups):
            raise ValueError("the weight compander's decay on Psi(v) needs an optimizer with coupled weight decay "
                             "(sgd, adam), not AdamW")
        # the group of every parameter: its weight decay is read at every step (a schedule may change it)
        self.groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        if self.step == "powerprop":
            self.handle = optimizer.register_step_post_hook(lambda *args: self._scale_updates())

    def _decay(self, param: torch.Tensor) -> float:
        return self.groups[id(param)].get("weight_decay", 0.0)

    @torch.no_grad()
    def after_backward(self, state) -> None:
        self.saved = []
        for layer, psi in self.layers:
            v = layer.parametrizations.weight.original
            if v.grad is None:
                continue
            lam = self._decay(v)
            slope = psi.derivative(v)
            grad = v.grad / slope if self.step == "powerprop" else v.grad.clone()  # dL/dw or dL/dv
            if not psi.learnable:
                # the optimizer will add lam * v; replace it by the decay of Psi(v) (in the space the optimizer sees)
                target = psi(v) if self.step == "powerprop" else psi(v) * slope
                grad += lam * (target - v)
            else:
                for param in (psi.a, psi.b):  # no decay on the learnable a, b
                    if param.grad is not None:
                        param.grad -= self._decay(param) * param
            v.grad.copy_(grad)
            if self.step == "powerprop":
                self.saved.append((v, v.detach().clone(), slope))

    @torch.no_grad()
    def _scale_updates(self) -> None:
        for v, before, slope in self.saved:
            v.copy_(before + (v - before) * slope)
        self.saved = []

    def on_train_end(self, state) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        learnable = [psi for _, psi in self.layers if psi.learnable]
        if learnable:  # where the per-layer a, b ended (first to last layer)
            state.logs["compander_a"] = [psi.a.item() for psi in learnable]
            state.logs["compander_b"] = [psi.b.item() for psi in learnable]
