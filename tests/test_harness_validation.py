"""Choosing hyperparameters on a validation split: the split itself, a tuning card built from a card, and the card
schema's paper_effect and lr_schedule checks."""

import copy
import math

import pytest
import torch

from diffkit.harness.cards import validate_card
from diffkit.harness.data import digits
from diffkit.harness.ghost_bn import GradientClipping
from diffkit.harness.validation import tune, validation_card, validation_split

CARD = {"name": "tiny", "paper": "p", "task": "classify", "data": {"name": "digits"},
        "model": {"name": "mlp", "hidden": [16]}, "optimizer": {"name": "sgd", "lr": 0.1},
        "budget": {"epochs": 2, "batch_size": 64}, "methods": {"base": {}, "other": {"optimizer": {"lr": 0.3}}},
        "baseline": "base", "seeds": [0], "metric": "test_accuracy", "metrics": ["test_accuracy"], "expected": ""}


def test_validation_split_holds_out_a_stratified_tenth_of_the_training_set():
    d = digits(0)
    v = validation_split(d, seed=3)
    assert len(v.y_train) + len(v.y_test) == len(d.y_train)
    assert len(v.y_test) == math.ceil(0.1 * len(d.y_train))  # as scikit-learn rounds a test fraction
    # stratified: every class keeps about its share in the held-out part
    share = torch.bincount(v.y_test, minlength=10) / len(v.y_test)
    assert (share - torch.bincount(d.y_train, minlength=10) / len(d.y_train)).abs().max() < 0.02
    rows = {tuple(r.tolist()) for r in d.x_train}
    assert all(tuple(r.tolist()) in rows for r in v.x_test)  # held out from training data, never the test set
    assert not {tuple(r.tolist()) for r in v.x_train} & {tuple(r.tolist()) for r in v.x_test}
    assert torch.equal(validation_split(d, seed=3).y_test, v.y_test)
    with pytest.raises(ValueError, match="fraction must be a number in"):
        validation_split(d, 0, fraction=1.0)


def test_tuning_runs_a_method_on_the_validation_split_over_a_grid():
    card = validate_card(CARD)
    tuned = validation_card(card, "other", {"optimizer.lr": 0.05})
    assert tuned["methods"] == {"other": {"optimizer": {"lr": 0.05}}} and tuned["baseline"] == "other"
    assert tuned["data"]["methods"][0] == {"name": "validation_split", "fraction": 0.1}
    assert card["methods"]["other"] == {"optimizer": {"lr": 0.3}}  # the card itself is untouched
    rows = tune(card, "base", {"optimizer.lr": [0.05, 0.2]}, seeds=[0, 1])
    assert [r["overrides"] for r in rows] == [{"optimizer.lr": 0.05}, {"optimizer.lr": 0.2}]
    assert all(len(r["values"]) == 2 and r["mean"] == pytest.approx(sum(r["values"]) / 2) for r in rows)
    with pytest.raises(ValueError, match="method must be one of"):
        validation_card(card, "nope", {})


def test_cards_check_paper_effect_and_lr_schedule():
    card = copy.deepcopy(CARD)
    card["paper_effect"] = {"test_accuracy": 0.01}
    assert validate_card(card)["paper_effect"] == {"test_accuracy": 0.01}
    for bad in ({"train_loss": 0.1}, {"test_accuracy": -0.01}, {"test_accuracy": "1 point"}, [0.01]):
        card["paper_effect"] = bad
        with pytest.raises(ValueError, match="paper_effect must map metrics of the card"):
            validate_card(card)
    card = copy.deepcopy(CARD)
    card["budget"]["lr_schedule"] = {"stages": [{"epochs": 1}]}
    with pytest.raises(ValueError, match="methods.base.budget.lr_schedule stages last 1 epochs; the budget has 2"):
        validate_card(card)
    card["budget"]["lr_schedule"] = "cosine"
    validate_card(card)
    inr = {**copy.deepcopy(CARD), "task": "inr", "data": {"name": "highfreq_signal"}, "model": {"name": "siren"},
           "optimizer": {"name": "adam"}, "metric": "psnr", "metrics": ["psnr"], "budget": {"lr_schedule": "cosine"}}
    with pytest.raises(ValueError, match="the inr task has no epoch-wise learning-rate schedule"):
        validate_card(inr)


def test_gradient_clipping_caps_the_total_norm():
    model = torch.nn.Linear(3, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    GradientClipping(5.0).after_backward(type("S", (), {"unwrapped_model": model})())
    norm = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters()))
    assert norm.item() == pytest.approx(5.0, rel=1e-5)
    with pytest.raises(ValueError, match="max_norm"):
        GradientClipping(0)


def test_tune_command_prints_the_grid_and_the_best_setting(tmp_path, capsys):
    import json

    from diffkit.harness.tune import main

    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(CARD))
    main([str(path), "--method", "base", "--grid", "optimizer.lr=0.05,0.2", "--seeds", "0"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "tiny / base: validation test_accuracy, mean over seeds [0]"
    rows = [line for line in out if line.startswith("| 0.")]
    assert [r.split(" | ")[0] for r in rows] == ["| 0.05", "| 0.2"]
    best = max(rows, key=lambda r: float(r.split(" | ")[1].strip(" |")))
    assert out[-1].startswith('best: {"optimizer.lr": ' + best.split(" | ")[0].strip("| "))


def test_tune_command_takes_a_shipped_card_by_name(capsys):
    from diffkit.harness.tune import main

    main(["diffgrad_1d", "--method", "adam", "--grid", "optimizer.lr=0.1", "--seeds", "0"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("diffgrad_1d / adam: validation")
    assert out[-1].startswith('best: {"optimizer.lr": 0.1}')
