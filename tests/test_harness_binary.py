"""BiPer's two stages (continuous sin(omega w), then sign(sin(omega w))), its activation normalisation and
regulariser, as the official edmav4/BiPer code; the layer entry builds the stage hook."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diffkit.harness.binary import BiPerActivation, BiPerStages, BinaryLinear, SignActivation
from diffkit.harness.models import binary_factory, mlp
from diffkit.harness.registry import LAYERS

W = [-2.0, -1.2, -0.6, -0.05, 0.05, 0.3, 0.9, 1.0, 1.4, 2.0]


def _layer(stage2, omega=20.0):
    layer = BinaryLinear(len(W), 1, "biper", omega=omega, stage2=stage2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([W]))
    layer(torch.ones(1, len(W))).sum().backward()
    return layer.binary_weight().detach()[0], layer.weight.grad[0]


def test_biper_stage1_is_the_continuous_sine_and_stage2_its_square_wave():
    omega = 20.0
    w = torch.tensor(W)
    forward, grad = _layer(stage2=False, omega=omega)
    torch.testing.assert_close(forward, torch.sin(omega * w))
    torch.testing.assert_close(grad, omega * torch.cos(omega * w))
    forward, grad = _layer(stage2=True, omega=omega)
    torch.testing.assert_close(forward, torch.sign(torch.sin(omega * w)))
    torch.testing.assert_close(grad, omega * torch.cos(omega * w))  # identity through the sign


def test_biper_activation_normalises_each_sample_then_uses_the_2_minus_2x_surrogate():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 9, generator=g) * torch.tensor([[0.1], [1.0], [3.0], [10.0]])).requires_grad_(True)
    upstream = torch.randn(4, 9, generator=g)
    act = BiPerActivation().train()
    out = act(x)
    y = x / torch.sqrt(x.var(dim=1, keepdim=True) + 1e-5)  # per-sample std over the features, unbiased
    torch.testing.assert_close(out, torch.sign(y))
    (out * upstream).sum().backward()
    # backward: (2 - |2 y|)_+ at y, chained through the normalisation
    factor = (2 - (2 * y).abs()).clamp_min(0).detach()
    (expected,) = torch.autograd.grad((factor * upstream * y).sum(), x)
    torch.testing.assert_close(x.grad, expected)
    act.eval()
    torch.testing.assert_close(act(x), torch.sign(x))


def test_each_estimator_brings_its_activation_binariser():
    for estimator, activation in (("biper", BiPerActivation), ("ste", SignActivation), ("reste", SignActivation)):
        model = mlp(8, 3, [6, 5], binary=binary_factory(estimator))
        assert [type(m) for m in model if isinstance(m, (BiPerActivation, SignActivation))] == [activation] * 2


def test_stages_switch_at_the_stage1_epochs_and_add_the_regulariser_gradient():
    model = nn.Sequential(BinaryLinear(5, 4, "biper", omega=20.0), BinaryLinear(4, 2, "ste"))
    hook = BiPerStages(epochs=6, stage1_epochs=4, tau=(0.5, 0.25))
    state = SimpleNamespace(unwrapped_model=model, epoch=0)
    hook.on_train_start(state)
    assert model[0].stage2 is False
    for tau, epoch in ((0.5, 0), (0.25, 4)):
        for layer in model:
            layer.weight.grad = torch.zeros_like(layer.weight)
        state.epoch = epoch
        hook.after_backward(state)
        w = model[0].weight.detach()
        # d/dw tau mean(1/2 - cos(2 omega w) / 2) = tau omega sin(2 omega w) / N
        torch.testing.assert_close(model[0].weight.grad, tau * 20.0 * torch.sin(40.0 * w) / w.numel())
        assert model[1].weight.grad.abs().max() == 0  # other estimators untouched
        for e in range(epoch, 4):
            state.epoch = e
            hook.on_epoch_end(state)
        assert model[0].stage2 is True
    with pytest.raises(ValueError, match="stage1_epochs must be an int in"):
        BiPerStages(epochs=6, stage1_epochs=6)


def test_biper_layer_entry_runs_two_thirds_of_the_budget_in_stage1_by_default():
    factory, hooks = LAYERS.build("biper", 60)
    (stages,) = [h for h in hooks if isinstance(h, BiPerStages)]
    assert stages.stage1_epochs == 40 and stages.tau == (0.037, 0.0468)
    assert math.isclose(factory(3, 2).omega, 20.0)
    _, hooks = LAYERS.build("biper", 60, stage1_epochs=0)  # stage 2 only
    assert [h.stage1_epochs for h in hooks if isinstance(h, BiPerStages)] == [0]
