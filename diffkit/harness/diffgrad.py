"""diffGrad (Dubey et al., "diffGrad: An Optimization Method for Convolutional Neural Networks", IEEE TNNLS
2020, arXiv 1909.11015) and the paper's three 1-D test functions (``diffGrad_analytical.ipynb``).

diffGrad is Adam whose first moment is scaled, per coordinate, by the friction coefficient
xi_t = sigmoid(|g_{t-1} - g_t|) in [0.5, 1): where the gradient barely changes (near an optimum, or on a
plateau) the step is halved, where it changes fast the step is Adam's.
"""

import math

import torch


class DiffGrad(torch.optim.Optimizer):
    """diffGrad, Dubey et al. 2020, Algorithm 1 (with the authors' ``grad.clone()`` fix of ``diffGrad_v2.py``).

    ``weight_decay`` is coupled L2 (added to the gradient before both moments), as in the reference code.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("DiffGrad does not support sparse gradients")
                grad = p.grad if group["weight_decay"] == 0 else p.grad + group["weight_decay"] * p
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    # g_0 = 0, so the first friction is sigmoid(|g_1|), as in the paper and both reference codes
                    state["previous_grad"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                friction = torch.sigmoid((state["previous_grad"] - grad).abs())
                # a copy, not the gradient tensor itself: the original diffGrad.py aliased p.grad, so g_{t-1} was
                # overwritten in place by the next backward and xi was always sigmoid(0) = 0.5
                state["previous_grad"] = grad.clone()
                step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                p.addcdiv_(m * friction, v.sqrt().add_(group["eps"]), value=-step_size)
        return loss


def _f1(x: torch.Tensor) -> torch.Tensor:
    # gradient 2x + 0.6 (x <= 0) / 2x - 0.4 (x > 0): global minimum -0.09 at -0.3, local -0.04 at 0.2
    return torch.where(x <= 0, x * x + 0.6 * x, x * x - 0.4 * x)


def _f2(x: torch.Tensor) -> torch.Tensor:
    # gradient -40 (x <= -0.9) / x cos 8x + sin 8x + 3x^2: the notebook gives only the gradient; this is its
    # antiderivative, continuous at -0.9 (the constant does not move any minimum)
    def smooth(z):
        return z * torch.sin(8 * z) / 8 - 7 * torch.cos(8 * z) / 64 + z**3

    knot = torch.tensor(-0.9, dtype=x.dtype)
    return torch.where(x <= knot, -40 * (x - knot) + smooth(knot), smooth(x))


def _f3(x: torch.Tensor) -> torch.Tensor:
    # odd piecewise gradient (7/8 on (0, 0.4], -1 on (0.4, 0.5], 2x beyond): even f with its global minimum 0
    # at 0 and local minima 0.25 at +-0.5
    a = x.abs()
    return torch.where(a <= 0.4, 0.875 * a, torch.where(a <= 0.5, 0.35 - (a - 0.4), a * a))


FUNCTIONS_1D = {"f1": _f1, "f2": _f2, "f3": _f3}
"""The 1-D functions of diffGrad's analytical experiment (x0 = -1, 300 steps, lr 0.1, beta1 0.95)."""


def function_1d(name: str):
    """One of diffGrad's 1-D test functions (``f1``, ``f2``, ``f3``) as a torch function of x."""
    if name not in FUNCTIONS_1D:
        raise ValueError(f"function must be one of {sorted(FUNCTIONS_1D)}, got {name!r}")
    return FUNCTIONS_1D[name]


def global_minimum_1d(name: str, lo: float = -1.5, hi: float = 1.5, n: int = 300_001) -> tuple[float, float]:
    """(argmin, min) of a 1-D test function on a fine float64 grid over [lo, hi] (the optimisers start at -1)."""
    grid = torch.linspace(lo, hi, n, dtype=torch.float64)
    values = function_1d(name)(grid)
    i = int(values.argmin())
    return float(grid[i]), float(values[i])
