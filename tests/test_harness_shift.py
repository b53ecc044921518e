"""DenseShift's zero-free power-of-two weights (the official thermometer code and sqrt surrogate) and the plain PoT
quantizer with zero: the grids, the straight-through gradients against their closed forms, exact round trips of on-grid weights, and the card path; OFQ's StatsQ and the
level-flip (oscillation) count."""

import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diffkit.harness.data import digits
from diffkit.harness.experiment import build_model
from diffkit.harness.registry import LAYERS
from diffkit.harness.shift import (ShiftDiagnostics, ShiftLinear, denseshift_levels, pot_levels, thermometer_shift,
                                   zero_weight_fraction)
from diffkit.harness.statsq import LevelFlips, StatsQLinear, statsq


def _wide_latents(out_features, in_features, seed=0, top=2):
    # magnitudes log-uniform over [2^-12, 2^top] (beyond both ends of every grid), random signs, plus exact zeros
    g = torch.Generator().manual_seed(seed)
    mags = torch.exp2(torch.empty(out_features, in_features).uniform_(-12, top, generator=g))
    w = torch.where(torch.rand(out_features, in_features, generator=g) < 0.5, -mags, mags)
    w[0, :4] = 0.0
    return w


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_denseshift_weights_lie_on_the_zero_free_grid(bits):
    layer = ShiftLinear(40, 50, "denseshift", bits)
    assert layer.shift_latents.shape == (2 ** (bits - 1) - 1, 50, 40)  # one binary latent per shift step
    layer.set_weight(_wide_latents(50, 40, top=10))
    w = layer.quantized_weight().detach().double()
    # the grid from first principles: +-2^p, p = 0 .. 2^(b-1) - 1, no zero (the official 3-bit w_sign * 2^shift)
    grid = {s * 2.0 ** p for s in (-1, 1) for p in range(2 ** (bits - 1))}
    assert set(w.unique().tolist()) == grid  # every level used, nothing off the grid
    assert len(grid) == 2 ** bits and 0.0 not in grid and (w != 0).all()
    assert set(denseshift_levels(bits).tolist()) == grid
    assert zero_weight_fraction(nn.Sequential(layer)) == 0.0


def test_denseshift_thermometer_code_is_the_official_3bit_product():
    b = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3))).T  # every (b1, b2, b3)
    b1, b2, b3 = b
    torch.testing.assert_close(thermometer_shift(b), ((b1 + 1) * b2 + 1) * b3)
    assert set(thermometer_shift(b).tolist()) == {0.0, 1.0, 2.0, 3.0}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pot_weights_lie_on_the_grid_with_zero(bits):
    layer = ShiftLinear(40, 50, "pot", bits)
    layer.set_weight(_wide_latents(50, 40))
    w = layer.quantized_weight().detach().double()
    grid = {0.0} | {s * 2.0 ** -p for s in (-1, 1) for p in range(2 ** (bits - 1) - 1)}
    assert set(w.unique().tolist()) == grid and len(grid) == 2 ** bits - 1
    assert set(pot_levels(bits).tolist()) == grid
    # zero exactly where log2-rounding passes the smallest shift: |w| < 2^-(p_max + 1/2)
    p_max = 2 ** (bits - 1) - 2
    latent = layer.weight.detach()
    torch.testing.assert_close(w == 0, latent.abs() < 2.0 ** -(p_max + 0.5), rtol=0, atol=0)


@pytest.mark.parametrize("quantizer,bits", [("denseshift", 2), ("denseshift", 3), ("denseshift", 4), ("pot", 3)])
def test_on_grid_weights_round_trip_exactly(quantizer, bits):
    levels = denseshift_levels(bits) if quantizer == "denseshift" else pot_levels(bits)
    g = torch.Generator().manual_seed(1)
    w = levels[torch.randint(len(levels), (7, 9), generator=g)].float()
    layer = ShiftLinear(9, 7, quantizer, bits)
    layer.set_weight(w)
    assert torch.equal(layer.quantized_weight().detach(), w)
    x = torch.randn(5, 9, generator=g)
    torch.testing.assert_close(layer(x), x @ w.T)


def test_denseshift_gradients_follow_the_official_sqrt_surrogate():
    layer = ShiftLinear(5, 1, "denseshift", bits=3)
    u = torch.tensor([[0.3, -0.7, 1.5, -2.0, 0.0]])
    t = torch.tensor([[[0.2, -0.1, 0.3, 0.4, -0.2]],    # t1
                      [[0.5, 0.1, -0.3, 0.4, 0.0]],     # t2 (0 binarises to 0)
                      [[0.1, 0.2, 0.3, -0.4, 0.2]]])    # t3
    with torch.no_grad():
        layer.sign_latent.copy_(u)
        layer.shift_latents.copy_(t)
    s = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0]])  # sign(0) = +1
    b1, b2, b3 = (t > 0).float()
    p = ((b1 + 1) * b2 + 1) * b3
    torch.testing.assert_close(p, torch.tensor([[3.0, 2.0, 1.0, 0.0, 1.0]]))
    torch.testing.assert_close(layer.quantized_weight().detach(), s * 2.0**p)
    upstream = torch.tensor([[0.5, -1.0, 2.0, 0.25, -3.0]])
    (layer.quantized_weight() * upstream).sum().backward()
    # identity STEs through sign and the 0/1 binarisations, the surrogate s sqrt(p + 1) in between
    torch.testing.assert_close(layer.sign_latent.grad, upstream * torch.sqrt(p + 1))
    dw_dp = upstream * s / (2 * torch.sqrt(p + 1))
    expected = torch.stack([dw_dp * b2 * b3, dw_dp * (b1 + 1) * b3, dw_dp * ((b1 + 1) * b2 + 1)])
    torch.testing.assert_close(layer.shift_latents.grad, expected)


def test_pot_ste_gradient_is_the_identity():
    layer = ShiftLinear(4, 3, "pot", bits=3)
    upstream = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    (layer.quantized_weight() * upstream).sum().backward()
    torch.testing.assert_close(layer.weight.grad, upstream)


def test_invalid_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="bits must be an int in \\[1, 5\\] for denseshift"):
        ShiftLinear(4, 4, "denseshift", bits=6)
    with pytest.raises(ValueError, match="bits must be an int in \\[2, 8\\] for pot"):
        ShiftLinear(4, 4, "pot", bits=1)
    with pytest.raises(ValueError, match="quantizer must be one of"):
        ShiftLinear(4, 4, "shift")
    with pytest.raises(ValueError, match="weight must be a tensor of shape"):
        ShiftLinear(4, 3).set_weight(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="layer 'denseshift' has no parameter 'bit'"):
        LAYERS.check("denseshift", {"bit": 3})


def test_card_model_has_shift_hidden_layers_and_a_full_precision_head():
    config = {"model": {"name": "mlp", "hidden": [32, 16], "norm": {"name": "bn"},
                        "linear": {"name": "denseshift", "bits": 3}}}
    model, hooks = build_model(config, digits(seed=0), epochs=1)
    shifts = [m for m in model.modules() if isinstance(m, ShiftLinear)]
    assert [(m.in_features, m.out_features, m.bits) for m in shifts] == [(64, 32, 3), (32, 16, 3)]
    assert isinstance(model[-1], nn.Linear) and any(isinstance(h, ShiftDiagnostics) for h in hooks)
    # the DenseShift latents are what an optimiser sees, and they get gradients through the STEs
    model(torch.randn(8, 64)).sum().backward()
    assert all(m.sign_latent.grad is not None and m.shift_latents.grad is not None for m in shifts)


# --- OFQ's StatsQ and the level-flip (oscillation) diagnostic ----------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3])
def test_statsq_matches_its_formula_row_by_row(bits):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 40, generator=g) * torch.linspace(0.1, 3, 6).unsqueeze(1)  # rows of different scales
    n = 2 ** (bits - 1)
    q = statsq(w, bits)
    for row, q_row in zip(w.double(), q.double()):
        s = 2 * row.abs().mean()
        # the row's grid from the formula: s (k + 1/2) / n, k = -n .. n-1 (2^b zero-free levels, symmetric)
        grid = torch.tensor([(k + 0.5) / n for k in range(-n, n)], dtype=torch.float64) * s
        wc = (row / s).clamp(-1, 1 - 1e-6)
        expected = s * (torch.floor(wc * n - 0.5 + 0.5) + 0.5) / n  # round(x) = floor(x + 1/2) off ties
        torch.testing.assert_close(q_row, expected, rtol=1e-5, atol=1e-6)
        assert torch.isin(q_row.round(decimals=5), grid.round(decimals=5)).all()
    w.requires_grad_(True)
    upstream = torch.randn(6, 40, generator=g)
    (statsq(w, bits) * upstream).sum().backward()
    torch.testing.assert_close(w.grad, upstream)  # straight through, the scale is detached


def test_statsq_layer_codes_and_level_flip_hook():
    layer = StatsQLinear(8, 3, bits=2)
    codes = layer.integer_weight()
    assert set(codes.unique().tolist()) <= {-2.0, -1.0, 0.0, 1.0}
    # the hook counts code changes between consecutive steps, per weight and epoch
    model = nn.Sequential(layer)
    state = SimpleNamespace(unwrapped_model=model, step=0, epoch=0, logs={})
    hook = LevelFlips()
    hook.on_train_start(state)
    with torch.no_grad():  # flip the sign of row 0: every code k there becomes -k - 1, all 8 change
        layer.weight[0].neg_()
    state.step = 1
    hook.on_step_start(state)
    with torch.no_grad():  # and back again: an oscillation, another 8 changes
        layer.weight[0].neg_()
    hook.on_epoch_end(state)
    hook.on_train_end(state)
    assert state.logs["level_flips_last_epoch"] == pytest.approx(16 / 24)
    assert state.logs["curves"]["level_flips"] == [[1, pytest.approx(16 / 24)]]


def test_shift_codes_change_exactly_when_the_quantised_weight_does():
    for quantizer in ("denseshift", "pot"):
        layer = ShiftLinear(40, 50, quantizer, 3)
        layer.set_weight(_wide_latents(50, 40))
        q, codes = layer.quantized_weight().detach(), layer.integer_weight()
        # one code per level: the map level -> code is a bijection
        pairs = set(zip(q.flatten().tolist(), codes.flatten().tolist()))
        assert len(pairs) == len(q.unique()) == len(codes.unique())
