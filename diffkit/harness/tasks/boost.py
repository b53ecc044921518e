"""The ``boost`` task: a one-hidden-layer network trained by gradient boosting (GBNN, Emami & Martinez-Munoz, IEEE
Access 2023) or by backprop (scikit-learn's MLPClassifier solvers), on a training split with a validation split
held out for the backprop learning rate; test accuracy of the whole network and with only 25 / 50 / 75 % of its
hidden units switched on -- GBNN keeps its first-trained units (its boosted prefix), a backprop MLP a random
subset (it has no order) -- for the paper's claim that GBNN's late units can be switched off at little cost."""

import torch
from accelerate import Accelerator

from ..gbnn import glorot_uniform_, keep_units, one_hidden_mlp
from ..registry import ALGORITHMS, MODELS
from .base import Task, build_data, check_data, component_spec, refuse_sections


METRICS = ("test_accuracy", "units25_test_accuracy", "units50_test_accuracy", "units75_test_accuracy",
           "validation_accuracy", "train_accuracy", "selected_lr", "selected_eta", "diverged_fits")
BUDGET = {"validation_fraction": 0.2}
FRACTIONS = (25, 50, 75)


def check(config: dict, where: str) -> None:
    refuse_sections(config, where, ("optimizer", "loss"), "the algorithm section says how the network is trained")
    check_data(config, where)
    name, params = component_spec(config.get("model"), f"{where}.model")
    if name != "one_hidden_mlp":
        raise ValueError(f"{where}.model must be one_hidden_mlp (GBNN's network), got {name!r}")
    MODELS.check(name, params)
    name, params = component_spec(config.get("algorithm"), f"{where}.algorithm")
    if name not in ("gbnn", "mlp_backprop"):
        raise ValueError(f"{where}.algorithm must be gbnn or mlp_backprop, got {name!r}")
    built = ALGORITHMS.build(name, **params)  # validates the parameters now
    model = MODELS.check("one_hidden_mlp", component_spec(config["model"], f"{where}.model")[1])
    if name == "gbnn":
        if model["activation"] != "logistic":
            raise ValueError(f"{where}.model.activation must be logistic for GBNN (its weak regressors' units)")
        etas, make = built
        if not (isinstance(etas, list) and etas):
            raise ValueError(f"{where}.algorithm.etas must be a non-empty list of learning rates, got {etas!r}")
        for eta in etas:
            make(units=model["units"], eta=eta)
    fraction = config["budget"]["validation_fraction"]
    if not (isinstance(fraction, float) and 0 < fraction < 1):
        raise ValueError(f"{where}.budget.validation_fraction must be a float in (0, 1), got {fraction!r}")


def _validation_split(data, fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    rows = torch.arange(len(data.y_train)).numpy()
    fit, val = train_test_split(rows, test_size=fraction, stratify=data.y_train.numpy(), random_state=10_000 + seed)
    return (data.x_train[fit], data.y_train[fit]), (data.x_train[val], data.y_train[val])


def run(config: dict, card: dict, seed: int, accelerator: Accelerator, progress: bool) -> dict:
    data = build_data(config, seed)
    (x, y), (x_val, y_val) = _validation_split(data, config["budget"]["validation_fraction"], seed)
    _, model_params = component_spec(config["model"], "model")
    units = MODELS.check("one_hidden_mlp", model_params)["units"]
    name, params = component_spec(config["algorithm"], "algorithm")
    x_test, y_test = data.x_test.double(), data.y_test

    def acc(net, xs, ys):
        with torch.no_grad():
            return (net(xs.double()).argmax(1) == ys).double().mean().item()

    metrics = {}
    if name == "gbnn":
        if data.num_classes == 2:
            raise ValueError("the boost task reports argmax accuracy of K logits: it needs >= 3 classes")
        etas, make = ALGORITHMS.build(name, **params)
        best, diverged = None, 0
        for eta in etas:  # each eta from the same subsamples and initial weights; the best validation accuracy wins
            candidate = make(units=units, eta=eta).fit(x, y, data.num_classes, torch.Generator().manual_seed(seed),
                                                       progress)
            diverged += candidate.diverged
            val = acc(candidate.to_mlp(), x_val, y_val)
            if best is None or (not candidate.diverged and (best[0].diverged or val > best[1])):
                best = (candidate, val, eta)
        gbnn = best[0]
        metrics.update(selected_eta=best[2], diverged_fits=diverged)
        net = gbnn.to_mlp()
        for percent in FRACTIONS:  # the first-trained units: the boosted model after that many steps
            metrics[f"units{percent}_test_accuracy"] = acc(gbnn.to_mlp(gbnn.steps_total * percent // 100),
                                                           x_test, y_test)
    else:
        trainer = ALGORITHMS.build(name, **params)

        def make_net():  # the same initial weights for every learning rate of a seed (scikit-learn's init)
            generator = torch.Generator().manual_seed(seed)
            net = one_hidden_mlp(data.num_features, data.num_classes, dtype=torch.float64, **model_params)
            glorot_uniform_(net[0], generator)
            glorot_uniform_(net[2], generator)
            return net

        net, lr, _ = trainer.fit(make_net, x, y, x_val, y_val, torch.Generator().manual_seed(seed))
        if lr is not None:
            metrics["selected_lr"] = lr
        order = torch.randperm(units, generator=torch.Generator().manual_seed(20_000 + seed))
        for percent in FRACTIONS:  # a random subset of units kept: a backprop MLP's units have no order
            metrics[f"units{percent}_test_accuracy"] = acc(keep_units(net, order[: units * percent // 100]),
                                                           x_test, y_test)
    metrics.update(test_accuracy=acc(net, x_test, y_test), validation_accuracy=acc(net, x_val, y_val),
                   train_accuracy=acc(net, x, y))
    return metrics


TASK = Task("boost", METRICS, check, run, optimizer=False, budget=BUDGET, algorithms=("gbnn", "mlp_backprop"))
