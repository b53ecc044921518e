"""The ``benign_oscillation`` task: SGD on a two-layer patch CNN over feature-noise patch data (Lu, Wu, Yang & Zou,
Benign Oscillation of Stochastic Gradient Descent with Large Learning Rates, ICLR 2024). A weak feature u is in
every example, a strong feature v in a fraction of them; the paper's claim is that a learning rate large enough to
make the training loss oscillate learns u (the network then classifies weak-feature-only data), while a small one
learns v and fits the rest by memorising noise."""

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from ..loop import accuracy, train
from ..registry import LOSSES, MODELS, OPTIMIZERS
from .base import Task, build, build_data, check_data, component_spec, refuse_sections


METRICS = ("weak_test_accuracy", "test_accuracy", "train_accuracy", "max_cos_weak", "max_cos_strong",
           "loss_increase_fraction", "final_train_loss")


def check(config: dict, where: str) -> None:
    refuse_sections(config, where, ("algorithm",), "plain SGD steps are the subject")
    check_data(config, where)
    if component_spec(config.get("data"), f"{where}.data")[0] != "feature_patches":
        raise ValueError(f"{where}.data must be feature_patches (the paper's data model)")
    name, params = component_spec(config.get("model"), f"{where}.model")
    if name != "patch_cnn":
        raise ValueError(f"{where}.model must be patch_cnn (the paper's network), got {name!r}")
    MODELS.check(name, params)
    name, params = component_spec(config.get("loss", "ce"), f"{where}.loss")
    if name not in ("ce", "binary_square"):
        raise ValueError(f"{where}.loss must be ce or binary_square (a loss of the binary score), got {name!r}")
    LOSSES.check(name, params)


def max_cos(weight: torch.Tensor, feature: torch.Tensor) -> float:
    """For the (2, m, d) filters of a PatchCNN: the mean over the two classes j of max_r cos(w_{j,r}, s_j feature),
    with s_j = -1 for class 0 (its examples carry -u, -v) and +1 for class 1."""
    signs = torch.tensor([-1.0, 1.0], device=weight.device)[:, None, None]
    return F.cosine_similarity(weight, signs * feature, dim=2).amax(1).mean().item()


class LossCurve:
    """Hook: the loss on the whole training set before every step and after the last."""

    def __init__(self, data):
        self.data, self.curve = data, []

    @torch.no_grad()
    def _evaluate(self, state) -> None:
        device = state.accelerator.device
        x, y = self.data.x_train.to(device), self.data.y_train.to(device)
        self.curve.append([state.step, state.criterion(state.unwrapped_model(x), y).item()])

    def on_step_start(self, state) -> None:
        self._evaluate(state)

    def on_train_end(self, state) -> None:
        self._evaluate(state)


def run(config: dict, card: dict, seed: int, accelerator: Accelerator, progress: bool) -> dict:
    budget = config["budget"]
    data = build_data(config, seed)
    name, params = component_spec(config["model"], "model")
    torch.manual_seed(seed)  # the same initial filters for every learning rate of a seed
    model = MODELS.build(name, data.num_features, data.num_classes, **params)
    optimizer = build(OPTIMIZERS, config["optimizer"], model.parameters())
    criterion = build(LOSSES, config.get("loss", "ce"), len(data.y_train), data.num_classes, None)
    curve = LossCurve(data)
    state = train(model, data, optimizer=optimizer, criterion=criterion, epochs=budget["epochs"],
                  batch_size=budget["batch_size"], seed=seed, hooks=[curve], accelerator=accelerator,
                  progress=progress)
    net, device = state.unwrapped_model.eval(), accelerator.device
    losses = [v for _, v in curve.curve]
    y_test = data.y_test.to(device)
    return {"test_accuracy": accuracy(net, data.x_test.to(device), y_test, accelerator),
            "weak_test_accuracy": accuracy(net, data.test_extra["x_weak"].to(device), y_test, accelerator),
            "train_accuracy": accuracy(net, data.x_train.to(device), data.y_train.to(device), accelerator),
            "max_cos_weak": max_cos(net.weight.detach(), data.test_extra["u"].to(device)),
            "max_cos_strong": max_cos(net.weight.detach(), data.test_extra["v"].to(device)),
            # the share of steps after which the whole-training-set loss went up: 0 for a monotone descent
            "loss_increase_fraction": sum(b > a for a, b in zip(losses, losses[1:])) / (len(losses) - 1),
            "final_train_loss": losses[-1], "curves": {"train_loss": curve.curve}}


TASK = Task("benign_oscillation", METRICS, check, run)
