"""GBNN (gradient-boosted one-hidden-layer networks) and its backprop baselines."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffkit.harness import load_card, run_method, validate_card
from diffkit.harness.gbnn import (GBNN, MLPTrainer, fit_weak_regressor, glorot_uniform_, keep_units, one_hidden_mlp,
                                  weak_regressor_objective)


ROOT = Path(__file__).resolve().parents[1]


def _blobs(classes: int, n: int = 120, d: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centres = torch.randn(classes, d, generator=gen) * 2
    return centres[y] + torch.randn(n, d, generator=gen), y


@pytest.mark.parametrize("classes", [2, 4])
def test_assembled_mlp_and_its_prefixes_equal_the_staged_ensemble(classes):
    x, y = _blobs(classes)
    gbnn = GBNN(units=12, units_per_step=2, max_iter=30).fit(x, y, classes, torch.Generator().manual_seed(0))
    assert len(gbnn.learners) == 6
    scale = 2.0 if classes == 2 else 1.0  # the binary MLP outputs the logit 2F (probability sigmoid(2F))
    for steps in (6, 1, 3, 0):
        mlp = gbnn.to_mlp(steps)
        assert mlp[0].out_features == max(2 * steps, 1)
        staged = gbnn.decision_function(x, steps)
        out = mlp(x.double())
        out = out.squeeze(1) if classes == 2 else out
        torch.testing.assert_close(out, scale * staged, atol=1e-6, rtol=0)
    # the staged sum is F_0 + sum_t rho_t f_t, written out by hand
    by_hand = gbnn.intercept.expand(len(x), -1).clone()
    for learner, rho in zip(gbnn.learners, gbnn.rhos):
        by_hand += rho * learner(x.double())
    torch.testing.assert_close(gbnn.decision_function(x), by_hand.squeeze(1) if classes == 2 else by_hand)


def test_residuals_newton_step_and_constant_are_the_official_formulas():
    # the official multi_class_loss / log_exponential_loss written in numpy (GAA-UAM/GBNN gbnn/GBNN.py)
    rng = np.random.default_rng(0)
    gbnn = GBNN()
    y = np.eye(3)[rng.integers(0, 3, 20)]
    raw, f = rng.normal(size=(20, 3)), rng.normal(size=(20, 3))
    p = np.exp(raw - raw.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    residual = y - p
    rho = -np.sum(f * (y - (y - residual))) / np.sum(f * f * (y - residual) * ((y - residual) - 1))
    gbnn.binary = False
    t = torch.from_numpy
    torch.testing.assert_close(gbnn._residuals(t(y), t(raw)), t(residual))
    assert gbnn._newton_step(t(y), t(residual), t(f)).item() == pytest.approx(rho)
    yb = rng.choice([-1.0, 1.0], 20)
    rawb, fb = rng.normal(size=20), rng.normal(size=20)
    rb = 2.0 * yb / (1 + np.exp(2.0 * yb * rawb))
    rhob = np.sum(rb * fb) / np.sum(rb * fb * fb * (2.0 * yb - rb))
    gbnn.binary = True
    torch.testing.assert_close(gbnn._residuals(t(yb), t(rawb)), t(rb))
    assert gbnn._newton_step(t(yb), t(rb), t(fb)).item() == pytest.approx(rhob)
    # the binary starting constant: 1/2 log((1 + mean y) / (1 - mean y)) with y = +-1
    x, labels = _blobs(2, n=30)
    labels[:5] = 1  # unbalanced: 20 of 30 positive
    fitted = GBNN(units=1, max_iter=5).fit(x, labels, 2, torch.Generator().manual_seed(0))
    mean = (2 * labels - 1).double().mean().item()
    assert fitted.intercept.item() == pytest.approx(0.5 * math.log((1 + mean) / (1 - mean)))


def test_weak_regressor_gradient_is_its_objectives_and_the_boosted_loss_falls():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    target = torch.randn(40, 2, generator=gen, dtype=torch.float64)
    net = one_hidden_mlp(3, 2, 4, dtype=torch.float64)
    theta = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    # the objective by autograd: 1/2 sum over outputs of the mean squared error + alpha/2 ||W||^2 / n
    objective = (0.5 * (net(x) - target).square().sum() / 40
                 + 0.5 * 0.1 * (net[0].weight.square().sum() + net[2].weight.square().sum()) / 40)
    grads = torch.autograd.grad(objective, list(net.parameters()))
    value, grad = weak_regressor_objective(theta.numpy(), x.numpy(), target.numpy(), 4, 0.1)
    assert value == pytest.approx(objective.item(), rel=1e-12)
    np.testing.assert_allclose(grad, torch.cat([g.flatten() for g in grads]).numpy(), rtol=1e-10, atol=1e-12)
    fitted = fit_weak_regressor(x.numpy(), target.numpy(), 4, 0.1, 200, torch.Generator().manual_seed(1))
    theta_fit = torch.nn.utils.parameters_to_vector(fitted.parameters()).numpy()
    assert weak_regressor_objective(theta_fit, x.numpy(), target.numpy(), 4, 0.1)[0] < value
    xs, y = _blobs(3)
    gbnn = GBNN(units=8, max_iter=50).fit(xs, y, 3, torch.Generator().manual_seed(0))
    assert gbnn.losses[-1] < 0.5 * gbnn.losses[0] and (gbnn.predict(xs) == y).double().mean() > 0.9


def test_a_non_finite_newton_step_is_reported_as_divergence():
    x, y = _blobs(3)
    gbnn = GBNN(units=3, max_iter=5).fit(x, y, 3, torch.Generator().manual_seed(0))
    assert not gbnn.diverged
    gbnn.rhos[1] = math.inf  # what sum f^2 p (1 - p) = 0 gives once the predictions saturate
    assert gbnn.diverged


def test_gbnn_and_trainer_refuse_bad_settings():
    with pytest.raises(ValueError, match="subsample"):
        GBNN(subsample=0)
    with pytest.raises(ValueError, match="units"):
        GBNN(units=1, units_per_step=2)
    with pytest.raises(ValueError, match="not fitted"):
        GBNN().to_mlp()
    x, y = _blobs(3)
    gbnn = GBNN(units=2, max_iter=5).fit(x, y, 3, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"steps must be an int in \[0, 2\]"):
        gbnn.decision_function(x, 3)
    with pytest.raises(ValueError, match="labels"):
        GBNN().fit(x, y + 5, 3, torch.Generator())
    with pytest.raises(ValueError, match="solver"):
        MLPTrainer(solver="rmsprop")
    with pytest.raises(ValueError, match="lrs"):
        MLPTrainer(lrs=[])


def test_mlp_trainer_picks_the_rate_on_validation_and_keep_units_switches_units_off():
    x, y = _blobs(3, n=150)

    def make_net():
        net = one_hidden_mlp(5, 3, 16, dtype=torch.float64)
        glorot_uniform_(net[0], torch.Generator().manual_seed(0))
        glorot_uniform_(net[2], torch.Generator().manual_seed(0))
        return net

    net, lr, val = MLPTrainer("sgd", lrs=[1e-6, 0.1], max_iter=30).fit(make_net, x[:100], y[:100], x[100:], y[100:],
                                                                      torch.Generator().manual_seed(0))
    assert lr == 0.1 and val > 0.8  # a rate of 1e-6 cannot learn in 30 epochs
    net_lbfgs, lr_lbfgs, _ = MLPTrainer("lbfgs", max_iter=50).fit(make_net, x, y, x, y, torch.Generator())
    assert lr_lbfgs is None and (net_lbfgs(x.double()).argmax(1) == y).double().mean() > 0.9
    pruned = keep_units(net, torch.tensor([0, 3]))
    h = torch.sigmoid(net[0](x.double()))
    expected = h[:, [0, 3]] @ net[2].weight[:, [0, 3]].T + net[2].bias
    torch.testing.assert_close(pruned(x.double()), expected)
    assert not torch.equal(pruned[2].weight, net[2].weight)  # a copy: the original keeps its units


def test_boost_card_runs_every_method_and_refuses_mismatched_sections():
    card = json.loads((ROOT / "cards" / "gbnn.json").read_text())
    load_card(ROOT / "cards" / "gbnn.json")
    card["model"]["units"] = 4
    card["methods"]["mlp_adam"]["algorithm"]["max_iter"] = 3
    card["methods"]["mlp_sgd"]["algorithm"]["max_iter"] = 3
    card["methods"]["mlp_lbfgs"]["algorithm"]["max_iter"] = 3
    card["algorithm"]["max_iter"] = 5
    card = validate_card(card)
    for method in card["methods"]:
        record = run_method(card, method, 0, progress=False)
        assert 0 <= record["metrics"]["test_accuracy"] <= 1 and "units25_test_accuracy" in record["metrics"]
        if method == "gbnn_eta_val":
            assert record["metrics"]["selected_eta"] in (1.0, 0.5, 0.1)
    bad = json.loads((ROOT / "cards" / "gbnn.json").read_text())
    bad["optimizer"] = {"name": "adam"}
    with pytest.raises(ValueError, match="takes no optimizer section"):
        validate_card(bad)
    classify = json.loads((ROOT / "cards" / "elr_label_noise.json").read_text())
    classify["methods"]["gbnn"] = {"algorithm": {"name": "gbnn"}}
    with pytest.raises(ValueError, match="'gbnn' runs only in task 'boost', not in 'classify'"):
        validate_card(classify)
    bad = json.loads((ROOT / "cards" / "gbnn.json").read_text())
    bad["model"]["activation"] = "relu"
    with pytest.raises(ValueError, match="activation must be logistic"):
        validate_card(bad)
