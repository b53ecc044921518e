"""The ``condense`` task: build a condensed training set (random real images, DC or DCC) and judge it by fresh
networks trained on it (DC's ``evaluate_synset``)."""

import torch
from accelerate import Accelerator

from ..condensation import dc_augment_params, evaluate_synset
from ..registry import ALGORITHMS, MODELS
from .base import Task, build, build_data, check_data_and_model, component_spec


# mean / min / max test accuracy of the networks trained on the condensed set, and the last matching loss
METRICS = ("test_accuracy", "test_accuracy_min", "test_accuracy_max", "final_matching_loss")
CONDENSATION_ALGORITHMS = ("random_selection", "dc", "dcc")  # the ALGORITHMS entries that build a condensed set


def check(config: dict, where: str) -> None:
    # the networks train as DC's evaluate_synset does, with its own SGD schedule
    if "optimizer" in config:
        raise ValueError(f"{where}: a condense card takes no optimizer (networks train on the condensed set with "
                         "DC's SGD schedule)")
    check_data_and_model(config, where, "convnet", "DC's network")
    name, params = component_spec(config.get("algorithm"), f"{where}.algorithm")
    if name not in CONDENSATION_ALGORITHMS:
        raise ValueError(f"{where}.algorithm must build a condensed set, one of {', '.join(CONDENSATION_ALGORITHMS)}, "
                         f"got {name!r}")
    ALGORITHMS.build(name, **params)  # validates ipc, loops and learning rates now
    if not (isinstance(config["budget"]["eval_models"], int) and config["budget"]["eval_models"] >= 1):
        raise ValueError(f"{where}.budget.eval_models must be an int >= 1, got {config['budget']['eval_models']!r}")
    if not isinstance(config["budget"]["eval_augment"], bool):
        raise ValueError(f"{where}.budget.eval_augment must be true or false, got {config['budget']['eval_augment']!r}")


def condensed_set(config: dict, seed: int, device: torch.device | str = "cpu", progress: bool = False) -> dict:
    """Build one method's condensed set (random real images, DC or DCC) from the standardised training images of
    a ``condense`` card's data. Returns the set (``x_syn``, ``y_syn``, in standardised units), the matching-loss
    ``curve``, the standardised test set, ``make_net`` and the standardisation ``mean`` / ``std``."""
    data = build_data(config, seed)
    if data.image_shape is None:
        raise ValueError(f"a condense card needs an image data set, got {config['data']!r}")
    x, x_test = data.x_train.view(-1, *data.image_shape), data.x_test.view(-1, *data.image_shape)
    mean, std = x.mean(), x.std()  # DC normalises images by the training set's statistics
    x, x_test = ((x - mean) / std).to(device), ((x_test - mean) / std).to(device)
    name, params = component_spec(config["model"], "model")

    def make_net():
        return MODELS.build(name, data.image_shape, data.num_classes, **params)

    condensation = build(ALGORITHMS, config["algorithm"])
    torch.manual_seed(seed)  # the same sequence of networks for DC and DCC
    x_syn, y_syn, curve = condensation.build(x, data.y_train.to(device), data.num_classes, make_net,
                                             torch.Generator().manual_seed(seed), progress)
    return {"x_syn": x_syn, "y_syn": y_syn, "curve": curve, "x_test": x_test, "y_test": data.y_test.to(device),
            "make_net": make_net, "mean": mean.item(), "std": std.item()}


def run(config: dict, card: dict, seed: int, accelerator: Accelerator, progress: bool) -> dict:
    """Build the condensed set, train ``budget.eval_models`` fresh networks on it (DC's ``evaluate_synset``) and
    report their mean test accuracy. The data split, the networks' initialisations and the evaluation seeds are
    shared by every method of a seed."""
    budget = config["budget"]
    built = condensed_set(config, seed, accelerator.device, progress)
    accuracies = []
    for i in range(budget["eval_models"]):
        torch.manual_seed(90_000 + 100 * seed + i)  # evaluation networks independent of how the set was made
        augment = dc_augment_params(built["x_syn"].shape[1:]) if budget["eval_augment"] else None
        accuracies.append(evaluate_synset(built["x_syn"], built["y_syn"], built["x_test"], built["y_test"],
                                          built["make_net"], epochs=budget["epochs"],
                                          generator=torch.Generator().manual_seed(i), augment=augment))
    metrics = {"test_accuracy": sum(accuracies) / len(accuracies),
               "test_accuracy_min": min(accuracies), "test_accuracy_max": max(accuracies)}
    if built["curve"]:
        metrics["final_matching_loss"] = built["curve"][-1][1]
        metrics["curves"] = {"matching_loss": built["curve"]}
    return metrics


# eval_augment: DC's augmentation (crop / scale / rotate, its MNIST setting) while the evaluation networks train
TASK = Task("condense", METRICS, check, run, optimizer=False, budget={"eval_augment": False},
            algorithms=CONDENSATION_ALGORITHMS)
