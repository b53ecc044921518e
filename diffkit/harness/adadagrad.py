"""AdAdaGrad / AdAdaGradNorm: adaptive batch sizes for adaptive gradient methods (Lau, Liu & Kolar, "AdAdaGrad:
Adaptive Batch Size Schemes for Adaptive Gradient Methods", arXiv 2402.11215; timlautk/AdAdaGrad ``tests.py``,
``adagradnorm.py``, ``main.py``).

After each step the batch size is raised, never lowered, to the smallest size that passes a test on the spread of
the per-sample gradients g_i around their mean g (the batch gradient), computed per parameter tensor t and summed
over tensors as the reference does:

- norm test: b <- max(b, ceil(sum_t ||Var_i(g_i,t)||_1 / (eta^2 ||g||^2))), Var the per-coordinate unbiased variance;
- inner-product test: b <- max(b, ceil(sum_t Var_i(<g_i,t, g_t>) / (theta^2 ||g||^4)));
- augmented inner-product test (``ip+orth``): the larger of the inner-product test's size and
  sum_t ||Var_i(g_i,t - <g_i,t, g_t> g_t / ||g_t||^2)||_1 / (nu^2 ||g||^2), the orthogonal part's norm test;

with ||g||^2 = sum_t ||g_t||^2. The step is AdaGrad-Norm (Ward, Wu & Bottou, JMLR 2020) with one scalar accumulator
(``AdaGradNorm``), the reference's row-wise AdaGrad-Norm (``AdaGradNormRowwise``: one accumulator per output row of
a weight matrix) or coordinate-wise AdaGrad (torch's Adagrad, the reference's ``--optimizer adagrad``).
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


class AdaGradNormRowwise(torch.optim.Optimizer):
    """The reference's row-wise AdaGrad-Norm (``adagradnorm.py`` ``Adagradnorm`` without momentum or decay): each
    output row r of a weight matrix (each output channel of a convolution) keeps s_r += ||g_r||^2 and steps
    -lr g_r / (sqrt(s_r) + 1e-10); a 1-D parameter (a bias) keeps one accumulator per entry that adds its own g^2 and,
    when it follows a weight with as many rows in its group, that row's ||g_r||^2 (the reference's "tricky" bias
    rule); accumulators start at ``initial_accumulator_value`` (1e-2)."""

    def __init__(self, params, lr: float = 1.0, initial_accumulator_value: float = 1e-2):
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not (isinstance(initial_accumulator_value, (int, float)) and initial_accumulator_value > 0):
            raise ValueError(f"initial_accumulator_value must be > 0, got {initial_accumulator_value!r}")
        super().__init__(params, {"lr": lr, "initial_accumulator_value": initial_accumulator_value})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            rows = None  # the row norms^2 of the last weight of this group, for the bias after it
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("AdaGradNormRowwise does not support sparse gradients")
                g = p.grad
                state = self.state[p]
                if p.dim() >= 2:
                    rows = g.flatten(1).square().sum(1)
                    increment = rows.view(-1, *[1] * (p.dim() - 1))
                elif rows is not None and rows.shape == g.shape:
                    increment = rows + g.square()
                else:
                    increment = g.square()
                shape = (p.shape[0], *[1] * (p.dim() - 1)) if p.dim() >= 2 else p.shape
                if "sum" not in state:
                    state["sum"] = torch.full(shape, float(group["initial_accumulator_value"]), dtype=torch.float64,
                                              device=p.device)
                state["sum"] += increment.double()
                p.sub_(group["lr"] * g / (state["sum"].sqrt() + 1e-10).to(p.dtype))
        return loss


def per_sample_gradients(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample cross-entropy gradients by ``vmap(grad)`` as in the reference ``compute_per_sample_gradients``: one
    (n, d_t) matrix per parameter tensor t (flattened), in ``model.parameters()`` order."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, (p, buffers), (xi[None],)), yi[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return [g.flatten(1) for g in grads.values()]


def _blocks(per_sample_grads) -> list[torch.Tensor]:
    """The per-tensor (n, d_t) blocks, in float64; a single (n, d) tensor is one block."""
    blocks = [per_sample_grads] if isinstance(per_sample_grads, torch.Tensor) else list(per_sample_grads)
    if not (blocks and all(isinstance(b, torch.Tensor) and b.dim() == 2 for b in blocks)
            and len({len(b) for b in blocks}) == 1 and len(blocks[0]) > 1):
        raise ValueError("per_sample_grads must be an (n, d) tensor or a list of (n, d_t) tensors with the same n >= 2 "
                         f"samples, got {[tuple(getattr(b, 'shape', ())) for b in blocks]}")
    return [b.double() for b in blocks]


class GradientSums:
    """Sums over the n samples of a batch that the tests need (sums, so that data-parallel processes can add theirs
    before testing): per tensor, sum_i g_i and sum_i g_i^2, and, given the batch gradient, sum_i <g_i, g>,
    sum_i <g_i, g>^2 and the orthogonal parts' sum_i o_i, sum_i o_i^2."""

    def __init__(self, blocks: list[torch.Tensor], reduce=lambda t: t):
        self.n = reduce(torch.tensor(float(len(blocks[0])), dtype=torch.float64)).item()
        self.mean = [reduce(b.sum(0)) / self.n for b in blocks]
        self.square_sum = [reduce(b.square().sum(0)) for b in blocks]
        self.norm2 = sum(m.square().sum() for m in self.mean)  # ||g||^2 over all tensors
        inner = [b @ m for b, m in zip(blocks, self.mean)]  # <g_i,t, g_t>
        self.inner_sum = [reduce(i.sum()) for i in inner]
        self.inner_square_sum = [reduce(i.square().sum()) for i in inner]
        ortho = [b - i[:, None] * m / m.square().sum().clamp_min(torch.finfo(m.dtype).tiny)
                 for b, i, m in zip(blocks, inner, self.mean)]
        self.ortho_sum = [reduce(o.sum(0)) for o in ortho]
        self.ortho_square_sum = [reduce(o.square().sum(0)) for o in ortho]

    def _variance(self, total, square_total):  # unbiased, as torch.var(correction=1)
        return (square_total - total.square() / self.n) / (self.n - 1)

    def norm_statistic(self, eta: float) -> float:
        variance = sum(self._variance(m * self.n, q).sum() for m, q in zip(self.mean, self.square_sum))
        return (variance / (eta**2 * self.norm2)).item()

    def inner_product_statistic(self, theta: float) -> float:
        variance = sum(self._variance(s, q) for s, q in zip(self.inner_sum, self.inner_square_sum))
        return (variance / (theta**2 * self.norm2**2)).item()

    def orthogonality_statistic(self, nu: float) -> float:
        variance = sum(self._variance(s, q).sum() for s, q in zip(self.ortho_sum, self.ortho_square_sum))
        return (variance / (nu**2 * self.norm2)).item()


def _check(name: str, value, batch_size: int) -> None:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def norm_test_batch_size(per_sample_grads, eta: float, batch_size: int) -> int:
    """Lau et al.'s norm test: max(batch_size, ceil(sum_t ||Var_i g_i,t||_1 / (eta^2 ||g||^2)))."""
    _check("eta", eta, batch_size)
    return max(batch_size, math.ceil(GradientSums(_blocks(per_sample_grads)).norm_statistic(eta)))


def inner_product_test_batch_size(per_sample_grads, theta: float, batch_size: int) -> int:
    """Lau et al.'s inner-product test, per tensor as the reference: max(batch_size,
    ceil(sum_t Var_i(<g_i,t, g_t>) / (theta^2 ||g||^4)))."""
    _check("theta", theta, batch_size)
    return max(batch_size, math.ceil(GradientSums(_blocks(per_sample_grads)).inner_product_statistic(theta)))


def augmented_inner_product_test_batch_size(per_sample_grads, theta: float, nu: float, batch_size: int) -> int:
    """Lau et al.'s augmented inner-product test (the reference's ``ip+orth``): the larger of the inner-product test
    and the orthogonality test sum_t ||Var_i(g_i,t - <g_i,t, g_t> g_t / ||g_t||^2)||_1 / (nu^2 ||g||^2)."""
    _check("theta", theta, batch_size)
    _check("nu", nu, batch_size)
    sums = GradientSums(_blocks(per_sample_grads))
    statistic = max(sums.inner_product_statistic(theta), sums.orthogonality_statistic(nu))
    return max(batch_size, math.ceil(statistic))


class AdaptiveBatchSize:
    """The AdAdaGrad training step: the cross-entropy on the batch, then (every ``every`` steps) a batch-size test on
    this batch's per-sample gradients at the current parameters, which sets ``state.batch_size`` for the next step
    (capped at ``max_batch_size``, by default the training set, and rounded up to a multiple of the processes).
    ``test``: ``norm`` (eta), ``inner_product`` (theta) or ``augmented_inner_product`` (theta and nu).

    Under data parallelism each process adds its samples' sums before the test, so the test sees the global batch.
    The per-step batch sizes go to ``state.logs["curves"]["batch_size"]``.
    """

    TESTS = ("norm", "inner_product", "augmented_inner_product")

    def __init__(self, test: str = "norm", eta: float = 0.1, theta: float = 0.1, nu: float = 0.1,
                 max_batch_size: int | None = None, every: int = 1):
        if test not in self.TESTS:
            raise ValueError(f"test must be one of {list(self.TESTS)}, got {test!r}")
        for name, value in (("eta", eta), ("theta", theta), ("nu", nu)):
            _check(name, value, 1)
        if max_batch_size is not None and not (isinstance(max_batch_size, int) and max_batch_size > 0):
            raise ValueError(f"max_batch_size must be a positive int or None, got {max_batch_size!r}")
        if not (isinstance(every, int) and every > 0):
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.test, self.eta, self.theta, self.nu = test, eta, theta, nu
        self.max_batch_size, self.every = max_batch_size, every

    def next_batch_size(self, state, x: torch.Tensor, y: torch.Tensor) -> int:
        b = state.batch_size
        blocks = [g.double() for g in per_sample_gradients(state.unwrapped_model, x, y)]

        def reduce(tensor):
            return tensor if state.accelerator.num_processes == 1 else state.accelerator.reduce(tensor, "sum")

        sums = GradientSums(blocks, reduce)
        if self.test == "norm":
            statistic = sums.norm_statistic(self.eta)
        elif self.test == "inner_product":
            statistic = sums.inner_product_statistic(self.theta)
        else:
            statistic = max(sums.inner_product_statistic(self.theta), sums.orthogonality_statistic(self.nu))
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
    training examples consumed when it reaches ``target`` (``reached_target`` 1/0), the accuracy curve
    ``state.logs["curves"]["test_accuracy"]`` as (step, examples, accuracy) rows and, with ``equal_steps``, the test
    accuracy after that many steps (``test_accuracy_at_equal_steps``; a run with fewer steps reports its last)."""

    def __init__(self, x_test: torch.Tensor, y_test: torch.Tensor, target: float, every: int = 1,
                 equal_steps: int | None = None):
        if not 0 < target <= 1:
            raise ValueError(f"target must be an accuracy in (0, 1], got {target!r}")
        if not (isinstance(every, int) and every > 0):
            raise ValueError(f"every must be a positive int, got {every!r}")
        if equal_steps is not None and not (isinstance(equal_steps, int) and equal_steps > 0):
            raise ValueError(f"equal_steps must be a positive int or None, got {equal_steps!r}")
        self.x_test, self.y_test, self.target, self.every = x_test, y_test, target, every
        self.equal_steps, self.examples = equal_steps, 0

    def _evaluate(self, state) -> float:
        device = state.accelerator.device
        acc = accuracy(state.unwrapped_model, self.x_test.to(device), self.y_test.to(device), state.accelerator)
        state.logs.setdefault("curves", {}).setdefault("test_accuracy", []).append([state.step, self.examples, acc])
        if acc >= self.target and not state.logs.get("reached_target"):
            state.logs.update(reached_target=1.0, steps_to_target=state.step, examples_to_target=self.examples)
        return acc

    def on_train_start(self, state) -> None:
        self.examples = 0
        state.logs["reached_target"] = 0.0

    def on_step_start(self, state) -> None:
        if state.step % self.every == 0 or state.step == self.equal_steps:
            acc = self._evaluate(state)
            if state.step == self.equal_steps:
                state.logs["test_accuracy_at_equal_steps"] = acc
        self.examples += state.batch_size

    def on_train_end(self, state) -> None:
        acc = self._evaluate(state)
        if self.equal_steps is not None and "test_accuracy_at_equal_steps" not in state.logs:
            state.logs["test_accuracy_at_equal_steps"] = acc
