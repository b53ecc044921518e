"""diffGrad against torch-optimizer's DiffGrad, and the paper's 1-D experiment."""

import pytest
import torch
import torch_optimizer

from diffkit.harness import DiffGrad, function_1d, global_minimum_1d


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_trajectory_equals_torch_optimizer_step_for_step(weight_decay):
    torch.manual_seed(0)
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))
    ours = torch.nn.Linear(5, 3).double()
    theirs = torch.nn.Linear(5, 3).double()
    theirs.load_state_dict(ours.state_dict())
    opt_ours = DiffGrad(ours.parameters(), lr=0.01, weight_decay=weight_decay)
    opt_theirs = torch_optimizer.DiffGrad(theirs.parameters(), lr=0.01, weight_decay=weight_decay)
    for step in range(100):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=f"step {step}")
    # the parameters did move: equality is not that of two frozen models
    assert not torch.equal(ours.weight, torch.nn.Linear(5, 3).double().weight)


def test_friction_uses_the_previous_gradient_not_an_alias():
    # with the aliasing bug g_{t-1} is the current gradient, xi = sigmoid(0) = 0.5 every step after the first
    p = torch.nn.Parameter(torch.zeros(1))
    opt = DiffGrad([p], lr=1.0, betas=(0.0, 0.0))  # beta = 0: the step is lr * xi * g / (|g| + eps) = xi * sign(g)
    for g in (1.0, -3.0):
        before = p.detach().clone()
        p.grad = torch.tensor([g])
        opt.step()
    step = (p - before).item()
    expected = -torch.sigmoid(torch.tensor(4.0)).item() * -1.0  # |g_1 - g_2| = 4, direction -sign(-3)
    assert step == pytest.approx(expected, rel=1e-6)


def _minimise(name, optimizer_cls):
    x = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    opt = optimizer_cls([x], lr=0.1, betas=(0.95, 0.999), eps=1e-8)
    f = function_1d(name)
    for _ in range(300):
        opt.zero_grad()
        f(x).sum().backward()
        opt.step()
    return x.item(), f(x.detach()).item() - global_minimum_1d(name)[1]


def test_on_the_papers_1d_functions_diffgrad_reaches_the_global_minimum_adam_misses():
    # F1: global minimum -0.09 at x = -0.3, local minimum -0.04 at x = 0.2
    x_adam, gap_adam = _minimise("f1", torch.optim.Adam)
    x_dg, gap_dg = _minimise("f1", DiffGrad)
    assert x_adam == pytest.approx(0.2, abs=0.01) and gap_adam == pytest.approx(0.05, abs=1e-3)
    assert x_dg == pytest.approx(-0.3, abs=0.01) and gap_dg < 1e-4
    # F2: the global minimum is the kink at -0.9 (gradient -40 left of it); Adam settles in the local minimum at 0
    x_adam, gap_adam = _minimise("f2", torch.optim.Adam)
    x_dg, gap_dg = _minimise("f2", DiffGrad)
    assert global_minimum_1d("f2")[0] == pytest.approx(-0.9, abs=1e-4)
    assert abs(x_adam) < 0.01 and gap_adam > 0.5
    assert -0.9 < x_dg < -0.75 and gap_dg < 0.1


def test_validation_names_the_parameter():
    with pytest.raises(ValueError, match="lr"):
        DiffGrad([torch.nn.Parameter(torch.zeros(1))], lr=-1)
    with pytest.raises(ValueError, match="betas"):
        DiffGrad([torch.nn.Parameter(torch.zeros(1))], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="f1"):
        function_1d("f9")
