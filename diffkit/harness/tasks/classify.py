"""The ``classify`` task: train a classifier on a data set (with its data methods) and report test accuracy and the
diagnostics the model's layers, the loss, the algorithm and the data carry."""

import torch
from accelerate import Accelerator

from ..adadagrad import StepsToTarget
from ..attribution import signal_mass
from ..binary import BinaryDiagnostics, binary_layers
from ..loop import HOOK_POINTS, accuracy, gather_rows, train
from ..registry import ALGORITHMS, LAYERS, LOSSES, MODELS, OPTIMIZERS
from ..schedules import LRSchedule
from ..shift import ShiftDiagnostics, ShiftLinear
from ..statsq import LevelFlips
from .base import Task, build, build_data, check_data, component_spec
from .grow import GROWTH_ALGORITHMS


METRICS = ("test_accuracy", "best_test_accuracy", "train_loss", "signal_mass", "estimating_error",
           "gradient_stability", "noisy_train_fit", "steps_to_target", "examples_to_target", "reached_target",
           "final_batch_size", "zero_weight_fraction", "level_flips_first_epoch", "level_flips_last_epoch",
           "cga_frozen_fraction", "clean_train_fit", "oscillations_first_epoch", "oscillations_last_epoch",
           "test_accuracy_at_equal_steps")
MODEL_LAYER_KEYS = ("norm", "binary", "linear", "reparam")  # model parameters that name a LAYERS entry


def check(config: dict, where: str) -> None:
    check_data(config, where)
    name, params = component_spec(config.get("model"), f"{where}.model")
    for key in MODEL_LAYER_KEYS:
        if key in params:
            LAYERS.check(*component_spec(params[key], f"{where}.model.{key}"))
    MODELS.check(name, {k: v for k, v in params.items() if k not in MODEL_LAYER_KEYS})
    LOSSES.check(*component_spec(config.get("loss", "ce"), f"{where}.loss"))
    name, params = component_spec(config.get("algorithm", "erm"), f"{where}.algorithm")
    ALGORITHMS.check(name, params)
    if name in GROWTH_ALGORITHMS:
        raise ValueError(f"{where}.algorithm {name!r} grows a network: it needs task 'grow', not 'classify'")
    from . import TASKS  # the registry of tasks imports this module

    owner = next((task.name for task in TASKS.values() if name in task.algorithms), None)
    if owner is not None:
        raise ValueError(f"{where}.algorithm {name!r} runs only in task {owner!r}, not in 'classify'")


def build_model(config: dict, data, epochs: int):
    """The model and the hooks its layers need (ReSTE's annealing, binary, shift and level-flip diagnostics); a
    ``reparam`` layer (weight compander) is applied to the built model."""
    name, params = component_spec(config["model"], "model")
    hooks, layers = [], {}
    for key in MODEL_LAYER_KEYS:
        if key in params:
            layers[key], layer_hooks = build(LAYERS, params.pop(key), epochs)
            hooks += layer_hooks
    reparam = layers.pop("reparam", None)
    model = MODELS.build(name, data.num_features, data.num_classes, **params, **layers)
    if reparam is not None:
        reparam(model)
    if binary_layers(model):
        hooks.append(BinaryDiagnostics())
    if any(isinstance(m, ShiftLinear) for m in model.modules()):
        hooks.append(ShiftDiagnostics())
    if any(hasattr(m, "integer_weight") for m in model.modules()):
        hooks.append(LevelFlips())
    return model, hooks


@torch.no_grad()
def _train_fit(model, data, accelerator, flipped: bool) -> float:
    """Share of the relabelled training samples whose (wrong) noisy label the model predicts (memorisation), or with
    ``flipped=False`` of the other training samples whose (correct) label it predicts."""
    chosen = (data.y_train != data.train_extra["y_clean"]) == flipped
    device = accelerator.device
    return accuracy(model, data.x_train[chosen].to(device), data.y_train[chosen].to(device), accelerator)


def fit(config: dict, seed: int, accelerator: Accelerator, progress: bool, extra_hooks=None):
    """Train and evaluate one method's classifier; ``extra_hooks(data)`` adds hooks that need the built data (another
    task's measurements). Returns the metrics, the data and the trained (bare, eval-mode) model."""
    budget = config["budget"]
    data = build_data(config, seed)
    torch.manual_seed(seed)  # the same initial weights for every method of this seed
    model, hooks = build_model(config, data, budget["epochs"])
    optimizer = build(OPTIMIZERS, config["optimizer"], model.parameters())
    gather = accelerator.gather if accelerator.num_processes > 1 else None
    criterion = build(LOSSES, config.get("loss", "ce"), len(data.y_train), data.num_classes, gather)
    algorithm = build(ALGORITHMS, config.get("algorithm", "erm"))
    if any(hasattr(algorithm, point) for point in HOOK_POINTS):  # an algorithm with hook methods (CGA) is a hook too
        hooks.append(algorithm)
    if budget["target_accuracy"] is not None:
        hooks.append(StepsToTarget(data.x_test, data.y_test, budget["target_accuracy"], budget["eval_steps"],
                                   budget["equal_steps"]))
    if budget["lr_schedule"] != "constant":
        hooks.append(LRSchedule(budget["lr_schedule"], budget["epochs"]))
    if extra_hooks is not None:
        hooks += extra_hooks(data)
    state = train(model, data, optimizer=optimizer, criterion=criterion, epochs=budget["epochs"],
                  batch_size=budget["batch_size"], seed=seed, algorithm=algorithm, hooks=hooks,
                  eval_every=budget["eval_every"], accelerator=accelerator, progress=progress)
    net, device = state.unwrapped_model.eval(), accelerator.device
    metrics = {"test_accuracy": accuracy(net, data.x_test.to(device), data.y_test.to(device), accelerator),
               "train_loss": state.history[-1]["train_loss"], **state.logs}
    evaluated = [h["test_accuracy"] for h in state.history if "test_accuracy" in h]
    if evaluated:
        metrics["best_test_accuracy"] = max(evaluated)
    if "signal_mask" in data.test_extra:
        def mass(x, y, mask):
            return signal_mass(net, x, y, mask)

        tensors = (data.x_test.to(device), data.y_test.to(device), data.test_extra["signal_mask"].to(device))
        metrics["signal_mass"] = gather_rows(mass, len(data.y_test), accelerator, *tensors).nanmean().item()
    if "y_clean" in data.train_extra:
        metrics["noisy_train_fit"] = _train_fit(net, data, accelerator, flipped=True)
        metrics["clean_train_fit"] = _train_fit(net, data, accelerator, flipped=False)
    accelerator.free_memory()
    return metrics, data, net


def run(config: dict, card: dict, seed: int, accelerator: Accelerator, progress: bool) -> dict:
    return fit(config, seed, accelerator, progress)[0]


# equal_steps: with target_accuracy, also the test accuracy after that many steps
TASK = Task("classify", METRICS, check, run, budget={"equal_steps": None})
