"""Weight Compander (Cakaj et al., IJCNN 2023): the paper's Eq. 1 / 3 / 4, weight decay on Psi(v), the
Powerpropagation-style Adam step, the learnable per-layer variant, and the card path."""

import math

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.nn.utils import parametrize

from diffkit.harness.compander import CompanderStep, WeightCompander, apply_weight_compander, compander_layers
from diffkit.harness.data import HarnessData, digits
from diffkit.harness.experiment import build_model
from diffkit.harness.loop import train


def test_eq1_eq3_eq4():
    a, b = 0.5, 0.7  # a < b is allowed: the paper's VGG19 choice
    psi = WeightCompander(a, b)
    v = torch.linspace(-40, 40, 8001, dtype=torch.float64)
    torch.testing.assert_close(psi(v), a * torch.atan(v / b))  # Eq. 1
    assert psi(v).abs().max() < a * math.pi / 2 and psi(v).abs().max() > 0.98 * a * math.pi / 2
    x = v.clone().requires_grad_(True)
    (slope,) = torch.autograd.grad(psi(x).sum(), x)
    torch.testing.assert_close(slope, a / (b * (1 + (v / b) ** 2)))  # Eq. 3
    torch.testing.assert_close(psi.derivative(v), slope)
    w = torch.linspace(-0.7, 0.7, 101, dtype=torch.float64)
    torch.testing.assert_close(psi(psi.right_inverse(w)), w)  # Eq. 4 inverts Eq. 1
    with pytest.raises(ValueError, match="a pi/2"):
        psi.right_inverse(torch.tensor([0.8]))
    with pytest.raises(ValueError, match="b must be a finite number > 0"):
        WeightCompander(1.0, 0.0)


def test_registering_keeps_weights_and_leaves_biases():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    before = [m.weight.detach().clone() for m in (model[0], model[3])]
    apply_weight_compander(model, a=0.5, b=0.7)
    for layer, w in zip((model[0], model[3]), before):
        assert parametrize.is_parametrized(layer, "weight") and not parametrize.is_parametrized(layer, "bias")
        torch.testing.assert_close(layer.weight, w, atol=1e-6, rtol=1e-5)
    assert not parametrize.is_parametrized(model[1])  # BatchNorm untouched
    assert len(compander_layers(model)) == 2
    with pytest.raises(ValueError, match="already"):
        apply_weight_compander(model)


def _one_step(optimizer_name, lr, wd, step, learnable=False):
    """One full-batch step on a one-layer net; returns (v before, a, b, dL/dw, v after, module)."""
    torch.manual_seed(1)
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    data = HarnessData(x, y, x, y, num_classes=3)
    model = nn.Sequential(nn.Linear(4, 3))
    a, b = (0.5, 1.0) if learnable else (0.8, 0.6)
    apply_weight_compander(model, a, b, learnable)
    layer = model[0]
    v0 = layer.parametrizations.weight.original.detach().clone()
    w = layer.weight.detach().clone().requires_grad_(True)
    (g_w,) = torch.autograd.grad(F.cross_entropy(F.linear(x, w, layer.bias), y), w)
    cls = torch.optim.SGD if optimizer_name == "sgd" else torch.optim.Adam
    optimizer = cls(model.parameters(), lr=lr, weight_decay=wd)
    psi = layer.parametrizations.weight[0]
    a0, b0 = psi.a.detach().clone(), psi.b.detach().clone()
    train(model, data, optimizer=optimizer, criterion=lambda logits, yy, index: F.cross_entropy(logits, yy), epochs=1,
          batch_size=8, seed=0, hooks=[CompanderStep(step)], accelerator=Accelerator(cpu=True), progress=False)
    return v0, a0, b0, g_w, layer.parametrizations.weight.original.detach(), psi


def test_weight_decay_acts_on_psi_of_v_with_sgd():
    lr, wd = 0.1, 0.3
    v0, a, b, g_w, v1, _ = _one_step("sgd", lr, wd, "chain")
    psi, slope = a * torch.atan(v0 / b), a / (b * (1 + (v0 / b) ** 2))
    # gradient of L + wd/2 ||Psi(v)||^2 w.r.t. v, by the chain rule
    torch.testing.assert_close(v1, v0 - lr * (g_w + wd * psi) * slope, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(v1, v0 - lr * (g_w * slope + wd * v0), atol=1e-5)  # not decay on v


def test_powerprop_adam_step_is_the_adaptive_step_on_dl_dpsi_times_psi_prime():
    lr, wd = 0.01, 0.2
    v0, a, b, g_w, v1, _ = _one_step("adam", lr, wd, "powerprop")
    psi, slope = a * torch.atan(v0 / b), a / (b * (1 + (v0 / b) ** 2))
    g = g_w + wd * psi  # the weight-space gradient Adam sees, decay on Psi(v)
    adam_first_step = g / (g.abs() + 1e-8)  # m_hat / (sqrt(v_hat) + eps) at step 1
    torch.testing.assert_close(v1, v0 - lr * adam_first_step * slope, atol=1e-6, rtol=1e-5)


def test_learnable_variant_per_layer_a_b_trained_without_decay():
    lr, wd = 0.1, 0.5
    v0, a0, b0, g_w, v1, psi = _one_step("sgd", lr, wd, "chain", learnable=True)
    assert (a0.item(), b0.item()) == (0.5, 1.0) and psi.a.requires_grad and psi.b.requires_grad
    slope = a0 / (b0 * (1 + (v0 / b0) ** 2))
    torch.testing.assert_close(v1, v0 - lr * (g_w * slope + wd * v0), atol=1e-6, rtol=1e-5)  # decay on v
    # dL/da = sum g_w * arctan(v / b), dL/db = sum g_w * a * (-v / b^2) / (1 + v^2 / b^2): no decay term
    grad_a = (g_w * torch.atan(v0 / b0)).sum()
    grad_b = (g_w * a0 * (-v0 / b0**2) / (1 + (v0 / b0) ** 2)).sum()
    torch.testing.assert_close(psi.a.detach(), a0 - lr * grad_a, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(psi.b.detach(), b0 - lr * grad_b, atol=1e-6, rtol=1e-5)


def test_step_refuses_decoupled_decay_and_models_without_companders():
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    data = HarnessData(x, y, x, y, num_classes=2)
    model = apply_weight_compander(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="AdamW"):
        train(model, data, optimizer=torch.optim.AdamW(model.parameters()), criterion=lambda o, t, i: o.sum(),
              epochs=1, batch_size=4, seed=0, hooks=[CompanderStep()], accelerator=Accelerator(cpu=True),
              progress=False)
    plain = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="weight companders"):
        train(plain, data, optimizer=torch.optim.SGD(plain.parameters(), lr=0.1), criterion=lambda o, t, i: o.sum(),
              epochs=1, batch_size=4, seed=0, hooks=[CompanderStep()], accelerator=Accelerator(cpu=True),
              progress=False)
    with pytest.raises(ValueError, match="step must be one of"):
        CompanderStep("adam")


def test_card_model_gets_every_linear_weight_reparameterised_and_the_step_hook():
    config = {"model": {"name": "mlp", "hidden": [32, 32],
                        "reparam": {"name": "weight_compander", "a": 0.5, "b": 0.7, "step": "chain"}}}
    model, hooks = build_model(config, digits(seed=0), epochs=1)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3 and all(parametrize.is_parametrized(m, "weight") for m in linears)
    assert not any(parametrize.is_parametrized(m, "bias") for m in linears)
    assert [type(h) for h in hooks] == [CompanderStep]
    psi = linears[0].parametrizations.weight[0]
    assert (psi.a.item(), psi.b.item()) == pytest.approx((0.5, 0.7))
