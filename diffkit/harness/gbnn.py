"""GBNN: Sequential Training of Neural Networks with Gradient Boosting (Emami & Martinez-Munoz, IEEE Access 2023,
arXiv 1909.12098; official code GAA-UAM/GBNN ``gbnn/GBNN.py``), and the backprop-trained MLPs it is compared with.

GBNN builds a one-hidden-layer network as a boosted additive model. It starts from the best constant F_0 (zeros for
the multi-class cross-entropy; 1/2 log((1 + mean y) / (1 - mean y)) for the binary log-exponential loss with y = +-1),
then for t = 1..T fits a small regressor f_t -- one hidden layer of J logistic units, K outputs -- to the
pseudo-residuals r = y - softmax(F) (binary: 2y / (1 + exp(2yF))) on a random half of the training set, with
L-BFGS, and adds rho_t f_t with a scalar Newton step rho_t = eta sum f r / sum f^2 p (1 - p) over the whole training
set (binary: sum r f / sum r f^2 (2y - r)). ``to_mlp`` assembles the T regressors into one MLP with T J hidden units:
their input weights side by side, output weights and biases scaled by rho_t (and by 2 for the binary loss, whose
probability is sigmoid(2F)), F_0 added to the output bias. The k-step prefix of that MLP (its first k J units and
their biases) is the k-step boosted model, which is why late units can be switched off.

The weak regressors are fitted as the official code fits them with scikit-learn's ``MLPRegressor``: scipy's L-BFGS-B
for at most 200 iterations with no gradient tolerance (``gtol`` = the official tol 0), Glorot-uniform initial weights
and biases with scikit-learn's bound sqrt(2 / (fan_in + fan_out)) for logistic units, and the objective whose gradient
scikit-learn follows, 1/2 sum over outputs of the mean over samples of the squared error plus alpha / 2 ||W||^2 / n
(alpha 1e-4, scikit-learn's default; scikit-learn reports the loss value averaged over the outputs as well, which
only rescales the data term for K > 1 outputs). Defaults are the official ones: 200 units, J = 1, eta = 1, 200
iterations, subsample 0.5.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def glorot_uniform_(layer: nn.Linear, generator: torch.Generator) -> nn.Linear:
    """scikit-learn's MLP initialisation for logistic units: weights and biases ~ U(+-sqrt(2 / (fan_in + fan_out)))."""
    bound = math.sqrt(2.0 / (layer.in_features + layer.out_features))
    with torch.no_grad():
        for p in (layer.weight, layer.bias):
            p.copy_(torch.rand(p.shape, generator=generator, dtype=p.dtype) * 2 * bound - bound)
    return layer


def one_hidden_mlp(num_features: int, num_outputs: int, units: int = 200, activation: str = "logistic",
                   dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Linear -> logistic (or ReLU / tanh) -> Linear, the network of GBNN and of its MLP baselines."""
    acts = {"logistic": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}
    if activation not in acts:
        raise ValueError(f"activation must be one of {', '.join(acts)}, got {activation!r}")
    if not (isinstance(units, int) and units >= 1):
        raise ValueError(f"units must be a positive int, got {units!r}")
    return nn.Sequential(nn.Linear(num_features, units, dtype=dtype), acts[activation](),
                         nn.Linear(units, num_outputs, dtype=dtype))


def weak_regressor_objective(theta: np.ndarray, x: np.ndarray, target: np.ndarray, units: int,
                             alpha: float) -> tuple[float, np.ndarray]:
    """The weak regressor's objective and its gradient for the flat parameters theta = [W1, b1, W2, b2] (the
    ``nn.Sequential`` parameter order): 1/2 sum over outputs of the mean squared error + alpha / 2 ||W||^2 / n."""
    (n, d), k = x.shape, target.shape[1]
    w1, b1, w2, b2 = _unpack(theta, units, d, k)
    hidden = 0.5 * (1 + np.tanh(0.5 * (x @ w1.T + b1)))  # the logistic function, without overflow
    diff = hidden @ w2.T + b2 - target
    loss = 0.5 * np.square(diff).sum() / n + 0.5 * alpha * (np.square(w1).sum() + np.square(w2).sum()) / n
    d_out = diff / n
    d_pre = (d_out @ w2) * hidden * (1 - hidden)
    grads = [d_pre.T @ x + alpha * w1 / n, d_pre.sum(0), d_out.T @ hidden + alpha * w2 / n, d_out.sum(0)]
    return loss, np.concatenate([g.ravel() for g in grads])


def _unpack(theta: np.ndarray, units: int, d: int, k: int) -> list[np.ndarray]:
    shapes = [(units, d), (units,), (k, units), (k,)]
    parts = np.split(theta, np.cumsum([int(np.prod(shape)) for shape in shapes])[:-1])
    return [part.reshape(shape) for part, shape in zip(parts, shapes)]


def fit_weak_regressor(x: np.ndarray, target: np.ndarray, units: int, alpha: float, max_iter: int,
                       generator: torch.Generator) -> nn.Sequential:
    """A one-hidden-layer logistic regressor (float64) fitted to ``target`` (n, K) as scikit-learn's MLPRegressor
    fits it with L-BFGS (see the module docstring)."""
    from scipy.optimize import minimize

    d, k = x.shape[1], target.shape[1]
    net = one_hidden_mlp(d, k, units, dtype=torch.float64)
    glorot_uniform_(net[0], generator)
    glorot_uniform_(net[2], generator)
    theta0 = np.concatenate([p.detach().numpy().ravel() for p in net.parameters()])
    result = minimize(weak_regressor_objective, theta0, args=(x, target, units, alpha), jac=True, method="L-BFGS-B",
                      options={"maxiter": max_iter, "maxfun": 15_000, "gtol": 0.0})
    with torch.no_grad():
        for p, value in zip(net.parameters(), _unpack(result.x, units, d, k)):
            p.copy_(torch.from_numpy(value))
    return net.requires_grad_(False)


class GBNN:
    """Gradient-boosted one-hidden-layer network (see the module docstring). ``fit(x, y, num_classes, generator)``
    with integer labels; two classes use the binary log-exponential loss, more use the multi-class cross-entropy.
    Everything runs in float64 so the assembled MLP reproduces the staged sum to rounding."""

    def __init__(self, units: int = 200, units_per_step: int = 1, eta: float = 1.0, max_iter: int = 200,
                 subsample: float = 0.5, alpha: float = 1e-4):
        if not (isinstance(units_per_step, int) and units_per_step >= 1):
            raise ValueError(f"units_per_step must be a positive int, got {units_per_step!r}")
        if not (isinstance(units, int) and units >= units_per_step):
            raise ValueError(f"units must be an int >= units_per_step = {units_per_step}, got {units!r}")
        if not (isinstance(max_iter, int) and max_iter >= 1):
            raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
        if not 0 < subsample <= 1:
            raise ValueError(f"subsample must be in (0, 1], got {subsample!r}")
        for name, value in (("eta", eta), ("alpha", alpha)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.steps_total = units // units_per_step  # the official T = total_nn // num_nn_step
        self.units_per_step, self.eta, self.max_iter, self.subsample, self.alpha = (
            units_per_step, float(eta), max_iter, float(subsample), float(alpha))
        self.learners: list[nn.Sequential] = []
        self.rhos: list[float] = []
        self.losses: list[float] = []

    # --- the two losses -------------------------------------------------------------------------------------------

    def _residuals(self, y, raw):
        if self.binary:
            return 2.0 * y / (1 + torch.exp(2.0 * y * raw))
        return y - raw.softmax(1)

    def _newton_step(self, y, residuals, f):
        if self.binary:
            return (residuals * f).sum() / (residuals * f * f * (2.0 * y - residuals)).sum()
        p = y - residuals
        return (f * residuals).sum() / (f * f * p * (1 - p)).sum()

    def _loss(self, y, raw):
        if self.binary:
            return F.softplus(-2.0 * y * raw).mean()
        return (torch.logsumexp(raw, 1) - (y * raw).sum(1)).mean()

    # --- fitting and prediction -----------------------------------------------------------------------------------

    def fit(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, generator: torch.Generator,
            progress: bool = False) -> "GBNN":
        from tqdm.auto import tqdm

        if x.dim() != 2 or y.shape != (len(x),):
            raise ValueError(f"need x of shape (n, d) and labels y of shape (n,), got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        if not (isinstance(num_classes, int) and num_classes >= 2) or y.min() < 0 or y.max() >= num_classes:
            raise ValueError(f"labels must be ints in [0, num_classes = {num_classes!r}), got {y.min()}..{y.max()}")
        x = x.double()
        x_np = x.numpy()
        self.binary, self.num_features = num_classes == 2, x.shape[1]
        if self.binary:
            target = (2 * y - 1).double()
            mean = target.mean()
            self.intercept = 0.5 * torch.log((1 + mean) / (1 - mean)).reshape(1)
        else:
            target = F.one_hot(y, num_classes).double()
            self.intercept = torch.zeros(num_classes, dtype=torch.float64)
        outputs = 1 if self.binary else num_classes
        raw = self.intercept.expand(len(x), outputs).squeeze(1) if self.binary else self.intercept.expand(len(x), -1)
        self.learners, self.rhos, self.losses = [], [], []
        for _ in tqdm(range(self.steps_total), desc="gbnn", disable=not progress, leave=False):
            residuals = self._residuals(target, raw)
            rows = torch.randperm(len(x), generator=generator)[: int(self.subsample * len(x))]
            learner = fit_weak_regressor(x_np[rows], residuals[rows].reshape(len(rows), outputs).numpy(),
                                         self.units_per_step, self.alpha, self.max_iter, generator)
            with torch.no_grad():
                f = learner(x).squeeze(1) if self.binary else learner(x)
                rho = self.eta * self._newton_step(target, residuals, f).item()
                raw = raw + rho * f
            self.learners.append(learner)
            self.rhos.append(rho)
            self.losses.append(self._loss(target, raw).item())
        return self

    @property
    def diverged(self) -> bool:
        """Whether a Newton step was not finite (sum f^2 p (1 - p) underflows to 0 once the predictions saturate):
        from there on the model is NaN, as the official code's would be."""
        return not all(math.isfinite(rho) for rho in self.rhos)

    def _check_steps(self, steps):
        if not self.learners:
            raise ValueError("GBNN is not fitted: call fit first")
        steps = len(self.learners) if steps is None else steps
        if not (isinstance(steps, int) and 0 <= steps <= len(self.learners)):
            raise ValueError(f"steps must be an int in [0, {len(self.learners)}], got {steps!r}")
        return steps

    @torch.no_grad()
    def decision_function(self, x: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """The boosted raw prediction F after the first ``steps`` steps (all by default): (n, K), or (n,) binary."""
        steps = self._check_steps(steps)
        x = x.double()
        raw = self.intercept.expand(len(x), -1).clone()
        for learner, rho in zip(self.learners[:steps], self.rhos[:steps]):
            raw += rho * learner(x)
        return raw.squeeze(1) if self.binary else raw

    @torch.no_grad()
    def predict(self, x: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        raw = self.decision_function(x, steps)
        return (raw > 0).long() if self.binary else raw.argmax(1)

    @torch.no_grad()
    def to_mlp(self, steps: int | None = None) -> nn.Sequential:
        """One MLP with steps J hidden units computing the ``steps``-step model: logits F (multi-class) or the single
        logit 2F (binary, scikit-learn's logistic output)."""
        steps = self._check_steps(steps)
        scale = 2.0 if self.binary else 1.0
        outputs = len(self.intercept)
        mlp = one_hidden_mlp(self.num_features, outputs, max(steps * self.units_per_step, 1), dtype=torch.float64)
        mlp[0].weight.zero_(), mlp[0].bias.zero_(), mlp[2].weight.zero_()
        mlp[2].bias.copy_(scale * self.intercept)
        for t, (learner, rho) in enumerate(zip(self.learners[:steps], self.rhos[:steps])):
            units = slice(t * self.units_per_step, (t + 1) * self.units_per_step)
            mlp[0].weight[units] = learner[0].weight
            mlp[0].bias[units] = learner[0].bias
            mlp[2].weight[:, units] = scale * rho * learner[2].weight
            mlp[2].bias.add_(scale * rho * learner[2].bias)
        return mlp.requires_grad_(False)


class MLPTrainer:
    """Backprop training of a one-hidden-layer MLP as scikit-learn's ``MLPClassifier`` does it, the baselines of the
    GBNN paper: log-loss plus alpha / 2 ||W||^2 per batch size; ``solver`` "adam" (betas 0.9 / 0.999, eps 1e-8) or
    "sgd" (constant rate, momentum 0.9, Nesterov) on shuffled minibatches of min(200, n) for at most ``max_iter``
    epochs, stopped once the epoch's training loss has not improved by ``tol`` for more than ``n_iter_no_change``
    epochs; or "lbfgs" (scipy's L-BFGS-B, ``max_iter`` iterations, gradient tolerance ``tol``) on the whole set.
    Those are scikit-learn's defaults. ``lrs`` lists the learning rates to try (ignored by L-BFGS): each is trained
    from the same initial weights and the one with the best validation accuracy is kept."""

    SOLVERS = ("adam", "sgd", "lbfgs")

    def __init__(self, solver: str = "adam", lrs: list[float] = (1e-3,), max_iter: int = 200, batch_size: int = 200,
                 alpha: float = 1e-4, momentum: float = 0.9, tol: float = 1e-4, n_iter_no_change: int = 10):
        if solver not in self.SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(self.SOLVERS)}, got {solver!r}")
        if not (isinstance(lrs, (list, tuple)) and lrs and all(isinstance(v, (int, float)) and v > 0 for v in lrs)):
            raise ValueError(f"lrs must be a non-empty list of positive learning rates, got {lrs!r}")
        for name, value in (("max_iter", max_iter), ("batch_size", batch_size), ("n_iter_no_change", n_iter_no_change)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("alpha", alpha), ("momentum", momentum), ("tol", tol)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.solver, self.lrs, self.max_iter, self.batch_size = solver, list(lrs), max_iter, batch_size
        self.alpha, self.momentum, self.tol, self.n_iter_no_change = alpha, momentum, tol, n_iter_no_change

    def _loss(self, net, x, y):
        weights = net[0].weight.square().sum() + net[2].weight.square().sum()
        return F.cross_entropy(net(x), y) + 0.5 * self.alpha * weights / len(x)

    def _fit_lbfgs(self, net, x, y):
        from scipy.optimize import minimize

        params = list(net.parameters())

        def loss_and_grad(theta):
            torch.nn.utils.vector_to_parameters(torch.from_numpy(theta), params)
            loss = self._loss(net, x, y)
            grads = torch.autograd.grad(loss, params)
            return loss.item(), torch.cat([g.flatten() for g in grads]).numpy()

        theta0 = torch.nn.utils.parameters_to_vector(params).detach().numpy().copy()
        result = minimize(loss_and_grad, theta0, jac=True, method="L-BFGS-B",
                          options={"maxiter": self.max_iter, "maxfun": 15_000, "gtol": self.tol})
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.from_numpy(result.x), params)

    def _fit_minibatch(self, net, x, y, lr, generator):
        if self.solver == "adam":
            optimizer = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
        else:
            optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=self.momentum, nesterov=self.momentum > 0)
        batch, best, stale = min(self.batch_size, len(y)), math.inf, 0
        for _ in range(self.max_iter):
            order, total = torch.randperm(len(y), generator=generator), 0.0
            for start in range(0, len(y), batch):  # scikit-learn keeps the last, shorter batch
                rows = order[start : start + batch]
                loss = self._loss(net, x[rows], y[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(rows)
            epoch_loss = total / len(y)
            stale = stale + 1 if epoch_loss > best - self.tol else 0
            best = min(best, epoch_loss)
            if stale > self.n_iter_no_change:
                break

    def fit(self, make_net, x, y, x_val, y_val, generator: torch.Generator):
        """Train ``make_net()`` (same initial weights for every rate) and return (net, chosen lr or None, validation
        accuracy)."""
        x, x_val = x.double(), x_val.double()
        best = None
        for lr in ([None] if self.solver == "lbfgs" else self.lrs):
            net = make_net()
            if lr is None:
                self._fit_lbfgs(net, x, y)
            else:
                self._fit_minibatch(net, x, y, lr, torch.Generator().manual_seed(generator.initial_seed()))
            with torch.no_grad():
                val = (net(x_val).argmax(1) == y_val).double().mean().item()
            if best is None or val > best[2]:
                best = (net.requires_grad_(False), lr, val)
        return best


def keep_units(net: nn.Sequential, keep: torch.Tensor) -> nn.Sequential:
    """A copy of a one-hidden-layer MLP with the hidden units outside ``keep`` (indices) switched off: their outgoing
    weights zeroed, so they no longer reach the output."""
    import copy

    pruned = copy.deepcopy(net)
    mask = torch.zeros(pruned[2].in_features, dtype=torch.bool)
    mask[keep] = True
    with torch.no_grad():
        pruned[2].weight[:, ~mask] = 0
    return pruned
