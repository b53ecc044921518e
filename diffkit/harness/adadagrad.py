"""AdAdaGrad / AdAdaGradNorm: adaptive batch sizes for adaptive gradient methods (Lau, Liu & Kolar, "AdAdaGrad:
Adaptive Batch Size Schemes for Adaptive Gradient Methods", arXiv 2402.11215; timlautk/AdAdaGrad ``tests.py``).

After each step the batch size is raised, never lowered, to the smallest size that passes a test on the spread of
the per-sample gradients g_i around their mean g (the batch gradient):

- norm test: b <- max(b, ceil(||Var_i(g_i)||_1 / (eta^2 ||g||^2))), where ||Var_i g_i||_1 sums the per-coordinate
  unbiased sample variances;
- (augmented) inner-product test: b <- max(b, ceil(Var_i(<g_i, g>) / (theta^2 ||g||^4))).

The step itself is AdaGrad-Norm (Ward, Wu & Bottou, JMLR 2020): b_t^2 = b_{t-1}^2 + ||g_t||^2 over all
parameters, theta <- theta - lr g_t / b_t (AdAdaGradNorm), or coordinate-wise AdaGrad (AdAdaGrad, torch's Adagrad).
"""

import math

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from .loop import accuracy


class AdaGradNorm(torch.optim.Optimizer):
    """AdaGrad-Norm (Ward, Wu & Bottou 2020, Alg. 1): one scalar step size for all parameters,
    b_t^2 = b_{t-1}^2 + ||g_t||^2 (the norm over every parameter of every group), theta <- theta - lr g_t / b_t."""

    def __init__(self, params, lr: float = 1.0, b0: float = 0.1):
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not (isinstance(b0, (int, float)) and b0 > 0):
            raise ValueError(f"b0 must be > 0 (it keeps the first step finite), got {b0!r}")
        super().__init__(params, {"lr": lr})
        self.b0 = float(b0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return loss
        if any(g.is_sparse for g in grads):
            raise TypeError("AdaGradNorm does not support sparse gradients")
        # float64 accumulator: b^2 only grows, and float32 would stop registering small ||g||^2 late in training
        squared = sum(g.double().square().sum() for g in grads)
        self.state["b_squared"] = self.state.get("b_squared", torch.tensor(self.b0**2, dtype=torch.float64)) + squared
        b = self.state["b_squared"].sqrt()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"] / b.item())
        return loss


def per_sample_gradients(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The (n, d) matrix of per-sample cross-entropy gradients (all parameters, flattened), by ``vmap(grad)`` as in
    the reference ``compute_per_sample_gradients``."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, (p, buffers), (xi[None],)), yi[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g.flatten(1) for g in grads.values()], 1)


def _check_grads(per_sample_grads: torch.Tensor, batch_size: int) -> None:
    if not (isinstance(per_sample_grads, torch.Tensor) and per_sample_grads.dim() == 2 and len(per_sample_grads) > 1):
        raise ValueError("per_sample_grads must be an (n, d) tensor with n >= 2 samples, got "
                         f"{getattr(per_sample_grads, 'shape', per_sample_grads)!r}")
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def norm_test_statistic(n: int, grad_sum: torch.Tensor, grad_sq_sum: torch.Tensor, eta: float) -> float:
    """||Var_i g_i||_1 / (eta^2 ||mean g||^2) from the sums over n samples of g_i and g_i^2 (sums, so that data-parallel
    processes can add theirs before the test)."""
    mean = grad_sum.double() / n
    variance = (grad_sq_sum.double() - n * mean.square()) / (n - 1)  # unbiased, as torch.var(correction=1)
    return (variance.sum() / (eta**2 * mean.square().sum())).item()


def norm_test_batch_size(per_sample_grads: torch.Tensor, eta: float, batch_size: int) -> int:
    """Lau et al.'s norm test: max(batch_size, ceil(||Var_i g_i||_1 / (eta^2 ||g||^2)))."""
    _check_grads(per_sample_grads, batch_size)
    if not eta > 0:
        raise ValueError(f"eta must be > 0, got {eta!r}")
    g = per_sample_grads.double()
    return max(batch_size, math.ceil(norm_test_statistic(len(g), g.sum(0), g.square().sum(0), eta)))


def inner_product_test_batch_size(per_sample_grads: torch.Tensor, theta: float, batch_size: int) -> int:
    """Lau et al.'s inner-product test: max(batch_size, ceil(Var_i(<g_i, g>) / (theta^2 ||g||^4)))."""
    _check_grads(per_sample_grads, batch_size)
    if not theta > 0:
        raise ValueError(f"theta must be > 0, got {theta!r}")
    g = per_sample_grads.double()
    mean = g.mean(0)
    statistic = (g @ mean).var(correction=1) / (theta**2 * mean.square().sum() ** 2)
    return max(batch_size, math.ceil(statistic.item()))


class AdaptiveBatchSize:
    """The AdAdaGrad training step: the cross-entropy on the batch, then (every ``every`` steps) a batch-size test on
    this batch's per-sample gradients at the current parameters, which sets ``state.batch_size`` for the next step
    (capped at ``max_batch_size``, by default the training set, and rounded up to a multiple of the processes).

    Under data parallelism each process adds its samples' sums before the test, so the test sees the global batch.
    The per-step batch sizes go to ``state.logs["curves"]["batch_size"]``.
    """

    TESTS = ("norm", "inner_product")

    def __init__(self, test: str = "norm", eta: float = 0.1, theta: float = 0.1, max_batch_size: int | None = None,
                 every: int = 1):
        if test not in self.TESTS:
            raise ValueError(f"test must be one of {list(self.TESTS)}, got {test!r}")
        if not (eta > 0 and theta > 0):
            raise ValueError(f"eta and theta must be > 0, got eta={eta!r}, theta={theta!r}")
        if max_batch_size is not None and not (isinstance(max_batch_size, int) and max_batch_size > 0):
            raise ValueError(f"max_batch_size must be a positive int or None, got {max_batch_size!r}")
        if not (isinstance(every, int) and every > 0):
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.test, self.eta, self.theta, self.max_batch_size, self.every = test, eta, theta, max_batch_size, every

    def _reduce(self, state, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if state.accelerator.num_processes == 1 else state.accelerator.reduce(tensor, "sum")

    def next_batch_size(self, state, x: torch.Tensor, y: torch.Tensor) -> int:
        b = state.batch_size
        g = per_sample_gradients(state.unwrapped_model, x, y).double()
        n = b  # the global batch: every process holds b / P of its rows
        grad_sum = self._reduce(state, g.sum(0))
        if self.test == "norm":
            statistic = norm_test_statistic(n, grad_sum, self._reduce(state, g.square().sum(0)), self.eta)
        else:
            mean = grad_sum / n
            inner = g @ mean
            inner_sum, inner_sq = self._reduce(state, inner.sum()), self._reduce(state, inner.square().sum())
            variance = (inner_sq - inner_sum**2 / n) / (n - 1)
            statistic = (variance / (self.theta**2 * mean.square().sum() ** 2)).item()
        cap = min(self.max_batch_size or state.train_size, state.train_size)
        p = state.accelerator.num_processes
        wanted = min(cap, max(b, math.ceil(statistic)))
        return min(-(-wanted // p) * p, cap - cap % p)

    def __call__(self, state, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = state.model(batch["x"])
        loss = state.criterion(logits, batch["y"], batch["index"])
        if state.batch_size < 2:
            raise ValueError(f"the batch-size tests need a batch of at least 2 samples, got {state.batch_size}")
        state.logs.setdefault("curves", {}).setdefault("batch_size", []).append(state.batch_size)
        if state.step % self.every == 0:
            state.batch_size = self.next_batch_size(state, batch["x"], batch["y"])
        state.logs["final_batch_size"] = state.batch_size
        return loss, logits


class StepsToTarget:
    """Hook: test accuracy before every ``every``-th step and at the end; logs the first step and the number of
    training examples consumed when it reaches ``target`` (``reached_target`` 1/0), and the accuracy curve
    ``state.logs["curves"]["test_accuracy"]`` as (step, examples, accuracy) rows."""

    def __init__(self, x_test: torch.Tensor, y_test: torch.Tensor, target: float, every: int = 1):
        if not 0 < target <= 1:
            raise ValueError(f"target must be an accuracy in (0, 1], got {target!r}")
        if not (isinstance(every, int) and every > 0):
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.x_test, self.y_test, self.target, self.every = x_test, y_test, target, every
        self.examples = 0

    def _evaluate(self, state) -> None:
        device = state.accelerator.device
        acc = accuracy(state.unwrapped_model, self.x_test.to(device), self.y_test.to(device), state.accelerator)
        state.logs.setdefault("curves", {}).setdefault("test_accuracy", []).append([state.step, self.examples, acc])
        if acc >= self.target and not state.logs.get("reached_target"):
            state.logs.update(reached_target=1.0, steps_to_target=state.step, examples_to_target=self.examples)

    def on_train_start(self, state) -> None:
        self.examples = 0
        state.logs["reached_target"] = 0.0

    def on_step_start(self, state) -> None:
        if state.step % self.every == 0:
            self._evaluate(state)
        self.examples += state.batch_size

    def on_train_end(self, state) -> None:
        self._evaluate(state)
