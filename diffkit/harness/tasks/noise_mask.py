"""The ``noise_mask`` task: pre-train a classifier under an input perturbation (none, fixed random Beta masks, the
policy-gradient noise mask of Yavuz & Yang (arXiv 2406.14568) or its detached-reward variant, additive Gaussian
noise), drop the perturbation and fine-tune on clean images, then measure clean test accuracy on the pre-training
classes and, for the paper's "unseen concepts" claim, a linear probe of the fine-tuned features on held-out classes
with a few labels each. Every method of a seed shares the data split, the classifier's initial weights and the
fine-tuning and probing protocol."""

import torch
from accelerate import Accelerator

from ..data import HarnessData
from ..loop import accuracy, train
from ..noise_mask import NoiseMaskPretraining, SmallCNN
from ..registry import ALGORITHMS, MODELS, CrossEntropy
from .base import Task, build_data, check_data, component_spec, refuse_sections


METRICS = ("test_accuracy", "probe_accuracy", "pretrain_test_accuracy", "train_loss", "mean_log_density")
# the official schedule scaled from 90 pre-training epochs (decay every 30) and 10 fine-tuning epochs (7 warm-up)
BUDGET = {"finetune_epochs": 3, "finetune_lr": 1e-3, "warmup_epochs": 2, "lr_step_epochs": 7, "pretrain_classes": 7,
          "probe_labels": 10}


def check(config: dict, where: str) -> None:
    refuse_sections(config, where, ("optimizer", "loss"), "the official SGD recipe and cross-entropy are built in")
    check_data(config, where)
    name, params = component_spec(config.get("model"), f"{where}.model")
    if name != "small_cnn":
        raise ValueError(f"{where}.model must be small_cnn, got {name!r}")
    MODELS.check(name, params)
    name, params = component_spec(config.get("algorithm"), f"{where}.algorithm")
    if name != "noise_mask_pretraining":
        raise ValueError(f"{where}.algorithm must be noise_mask_pretraining, got {name!r}")
    kind = ALGORITHMS.check(name, params)["kind"]
    if kind not in NoiseMaskPretraining.KINDS:
        raise ValueError(f"{where}.algorithm.kind must be one of {', '.join(NoiseMaskPretraining.KINDS)}, got {kind!r}")
    budget = config["budget"]
    for key in ("epochs", "batch_size", "finetune_epochs", "lr_step_epochs", "pretrain_classes", "probe_labels"):
        if not (isinstance(budget[key], int) and budget[key] >= 1):
            raise ValueError(f"{where}.budget.{key} must be a positive int, got {budget[key]!r}")
    if not (isinstance(budget["warmup_epochs"], int) and 0 <= budget["warmup_epochs"] <= budget["finetune_epochs"]):
        raise ValueError(f"{where}.budget.warmup_epochs must be an int in [0, finetune_epochs], got "
                         f"{budget['warmup_epochs']!r}")


def split_classes(data: HarnessData, classes: int) -> tuple[HarnessData, HarnessData]:
    """The data restricted to labels < ``classes`` (pre-training) and to the others, relabelled from 0 (probing)."""
    def part(keep_train, keep_test, offset, count):
        return HarnessData(data.x_train[keep_train], data.y_train[keep_train] - offset, data.x_test[keep_test],
                           data.y_test[keep_test] - offset, count, {}, {}, data.image_shape)

    seen_train, seen_test = data.y_train < classes, data.y_test < classes
    return (part(seen_train, seen_test, 0, classes),
            part(~seen_train, ~seen_test, classes, data.num_classes - classes))


class EpochSchedule:
    """Hook: steps an epoch-wise learning-rate scheduler at the end of every epoch."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def on_epoch_end(self, state) -> None:
        self.scheduler.step()


def finetune(model, data: HarnessData, budget: dict, seed: int, accelerator: Accelerator, progress: bool):
    """The official fine-tuning recipe (``_normal``): SGD momentum 0.9, wd 1e-4, ``finetune_lr`` with a linear
    warm-up from 1 % over ``warmup_epochs``, on clean images."""
    optimizer = torch.optim.SGD(model.parameters(), lr=budget["finetune_lr"], momentum=0.9, weight_decay=1e-4)
    hooks = []
    if budget["warmup_epochs"]:
        hooks.append(EpochSchedule(torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01,
                                                                     total_iters=budget["warmup_epochs"])))
    return train(model, data, optimizer=optimizer, criterion=CrossEntropy(),
                 epochs=budget["finetune_epochs"], batch_size=budget["batch_size"], seed=10_000 + seed, hooks=hooks,
                 accelerator=accelerator, progress=progress)


@torch.no_grad()
def probe_accuracy(model: SmallCNN, data: HarnessData, labels_per_class: int, seed: int) -> float:
    """A linear probe (multinomial logistic regression) on the frozen features of ``labels_per_class`` training images
    per class, scored on all test images of those classes."""
    from sklearn.linear_model import LogisticRegression

    model.eval()
    gen = torch.Generator().manual_seed(30_000 + seed)
    order = torch.randperm(len(data.y_train), generator=gen)
    chosen = torch.cat([order[data.y_train[order] == c][:labels_per_class] for c in range(data.num_classes)])
    features = model.features(data.x_train[chosen]).numpy()
    probe = LogisticRegression(max_iter=1000).fit(features, data.y_train[chosen].numpy())
    return float((probe.predict(model.features(data.x_test).numpy()) == data.y_test.numpy()).mean())


def run(config: dict, card: dict, seed: int, accelerator: Accelerator, progress: bool) -> dict:
    budget = config["budget"]
    data = build_data(config, seed)
    if data.image_shape is None:
        raise ValueError(f"the noise_mask task needs an image data set, got {config['data']!r}")
    seen, unseen = split_classes(data, budget["pretrain_classes"])
    name, params = component_spec(config["model"], "model")
    torch.manual_seed(seed)  # the same initial classifier, initial bases and policy for every method of a seed
    model = MODELS.build(name, data.image_shape, seen.num_classes, **params)
    lr = 0.1
    _, algorithm_params = component_spec(config["algorithm"], "algorithm")
    algorithm = ALGORITHMS.build("noise_mask_pretraining", data.image_shape, lr, budget["epochs"], **algorithm_params)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    steps = EpochSchedule(torch.optim.lr_scheduler.StepLR(optimizer, step_size=budget["lr_step_epochs"], gamma=0.1))
    state = train(model, seen, optimizer=optimizer, criterion=CrossEntropy(), epochs=budget["epochs"],
                  batch_size=budget["batch_size"], seed=seed, algorithm=algorithm, hooks=[algorithm, steps],
                  accelerator=accelerator, progress=progress)
    device = accelerator.device
    net = state.unwrapped_model
    metrics = {"pretrain_test_accuracy": accuracy(net, seen.x_test.to(device), seen.y_test.to(device), accelerator)}
    if algorithm.lse_history:
        metrics["mean_log_density"] = sum(algorithm.lse_history) / len(algorithm.lse_history)
    state = finetune(net, seen, budget, seed, accelerator, progress)
    net = state.unwrapped_model.eval()
    metrics.update(test_accuracy=accuracy(net, seen.x_test.to(device), seen.y_test.to(device), accelerator),
                   train_loss=state.history[-1]["train_loss"],
                   probe_accuracy=probe_accuracy(net.cpu(), unseen, budget["probe_labels"], seed))
    return metrics


TASK = Task("noise_mask", METRICS, check, run, optimizer=False, budget=BUDGET,
            algorithms=("noise_mask_pretraining",))
