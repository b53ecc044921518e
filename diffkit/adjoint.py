"""AdjointDPM (Pan et al., ICLR 2024): gradients through a whole sampling run by the adjoint ODE.

The probability-flow ODE in y = x / alpha_t and rho = sigma_t / alpha_t has no linear term:

    dy/drho = eps(alpha_t y, t(rho), c) = (y - D(y, rho, c)) / rho       (an Euler step in rho is a DDIM step)

with D the (guided) x0 prediction. For a loss L(x_0) its adjoint a_y = dL/dy solves, backwards from
rho_0 to rho_T,

    da_y/drho = -a_y^T d eps/dy,   da_c/drho = -a_y^T d eps/dc,   da_theta/drho = -a_y^T d eps/dtheta,

while y is re-integrated backwards alongside. The a_y / rho part is stiff where rho spans orders of magnitude
(the first steps), so diffkit integrates the pair with the exponential integrator in lambda = -log rho that
DPM-Solver++ uses forwards. With r_i = rho_{i+1} / rho_i, a step of order 1 (DDIM) or 2 (DPM-Solver++(2M)) is

    y_{i+1} = r_i y_i + p_i D_i + q_i D_{i-1}        (order 1: p = 1 - r, q = 0)

and the adjoint takes the exact transpose of these steps, one vector-Jacobian product per step:

    a_i = r_i a_{i+1} + (p_i a_{i+1} + q_{i+1} a_{i+2})^T dD_i/dy,   a_c,theta += (same vector)^T dD_i/d(c, theta)

evaluated at y_i as the backward pass reconstructs it (the same multistep formula run from rho_{i+1} up to
rho_i with D_{i+1}, D_{i+2}). Where that reconstruction is exact the adjoint equals backprop through the
sampler; its error is the solver's, of order 1 or 2 (AdjointDEIS, Blasingame & Liu 2024, writes the
first-order adjoint in lambda).

``adjoint_sample`` returns x_0 and, on ``backward()``, the gradients for x_T, every conditioning tensor in
``cond`` that requires grad and ``params``. Backends:

- ``"adjoint"``: that exponential-integrator adjoint on a fixed grid; the forward pass keeps no activations
  and no trajectory, so memory does not grow with the step count (n + 1 network evaluations backwards,
  n of them with a VJP).
- ``"torchdiffeq"``: ``torchdiffeq.odeint_adjoint`` on the same ODE and grid in rho with any fixed-grid
  method (Euler for order 1, as the paper's code; midpoint for order 2; rk4 on request), the network at the
  continuous t(rho); it stores the state at every grid point (O(steps) memory) and resets to it during the
  backward pass. Its explicit integrators diverge backwards where rho is large and falls fast (the adjoint's
  a / rho term: the cosine schedule reaches rho = 2e4 at t = 999 and its next linspace points are 16, 8, 5.3, ...),
  so grid intervals that start above rho = 10 (``TORCHDIFFEQ_MAX_RHO``) are taken by the integrator's own steps
  and differentiated exactly (their transpose, by checkpointed backprop), and odeint_adjoint starts below. On
  the cosine schedule (tests/test_adjoint.py) this turns a gradient 1e3-1e6 times too large into one that
  converges with the steps; starting below rho = 100 instead stops the blow-up but leaves Euler 81% off at any
  step count, as the intervals just below 100 still span rho ratios of 2.
- ``"checkpoint"``: the exact gradient of the discrete sampler by backprop, recomputing each step's
  activations (``torch.utils.checkpoint``); memory O(steps x latent).
- ``"autograd"``: plain backprop through the loop (memory grows with steps x activations).

Any Gaussian path works, VP or flow matching: y = x / alpha and rho = sigma / alpha are defined on both (on the
flow path alpha = 1 - sigma, so rho = sigma / (1 - sigma)), and the grid may be a plain timestep array or a
``StepGrid``. It must start where alpha > 0 and end at a noise level sigma > 0 (the official code stops at
sigma_min too), since the backward pass evaluates the network at the end point: ``adjoint_timesteps`` builds
such a grid. Guidance inside the ODE is supported when it is stateless (CFG, APG without momentum, CFG-rescale,
intervals).
"""

import math

import torch
from torch.utils.checkpoint import checkpoint

from .denoiser import Denoiser, StepState
from .schedule import StepGrid, shift_sigmas


BACKENDS = ("adjoint", "torchdiffeq", "checkpoint", "autograd")
TORCHDIFFEQ_METHODS = ("euler", "midpoint", "heun3", "rk4", "explicit_adams", "implicit_adams")  # fixed-grid
TORCHDIFFEQ_MAX_RHO = 10.0  # intervals starting above it: exact steps, not torchdiffeq's explicit adjoint


def adjoint_timesteps(denoiser: Denoiser, num_inference_steps: int, shift: float = 1.0) -> torch.Tensor:
    """n + 1 timesteps, n steps in rho. VP: linspace from t = N - 1 down to t = 0, rounded. Flow matching (in flow
    time, t = N sigma): sigma evenly spaced from 1 - 1/N (DPM-Solver's flow-sigma start: alpha > 0) down to 1/N,
    shifted by ``shift`` as the model's scheduler shifts (SD3: 3; with dynamic shifting e^mu)."""
    schedule = denoiser.schedule
    if schedule.path == "flow":
        n, N = int(num_inference_steps), schedule.num_train_timesteps
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
        sigmas = shift_sigmas(torch.linspace(1 - 1 / N, 1 / N, n + 1, dtype=torch.float64), float(shift))
        return N * sigmas
    if shift != 1.0:
        raise ValueError(f"shift applies to flow-matching schedules, got shift={shift} for a VP schedule")
    return schedule.timesteps(num_inference_steps, "linspace", end=0.0, grid_includes_end=True)


class RhoODE:
    """The guided eps field of a denoiser on a timestep grid, as a function of y = x / alpha, and the
    multistep exponential integrator of order 1 (DDIM) or 2 (DPM-Solver++(2M)) that walks it."""

    def __init__(
        self, denoiser: Denoiser, timesteps, cond=None, uncond=None, guidance=None, order: int = 2, method=None
    ):
        if isinstance(timesteps, StepGrid):
            grid = timesteps
        else:
            ts = torch.as_tensor(timesteps, dtype=torch.float64)
            if len(ts) < 2 or torch.any(ts[1:] >= ts[:-1]):
                raise ValueError(f"timesteps must be strictly decreasing with >= 2 entries, got {ts.tolist()}")
            grid = StepGrid.from_timesteps(denoiser.schedule, ts)
        if grid.sigma[-1] == 0:
            raise ValueError("the adjoint grid must end at a model timestep with sigma > 0, not clean data (use adjoint_timesteps)")
        if grid.alpha[0] == 0:
            raise ValueError("the adjoint grid must start where alpha > 0 (y = x / alpha), not at pure noise (use adjoint_timesteps)")
        if grid.jumps or any(not r1 < r0 for r0, r1 in zip(grid.rho, grid.rho[1:])):
            raise ValueError("the adjoint needs a grid that steps from entry to entry with strictly falling rho")
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order!r}")
        if method is not None and method not in TORCHDIFFEQ_METHODS:
            raise ValueError(f"method must be one of torchdiffeq's fixed-grid {TORCHDIFFEQ_METHODS}, got {method!r}")
        if getattr(guidance, "momentum", 0.0):
            raise ValueError("guidance with momentum is stateful along the run; the adjoint needs momentum = 0")
        self.denoiser, self.cond, self.uncond, self.guidance = denoiser, dict(cond or {}), uncond, guidance
        self.order = order
        self.method = method or ("euler" if order == 1 else "midpoint")
        self.grid = grid
        self.alpha, self.sigma, self.rho = grid.alpha, grid.sigma, grid.rho
        self.t = grid.model_timesteps()
        self.n = n = grid.num_steps
        # y_{i+1} = r_i y_i + p_i D_i + q_i D_{i-1}; the first step has no history, and like diffusers'
        # lower_order_final the last one is first order on short grids, where its lambda step is longest.
        self.r = [self.rho[i + 1] / self.rho[i] for i in range(n)]
        self.p, self.q = [1 - r for r in self.r], [0.0] * n
        for i in range(1, n):
            if order == 2 and not (i == n - 1 and n < 15):
                c = self._extrapolation(i + 1, i, i - 1)
                self.p[i], self.q[i] = (1 - self.r[i]) * (1 + c), -(1 - self.r[i]) * c
        self.reconstructed_x_T = None  # set by the adjoint backward pass

    def _extrapolation(self, to: int, at: int, prev: int) -> float:
        """DPM-Solver++(2M)'s 1 / (2 r0): h / (2 h_prev) in lambda = -log rho, for a step at -> to."""
        h = math.log(self.rho[at] / self.rho[to])
        h_prev = math.log(self.rho[prev] / self.rho[at])
        return h / (2 * h_prev)

    def state(self, y: torch.Tensor, i: int) -> StepState:
        return StepState(i, self.n, self.t[i].to(y.device), self.alpha[i], self.sigma[i], self.alpha[i] * y)

    def x0(self, y: torch.Tensor, i: int, cond: dict) -> torch.Tensor:
        """The guided x0 prediction D at grid point i for state y."""
        return self.denoiser.guided_x0(self.state(y, i), cond, self.uncond, self.guidance)

    def step(self, y: torch.Tensor, d_prev, i: int, cond: dict):
        """One step from grid point i to i + 1: returns (y_{i+1}, D_i)."""
        d = self.x0(y, i, cond)
        y = self.r[i] * y + self.p[i] * d
        if self.q[i]:
            y = y + self.q[i] * d_prev
        return y, d

    def unstep(self, y: torch.Tensor, d: torch.Tensor, d_next, i: int) -> torch.Tensor:
        """y_i from y_{i+1}, D_{i+1} (= ``d``) and D_{i+2}: the same integrator run from rho_{i+1} up to rho_i."""
        up = self.rho[i] / self.rho[i + 1]
        if self.order == 1 or d_next is None:
            return up * y + (1 - up) * d
        c = self._extrapolation(i, i + 1, i + 2)
        return up * y + (1 - up) * ((1 + c) * d - c * d_next)

    def grad_keys(self) -> list[str]:
        return [k for k, v in self.cond.items() if torch.is_tensor(v) and v.requires_grad]

    def sample(self, x_T: torch.Tensor, params=(), backend: str = "adjoint") -> torch.Tensor:
        """x_0 from x_T; see ``adjoint_sample``. After an adjoint backward pass, ``self.reconstructed_x_T``
        holds x_T as the backward pass recovered it."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        params = [p for p in params if p.requires_grad]
        if backend == "adjoint":
            cond_tensors = [self.cond[k] for k in self.grad_keys()]
            return _Adjoint.apply(self, len(cond_tensors), x_T, *cond_tensors, *params)
        if backend == "torchdiffeq":
            return _torchdiffeq(self, x_T, params)
        y, d = x_T / self.alpha[0], None
        for i in range(self.n):
            if backend == "checkpoint":
                y, d = checkpoint(self.step, y, d, i, self.cond, use_reentrant=False)
            else:
                y, d = self.step(y, d, i, self.cond)
        return y * self.alpha[-1]


class _Adjoint(torch.autograd.Function):
    """Inputs: x_T, the differentiable conditioning tensors, then the parameters (so autograd routes their
    gradients). The forward pass keeps only the final state."""

    @staticmethod
    def forward(ctx, ode: RhoODE, num_cond: int, x_T: torch.Tensor, *tensors):
        keys = ode.grad_keys()
        cond = {**ode.cond, **{k: t.detach() for k, t in zip(keys, tensors[:num_cond])}}
        with torch.no_grad():
            y, d = x_T.detach() / ode.alpha[0], None
            for i in range(ode.n):
                y, d = ode.step(y, d, i, cond)
        ctx.ode, ctx.keys = ode, keys
        ctx.save_for_backward(y, *tensors[:num_cond])
        ctx.params = tensors[num_cond:]
        return y * ode.alpha[-1]

    @staticmethod
    def backward(ctx, grad_x0: torch.Tensor):
        ode, params = ctx.ode, list(ctx.params)
        y, *cond_tensors = ctx.saved_tensors
        leaves = [t.detach().requires_grad_(True) for t in cond_tensors]
        cond = {**ode.cond, **dict(zip(ctx.keys, leaves))}
        a, a_next = grad_x0 * ode.alpha[-1], torch.zeros_like(grad_x0)  # a_{i+1}, a_{i+2}; y = x / alpha at the end
        a_rest = [torch.zeros_like(t) for t in leaves + params]  # a_c, then a_theta
        with torch.no_grad():
            d, d_next = ode.x0(y, ode.n, cond), None  # D_{i+1}, D_{i+2}
        # Walk (y, a_y, a_c, a_theta) back from grid point i + 1 to i.
        for i in reversed(range(ode.n)):
            y = ode.unstep(y, d, d_next, i)
            # D_i reaches y_{i+1} through p_i and y_{i+2} through q_{i+1}
            w = ode.p[i] * a + (ode.q[i + 1] * a_next if i + 1 < ode.n else 0)
            with torch.enable_grad():
                y_leaf = y.detach().requires_grad_(True)
                d_i = ode.x0(y_leaf, i, cond)
                vjps = torch.autograd.grad(d_i, [y_leaf, *leaves, *params], w, allow_unused=True)
            a, a_next = ode.r[i] * a + vjps[0], a
            for acc, g in zip(a_rest, vjps[1:]):
                if g is not None:
                    acc.add_(g)
            d, d_next = d_i.detach(), d
        ode.reconstructed_x_T = (y * ode.alpha[0]).detach()
        return (None, None, a / ode.alpha[0], *a_rest)


def _torchdiffeq(ode: RhoODE, x_T: torch.Tensor, params: list) -> torch.Tensor:
    from torchdiffeq import odeint_adjoint

    keys = ode.grad_keys()
    schedule = ode.denoiser.schedule
    rho = torch.tensor(ode.rho, dtype=torch.float64)

    # intervals starting above TORCHDIFFEQ_MAX_RHO: the integrator's own steps, differentiated exactly
    y, d = x_T / ode.alpha[0], None
    k = 0
    while k < ode.n and ode.rho[k] > TORCHDIFFEQ_MAX_RHO:
        y, d = checkpoint(ode.step, y, d, k, ode.cond, use_reentrant=False)
        k += 1
    if k == ode.n:
        return y * ode.alpha[-1]

    class Field(torch.nn.Module):
        # conditioning tensors ride along in the state with zero derivative, so their adjoint is dL/dc
        def forward(self, r, state):
            y, *cs = state
            r = r.detach().double().clamp(rho[-1], rho[0])  # the grid went through x_T's dtype: undo its rounding
            t = schedule.timestep_at_rho(r)
            alpha = float(schedule.alpha_at_rho(r))
            i = int(torch.argmin((rho - r).abs()))  # the step index guidance intervals see
            step = StepState(i, ode.n, t.float().to(y.device), alpha, float(r) * alpha, alpha * y)
            d = ode.denoiser.guided_x0(step, {**ode.cond, **dict(zip(keys, cs))}, ode.uncond, ode.guidance)
            return ((y - d) / float(r), *[torch.zeros_like(c) for c in cs])

    state = (y, *[ode.cond[key] for key in keys])
    grid = rho[k:].to(dtype=x_T.dtype, device=x_T.device)
    ys = odeint_adjoint(Field(), state, grid, method=ode.method, adjoint_params=tuple(params))
    return ys[0][-1] * ode.alpha[-1]


def adjoint_sample(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    timesteps,
    *,
    cond: dict | None = None,
    uncond: dict | None = None,
    guidance=None,
    params=(),
    backend: str = "adjoint",
    order: int = 2,
    method: str | None = None,
) -> torch.Tensor:
    """Sample x_0 from x_T by steps in rho (order 1: DDIM, order 2: DPM-Solver++(2M)), differentiable by the
    chosen ``backend``. ``method`` picks torchdiffeq's fixed-grid solver (default: Euler for order 1, as the
    paper's code, midpoint for order 2).

    Gradients reach ``x_T``, the tensors in ``cond`` that require grad and ``params`` (any iterable of
    parameters, e.g. a LoRA or a few layers). The adjoint and torchdiffeq backends differentiate only those;
    the backprop backends, like any backprop, also reach other parameters that require grad.
    """
    return RhoODE(denoiser, timesteps, cond, uncond, guidance, order, method).sample(x_T, params, backend)
