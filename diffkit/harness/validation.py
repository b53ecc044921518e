"""Choosing hyperparameters on a validation split, never on the test set.

``validation_split`` is a data method that holds out a stratified ``fraction`` of the training set (the papers'
9 : 1 split) and makes it the split a card reports on, so a card run with it measures validation accuracy and the
test set is not seen. ``tune`` runs one method of a card over a grid of overrides with that split and returns the
validation metric of every setting; ``python -m diffkit.harness.tune CARD --method M --grid optimizer.lr=...``
prints the table and the best setting (what the card then fixes for its test-set runs).
"""

import copy
import itertools
import math

import torch

from .data import HarnessData


def validation_split(data: HarnessData, seed: int, fraction: float = 0.1) -> HarnessData:
    """The training set split ``1 - fraction`` : ``fraction`` (stratified by label, seeded): the first part trains,
    the second becomes the evaluation split; the original test set is dropped. Per-sample extras follow their rows."""
    from sklearn.model_selection import train_test_split

    if isinstance(fraction, bool) or not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise ValueError(f"fraction must be a number in (0, 1), got {fraction!r}")
    y = data.y_train
    stratify = y.numpy() if y.dtype == torch.long else None
    train, held = train_test_split(torch.arange(len(y)).numpy(), test_size=fraction, stratify=stratify,
                                   random_state=80_000 + seed)
    train, held = torch.from_numpy(train), torch.from_numpy(held)
    return HarnessData(data.x_train[train], y[train], data.x_train[held], y[held], data.num_classes,
                       {k: v[train] for k, v in data.train_extra.items()},
                       {k: v[held] for k, v in data.train_extra.items()}, data.image_shape)


def _set(config: dict, path: str, value) -> None:
    """Set ``value`` at a dotted ``path`` (section.key[.key...]) of a method's overrides, creating tables on the way."""
    *parents, key = path.split(".")
    for part in parents:
        config = config.setdefault(part, {})
        if not isinstance(config, dict):
            raise ValueError(f"grid path {path!r} runs into a non-table value at {part!r}")
    config[key] = value


def validation_card(card: dict, method: str, overrides: dict, fraction: float = 0.1) -> dict:
    """A one-method copy of ``card``: ``method`` with ``overrides`` (dotted path -> value) applied, run on the
    validation split of the card's data (the split added before the card's own data methods)."""
    from .cards import validate_card

    if method not in card["methods"]:
        raise ValueError(f"method must be one of {sorted(card['methods'])}, got {method!r}")
    tuned = copy.deepcopy(card)
    data = tuned["data"] if isinstance(tuned["data"], dict) else {"name": tuned["data"]}
    data["methods"] = [{"name": "validation_split", "fraction": fraction}] + list(data.get("methods", []))
    tuned["data"] = data
    overridden = copy.deepcopy(tuned["methods"][method])
    for path, value in overrides.items():
        _set(overridden, path, value)
    tuned["methods"], tuned["baseline"] = {method: overridden}, method
    return validate_card(tuned, source=f"{card['name']} (validation)")


def tune(card: dict, method: str, grid: dict[str, list], seeds: list[int], fraction: float = 0.1,
         metric: str | None = None, progress: bool = False, on_row=None) -> list[dict]:
    """Run ``method`` for every combination of ``grid`` (dotted path -> values) and seed on the validation split;
    returns one row per combination: the overrides, the per-seed values of ``metric`` (default: the card's; NaN where
    a run does not report it, or fails, e.g. diverges: the failure's message goes to the row's ``errors``) and their
    mean. ``on_row(row)`` is called as each row completes."""
    from .experiment import run_method

    if not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise ValueError(f"grid must map dotted paths to non-empty lists of values, got {grid!r}")
    rows = []
    for values in itertools.product(*grid.values()):
        overrides = dict(zip(grid, values))
        tuned = validation_card(card, method, overrides, fraction)
        scores, errors = [], []
        for seed in seeds:
            try:
                scores.append(run_method(tuned, method, seed, progress=progress)["metrics"].get(metric or card["metric"],
                                                                                              math.nan))
            except (ValueError, RuntimeError) as err:  # a setting that diverges loses; the grid goes on
                scores.append(math.nan)
                errors.append(f"seed {seed}: {err}")
        rows.append({"overrides": overrides, "values": scores, "mean": sum(scores) / len(scores), "errors": errors})
        if on_row is not None:
            on_row(rows[-1])
    return rows
