"""The ``coherence`` task: a classifier trained as in ``classify`` while the m-coherence of the per-example gradients
of fixed training examples (with their training labels) is measured every few steps (Chatterjee & Zielinski, On the
Generalization Mystery in Deep Learning, arXiv 2203.10036: coherence is high for real labels and low for random ones
early in training, which is why GD generalises on the first and memorises the second)."""

import torch
from accelerate import Accelerator

from ..coherence import CoherenceCurve
from ..loop import accuracy
from . import classify
from .base import Task


METRICS = ("coherence_early", "coherence_max", "coherence_final", "test_accuracy", "train_accuracy",
           "noisy_train_fit", "train_loss")
BUDGET = {"coherence_every": 20, "coherence_examples": 256, "early_steps": 100}


def check(config: dict, where: str) -> None:
    classify.check(config, where)
    budget = config["budget"]
    for key in BUDGET:
        if not (isinstance(budget[key], int) and budget[key] >= (2 if key == "coherence_examples" else 1)):
            raise ValueError(f"{where}.budget.{key} must be a positive int (>= 2 examples), got {budget[key]!r}")


def run(config: dict, card: dict, seed: int, accelerator: Accelerator, progress: bool) -> dict:
    budget, curves = config["budget"], []

    def coherence_hook(data):
        m = budget["coherence_examples"]
        if m > len(data.y_train):
            raise ValueError(f"budget.coherence_examples = {m} exceeds the {len(data.y_train)} training examples")
        # the same examples for every method of a seed (labels are each method's training labels)
        chosen = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(90_000 + seed))[:m]
        curves.append(CoherenceCurve(data.x_train[chosen], data.y_train[chosen], budget["coherence_every"]))
        return curves

    metrics, data, net = classify.fit(config, seed, accelerator, progress, coherence_hook)
    curve = curves[0].curve
    early = [v for step, v in curve if step <= budget["early_steps"]]
    device = accelerator.device
    return {"test_accuracy": metrics["test_accuracy"], "train_loss": metrics["train_loss"],
            **({"noisy_train_fit": metrics["noisy_train_fit"]} if "noisy_train_fit" in metrics else {}),
            "train_accuracy": accuracy(net, data.x_train.to(device), data.y_train.to(device), accelerator),
            "coherence_early": sum(early) / len(early), "coherence_max": max(v for _, v in curve),
            "coherence_final": curve[-1][1], "curves": {"coherence": curve}}


TASK = Task("coherence", METRICS, check, run, budget=BUDGET)
