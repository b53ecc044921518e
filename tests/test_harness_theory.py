"""The theory cards' pieces: XOR cluster data and the fixed-second-layer ReLU network (benign overfitting /
grokking), gradient coherence and the robust-mean GD variants (generalisation mystery), feature-noise patch data and
the patch CNN (benign oscillation); and a short run of each card."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffkit.harness import run_method, validate_card
from diffkit.harness.coherence import (RobustMeanGD, m_coherence, median_of_means, per_example_gradients,
                                       winsorized_mean)
from diffkit.harness.data import feature_patches, xor_clusters
from diffkit.harness.models import PatchCNN, TwoLayerReLU, mlp
from diffkit.harness.tasks.benign_oscillation import max_cos
from diffkit.harness.tasks.xor_grokking import evaluation_steps


ROOT = Path(__file__).resolve().parents[1]


# --- XOR clusters ---------------------------------------------------------------------------------------------------

def test_xor_clusters_follow_the_paper_model():
    data = xor_clusters(0, d=50, n=80, mu_norm_sq=200.0, flip=0.1, test=400)
    assert data.x_train.shape == (80, 50) and data.x_test.shape == (400, 50)
    flipped = data.y_train != data.train_extra["y_clean"]
    assert flipped.sum() == 8  # exactly 10% of the labels flipped
    # the cluster means are +-mu_1 = +-sqrt(200) e_1 (label 1) and +-mu_2 = +-sqrt(200) e_2 (label 0)
    x, y = data.x_test, data.y_test
    on_1, on_2 = x[:, 0].abs(), x[:, 1].abs()
    assert torch.equal((on_1 > on_2).long(), y)  # 14-sigma clusters: the mean direction decides the label
    assert on_1[y == 1].mean() == pytest.approx(200 ** 0.5, abs=0.3)
    with pytest.raises(ValueError, match="flip"):
        xor_clusters(0, flip=0.5)


def test_two_layer_relu_is_the_paper_network_and_its_cross_entropy_is_the_logistic_loss():
    torch.manual_seed(0)
    net = TwoLayerReLU(6, width=4, init_std=0.5)
    assert torch.equal(net.second_layer, torch.tensor([0.5, 0.5, -0.5, -0.5]))  # +-1/sqrt(m)
    x = torch.randn(5, 6)
    f = sum(net.second_layer[j] * torch.relu(x @ net.weight[j]) for j in range(4))
    torch.testing.assert_close(net.score(x), f)
    y = torch.tensor([1, 0, 1, 1, 0])
    logistic = torch.log1p(torch.exp(-(2 * y - 1) * f)).mean()
    torch.testing.assert_close(F.cross_entropy(net(x), y), logistic)
    assert len(list(net.parameters())) == 1  # the second layer is fixed
    assert evaluation_steps(800)[:10] == list(range(1, 11)) and evaluation_steps(800)[-1] == 800


# --- coherence and robust means -------------------------------------------------------------------------------------

def test_m_coherence_closed_forms():
    g = torch.randn(1, 30)
    assert m_coherence(g.expand(8, -1)) == pytest.approx(8)  # identical gradients: m
    assert m_coherence(torch.eye(6) * torch.arange(1.0, 7.0)[:, None]) == pytest.approx(1)  # orthogonal: 1
    assert m_coherence(torch.cat([g, -g])) == pytest.approx(0, abs=1e-12)  # cancelling: 0
    rows = torch.randn(5, 7, dtype=torch.float64)
    by_hand = 5 * rows.mean(0).square().sum() / rows.square().sum(1).mean()
    assert m_coherence(rows) == pytest.approx(by_hand.item())
    with pytest.raises(ValueError, match="zero"):
        m_coherence(torch.zeros(3, 4))


def test_per_example_gradients_match_one_backward_per_example():
    torch.manual_seed(0)
    model = mlp(6, 3, [5])
    x, y = torch.randn(4, 6), torch.tensor([0, 2, 1, 2])
    grads = per_example_gradients(model, x, y)
    for i in range(4):
        single = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters()))
        torch.testing.assert_close(grads[i], torch.cat([g.flatten() for g in single]))


def test_robust_means_against_numpy_references():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(12, 9))
    t = torch.from_numpy(rows)
    for c in (0, 1, 3):  # clip each column's c largest / smallest to the (c+1)-th largest / smallest, then average
        ordered = np.sort(rows, 0)
        expected = np.clip(rows, ordered[c], ordered[-1 - c]).mean(0)
        np.testing.assert_allclose(winsorized_mean(t, c).numpy(), expected)
    np.testing.assert_allclose(median_of_means(t, 3).numpy(), np.median(rows.reshape(3, 4, 9).mean(1), 0))
    np.testing.assert_allclose(median_of_means(t, 4).numpy(), np.median(rows.reshape(4, 3, 9).mean(1), 0))
    with pytest.raises(ValueError, match="2c <"):
        winsorized_mean(t, 6)
    with pytest.raises(ValueError, match="dividing"):
        median_of_means(t, 5)


@pytest.mark.parametrize("estimator", ["mean", "winsorize", "median_of_means"])
def test_robust_mean_gd_steps_along_the_robust_mean(estimator):
    torch.manual_seed(0)
    model = mlp(6, 3, [5])
    x, y = torch.randn(9, 6), torch.randint(0, 3, (9,))
    algorithm = RobustMeanGD(estimator, c=2, groups=3)
    state = SimpleNamespace(model=model, unwrapped_model=model, accelerator=SimpleNamespace(num_processes=1))
    loss, logits = algorithm(state, {"x": x, "y": y, "index": torch.arange(9)})
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y).item())  # its value: the batch loss
    grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])
    per_example = per_example_gradients(model, x, y)
    expected = {"mean": per_example.mean(0), "winsorize": winsorized_mean(per_example, 2),
                "median_of_means": median_of_means(per_example, 3)}[estimator]
    torch.testing.assert_close(grad, expected)


# --- feature patches and the patch CNN ------------------------------------------------------------------------------

def test_feature_patches_carry_the_weak_feature_everywhere_and_the_strong_one_in_a_fraction():
    data = feature_patches(0, n=400, test=300, d=20, weak_norm=0.5, strong_norm=3.0, strong_fraction=0.2)
    x = data.x_train.view(400, 3, 20)
    sign = (2 * data.y_train - 1).float()
    u, v = data.test_extra["u"], data.test_extra["v"]
    torch.testing.assert_close(x[:, 0], sign[:, None] * u.expand(400, -1))  # y u in every example
    strong = (x[:, 1] @ v).abs() > 0
    assert 0.12 < strong.float().mean() < 0.28
    torch.testing.assert_close(x[strong, 1], sign[strong, None] * v)
    assert (x[:, 2, :2] == 0).all() and (x[~strong, 1, :2] == 0).all()  # the noise is orthogonal to u and v
    weak = data.test_extra["x_weak"].view(300, 3, 20)
    assert (weak[:, 1] @ v == 0).all()  # weak-feature-only test data: no strong patch
    torch.testing.assert_close(weak[:, 0], data.x_test.view(300, 3, 20)[:, 0])


def test_patch_cnn_is_the_patch_sum_of_relu_filters_and_max_cos_picks_the_best_filter():
    torch.manual_seed(0)
    net = PatchCNN(12, patches=3, width=2, init_std=1.0)
    x = torch.randn(5, 12)
    patches = x.view(5, 3, 4)
    expected = torch.stack([sum(torch.relu(patches[:, p] @ net.weight[j, r]) for r in range(2) for p in range(3)) / 2
                            for j in range(2)], 1)
    torch.testing.assert_close(net(x), expected)
    weight = torch.zeros(2, 3, 4)
    weight[1, 2, 0], weight[0, 1, 0], weight[0, 0, 1] = 2.0, -1.0, 5.0  # class 1 aligned with +u, class 0 with -u
    u = torch.tensor([1.0, 0, 0, 0])
    assert max_cos(weight, u) == pytest.approx(1.0)


# --- short runs of the cards ----------------------------------------------------------------------------------------

def _short(name, **budget):
    card = json.loads((ROOT / "cards" / f"{name}.json").read_text())
    card["budget"].update(budget)
    return validate_card(card)


def test_theory_cards_run_end_to_end():
    card = _short("xor_grokking", steps=3)
    card["data"].update(d=200, test=100)
    record = run_method(validate_card(card), "gd_lr0.2", 0, progress=False)
    assert set(record["metrics"]) == set(card["metrics"]) and [s for s, _ in record["curves"]["test_accuracy"]] == [1, 2, 3]
    card = _short("coherence_labels", epochs=1, coherence_every=5, coherence_examples=16, early_steps=10)
    record = run_method(card, "random_labels", 0, progress=False)
    assert record["metrics"]["coherence_early"] > 0 and record["curves"]["coherence"][0][0] == 0
    card = _short("robust_mean_gd", epochs=1)
    for method in ("winsorized_c4", "median_of_3_means"):
        assert 0 <= run_method(card, method, 0, progress=False)["metrics"]["noisy_train_fit"] <= 1
    card = _short("benign_oscillation", epochs=2)
    record = run_method(card, "sgd_lr0.4", 10, progress=False)
    assert len(record["curves"]["train_loss"]) == 2 * 5 + 1 and -1 <= record["metrics"]["max_cos_weak"] <= 1
    bad = json.loads((ROOT / "cards" / "xor_grokking.json").read_text())
    bad["loss"] = {"name": "ce"}
    with pytest.raises(ValueError, match="takes no loss section"):
        validate_card(bad)
