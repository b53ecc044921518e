"""Sign estimators for binary weights, and the two indicators ReSTE uses to compare them.

- ``ste``: clipped straight-through estimator (Courbariaux et al. 2016; ReSTE's "STE" baseline):
  forward sign(w), backward 1{|w| <= 1}.
- ``reste``: Rectified STE (Wu et al., "Estimator Meets Equilibrium Perspective: A Rectified Straight Through
  Estimator for Binary Neural Networks Training", ICCV 2023): forward sign(w), backward the derivative of the
  power function f_o(w) = sign(w)|w|^(1/o), i.e. (1/o)|w|^((1-o)/o) for 0.1 < |w| <= t, the secant slope
  0.1^(1/o)/0.1 for |w| <= 0.1 (where the power's derivative blows up), 0 beyond t; o is annealed 1 -> o_end.
- ``biper``: BiPer (Vargas et al., "BiPer: Binary Neural Networks using a Periodic Function", CVPR 2024),
  stage 2: forward sign(sin(omega w)), backward omega cos(omega w) (the square wave's sine surrogate).

Indicators (ReSTE Sec. 3.2, ``utils/tools.py``): the estimating error sum_layers ||f~(w) - forward(w)||_2,
f~ the function whose derivative the backward pass uses, and the gradient stability
sum_layers Var(|dL/dw|): a small estimating error costs stability (larger, more divergent gradients).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


ESTIMATORS = ("ste", "reste", "biper")
RESTE_INTERVAL = 0.1  # below this |w| ReSTE's backward is the secant slope of f_o, as in the reference code


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        return torch.sign(w)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= 1).to(grad.dtype)


class _SignReSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, o: float, t: float):
        ctx.save_for_backward(w)
        ctx.o, ctx.t = o, t
        return torch.sign(w)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad * reste_derivative(w, ctx.o, ctx.t), None, None


class _SignBiPer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, omega: float):
        ctx.save_for_backward(w)
        ctx.omega = omega
        return torch.sign(torch.sin(omega * w))

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad * ctx.omega * torch.cos(ctx.omega * w), None


def reste_derivative(w: torch.Tensor, o: float, t: float = 1.5) -> torch.Tensor:
    """ReSTE's backward factor at ``w`` (Wu et al. 2023, Eq. 9 with the reference code's |w| <= 0.1 secant)."""
    a = w.abs()
    power = a.clamp_min(RESTE_INTERVAL).pow((1 - o) / o) / o
    secant = RESTE_INTERVAL ** (1 / o) / RESTE_INTERVAL
    return torch.where(a <= RESTE_INTERVAL, torch.full_like(w, secant), torch.where(a <= t, power, torch.zeros_like(w)))


def reste_o(epoch: int, epochs: int, o_end: float = 3.0) -> float:
    """ReSTE's annealed power o = 1 + (1 - cos(pi/2 * epoch/epochs)) (o_end - 1) (``main.py``: 1 at the start)."""
    if not (isinstance(epochs, int) and epochs > 0 and 0 <= epoch <= epochs):
        raise ValueError(f"need 0 <= epoch <= epochs with epochs > 0, got epoch={epoch!r}, epochs={epochs!r}")
    if not o_end >= 1:
        raise ValueError(f"o_end must be >= 1, got {o_end!r}")
    return 1 + (1 - math.cos(math.pi / 2 * epoch / epochs)) * (o_end - 1)


class BinaryLinear(nn.Linear):
    """A linear layer whose weights are binarised by ``estimator`` (``ste``, ``reste``, ``biper``) in the
    forward pass; the latent real weights are what the optimiser updates.

    No weight scale: every binary layer in the harness feeds a BatchNorm, which absorbs a per-layer (ReSTE's
    mean|W|) or per-channel (BiPer's alpha) scale exactly.
    """

    def __init__(self, in_features: int, out_features: int, estimator: str = "ste", bias: bool = False,
                 o: float = 1.0, t: float = 1.5, omega: float = 20.0):
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {list(ESTIMATORS)}, got {estimator!r}")
        if not o >= 1 or not t > RESTE_INTERVAL or not omega > 0:
            raise ValueError(f"need o >= 1, t > {RESTE_INTERVAL}, omega > 0, got o={o!r}, t={t!r}, omega={omega!r}")
        super().__init__(in_features, out_features, bias=bias)
        self.estimator, self.o, self.t, self.omega = estimator, float(o), float(t), float(omega)

    def binary_weight(self) -> torch.Tensor:
        if self.estimator == "ste":
            return _SignSTE.apply(self.weight)
        if self.estimator == "reste":
            return _SignReSTE.apply(self.weight, self.o, self.t)
        return _SignBiPer.apply(self.weight, self.omega)

    def surrogate(self) -> torch.Tensor:
        """f~(w): the function whose derivative the backward pass uses in place of the forward's."""
        w = self.weight.detach()
        if self.estimator == "ste":
            return w.clamp(-1, 1)
        if self.estimator == "reste":
            return torch.sign(w) * w.abs().pow(1 / self.o)
        return torch.sin(self.omega * w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.binary_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, estimator={self.estimator}"


class SignActivation(nn.Module):
    """Binary activations, sign(x) with the clipped STE, the same for every weight estimator so that the weight
    estimator is the only thing a comparison varies."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SignSTE.apply(x)


def binary_layers(model: nn.Module) -> list[BinaryLinear]:
    return [m for m in model.modules() if isinstance(m, BinaryLinear)]


def estimating_error(model: nn.Module) -> float:
    """ReSTE's estimating error: sum over binary layers of ||f~(w) - forward(w)||_2 (``get_fitting_error``)."""
    layers = binary_layers(model)
    if not layers:
        raise ValueError("estimating_error needs a model with BinaryLinear layers")
    with torch.no_grad():
        return float(sum(torch.linalg.vector_norm(m.surrogate() - m.binary_weight()) for m in layers))


def gradient_stability(model: nn.Module) -> float:
    """ReSTE's gradient-stability indicator: sum over binary layers of Var(|dL/dw|) of the latest backward pass
    (``get_stability_var``); lower is more stable."""
    layers = binary_layers(model)
    if not layers or any(m.weight.grad is None for m in layers):
        raise ValueError("gradient_stability needs a model with BinaryLinear layers after a backward pass")
    return float(sum(m.weight.grad.abs().flatten().var() for m in layers))


class ResteAnnealing:
    """Training hook: sets every ReSTE layer's o to ``reste_o(epoch, epochs, o_end)`` at the start (o = 1) and after
    each epoch, as ``main.py`` does before each epoch."""

    def __init__(self, epochs: int, o_end: float = 3.0):
        reste_o(0, epochs, o_end)  # validates
        self.epochs, self.o_end = epochs, o_end

    def _set(self, model: nn.Module, epoch: int) -> None:
        o = reste_o(min(epoch, self.epochs), self.epochs, self.o_end)
        for layer in binary_layers(model):
            if layer.estimator == "reste":
                layer.o = o

    def on_train_start(self, state) -> None:
        self._set(state.unwrapped_model, 0)

    def on_epoch_end(self, state) -> None:
        self._set(state.unwrapped_model, state.epoch + 1)


class BinaryDiagnostics:
    """Training hook: ReSTE's gradient-stability indicator averaged over every step (after backward), and the
    estimating error at the end of training, into ``state.logs``."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def after_backward(self, state) -> None:
        self.total += gradient_stability(state.unwrapped_model)
        self.count += 1

    def on_train_end(self, state) -> None:
        state.logs["gradient_stability"] = self.total / max(self.count, 1)
        state.logs["estimating_error"] = estimating_error(state.unwrapped_model)
