"""The ``xor_grokking`` task: full-batch gradient descent on the logistic loss of a two-layer ReLU network over XOR
cluster data with flipped labels (Xu, Wang, Frei, Vardi & Hu, Benign Overfitting and Grokking in ReLU Networks for XOR
Cluster Data, ICLR 2024), with train accuracy, the fit of the flipped labels and clean test accuracy followed over
the steps: the paper's claim is benign overfitting after a grokking-like jump (the training data, flipped labels
included, fitted from the first steps while test accuracy starts near chance and rises later)."""

import torch
from accelerate import Accelerator

from ..loop import accuracy, train
from ..registry import LOSSES, MODELS, OPTIMIZERS
from .base import Task, build, build_data, check_data, component_spec, refuse_sections


METRICS = ("test_accuracy", "test_accuracy_step1", "max_test_accuracy", "grokking_gain", "train_accuracy",
           "train_accuracy_step1", "flipped_fit", "flipped_fit_step1")


def check(config: dict, where: str) -> None:
    refuse_sections(config, where, ("loss", "algorithm"), "the loss is the paper's logistic loss, the algorithm GD")
    check_data(config, where)
    name = component_spec(config.get("data"), f"{where}.data")[0]
    if name != "xor_clusters":
        raise ValueError(f"{where}.data must be xor_clusters (the paper's data), got {name!r}")
    name, params = component_spec(config.get("model"), f"{where}.model")
    if name != "two_layer_relu":
        raise ValueError(f"{where}.model must be two_layer_relu (the paper's network), got {name!r}")
    MODELS.check(name, params)
    steps = config["budget"]["steps"]
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"{where}.budget.steps must be an int >= 1, got {steps!r}")


def evaluation_steps(steps: int) -> list[int]:
    """Every step up to 10, then about 12 per decade (1, 2, ..., 10, 12, 15, 17, 20, ...), and the last."""
    marks = set(range(1, min(steps, 10) + 1)) | {steps}
    value = 10.0
    while value < steps:
        value *= 10 ** (1 / 12)
        marks.add(min(steps, round(value)))
    return sorted(marks)


class AccuracyCurve:
    """Hook: after the chosen steps (full-batch GD: one step per epoch), the train accuracy on the given (flipped)
    labels, the share of flipped training points predicted with their flipped label, and clean test accuracy."""

    def __init__(self, data, steps: list[int]):
        self.data, self.steps = data, set(steps)
        self.flipped = data.y_train != data.train_extra["y_clean"]
        self.curves = {"test_accuracy": [], "train_accuracy": [], "flipped_fit": []}

    def on_epoch_end(self, state) -> None:
        step = state.step
        if step not in self.steps:
            return
        device, data, acc = state.accelerator.device, self.data, state.accelerator
        net = state.unwrapped_model
        x, y = data.x_train.to(device), data.y_train.to(device)
        values = {"test_accuracy": accuracy(net, data.x_test.to(device), data.y_test.to(device), acc),
                  "train_accuracy": accuracy(net, x, y, acc),
                  "flipped_fit": accuracy(net, x[self.flipped], y[self.flipped], acc) if self.flipped.any() else 1.0}
        for name, value in values.items():
            self.curves[name].append([step, value])


def run(config: dict, card: dict, seed: int, accelerator: Accelerator, progress: bool) -> dict:
    budget = config["budget"]
    data = build_data(config, seed)
    name, params = component_spec(config["model"], "model")
    torch.manual_seed(seed)
    model = MODELS.build(name, data.num_features, data.num_classes, **params)
    optimizer = build(OPTIMIZERS, config["optimizer"], model.parameters())
    criterion = build(LOSSES, "ce", len(data.y_train), data.num_classes, None)  # = the logistic loss on (0, f)
    curve = AccuracyCurve(data, evaluation_steps(budget["steps"]))
    # full-batch gradient descent: one step per epoch over the whole training set
    train(model, data, optimizer=optimizer, criterion=criterion, epochs=budget["steps"], batch_size=len(data.y_train),
          seed=seed, hooks=[curve], accelerator=accelerator, progress=progress)
    test = curve.curves["test_accuracy"]
    final = {k: v[-1][1] for k, v in curve.curves.items()}
    first = {k: v[0][1] for k, v in curve.curves.items()}
    return {**final, "test_accuracy_step1": first["test_accuracy"], "train_accuracy_step1": first["train_accuracy"],
            "flipped_fit_step1": first["flipped_fit"], "max_test_accuracy": max(v for _, v in test),
            "grokking_gain": final["test_accuracy"] - first["test_accuracy"], "curves": curve.curves}


TASK = Task("xor_grokking", METRICS, check, run)
