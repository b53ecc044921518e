"""Sign estimators for binary weights, and the two indicators ReSTE uses to compare them.

- ``ste``: clipped straight-through estimator (Courbariaux et al. 2016; ReSTE's "STE" baseline):
  forward sign(w), backward 1{|w| <= 1}.
- ``reste``: Rectified STE (Wu et al., "Estimator Meets Equilibrium Perspective: A Rectified Straight Through
  Estimator for Binary Neural Networks Training", ICCV 2023): forward sign(w), backward the derivative of the
  power function f_o(w) = sign(w)|w|^(1/o), i.e. (1/o)|w|^((1-o)/o) for 0.1 < |w| <= t, the secant slope
  0.1^(1/o)/0.1 for |w| <= 0.1 (where the power's derivative blows up), 0 beyond t; o is annealed 1 -> o_end.
- ``biper``: BiPer (Vargas et al., "BiPer: Binary Neural Networks using a Periodic Function", CVPR 2024;
  edmav4/BiPer ``cifar10/modules/binarized_modules.py``, ``main.py``, ``main_stage2.py``, ``run_stg1.sh``,
  ``run_stg2.sh``), in its two stages: stage 1 trains with the continuous weights sin(omega w), stage 2 continues
  from stage 1's weights with sign(sin(omega w)) forward and the sine's derivative omega cos(omega w) backward
  (identity through the sign). Both stages add the official regulariser tau mean(1/2 - cos(2 omega w) / 2) per
  layer (tau 0.037 in stage 1, 0.0468 in stage 2, the scripts' values); ``BiPerStages`` switches the stage and adds
  the regulariser's gradient. BiPer also binarises activations its own way (``BiPerActivation``): in training each
  sample's pre-activation is divided by its standard deviation over the features, and the sign's backward is the
  official (2 - |2 x|)_+ of that normalised value.

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
    forward pass; the latent real weights are what the optimiser updates. A BiPer layer starts in stage 2 (binary
    weights) unless ``stage2`` is set False (``BiPerStages`` runs stage 1 first).

    No weight scale: every binary layer in the harness feeds a BatchNorm, which absorbs a per-layer (ReSTE's
    mean|W|) or per-channel (BiPer's alpha) scale exactly.
    """

    def __init__(self, in_features: int, out_features: int, estimator: str = "ste", bias: bool = False,
                 o: float = 1.0, t: float = 1.5, omega: float = 20.0, stage2: bool = True):
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {list(ESTIMATORS)}, got {estimator!r}")
        if not o >= 1 or not t > RESTE_INTERVAL or not omega > 0:
            raise ValueError(f"need o >= 1, t > {RESTE_INTERVAL}, omega > 0, got o={o!r}, t={t!r}, omega={omega!r}")
        super().__init__(in_features, out_features, bias=bias)
        self.estimator, self.o, self.t, self.omega = estimator, float(o), float(t), float(omega)
        self.stage2 = stage2  # BiPer only: False = stage 1, continuous sin(omega w)

    def binary_weight(self) -> torch.Tensor:
        if self.estimator == "ste":
            return _SignSTE.apply(self.weight)
        if self.estimator == "reste":
            return _SignReSTE.apply(self.weight, self.o, self.t)
        if not self.stage2:
            return torch.sin(self.omega * self.weight)
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

    def activation(self) -> nn.Module:
        """The activation binariser that follows this layer: BiPer's own, the clipped-STE sign otherwise."""
        return BiPerActivation() if self.estimator == "biper" else SignActivation()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, estimator={self.estimator}"


class SignActivation(nn.Module):
    """Binary activations, sign(x) with the clipped STE (ReSTE's "STE" baseline for activations)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SignSTE.apply(x)


class _SignBiPerActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (2 - (2 * x).abs()).clamp_min(0)


class BiPerActivation(nn.Module):
    """BiPer's activation binariser (``BinaryQuantize_a`` and the normalisation in ``BinarizeConv2d.forward``): in
    training x / sqrt(Var(x) + 1e-5) per sample (unbiased variance over the features), then sign with the backward
    (2 - |2 x|)_+; in evaluation plain sign (the normalisation does not change a sign)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            x = x / torch.sqrt(x.var(dim=tuple(range(1, x.dim())), keepdim=True) + 1e-5)
        return _SignBiPerActivation.apply(x)


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


BIPER_TAU = (0.037, 0.0468)  # run_stg1.sh / run_stg2.sh --tau (tau_min = tau_max = tau: constant per stage)


class BiPerStages:
    """Training hook for BiPer's two stages: stage 1 (continuous sin(omega w)) for the first ``stage1_epochs`` epochs,
    then stage 2 (sign(sin(omega w))) from the weights stage 1 ends with; in both the gradient of the official
    regulariser tau mean(1/2 - cos(2 omega w) / 2) = tau mean(sin^2(omega w)) per layer (``tau`` = (stage 1, stage 2)).
    The stages' learning rates and weight decays are the card's ``lr_schedule`` (``schedules.py``). The official
    stage 2 resumes from stage 1's best-validation checkpoint; here from its last weights."""

    def __init__(self, epochs: int, stage1_epochs: int, tau: tuple[float, float] = BIPER_TAU):
        if not (isinstance(stage1_epochs, int) and not isinstance(stage1_epochs, bool) and 0 <= stage1_epochs < epochs):
            raise ValueError(f"stage1_epochs must be an int in [0, {epochs}) (the budget's epochs), got "
                             f"{stage1_epochs!r}")
        if not (isinstance(tau, (list, tuple)) and len(tau) == 2 and all(isinstance(v, (int, float)) and v >= 0
                                                                          for v in tau)):
            raise ValueError(f"tau must be two numbers >= 0 (stage 1, stage 2), got {tau!r}")
        self.stage1_epochs, self.tau, self.layers = stage1_epochs, tuple(float(v) for v in tau), []

    def _set(self, stage2: bool) -> None:
        for layer in self.layers:
            layer.stage2 = stage2

    def on_train_start(self, state) -> None:
        self.layers = [m for m in binary_layers(state.unwrapped_model) if m.estimator == "biper"]
        if not self.layers:
            raise ValueError("BiPerStages needs a model with BiPer layers")
        self._set(self.stage1_epochs == 0)

    @torch.no_grad()
    def after_backward(self, state) -> None:
        tau = self.tau[1] if self.layers[0].stage2 else self.tau[0]
        for layer in self.layers:
            if layer.weight.grad is not None:  # d/dw mean(sin^2(omega w)) = omega sin(2 omega w) / N
                layer.weight.grad += tau * layer.omega * torch.sin(2 * layer.omega * layer.weight) / layer.weight.numel()

    def on_epoch_end(self, state) -> None:
        if state.epoch + 1 == self.stage1_epochs:
            self._set(True)


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
