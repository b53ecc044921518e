"""The ``grow`` task: grow a network from two trained members (MixtureGrowth) or train the grown size from scratch,
at the same number of steps."""

import torch
from accelerate import Accelerator

from ..loop import accuracy, train
from ..models import mlp
from ..registry import ALGORITHMS, LOSSES, MODELS, OPTIMIZERS
from ..schedules import LRSchedule
from .base import Task, build, build_data, check_data_and_model, component_spec


# the grown (or from-scratch) network's accuracy, and the members' and the just-grown network's
METRICS = ("test_accuracy", "best_test_accuracy", "train_loss", "members_test_accuracy", "grown_test_accuracy")
GROWTH_ALGORITHMS = ("mixturegrowth", "random_growth")  # the ALGORITHMS entries that build a Growth


def check(config: dict, where: str) -> None:
    check_data_and_model(config, where, "template_mlp", "the growth members")
    LOSSES.check(*component_spec(config.get("loss", "ce"), f"{where}.loss"))
    name, params = component_spec(config.get("algorithm", "erm"), f"{where}.algorithm")
    if name != "erm" and name not in GROWTH_ALGORITHMS:
        raise ValueError(f"{where}.algorithm must be erm (train the grown size from scratch) or a growth algorithm, "
                         f"one of {', '.join(GROWTH_ALGORITHMS)}, got {name!r}")
    algorithm = ALGORITHMS.build(name, **params)
    epochs = config["budget"]["epochs"]
    if name != "erm" and not algorithm.member_epochs < epochs:
        raise ValueError(f"{where}.algorithm.member_epochs must be < budget.epochs = {epochs}, got "
                         f"{algorithm.member_epochs!r}")
    if config["budget"]["lr_schedule"] not in ("constant", "cosine"):
        raise ValueError(f"{where}.budget.lr_schedule of a grow card must be 'constant' or 'cosine' (a cosine per "
                         f"training phase), got {config['budget']['lr_schedule']!r}")


def run(config: dict, card: dict, seed: int, accelerator: Accelerator, progress: bool) -> dict:
    """erm trains the MLP of twice the members' width from scratch for ``budget.epochs``; a growth algorithm trains
    two template members for ``member_epochs`` each, grows them, and trains the grown MLP for the remaining epochs
    (a fresh optimizer, as for a new network), so every method takes the same number of steps."""
    budget = config["budget"]
    data = build_data(config, seed)
    name, params = component_spec(config["model"], "model")
    criterion = build(LOSSES, config.get("loss", "ce"), len(data.y_train), data.num_classes, None)
    algorithm = build(ALGORITHMS, config.get("algorithm", "erm"))
    device = accelerator.device

    def fit(model, epochs, run_seed):
        optimizer = build(OPTIMIZERS, config["optimizer"], model.parameters())
        # each phase (member, grown network) restarts the schedule, as the reference resets its scheduler
        hooks = [LRSchedule(budget["lr_schedule"], epochs)] if budget["lr_schedule"] != "constant" else []
        state = train(model, data, optimizer=optimizer, criterion=criterion, epochs=epochs,
                      batch_size=budget["batch_size"], seed=run_seed, hooks=hooks, eval_every=budget["eval_every"],
                      accelerator=accelerator, progress=progress)
        return state.unwrapped_model.eval(), state

    def test_accuracy(model):
        return accuracy(model, data.x_test.to(device), data.y_test.to(device), accelerator)

    torch.manual_seed(seed)  # the same members (and so the same grown diagonal) for every growth method of a seed
    metrics = {}
    if hasattr(algorithm, "grow"):
        members = [MODELS.build(name, data.num_features, data.num_classes, **params) for _ in range(2)]
        # the members see the data in different orders, as two independently trained networks would
        members = [fit(m, algorithm.member_epochs, 2 * seed + i)[0] for i, m in enumerate(members)]
        model = algorithm.grow(*members, torch.Generator().manual_seed(seed)).to(device)
        metrics["members_test_accuracy"] = sum(map(test_accuracy, members)) / 2
        metrics["grown_test_accuracy"] = test_accuracy(model)
        epochs = budget["epochs"] - algorithm.member_epochs
    else:
        p = MODELS.check(name, params)
        model, epochs = mlp(data.num_features, data.num_classes, [2 * p["hidden"]] * p["depth"]), budget["epochs"]
    net, state = fit(model, epochs, seed)
    metrics.update(test_accuracy=test_accuracy(net), train_loss=state.history[-1]["train_loss"])
    evaluated = [h["test_accuracy"] for h in state.history if "test_accuracy" in h]
    if evaluated:
        metrics["best_test_accuracy"] = max(evaluated)
    accelerator.free_memory()
    return metrics


TASK = Task("grow", METRICS, check, run, algorithms=GROWTH_ALGORITHMS)
