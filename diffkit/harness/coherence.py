"""Gradient coherence (Chatterjee & Zielinski, On the Generalization Mystery in Deep Learning, arXiv 2203.10036) and
the robust-mean variants of gradient descent it motivates.

- ``m_coherence``: for the per-example gradients g_1..g_m of m examples, m ||mean g||^2 / mean ||g||^2 (Chatterjee &
  Zielinski, Making Coherence Out of Nothing At All, arXiv 2008.01217, and Sec. 4 of 2203.10036): m when all
  gradients are equal, 1 when they are orthogonal, 0 when they cancel.
- ``winsorized_mean``: the per-coordinate mean after clipping, in each coordinate, the c largest and c smallest of
  the m per-example values to the (c+1)-th largest / smallest one -- winsorized gradient descent (Chatterjee,
  Coherent Gradients, ICLR 2020, Sec. 5); c = 0 is the mean.
- ``median_of_means``: the batch cut into k equal groups, each group's mean gradient, and their per-coordinate median
  -- M3 for k = 3 (Zielinski, Krishnan & Chatterjee, Weak and Strong Gradient Directions, arXiv 2003.07422).

Both robust means attenuate the weak gradient directions that only a few examples support, which the theory says is
how individual (e.g. mislabelled) examples get memorised. The full text of 2203.10036 could not be retrieved here:
the two estimators follow the papers that introduced them (as the research notes and the abstracts describe them),
which 2203.10036 cites for its robust-averaging variants of GD. ``RobustMeanGD`` is a harness algorithm that steps along the
robust mean of the batch's per-example gradients (``torch.func``), so any optimizer applies it.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap


def per_example_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The (B, P) matrix of per-example cross-entropy gradients over the model's trainable parameters, flattened in
    ``model.named_parameters()`` order."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = dict(model.named_buffers())

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, (p, buffers), (xi[None],)), yi[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g.flatten(1) for g in grads.values()], 1)


def m_coherence(grads: torch.Tensor) -> float:
    """m ||mean_i g_i||^2 / mean_i ||g_i||^2 for the rows g_i of ``grads`` (m = the number of rows)."""
    if grads.dim() != 2 or len(grads) < 2:
        raise ValueError(f"grads must be an (m, P) matrix with m >= 2, got shape {tuple(grads.shape)}")
    mean_sq = grads.square().sum(1).mean()
    if mean_sq == 0:
        raise ValueError("every per-example gradient is zero: coherence is undefined")
    return (len(grads) * grads.mean(0).square().sum() / mean_sq).item()


def winsorized_mean(grads: torch.Tensor, c: int) -> torch.Tensor:
    """Per-coordinate mean over the rows after clipping each coordinate's c largest and c smallest values to the
    (c+1)-th largest / smallest."""
    m = len(grads)
    if not (isinstance(c, int) and 0 <= c and 2 * c < m):
        raise ValueError(f"c must be an int with 0 <= 2c < {m} (the batch size), got {c!r}")
    if c == 0:
        return grads.mean(0)
    high = grads.topk(c + 1, 0).values[-1]  # the (c+1)-th largest value of each coordinate
    low = grads.topk(c + 1, 0, largest=False).values[-1]
    return grads.clamp(low, high).mean(0)


def median_of_means(grads: torch.Tensor, groups: int = 3) -> torch.Tensor:
    """Per-coordinate median of the means of ``groups`` consecutive equal groups of rows."""
    m = len(grads)
    if not (isinstance(groups, int) and groups >= 1 and m % groups == 0):
        raise ValueError(f"groups must be a positive int dividing the batch size {m}, got {groups!r}")
    return coordinate_median(grads.view(groups, m // groups, -1).mean(1))


def coordinate_median(rows: torch.Tensor) -> torch.Tensor:
    """Per-coordinate median of the rows; for an even count the mean of the middle two (torch.median would take the
    lower one)."""
    return rows.quantile(0.5, dim=0) if len(rows) % 2 == 0 else rows.median(0).values


class RobustMeanGD:
    """Harness algorithm: the step direction is a robust mean of the batch's per-example gradients instead of their
    mean. ``estimator``: "mean" (plain SGD through per-example gradients), "winsorize" (with ``c``) or
    "median_of_means" (with ``groups``; the batch is already shuffled, so consecutive groups are random groups).
    The returned loss has the batch's mean cross-entropy as its value and the robust mean as its gradient. A single
    process only: under DDP each process's robust mean would be averaged, which is not the robust mean of the batch."""

    ESTIMATORS = ("mean", "winsorize", "median_of_means")

    def __init__(self, estimator: str = "winsorize", c: int = 1, groups: int = 3):
        if estimator not in self.ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(self.ESTIMATORS)}, got {estimator!r}")
        for name, value, low in (("c", c, 0), ("groups", groups, 1)):
            if not (isinstance(value, int) and value >= low):
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.estimator, self.c, self.groups = estimator, c, groups

    def direction(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The robust mean of the per-example gradients of (x, y), flattened in parameter order. The median of
        means needs only the groups' mean gradients, so it takes one backward pass per group."""
        params = [p for p in model.parameters() if p.requires_grad]
        if self.estimator == "winsorize":
            return winsorized_mean(per_example_gradients(model, x, y), self.c)
        groups = self.groups if self.estimator == "median_of_means" else 1
        if len(y) % groups:
            raise ValueError(f"groups must divide the batch size {len(y)}, got {groups!r}")
        means = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
            F.cross_entropy(model(xs), ys), params)]) for xs, ys in zip(x.chunk(groups), y.chunk(groups))])
        return coordinate_median(means)

    def __call__(self, state, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if state.accelerator.num_processes > 1:
            raise ValueError("RobustMeanGD runs in a single process (a robust mean does not average across processes)")
        model = state.unwrapped_model
        direction = self.direction(model, batch["x"], batch["y"])
        logits = model(batch["x"])
        loss = F.cross_entropy(logits, batch["y"])
        flat = torch.cat([p.flatten() for p in model.parameters() if p.requires_grad])
        surrogate = (flat * direction).sum()
        # value: the batch loss; gradient: the robust mean direction
        return loss.detach() + surrogate - surrogate.detach(), logits


class CoherenceCurve:
    """Hook: the m-coherence of the per-example gradients of fixed training examples (with their training labels)
    before every ``every``-th step and after the last."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, every: int):
        if not (isinstance(every, int) and every > 0):
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.x, self.y, self.every, self.curve = x, y, every, []

    def _evaluate(self, state) -> None:
        device = state.accelerator.device
        grads = per_example_gradients(state.unwrapped_model, self.x.to(device), self.y.to(device))
        self.curve.append([state.step, m_coherence(grads)])

    def on_step_start(self, state) -> None:
        if state.step % self.every == 0:
            self._evaluate(state)

    def on_train_end(self, state) -> None:
        if not self.curve or self.curve[-1][0] != state.step:
            self._evaluate(state)
