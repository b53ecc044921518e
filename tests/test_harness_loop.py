"""The harness loop, checkpoints, cards, the report and the command line, including two processes."""

import json
import math
import os
import shutil
import socket
import statistics
import subprocess
from pathlib import Path

import pytest
import torch
from scipy.stats import t as student_t

from diffkit.cli import main
from diffkit.harness import (ELRLoss, load_card, load_checkpoint, paired_interval, save_checkpoint, train,
                             validate_card, write_report)
from diffkit.harness.data import digits
from diffkit.harness.registry import OPTIMIZERS
from diffkit.harness.models import mlp


ROOT = Path(__file__).resolve().parents[1]
TINY_CARD = {
    "name": "tiny", "paper": "none (a test card)", "task": "classify",
    "data": {"name": "digits"}, "model": {"name": "mlp", "hidden": [32]},
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "loss": {"name": "elr"},
    "budget": {"epochs": 3, "batch_size": 64, "eval_every": 1},
    "methods": {"elr": {}, "ce": {"loss": {"name": "ce"}}}, "baseline": "ce", "seeds": [0],
    "metric": "test_accuracy", "metrics": ["test_accuracy", "best_test_accuracy", "train_loss"],
    "expected": "nothing: a test card",
}


@pytest.fixture
def tiny_card(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY_CARD))
    return path


def test_training_loss_falls_and_hooks_fire_in_order():
    data = digits(seed=0)
    model = mlp(data.num_features, data.num_classes, hidden=[64])
    calls = []

    class Recorder:
        def on_step_start(self, state):
            calls.append(("step", state.step))

        def after_backward(self, state):
            # gradients exist here, before the optimizer consumes them
            assert all(p.grad is not None for p in state.unwrapped_model.parameters())
            calls.append(("backward", state.step))

        def on_epoch_end(self, state):
            calls.append(("epoch", state.epoch))

    state = train(model, data, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                  criterion=ELRLoss(len(data.y_train), 10), epochs=4, batch_size=100, seed=0,
                  hooks=[Recorder()], progress=False)
    losses = [h["train_loss"] for h in state.history]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.5 * losses[0], losses
    steps = len(data.y_train) // 100
    assert calls[:3] == [("step", 0), ("backward", 0), ("step", 1)] and calls.count(("epoch", 3)) == 1
    assert len([c for c in calls if c[0] == "backward"]) == 4 * steps
    with pytest.raises(TypeError, match="hook"):
        train(model, data, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=ELRLoss(1203, 10),
              epochs=1, batch_size=100, seed=0, hooks=[object()], progress=False)


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    from diffkit.harness import GhostBatchNorm1d

    model = mlp(64, 10, hidden=[16, 16], norm=lambda w: GhostBatchNorm1d(w, ghost_size=8))
    model(torch.randn(32, 64))  # non-trivial running statistics
    target = torch.rand(100, 10)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, extra={"elr_target": target})
    fresh = mlp(64, 10, hidden=[16, 16], norm=lambda w: GhostBatchNorm1d(w, ghost_size=8))
    extra = load_checkpoint(path, fresh)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(extra["elr_target"], target)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary file left behind
    with pytest.raises(RuntimeError):
        load_checkpoint(path, mlp(64, 10, hidden=[16]))  # strict: a different architecture is refused


def _record(method, seed, value, baseline="base"):
    return {"card": "c", "method": method, "seed": seed, "metrics": {"acc": value}, "wall_s": 1.0,
            "baseline": baseline, "metric": "acc", "paper": "p", "expected": "e"}


def test_report_interval_matches_a_hand_computation(tmp_path):
    base, new = [0.50, 0.60, 0.70, 0.65], [0.61, 0.70, 0.83, 0.76]
    diffs = [b - a for a, b in zip(base, new)]
    mean, sd = sum(diffs) / 4, statistics.stdev(diffs)
    half = student_t.ppf(0.975, 3) * sd / math.sqrt(4)
    assert paired_interval(diffs) == pytest.approx((mean, mean - half, mean + half))
    records = [_record("base", s, v) for s, v in enumerate(base)] + [_record("new", s, v) for s, v in enumerate(new)]
    # a rerun of a seed replaces the old record; an unpaired seed of one method is left out of the difference
    records += [_record("base", 0, base[0]), _record("new", 9, 123.0)]
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    text = write_report(results, tmp_path / "r.md")
    row = next(line for line in text.splitlines() if line.startswith("| new |") and "[" in line)
    assert f"{mean:.4g} [{mean - half:.4g}, {mean + half:.4g}]" in row and "significant" not in row
    # noisy differences whose interval contains 0 are called so
    noisy = [_record("base", s, v) for s, v in enumerate(base)] + [_record("new", s, v) for s, v in
                                                                   enumerate([0.55, 0.55, 0.75, 0.60])]
    results.write_text("".join(json.dumps(r) + "\n" for r in noisy))
    assert "not significant** (no paper effect" in write_report(results, tmp_path / "r.md")
    assert (tmp_path / "r.md").read_text().startswith("# Harness results")


def test_cards_refuse_unknown_names_and_parameters(tmp_path):
    card = json.loads(json.dumps(TINY_CARD))
    card["methods"]["bad"] = {"optimizer": {"name": "adamw"}}
    with pytest.raises(ValueError, match="unknown optimizer .adamw.; allowed: adagrad, adagrad_norm, adagrad_norm_rowwise, adam, diffgrad, sgd"):
        validate_card(card)
    card["methods"]["bad"] = {"loss": {"name": "elr", "gamma": 1}}
    with pytest.raises(ValueError, match="no parameter 'gamma'; allowed: beta, lam"):
        validate_card(card)
    card["methods"].pop("bad")
    card["baseline"] = "nope"
    with pytest.raises(ValueError, match="baseline"):
        validate_card(card)
    with pytest.raises(ValueError, match="unknown optimizer"):
        OPTIMIZERS.build("rmsprop", [])
    for path in sorted((ROOT / "cards").glob("*.json")):  # every shipped card resolves
        assert load_card(path)["methods"]


def test_cli_run_appends_records_and_report_writes_tables(tiny_card, tmp_path, capsys):
    results, out = tmp_path / "docs" / "r.jsonl", tmp_path / "docs" / "r.md"
    assert main(["harness", "run", str(tiny_card), "--results", str(results), "--methods", "elr", "--no-progress"]) == 0
    assert main(["harness", "run", str(tiny_card), "--results", str(results), "--no-progress"]) == 0
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["method"], r["seed"]) for r in records] == [("elr", 0), ("elr", 0), ("ce", 0)]
    assert records[0]["metrics"] == records[1]["metrics"]  # deterministic per seed
    assert set(records[0]) >= {"card", "method", "seed", "metrics", "wall_s", "versions"}
    assert main(["harness", "report", "--results", str(results), "--out", str(out)]) == 0
    assert "| ce (baseline) | 1 |" in out.read_text()
    capsys.readouterr()
    assert main(["harness", "run", str(tmp_path / "missing.json")]) == 2
    assert main(["harness", "run", str(tiny_card), "--methods", "sgd"]) == 2
    assert main(["harness", "run", str(tiny_card), "--seeds", "-1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err) and "allowed: elr, ce" in err[1]


def _free_port() -> int:
    with socket.socket() as s:  # the OS picks a free port; another run on the machine cannot collide with it
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_same_metrics_as_one(tiny_card, tmp_path):
    """Each process trains on its contiguous half of every global batch and DDP averages the gradients (the
    gradient of the global mean, the shares being equal); ELR's targets are gathered so both processes keep the
    same table. accelerate's ``--cpu`` launch starts a single process unless mpirun is used, so the test asks for
    its torchrun launcher (``--multi_gpu``) with ACCELERATE_USE_CPU=1, which runs DDP on gloo over CPU processes."""
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate's launcher is not on PATH")
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert main(["harness", "run", str(tiny_card), "--results", str(one), "--methods", "elr", "--no-progress"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               "-m", "diffkit", "harness", "run", str(tiny_card), "--results", str(two), "--methods", "elr",
               "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    single, double = (json.loads(p.read_text()) for p in (one, two))
    assert (single["num_processes"], double["num_processes"]) == (1, 2)
    # summation order differs (two half-batch means averaged vs one mean), so agreement is up to float32 rounding
    # accumulated over 54 steps: 1e-6 is ~10 ulp of a loss ~0.3; accuracies are counts and must match exactly
    assert double["metrics"]["test_accuracy"] == single["metrics"]["test_accuracy"]
    assert double["metrics"]["best_test_accuracy"] == single["metrics"]["best_test_accuracy"]
    assert double["metrics"]["train_loss"] == pytest.approx(single["metrics"]["train_loss"], rel=1e-6, abs=1e-6)
