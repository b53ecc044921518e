"""Dataset condensation: DC's layer-wise gradient distance against its closed form, DC's and DCC's matching losses
against the closed-form gradients of a linear softmax model (where DCC's summed gradient provably drops what all
classes share and DC's does not), descent of the loss in the synthetic images, random selection, the distractor
data and the card path."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffkit.harness.cards import validate_card
from diffkit.harness.condensation import (Condensation, ConvNet, condense, evaluate_synset, gradient_distance,
                                          matching_loss, random_selection)
from diffkit.harness.data import HarnessData, digits, distractors
from diffkit.harness.experiment import run_method


pytestmark = pytest.mark.usefixtures("one_thread")


def test_gradient_distance_is_dc_distance_wb():
    # rows: parallel (cos 1), orthogonal (cos 0), opposite (cos -1) -> 0 + 1 + 2; a bias (1-D) counts nothing
    real = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
    syn = torch.tensor([[5.0, 0.0], [1.0, 0.0], [-6.0, -2.0]])
    d = gradient_distance([syn, torch.randn(3)], [real, torch.randn(3)])
    torch.testing.assert_close(d, torch.tensor(3.0), atol=1e-5, rtol=0)
    # a conv kernel (out, in, h, w) is compared per output channel over in*h*w
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    expected = (1 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=0)).sum()
    torch.testing.assert_close(gradient_distance([a], [b]), expected, atol=1e-4, rtol=1e-4)


def _linear_at_zero(features=6, classes=3):
    net = nn.Linear(features, classes, bias=False)
    nn.init.zeros_(net.weight)  # uniform softmax: the gradient of class c's mean CE is (1/K - e_c) mean(x_c)^T
    return net


def _closed_form_gradient(means: torch.Tensor) -> torch.Tensor:
    k = len(means)
    return torch.stack([(torch.full((k,), 1 / k) - torch.eye(k)[c])[:, None] * means[c] for c in range(k)])


def _real_and_syn(seed=0, classes=3, features=6, per_class=5, shared=None):
    g = torch.Generator().manual_seed(seed)
    real = [torch.randn(per_class, features, generator=g) + (0 if shared is None else shared) for _ in range(classes)]
    x_syn = torch.randn(classes, features, generator=g)
    return real, x_syn, torch.arange(classes)


@pytest.mark.parametrize("contrastive", [False, True])
def test_matching_losses_equal_their_closed_forms_on_a_linear_model(contrastive):
    real, x_syn, y_syn = _real_and_syn()
    net = _linear_at_zero()
    g_real = _closed_form_gradient(torch.stack([b.mean(0) for b in real]))
    g_syn = _closed_form_gradient(x_syn)  # one synthetic image per class: its mean is itself

    def distance(a, b):
        return (1 - F.cosine_similarity(a, b, dim=1, eps=0)).sum()

    if contrastive:  # DCC: D(sum_c g_syn_c, sum_c g_real_c)
        expected = distance(g_syn.sum(0), g_real.sum(0))
    else:  # DC: sum_c D(g_syn_c, g_real_c)
        expected = sum(distance(g_syn[c], g_real[c]) for c in range(3))
    torch.testing.assert_close(matching_loss(net, x_syn, y_syn, real, contrastive), expected, atol=1e-5, rtol=1e-5)


def test_dcc_ignores_what_all_classes_share_and_dc_does_not():
    # the same image added to every real image (task-irrelevant content) leaves DCC's target gradient unchanged,
    # since sum_c (1/K - e_c) = 0; DC's class-wise targets move with it
    shared = 3 * torch.randn(6, generator=torch.Generator().manual_seed(5))
    plain, x_syn, y_syn = _real_and_syn(seed=1)
    with_shared = [b + shared for b in plain]
    net = _linear_at_zero()
    dcc = [matching_loss(net, x_syn, y_syn, real, True) for real in (plain, with_shared)]
    dc = [matching_loss(net, x_syn, y_syn, real, False) for real in (plain, with_shared)]
    torch.testing.assert_close(dcc[0], dcc[1], atol=1e-5, rtol=1e-5)
    assert abs(dc[0] - dc[1]) > 0.1


@pytest.mark.parametrize("contrastive", [False, True])
def test_a_small_step_on_the_synthetic_images_lowers_the_matching_loss(contrastive):
    d = digits(0)
    x, y = d.x_train.view(-1, 1, 8, 8), d.y_train
    torch.manual_seed(0)
    net = ConvNet((1, 8, 8), 10, width=16, depth=2)
    real = [x[y == c][:32] for c in range(10)]
    x_syn = torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y_syn = torch.arange(10).repeat_interleave(2)
    loss = matching_loss(net, x_syn, y_syn, real, contrastive)
    (grad,) = torch.autograd.grad(loss, x_syn)
    after = matching_loss(net, (x_syn - 1e-3 * grad).detach(), y_syn, real, contrastive)
    assert after < loss - 1e-4


def test_condense_runs_dc_loops_and_keeps_the_labels():
    d = digits(0)
    x, y = d.x_train.view(-1, 1, 8, 8), d.y_train
    torch.manual_seed(0)
    x_syn, y_syn, curve = condense(x, y, 10, 2, lambda: ConvNet((1, 8, 8), 10, width=8, depth=2), contrastive=True,
                                   iterations=3, outer_loop=2, inner_loop=1, batch_real=16, log_every=1)
    assert x_syn.shape == (20, 1, 8, 8) and torch.equal(y_syn, torch.arange(10).repeat_interleave(2))
    assert [it for it, _ in curve] == [0, 1, 2] and all(v > 0 for _, v in curve)
    # noise initialisation: iterations=0 returns the seeded noise itself
    start, _, _ = condense(x, y, 10, 1, lambda: ConvNet((1, 8, 8), 10, 8, 2), contrastive=False, iterations=0,
                           generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(start, torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(3)))


def test_dcc_warm_up_runs_dc_loss_then_its_own():
    # DCC's bi-level warm-up: while iteration < warmup_iterations and update < warmup_updates, DC's class-wise loss
    d = digits(0)
    x, y = d.x_train.view(-1, 1, 8, 8), d.y_train

    def run(contrastive, **warmup):
        torch.manual_seed(0)
        return condense(x, y, 10, 2, lambda: ConvNet((1, 8, 8), 10, 8, 2), contrastive=contrastive, iterations=2,
                        outer_loop=3, inner_loop=1, batch_real=16, init="real",
                        generator=torch.Generator().manual_seed(1), **warmup)[0]

    dc = run(False)
    torch.testing.assert_close(run(True, warmup_iterations=2, warmup_updates=3), dc, rtol=0, atol=0)
    assert not torch.allclose(run(True, warmup_iterations=0), dc)
    assert not torch.allclose(run(True, warmup_iterations=2, warmup_updates=2), dc)  # the third update of each


def test_random_selection_takes_ipc_real_images_of_each_class():
    d = digits(0)
    x, y = random_selection(d.x_train, d.y_train, 10, 3, torch.Generator().manual_seed(0))
    assert torch.equal(y, torch.arange(10).repeat_interleave(3))
    for image, label in zip(x, y):
        matches = (d.x_train == image).all(1)
        assert matches.any() and (d.y_train[matches] == label).all()
    assert len({tuple(r.tolist()) for r in x}) == 30  # no image twice


def test_a_network_trained_on_the_whole_training_set_learns_digits():
    # evaluate_synset is DC's trainer: given the real training set as the "synthetic" one it must learn the task
    d = digits(0)
    x, xt = d.x_train.view(-1, 1, 8, 8), d.x_test.view(-1, 1, 8, 8)
    mean, std = x.mean(), x.std()
    torch.manual_seed(0)
    acc = evaluate_synset((x - mean) / std, d.y_train, (xt - mean) / std, d.y_test,
                          lambda: ConvNet((1, 8, 8), 10, 16, 2), epochs=60)
    assert acc > 0.9


def test_evaluate_synset_follows_dcs_schedule():
    # a transcription of DC's utils.evaluate_synset: SGD(momentum 0.9, wd 5e-4) for Epoch + 1 epochs, rebuilt with
    # lr / 10 (fresh momentum) after epoch Epoch // 2 + 1; the trained weights must agree
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 1, 8, 8, generator=g), torch.arange(24) % 10
    made = []

    def make_net():
        torch.manual_seed(3)
        made.append(ConvNet((1, 8, 8), 10, 8, 2))
        return made[-1]

    evaluate_synset(x, y, x, y, make_net, epochs=6, batch_train=8, generator=torch.Generator().manual_seed(1))
    reference, order = make_net(), torch.Generator().manual_seed(1)
    lr, epochs = 0.01, 6
    optimizer = torch.optim.SGD(reference.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    for ep in range(epochs + 1):
        for batch in torch.randperm(len(x), generator=order).split(8):
            loss = F.cross_entropy(reference(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if ep in [epochs // 2 + 1]:
            lr *= 0.1
            optimizer = torch.optim.SGD(reference.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    for ours, theirs in zip(made[0].parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)  # the same operations in the same order


def test_distractors_keep_the_digit_and_add_irrelevant_images():
    d = digits(0)
    out = distractors(d, 0, count=2)
    assert out.image_shape == (1, 8, 24) and torch.equal(out.y_train, d.y_train)
    images = out.x_train.view(-1, 1, 8, 24)
    torch.testing.assert_close(images[..., :8].flatten(1), d.x_train, rtol=0, atol=0)
    pool = {tuple(r.tolist()) for r in d.x_train}
    for block in (images[..., 8:16], images[..., 16:]):
        assert all(tuple(r.tolist()) in pool for r in block.flatten(1)[:50])
    # the distractor's class is independent of the label: about 1 in 10 agree
    classes = {tuple(r.tolist()): int(c) for r, c in zip(d.x_train, d.y_train)}
    agree = sum(classes[tuple(r.tolist())] == int(c) for r, c in zip(images[..., 8:16].flatten(1), d.y_train))
    assert agree / len(d.y_train) < 0.2
    with pytest.raises(ValueError, match="image data set"):
        distractors(HarnessData(d.x_train, d.y_train, d.x_test, d.y_test, 10), 0)
    with pytest.raises(ValueError, match="count"):
        distractors(d, 0, count=0)


def _card():
    return {
        "name": "dcc_tiny", "paper": "test", "task": "condense", "data": {"name": "digits"},
        "model": {"name": "convnet", "width": 8, "depth": 2},
        "algorithm": {"name": "random_selection", "ipc": 1}, "budget": {"epochs": 2, "eval_models": 2},
        "methods": {"random": {}, "dc": {"algorithm": {"name": "dc", "iterations": 1, "batch_real": 8}},
                    "dcc": {"algorithm": {"name": "dcc", "iterations": 1, "batch_real": 8}}},
        "baseline": "dc", "seeds": [0], "metric": "test_accuracy",
        "metrics": ["test_accuracy", "test_accuracy_min", "test_accuracy_max", "final_matching_loss"], "expected": "",
    }


def test_condense_card_runs_every_method():
    card = validate_card(_card())
    records = {m: run_method(card, m, 0, progress=False) for m in card["methods"]}
    for method, record in records.items():
        m = record["metrics"]
        assert m["test_accuracy_min"] <= m["test_accuracy"] <= m["test_accuracy_max"] <= 1
        assert ("final_matching_loss" in m) == (method != "random")
    json.dumps(records)  # records are JSON lines
    # the methods of a seed are paired: same split, same networks, same evaluation seeds, so DCC whose warm-up spans
    # every iteration (DC's loss throughout) reproduces DC's record exactly
    card["methods"]["dcc"]["algorithm"]["warmup_iterations"] = 1
    assert run_method(card, "dcc", 0, progress=False)["metrics"] == records["dc"]["metrics"]


def test_shipped_condense_cards_validate():
    from pathlib import Path

    from diffkit.harness.cards import load_card

    cards = sorted(Path(__file__).resolve().parents[1].joinpath("cards").glob("dcc_*.json"))
    assert len(cards) == 5
    for path in cards:
        card = load_card(path)
        assert set(card["methods"]) == {"random", "dc", "dcc"} and len(card["seeds"]) >= 3


@pytest.mark.parametrize("change,message", [
    (lambda c: c["methods"]["dc"]["algorithm"].update(ipc=3), "loops"),
    (lambda c: c["methods"]["dc"]["algorithm"].update(lr_img=0), "lr_img"),
    (lambda c: c["methods"]["dc"]["algorithm"].update(init="zeros"), "init"),
    (lambda c: c.update(optimizer={"name": "sgd"}), "no optimizer"),
    (lambda c: c["methods"]["dc"].update(algorithm={"name": "erm"}), "condensed set"),
    (lambda c: c.update(model={"name": "mlp"}), "convnet"),
    (lambda c: c["budget"].update(eval_models=0), "eval_models"),
    (lambda c: c["metrics"].append("psnr"), "unknown metric"),
])
def test_bad_condense_cards_are_refused(change, message):
    card = copy.deepcopy(_card())
    change(card)
    with pytest.raises(ValueError, match=message):
        validate_card(card)


def test_condensation_arguments_are_checked():
    with pytest.raises(ValueError, match="method"):
        Condensation("kip")
    with pytest.raises(ValueError, match="ipc"):
        Condensation("dc", ipc=0)
    x = torch.randn(20, 1, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        condense(x, torch.arange(20) % 10, 10, 1, lambda: ConvNet((1, 8, 8), 10, 8, 2), contrastive=True)
    with pytest.raises(ValueError, match="below 1x1"):
        ConvNet((1, 8, 8), 10, depth=4)


def test_shared_texture_puts_label_independent_backgrounds_beside_each_digit():
    from diffkit.harness.condensation import shared_texture, texture_bank

    d = digits(0)
    out = shared_texture(d, 0, count=2, textures=3)
    assert out.image_shape == (1, 8, 24) and torch.equal(out.y_train, d.y_train)
    images = out.x_train.view(-1, 1, 8, 24)
    torch.testing.assert_close(images[..., :8].flatten(1), d.x_train, rtol=0, atol=0)
    bank = texture_bank(8, 8, 3).flatten(1)
    for block in (images[..., 8:16], images[..., 16:]):
        matches = (block.flatten(1)[:, None] == bank[None]).all(-1)  # which bank texture each block is
        assert matches.sum(1).eq(1).all()  # exactly one, for every image
        chosen = matches.float().argmax(1)
        # shared by all classes: every texture appears with every label
        for c in range(10):
            assert set(chosen[d.y_train == c].tolist()) == {0, 1, 2}
    assert float(bank.min()) == 0.0 and float(bank.max()) == 1.0
    with pytest.raises(ValueError, match="textures must be an int >= 1"):
        shared_texture(d, 0, textures=0)


def test_dc_augment_applies_one_of_crop_scale_rotate_per_image():
    from diffkit.harness.condensation import dc_augment, dc_augment_params

    params = dc_augment_params((1, 28, 28))
    assert params == {"crop": 4, "scale": 0.2, "rotate": 45, "strategy": ("crop", "scale", "rotate")}
    assert dc_augment_params((1, 8, 8))["crop"] == 1
    x = torch.rand(6, 1, 8, 8)
    rng = np.random.default_rng(0)
    # crop only: each image is the mean-padded original cut at an offset within [0, 2 crop)
    out = dc_augment(x, {**params, "crop": 1, "strategy": ("crop",)}, rng)
    mean = x.mean()
    for img, aug in zip(x, out):
        padded = torch.full((1, 10, 10), float(mean))
        padded[:, 1:9, 1:9] = img
        assert any(torch.allclose(aug, padded[:, r:r + 8, c:c + 8]) for r in range(2) for c in range(2))
    # scaling by a factor of exactly 1 is the identity; rotation keeps the shape; the input is never modified
    same = dc_augment(x, {**params, "scale": 0.0, "strategy": ("scale",)}, np.random.default_rng(1))
    torch.testing.assert_close(same, x, atol=0, rtol=0)
    assert dc_augment(x, {**params, "strategy": ("rotate",)}, np.random.default_rng(2)).shape == x.shape
    assert out.shape == x.shape and not torch.equal(out, x)


def test_dc_augment_rotates_wide_images_with_shared_textures():
    """The distractor cards put textures beside each digit (8 x 32): rotated near 45 degrees its bounding box is
    narrower than 32, and the centre crop must mean-fill rather than fail (dcc_distractors3_ipc1 crashed so)."""
    from diffkit.harness.condensation import dc_augment, dc_augment_params

    x = torch.rand(4, 1, 8, 32)
    rotate = {**dc_augment_params((1, 8, 32)), "strategy": ("rotate",)}
    for seed in range(5):
        assert dc_augment(x, rotate, np.random.default_rng(seed)).shape == x.shape
    flat = torch.full((1, 1, 8, 32), 0.5)  # a constant image rotates into itself: the fill is its mean
    torch.testing.assert_close(dc_augment(flat, rotate, np.random.default_rng(0)), flat, atol=1e-6, rtol=0)


def test_condense_card_with_dc_augmentation_runs():
    card = _card()
    card["budget"]["eval_augment"] = True
    card["methods"] = {"random": {}}
    card["baseline"] = "random"
    record = run_method(validate_card(card), "random", 0, progress=False)
    assert 0 < record["metrics"]["test_accuracy"] <= 1
    card["budget"]["eval_augment"] = "yes"
    with pytest.raises(ValueError, match="eval_augment must be true or false"):
        validate_card(card)
