"""The ``function_1d`` task: diffGrad's analytical experiment, an optimizer minimising 1-D functions from x0."""

import torch
from accelerate import Accelerator

from ..diffgrad import FUNCTIONS_1D, function_1d, global_minimum_1d
from ..registry import OPTIMIZERS
from .base import Task, build


def metrics(card: dict, source: str) -> tuple[str, ...]:
    """``<function>_x`` and ``<function>_gap`` for each of the card's ``data.functions``."""
    functions = card.get("data", {}).get("functions") if isinstance(card.get("data"), dict) else None
    if not (isinstance(functions, list) and functions and set(functions) <= set(FUNCTIONS_1D)):
        raise ValueError(f"{source}: a function_1d card needs data.functions, a list from {sorted(FUNCTIONS_1D)}, "
                         f"got {functions!r}")
    return tuple(f"{f}_{m}" for f in functions for m in ("x", "gap"))


def check(config: dict, where: str) -> None:
    """Nothing beyond the optimizer: the functions are checked with the metrics."""


def run(config: dict, card: dict, seed: int, accelerator: Accelerator, progress: bool) -> dict:
    """Minimise each 1-D function from x0; x and the gap to the global minimum (deterministic: the seed is unused)."""
    budget, result = config["budget"], {}
    for name in card["data"]["functions"]:
        f = function_1d(name)
        x = torch.tensor([float(budget["x0"])], dtype=torch.float64, requires_grad=True)
        optimizer = build(OPTIMIZERS, config["optimizer"], [x])
        for _ in range(budget["steps"]):
            optimizer.zero_grad()
            f(x).sum().backward()
            optimizer.step()
        result[f"{name}_x"] = x.item()
        result[f"{name}_gap"] = f(x.detach()).item() - global_minimum_1d(name)[1]
    return result


TASK = Task("function_1d", metrics, check, run)
