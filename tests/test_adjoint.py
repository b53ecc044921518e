"""AdjointDPM backends against the closed-form Gaussian case and against each other on a tiny UNet."""

import pytest
import torch

from diffkit.adjoint import BACKENDS, RhoODE, adjoint_sample, adjoint_timesteps
from diffkit.denoiser import Denoiser
from diffkit.guidance import CFG
from diffkit.schedule import NoiseSchedule
from helpers import NearlyTrainedModel, tiny_unet


class GaussianEps(torch.nn.Module):
    """The exact noise prediction for data N(m, s^2 I): eps = sigma (x - alpha m) / (alpha^2 s^2 + sigma^2).
    The mean comes in as conditioning (``mean=``), the log-scale is a parameter."""

    def __init__(self, schedule, log_s=0.3):
        super().__init__()
        self.schedule = schedule
        self.log_s = torch.nn.Parameter(torch.tensor(log_s, dtype=torch.float64))

    def forward(self, x, t, mean=None, return_dict=True):
        t = t.reshape(-1)[0].double()
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        s2 = torch.exp(2 * self.log_s)
        return (sigma * (x - alpha * mean) / (alpha**2 * s2 + sigma**2),)


def _closed_form(schedule, timesteps, x_T, mean, log_s):
    """The probability-flow ODE solved exactly: y - m = (y_T - m) sqrt(s^2 + rho^2) / sqrt(s^2 + rho_T^2)."""
    a_T, s_T = schedule.alpha(timesteps[0]), schedule.sigma(timesteps[0])
    a_e, s_e = schedule.alpha(timesteps[-1]), schedule.sigma(timesteps[-1])
    s2 = torch.exp(2 * log_s)
    rho_T, rho_e = s_T / a_T, s_e / a_e
    return a_e * (mean + (x_T / a_T - mean) * torch.sqrt(s2 + rho_e**2) / torch.sqrt(s2 + rho_T**2))


def _gaussian_grads(backend, steps, order=2, method=None, path="vp"):
    schedule = NoiseSchedule.from_config({"beta_schedule": "linear"}) if path == "vp" else NoiseSchedule.flow_matching()
    model = GaussianEps(schedule)
    denoiser = Denoiser(model, schedule, "epsilon")
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    mean = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    weights = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    timesteps = adjoint_timesteps(denoiser, steps, shift=3.0 if path == "flow" else 1.0)
    x0 = adjoint_sample(
        denoiser, x_T, timesteps, cond={"mean": mean}, params=[model.log_s], backend=backend, order=order, method=method
    )
    (x0 * weights).sum().backward()
    ours = [x_T.grad.clone(), mean.grad.clone(), model.log_s.grad.clone()]
    # reference: autograd through the exact solution
    x_T.grad = mean.grad = None
    log_s = model.log_s.detach().clone().requires_grad_(True)
    ref = torch.autograd.grad((_closed_form(schedule, timesteps, x_T, mean, log_s) * weights).sum(), [x_T, mean, log_s])
    return [((a - b).norm() / b.norm()).item() for a, b in zip(ours, ref)]


@pytest.mark.parametrize("backend", ["adjoint", "checkpoint", "autograd"])
@pytest.mark.parametrize("path", ["vp", "flow"])
def test_second_order_gradients_reach_the_closed_form(backend, path):
    """Gradients for x_T, the data mean (through the conditioning) and the data log-scale (a parameter), with
    DPM-Solver++(2M) forwards and its transpose backwards: second order, about 16x smaller from 50 to 200
    steps (the adjoint's log-scale gradient, 1.8e-3 -> 2.8e-4, falls 6x), and within 1e-3 of the exact values
    at 200 (measured 5.8e-4 for x_T). The same on the flow-matching path (alpha = 1 - sigma, SD3's shift 3),
    in flow time: rho = sigma / alpha there (x_T 1.4e-2 -> 7.3e-4)."""
    coarse, fine = _gaussian_grads(backend, 50, path=path), _gaussian_grads(backend, 200, path=path)
    assert all(f < c / 5 for f, c in zip(fine, coarse)), (coarse, fine)
    assert max(fine) <= 1e-3, fine


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_order_gradients_converge_like_one_over_steps(backend):
    """Order 1 (DDIM; Euler in rho for torchdiffeq, as the paper's code): the error falls about 4x from 50 to
    200 steps. torchdiffeq's Euler adjoint takes each VJP at the cleaner end of the interval, where a_y ~ 1/rho
    varies fastest: same order, a larger constant (3.6% at 200 steps, vs 0.8% for the others; 15% before the
    intervals above rho = 10, here the first one, became exact steps)."""
    coarse, fine = _gaussian_grads(backend, 50, order=1), _gaussian_grads(backend, 200, order=1)
    assert all(f < c / 2.5 for f, c in zip(fine, coarse)), (coarse, fine)
    assert max(fine) <= (0.2 if backend == "torchdiffeq" else 2e-2), fine


@pytest.mark.parametrize("method, bound", [("midpoint", 5e-3), ("rk4", 1e-3)])
def test_torchdiffeq_higher_order_methods_reach_the_closed_form(method, bound):
    """torchdiffeq in rho at the continuous t(rho): midpoint is second order (4.6e-4 at 200 steps; 3.1e-3 when the
    first interval, from rho = 157, was torchdiffeq's too), rk4 meets 1e-3 at four evaluations per step (2e-5 at
    200 steps, the exponential integrator's error on that first interval)."""
    coarse, fine = _gaussian_grads("torchdiffeq", 50, method=method), _gaussian_grads("torchdiffeq", 200, method=method)
    assert all(f < c / 8 or f < 1e-7 for f, c in zip(fine, coarse)), (coarse, fine)
    assert max(fine) <= bound, fine


def _unet_grads(backend, steps, guidance=None, order=2, schedule=None, prediction_type="epsilon", shift=1.0, method=None):
    schedule = schedule or NoiseSchedule.from_config({"beta_schedule": "linear"})
    model = NearlyTrainedModel(schedule, prediction_type, num_class_embeds=3)
    denoiser = Denoiser(model, schedule, prediction_type)
    params = list(model.unet.conv_out.parameters())
    x_T = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    target = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    model.zero_grad()
    x0 = adjoint_sample(
        denoiser, x_T, adjoint_timesteps(denoiser, steps, shift), cond={"class_labels": torch.tensor([1])},
        uncond={"class_labels": torch.tensor([2])}, guidance=guidance, params=params, backend=backend, order=order,
        method=method,
    )
    (x0 - target).square().sum().backward()
    return torch.cat([x_T.grad.flatten()] + [p.grad.flatten() for p in params])


@pytest.mark.parametrize("order, steps, bound, shrink", [(2, (50, 100), 5e-2, 3.0), (1, (50, 100), 5e-2, 1.6)])
def test_adjoint_agrees_with_checkpointed_backprop_on_a_unet_with_guidance(order, steps, bound, shrink):
    """The adjoint is the transpose of the sampler's steps taken at the states it reconstructs backwards, so
    it differs from the exact gradient of the sampler by the reconstruction error, which falls with the
    solver's order (measured: order 2 1.8% at 50 steps, 0.4% at 100; order 1 6.0% and 3.0%)."""
    errors = []
    for n in steps:
        ref = _unet_grads("checkpoint", n, CFG(2.0), order)
        ours = _unet_grads("adjoint", n, CFG(2.0), order)
        errors.append(((ours - ref).norm() / ref.norm()).item())
    assert errors[0] <= (bound if order == 2 else 0.1) and errors[1] <= bound, errors
    assert errors[1] < errors[0] / shrink, errors


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_adjoint_on_a_flow_model_agrees_with_checkpointed_backprop():
    """AdjointDPM on a flow-matching model (velocity prediction, SD3's shift 3, CFG) in flow time: the adjoint and
    torchdiffeq's midpoint converge to the exact gradient of the sampler (measured: adjoint 4.3% at 25 steps,
    1.4% at 50; torchdiffeq 22%, 8.2%)."""
    flow = dict(schedule=NoiseSchedule.flow_matching(), prediction_type="flow", shift=3.0, guidance=CFG(2.0))
    errors = {"adjoint": [], "torchdiffeq": []}
    for steps in (25, 50):
        ref = _unet_grads("checkpoint", steps, **flow)
        for backend in errors:
            errors[backend].append(_relative(_unet_grads(backend, steps, **flow), ref))
    assert errors["adjoint"][1] < 0.02 and errors["adjoint"][1] < errors["adjoint"][0] / 2.5, errors
    assert errors["torchdiffeq"][1] < 0.12 and errors["torchdiffeq"][1] < errors["torchdiffeq"][0] / 2, errors


def test_torchdiffeq_converges_on_the_cosine_schedule():
    """The cosine schedule's rho is 2e4 at t = 999, 16 at the next 25-step point: torchdiffeq's explicit adjoint
    used to blow the gradient up 1e3-1e6-fold there. Its intervals above rho = 10 are now exact steps, and the
    midpoint method converges to the checkpointed gradient (measured 4.1% at 25 steps, 1.4% at 50)."""
    cosine = dict(schedule=NoiseSchedule.from_config({"beta_schedule": "squaredcos_cap_v2"}), prediction_type="v_prediction",
                  guidance=CFG(2.0))
    errors = [_relative(_unet_grads("torchdiffeq", n, **cosine), _unet_grads("checkpoint", n, **cosine)) for n in (25, 50)]
    assert errors[1] < 0.025 and errors[1] < errors[0] / 2.5, errors


def test_adjoint_memory_does_not_grow_with_the_steps():
    """What autograd keeps from the forward pass: the adjoint backend the final state and the conditioning
    (the same at 5 and 20 steps); checkpointed backprop one input per step."""
    schedule = NoiseSchedule.flow_matching()
    model = NearlyTrainedModel(schedule, "flow")
    denoiser = Denoiser(model, schedule, "flow")

    def saved_bytes(backend, steps):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        x_T = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            adjoint_sample(denoiser, x_T, adjoint_timesteps(denoiser, steps, 3.0), backend=backend)
        return total[0]

    assert saved_bytes("adjoint", 5) == saved_bytes("adjoint", 20)
    assert saved_bytes("checkpoint", 20) > 3 * saved_bytes("checkpoint", 5)


def test_checkpoint_equals_plain_autograd_exactly():
    assert torch.allclose(_unet_grads("checkpoint", 10), _unet_grads("autograd", 10), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("order, bound, shrink", [(2, 1e-2, 8), (1, 0.1, 3)])
def test_backward_pass_restores_x_T(order, bound, shrink):
    """The states the backward pass reconstructs end at x_T up to the integrator's error. Max-abs error on
    x_T ~ N(0, I), measured: order 2 0.11 at 50 steps, 0.004 at 200; order 1 (DDIM inversion) 0.37 and 0.095."""
    schedule = NoiseSchedule.from_config({"beta_schedule": "linear"})
    model = NearlyTrainedModel(schedule, "epsilon")
    denoiser = Denoiser(model, schedule, "epsilon")
    x_T = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    errors = []
    for steps in (50, 200):
        ode = RhoODE(denoiser, adjoint_timesteps(denoiser, steps), order=order)
        ode.sample(x_T).sum().backward()
        errors.append((ode.reconstructed_x_T - x_T).abs().max().item())
    assert errors[1] <= bound and errors[1] < errors[0] / shrink, errors


def test_bad_arguments():
    schedule = NoiseSchedule.from_config({})
    denoiser = Denoiser(tiny_unet(), schedule)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="backend"):
        adjoint_sample(denoiser, x, adjoint_timesteps(denoiser, 3), backend="magic")
    with pytest.raises(ValueError, match="model timestep"):
        adjoint_sample(denoiser, x, schedule.timesteps(3))
    with pytest.raises(ValueError, match="order"):
        adjoint_sample(denoiser, x, adjoint_timesteps(denoiser, 3), order=3)
    with pytest.raises(ValueError, match="method"):
        adjoint_sample(denoiser, x, adjoint_timesteps(denoiser, 3), backend="torchdiffeq", method="dopri5")
    with pytest.raises(ValueError, match="rho"):
        schedule.timestep_at_rho(-1.0)
    flow = Denoiser(tiny_unet(), NoiseSchedule.flow_matching(), "flow")
    with pytest.raises(ValueError, match="alpha > 0"):  # a FlowMatch grid starts at pure noise: y = x / alpha breaks
        adjoint_sample(flow, x, torch.tensor([1000.0, 500.0, 10.0]))
    with pytest.raises(ValueError, match="shift"):
        adjoint_timesteps(denoiser, 3, shift=3.0)
