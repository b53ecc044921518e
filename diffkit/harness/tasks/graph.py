"""The ``graph`` task: semi-supervised node classification with a GCN, full-graph Adam with early stopping on
validation accuracy (the Virgo example's protocol, ``comp1.py``), for comparing weight initialisers (Virgo, ICML 2023).
Besides test accuracy it reports how far the initialised network is from preserving variance: the spread, in orders
of magnitude, of the per-layer variances of the outputs (forward) and of the loss gradients (backward)."""

import copy
import math

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from ..registry import GRAPH_INITIALIZERS, GRAPH_SETS, MODELS, OPTIMIZERS
from ..virgo import layer_variances
from .base import Task, build, component_spec, refuse_sections


METRICS = ("test_accuracy", "best_val_accuracy", "epochs_trained", "forward_variance_spread",
           "backward_variance_spread", "final_train_loss")
BUDGET = {"patience": 20}


def check(config: dict, where: str) -> None:
    refuse_sections(config, where, ("loss", "algorithm"), "cross-entropy on the labelled nodes, the initialiser is "
                    "model.init")
    GRAPH_SETS.check(*component_spec(config.get("data"), f"{where}.data"))
    name, params = component_spec(config.get("model"), f"{where}.model")
    if name != "gcn":
        raise ValueError(f"{where}.model must be gcn, got {name!r}")
    GRAPH_INITIALIZERS.check(*component_spec(params.get("init", "xavier"), f"{where}.model.init"))
    MODELS.check(name, {k: v for k, v in params.items() if k != "init"})
    for key in ("epochs", "patience"):
        if not (isinstance(config["budget"][key], int) and config["budget"][key] >= 1):
            raise ValueError(f"{where}.budget.{key} must be a positive int, got {config['budget'][key]!r}")


def _spread(variances: list[float]) -> float:
    """log10 of the largest over the smallest per-layer variance: 0 when every layer has the same variance."""
    return math.log10(max(variances) / min(variances))


def run(config: dict, card: dict, seed: int, accelerator: Accelerator, progress: bool) -> dict:
    budget = config["budget"]
    graph = build(GRAPH_SETS, config["data"], seed)
    name, params = component_spec(config["model"], "model")
    init = params.pop("init", "xavier")
    torch.manual_seed(seed)
    model = MODELS.build(name, graph.num_features, graph.num_classes, **params)
    build(GRAPH_INITIALIZERS, init, model, graph, torch.Generator().manual_seed(seed))
    forward, backward = layer_variances(model, graph)
    optimizer = build(OPTIMIZERS, config["optimizer"], model.parameters())
    best, best_state, stale, epoch = -1.0, None, 0, 0

    def accuracy(mask):
        model.eval()
        with torch.no_grad():
            return (model(graph.x, graph.adjacency)[mask].argmax(1) == graph.y[mask]).float().mean().item()

    for epoch in range(1, budget["epochs"] + 1):
        model.train()
        loss = F.cross_entropy(model(graph.x, graph.adjacency)[graph.train_mask], graph.y[graph.train_mask])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        val = accuracy(graph.val_mask)
        if val > best:  # the official EarlyStopping: stop after `patience` epochs without a strictly better score
            best, best_state, stale = val, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= budget["patience"]:
                break
    model.load_state_dict(best_state)
    return {"test_accuracy": accuracy(graph.test_mask), "best_val_accuracy": best, "epochs_trained": epoch,
            "forward_variance_spread": _spread(forward), "backward_variance_spread": _spread(backward),
            "final_train_loss": loss.item()}


TASK = Task("graph", METRICS, check, run, budget=BUDGET)
