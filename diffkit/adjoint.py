"""AdjointDPM (Pan et al., ICLR 2024): gradients through a whole sampling run by the adjoint ODE.

The probability-flow ODE in y = x / alpha_t and rho = sigma_t / alpha_t has no linear term:

    dy/drho = eps(alpha_t y, t(rho), c) = (y - D(y, rho, c)) / rho       (an Euler step in rho is a DDIM step)

with D the (guided) x0 prediction. For a loss L(x_0) its adjoint a_y = dL/dy solves, backwards from
rho_0 to rho_T,

    da_y/drho = -a_y^T d eps/dy,   da_c/drho = -a_y^T d eps/dc,   da_theta/drho = -a_y^T d eps/dtheta,

while y is re-integrated backwards alongside. The a_y / rho part is stiff where rho spans orders of magnitude
(the first steps), so diffkit discretises it as the exponential integrator it is dual to: over each interval
[rho_{i+1}, rho_i], with r = rho_{i+1} / rho_i = exp(-(lambda_{i+1} - lambda_i)),

    y_i     = (y_{i+1} - (1 - r) D_{i+1}) / r                      (DDIM inversion, D at the later point)
    a_i     = r a_{i+1} + (1 - r) a_{i+1}^T dD/dy (y_i, rho_i)       (the VJP at the noisier point)
    a_c,th += (1 - r) a_{i+1}^T dD/d(c, theta) (y_i, rho_i)

a first-order scheme that is the exact transpose of the forward DDIM step whenever the inversion is exact
(AdjointDEIS, Blasingame & Liu 2024, writes the same integrator in lambda).

``adjoint_sample`` returns x_0 and, on ``backward()``, the gradients for x_T, every conditioning tensor in
``cond`` that requires grad, and ``params``. Backends:

- ``"adjoint"``: that exponential-integrator adjoint on a fixed grid; the forward pass keeps no activations
  and no trajectory, so memory does not grow with the step count (n + 1 network evaluations backwards,
  n of them with a VJP).
- ``"torchdiffeq"``: ``torchdiffeq.odeint_adjoint`` (Euler) on the same ODE and grid; it stores the state at
  every grid point (O(steps) memory) and resets to it during the backward pass.
- ``"checkpoint"``: the exact gradient of the discrete sampler by backprop, recomputing each step's
  activations (``torch.utils.checkpoint``); memory O(steps x latent).
- ``"autograd"``: plain backprop through the loop (memory grows with steps x activations).

The grid must end at a model timestep (>= 0; the official code stops at sigma_min too) because the backward
pass evaluates the network at the end point. Guidance inside the ODE is supported when it is stateless
(CFG, APG without momentum, CFG-rescale, intervals).
"""

import torch
from torch.utils.checkpoint import checkpoint

from .denoiser import Denoiser, StepState


BACKENDS = ("adjoint", "torchdiffeq", "checkpoint", "autograd")


def adjoint_timesteps(denoiser: Denoiser, num_inference_steps: int) -> torch.Tensor:
    """n + 1 linspace timesteps from t = N - 1 down to t = 0, rounded: n Euler steps in rho."""
    return denoiser.schedule.timesteps(num_inference_steps, "linspace", end=0.0, grid_includes_end=True)


class RhoODE:
    """The guided eps field of a denoiser on a timestep grid, as a function of y = x / alpha."""

    def __init__(self, denoiser: Denoiser, timesteps, cond=None, uncond=None, guidance=None):
        ts = torch.as_tensor(timesteps, dtype=torch.float64)
        if ts[-1] < 0:
            raise ValueError("the adjoint grid must end at a model timestep >= 0 (use adjoint_timesteps)")
        if torch.any(ts[1:] >= ts[:-1]):
            raise ValueError(f"timesteps must be strictly decreasing, got {ts.tolist()}")
        if getattr(guidance, "momentum", 0.0):
            raise ValueError("guidance with momentum is stateful along the run; the adjoint needs momentum = 0")
        self.denoiser, self.cond, self.uncond, self.guidance = denoiser, dict(cond or {}), uncond, guidance
        self.alpha = denoiser.schedule.alpha(ts).tolist()
        self.sigma = denoiser.schedule.sigma(ts).tolist()
        self.rho = [s / a for s, a in zip(self.sigma, self.alpha)]
        self.t = ts.float()
        self.n = len(ts) - 1
        self.reconstructed_x_T = None  # set by the adjoint backward pass

    def x0(self, y: torch.Tensor, i: int, cond: dict) -> torch.Tensor:
        """The guided x0 prediction D at grid point i for state y."""
        alpha, sigma = self.alpha[i], self.sigma[i]
        state = StepState(i, self.n, self.t[i].to(y.device), alpha, sigma, alpha * y)
        return self.denoiser.guided_x0(state, cond, self.uncond, self.guidance)

    def eps(self, y: torch.Tensor, i: int, cond: dict) -> torch.Tensor:
        """dy/drho = (y - D) / rho: the guided eps at grid point i."""
        return (y - self.x0(y, i, cond)) / self.rho[i]

    def step(self, y: torch.Tensor, i: int, cond: dict) -> torch.Tensor:
        """One Euler step in rho from grid point i to i + 1, which is a DDIM step."""
        r = self.rho[i + 1] / self.rho[i]
        return r * y + (1 - r) * self.x0(y, i, cond)

    def grad_keys(self) -> list[str]:
        return [k for k, v in self.cond.items() if torch.is_tensor(v) and v.requires_grad]

    def sample(self, x_T: torch.Tensor, params=(), backend: str = "adjoint") -> torch.Tensor:
        """x_0 from x_T; see ``adjoint_sample``. After an adjoint backward pass, ``self.reconstructed_x_T``
        holds x_T as the backward ODE recovered it."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        params = [p for p in params if p.requires_grad]
        if backend == "adjoint":
            cond_tensors = [self.cond[k] for k in self.grad_keys()]
            return _Adjoint.apply(self, len(cond_tensors), x_T, *cond_tensors, *params)
        if backend == "torchdiffeq":
            return _torchdiffeq(self, x_T, params)
        y = x_T / self.alpha[0]
        for i in range(self.n):
            if backend == "checkpoint":
                y = checkpoint(self.step, y, i, self.cond, use_reentrant=False)
            else:
                y = self.step(y, i, self.cond)
        return y * self.alpha[-1]


class _Adjoint(torch.autograd.Function):
    """Inputs: x_T, the differentiable conditioning tensors, then the parameters (so autograd routes their
    gradients). The forward pass keeps only the final state."""

    @staticmethod
    def forward(ctx, ode: RhoODE, num_cond: int, x_T: torch.Tensor, *tensors):
        keys = ode.grad_keys()
        cond = {**ode.cond, **{k: t.detach() for k, t in zip(keys, tensors[:num_cond])}}
        with torch.no_grad():
            y = x_T.detach() / ode.alpha[0]
            for i in range(ode.n):
                y = ode.step(y, i, cond)
        ctx.ode, ctx.keys, ctx.num_cond = ode, keys, num_cond
        ctx.save_for_backward(y, *tensors[:num_cond])
        ctx.params = tensors[num_cond:]
        return y * ode.alpha[-1]

    @staticmethod
    def backward(ctx, grad_x0: torch.Tensor):
        ode, params = ctx.ode, list(ctx.params)
        y, *cond_tensors = ctx.saved_tensors
        leaves = [t.detach().requires_grad_(True) for t in cond_tensors]
        cond = {**ode.cond, **dict(zip(ctx.keys, leaves))}
        a_y = grad_x0 * ode.alpha[-1]  # y = x / alpha at the end of the grid
        a_rest = [torch.zeros_like(t) for t in leaves + params]  # a_c, then a_theta
        with torch.no_grad():
            d_next = ode.x0(y, ode.n, cond)
        # Integrate (y, a_y, a_c, a_theta) backwards from grid point i + 1 to i.
        for i in reversed(range(ode.n)):
            r = ode.rho[i + 1] / ode.rho[i]
            y = (y - (1 - r) * d_next) / r
            with torch.enable_grad():
                y_leaf = y.detach().requires_grad_(True)
                d = ode.x0(y_leaf, i, cond)
                vjps = torch.autograd.grad(d, [y_leaf, *leaves, *params], a_y, allow_unused=True)
            a_y = r * a_y + (1 - r) * vjps[0]
            for acc, g in zip(a_rest, vjps[1:]):
                if g is not None:
                    acc.add_((1 - r) * g)
            d_next = d.detach()
        ode.reconstructed_x_T = (y * ode.alpha[0]).detach()
        return (None, None, a_y / ode.alpha[0], *a_rest)


def _torchdiffeq(ode: RhoODE, x_T: torch.Tensor, params: list) -> torch.Tensor:
    from torchdiffeq import odeint_adjoint

    keys = ode.grad_keys()
    rho = torch.tensor(ode.rho, dtype=x_T.dtype, device=x_T.device)

    class Field(torch.nn.Module):
        # conditioning tensors ride along in the state with zero derivative, so their adjoint is dL/dc
        def forward(self, r, state):
            y, *cs = state
            i = int(torch.argmin((rho - r).abs()))
            return (ode.eps(y, i, {**ode.cond, **dict(zip(keys, cs))}), *[torch.zeros_like(c) for c in cs])

    state = (x_T / ode.alpha[0], *[ode.cond[k] for k in keys])
    ys = odeint_adjoint(Field(), state, rho, method="euler", adjoint_params=tuple(params))
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
) -> torch.Tensor:
    """Sample x_0 from x_T by Euler steps in rho (DDIM), differentiable by the chosen ``backend``.

    Gradients reach ``x_T``, the tensors in ``cond`` that require grad and ``params`` (any iterable of
    parameters, e.g. a LoRA or a few layers). The adjoint and torchdiffeq backends differentiate only those;
    the backprop backends, like any backprop, also reach other parameters that require grad.
    """
    return RhoODE(denoiser, timesteps, cond, uncond, guidance).sample(x_T, params, backend)
