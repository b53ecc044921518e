"""Run a card: every method of a card for one seed, each from the same data split and the same initial weights,
returning one record per run (card, method, seed, metrics, wall time, versions). What a run trains and measures is
the card's task (``tasks.TASKS``)."""

import platform
import time

import torch
from accelerate import Accelerator

from .. import __version__
from .cards import method_config
from .tasks import TASKS, build_data
from .tasks.classify import build_model
from .tasks.condense import condensed_set

__all__ = ["build_data", "build_model", "condensed_set", "run_method", "versions"]


def versions() -> dict:
    import accelerate

    return {"diffkit": __version__, "torch": torch.__version__, "accelerate": accelerate.__version__,
            "python": platform.python_version()}


def run_method(card: dict, method: str, seed: int, accelerator: Accelerator | None = None, progress: bool = True) -> dict:
    """Train and evaluate one method of a (validated) card for one seed; returns the result record."""
    if not (isinstance(seed, int) and seed >= 0):
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    config = method_config(card, method)
    accelerator = accelerator or Accelerator()
    start = time.perf_counter()
    metrics = TASKS[card["task"]].run(config, card, seed, accelerator, progress)
    curves = metrics.pop("curves", None)
    record = {
        "card": card["name"], "method": method, "seed": seed,
        "metrics": {k: metrics[k] for k in card["metrics"] if k in metrics},
        "wall_s": round(time.perf_counter() - start, 3),
        "baseline": card["baseline"], "metric": card["metric"], "paper": card["paper"], "expected": card["expected"],
        "paper_effect": card.get("paper_effect", {}),
        "num_processes": accelerator.num_processes, "threads": torch.get_num_threads(), "versions": versions(),
    }
    if curves:  # per-step curves (batch size, accuracy) ride along in the record; the report summarises them
        record["curves"] = curves
    return record
