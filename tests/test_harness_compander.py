"""Weight compander stand-in: the properties the paper's abstract states (odd, bounded, pushes small weights away
from zero), the parametrisation plumbing, and the card path that applies it to an MLP."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from diffkit.harness.compander import WeightCompanderStandIn, apply_weight_compander
from diffkit.harness.data import digits
from diffkit.harness.experiment import build_model


def test_stand_in_is_odd_bounded_and_expands_small_weights():
    alpha, beta = 1.0, 0.4
    wc = WeightCompanderStandIn(alpha, beta)
    v = torch.linspace(-50, 50, 20001, dtype=torch.float64)
    w = wc(v.float()).double()
    torch.testing.assert_close(wc(-v.float()), -wc(v.float()))  # odd
    assert w.abs().max() <= alpha and w.abs().max() > 0.999 * alpha  # bounded by alpha, and alpha is approached
    # large weights are compressed: beyond alpha nothing can keep its magnitude
    big = v.abs() > alpha
    assert (w[big].abs() < v[big].abs()).all()
    # small weights are pushed away from zero: |wc(v)| > |v| near 0, with slope alpha / beta there
    small = (v.abs() > 0) & (v.abs() < 0.1)
    assert (w[small].abs() > v[small].abs()).all()
    x = torch.zeros(1, requires_grad=True)
    (slope,) = torch.autograd.grad(wc(x).sum(), x)
    assert slope.item() == pytest.approx(alpha / beta, rel=1e-6)
    # monotone, so the ordering of weights survives the reparameterisation
    assert (w.diff() >= 0).all()


def test_a_bounded_function_without_expansion_is_refused():
    # alpha <= beta would make wc a plain squashing function (slope <= 1 at 0): not what the paper describes
    with pytest.raises(ValueError, match="alpha"):
        WeightCompanderStandIn(alpha=0.5, beta=0.5)


def test_registering_keeps_initial_weights_and_scales_gradients():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    before = layer.weight.detach().clone()
    apply_weight_compander(layer, alpha=1.0, beta=0.5)
    assert parametrize.is_parametrized(layer, "weight")
    torch.testing.assert_close(layer.weight, before, atol=1e-6, rtol=1e-5)
    v = layer.parametrizations.weight.original
    x = torch.randn(4, 16)
    layer(x).square().sum().backward()
    # dL/dv = dL/dw * (alpha / beta) * (1 - tanh^2(v / beta)), by the chain rule through wc
    w = layer.weight.detach().requires_grad_(True)
    (grad_w,) = torch.autograd.grad(nn.functional.linear(x, w, layer.bias.detach()).square().sum(), w)
    expected = grad_w * (1.0 / 0.5) * (1 - torch.tanh(v.detach() / 0.5) ** 2)
    torch.testing.assert_close(v.grad, expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="alpha"):
        apply_weight_compander(nn.Linear(2, 2), alpha=0.01, beta=0.005)  # default init exceeds alpha


def test_card_model_gets_every_linear_weight_reparameterised():
    config = {"model": {"name": "mlp", "hidden": [32, 32],
                        "reparam": {"name": "weight_compander", "alpha": 1.0, "beta": 0.5}}}
    model, hooks = build_model(config, digits(seed=0), epochs=1)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3 and all(parametrize.is_parametrized(m, "weight") for m in linears)
    assert not any(parametrize.is_parametrized(m, "bias") for m in linears) and hooks == []
