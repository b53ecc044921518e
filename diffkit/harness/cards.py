"""Experiment cards: one JSON or TOML file per paper saying what to train (data, model, method, baseline,
budget, seeds), what to measure and what the paper leads us to expect.

A card's top-level ``data``, ``model``, ``optimizer``, ``loss``, ``algorithm`` and ``budget`` sections are the
shared setting; each entry of ``methods`` overrides some of them (section by section, key by key), so a method
is the baseline plus exactly what the paper changes. ``validate_card`` resolves every method against the
registries, so a card with a typo fails before it trains. The ``task`` names an entry of ``tasks.TASKS``, which
says which metrics the card may list and checks each method's setting.
"""

import copy
import json
import tomllib
from pathlib import Path

from .registry import OPTIMIZERS
from .schedules import schedule_stages
from .tasks import TASKS, component_spec


SECTIONS = ("data", "model", "optimizer", "loss", "algorithm", "budget")
REQUIRED = ("name", "paper", "task", "methods", "baseline", "seeds", "metric", "metrics", "expected")
# paper_effect: {metric: the size of the paper's effect in that metric's units}; the report calls a difference the
# seeds could not have detected at that size "inconclusive"
OPTIONAL = SECTIONS + ("paper_effect",)
# budget keys every card may set (a task adds its own in its Task entry); target_accuracy (tested every eval_steps
# steps) adds the steps / examples a classifier needs to reach it; lr_schedule is set once per epoch (schedules.py)
BUDGET_DEFAULTS = {"epochs": 10, "batch_size": 64, "eval_every": 0, "steps": 300, "x0": -1.0, "target_accuracy": None,
                   "eval_steps": 1, "eval_models": 5, "lr_schedule": "constant"}
SCHEDULED_TASKS = ("classify", "grow", "denoise")  # the tasks that train by epochs with the card's optimizer


def load_card(path: str | Path) -> dict:
    """Read and validate a card (``.json`` or ``.toml``)."""
    path = Path(path)
    if path.suffix not in (".json", ".toml"):
        raise ValueError(f"card must be a .json or .toml file, got {str(path)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"no card at {path}")
    text = path.read_text()
    try:
        card = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"card {path} is not valid {path.suffix[1:].upper()}: {err}") from None
    return validate_card(card, source=str(path))


def _merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for section, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(section), dict) and "name" not in value:
            merged[section] = {**merged[section], **value}
        else:  # naming a new component replaces the section (another loss's defaults are not the old one's)
            merged[section] = copy.deepcopy(value)
    return merged


def method_config(card: dict, method: str) -> dict:
    """The full setting of one method: the card's sections with the method's overrides applied."""
    if method not in card["methods"]:
        raise ValueError(f"method must be one of {sorted(card['methods'])}, got {method!r}")
    return _merge({s: card[s] for s in SECTIONS if s in card}, card["methods"][method])


def validate_card(card: dict, source: str = "card") -> dict:
    """Check a card's keys, names and parameters; returns it with budget defaults filled in."""
    if not isinstance(card, dict):
        raise TypeError(f"{source} must be a table/object, got {type(card).__name__}")
    missing = [k for k in REQUIRED if k not in card]
    if missing:
        raise ValueError(f"{source} lacks {', '.join(missing)}")
    unknown = sorted(set(card) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ValueError(f"{source} has unknown key {unknown[0]!r}; allowed: {', '.join(REQUIRED + OPTIONAL)}")
    if card["task"] not in TASKS:
        raise ValueError(f"{source}: task must be one of {list(TASKS)}, got {card['task']!r}")
    if not (isinstance(card["methods"], dict) and card["methods"]):
        raise ValueError(f"{source}: methods must be a non-empty table of name -> overrides")
    if card["baseline"] not in card["methods"]:
        raise ValueError(f"{source}: baseline must be one of the methods {sorted(card['methods'])}, got {card['baseline']!r}")
    seeds = card["seeds"]
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and s >= 0 for s in seeds)):
        raise ValueError(f"{source}: seeds must be a non-empty list of ints >= 0, got {seeds!r}")
    if not (isinstance(card["metrics"], list) and card["metric"] in card["metrics"]):
        raise ValueError(f"{source}: metrics must be a list that includes metric {card['metric']!r}")
    task = TASKS[card["task"]]
    allowed_metrics = task.allowed_metrics(card, source)
    bad = sorted(set(card["metrics"]) - set(allowed_metrics))
    if bad:
        raise ValueError(f"{source}: unknown metric {bad[0]!r}; allowed: {', '.join(allowed_metrics)}")
    effects = card.get("paper_effect", {})
    if not (isinstance(effects, dict) and all(k in card["metrics"] and not isinstance(v, bool)
                                              and isinstance(v, (int, float)) and 0 < v < float("inf")
                                              for k, v in effects.items())):
        raise ValueError(f"{source}: paper_effect must map metrics of the card to positive finite numbers (the size "
                         f"of the paper's effect), got {effects!r}")
    card = copy.deepcopy(card)
    defaults = {**BUDGET_DEFAULTS, **task.budget}
    card["budget"] = {**defaults, **card.get("budget", {})}
    unknown = sorted(set(card["budget"]) - set(defaults))
    if unknown:
        raise ValueError(f"{source}: budget has unknown key {unknown[0]!r}; allowed: {', '.join(defaults)}")
    for method in card["methods"]:
        if not isinstance(card["methods"][method], dict):
            raise ValueError(f"{source}: methods.{method} must be a table of overrides")
        bad = sorted(set(card["methods"][method]) - set(SECTIONS))
        if bad:
            raise ValueError(f"{source}: methods.{method} overrides unknown section {bad[0]!r}; allowed: {', '.join(SECTIONS)}")
        config, where = method_config(card, method), f"{source}: methods.{method}"
        if config["budget"]["lr_schedule"] != "constant" and card["task"] not in SCHEDULED_TASKS:
            raise ValueError(f"{where}.budget.lr_schedule: the {card['task']} task has no epoch-wise learning-rate "
                             f"schedule (tasks with one: {', '.join(SCHEDULED_TASKS)})")
        try:
            schedule_stages(config["budget"]["lr_schedule"], config["budget"]["epochs"])
        except ValueError as err:
            raise ValueError(f"{where}.budget.{err}") from None
        if task.optimizer:
            OPTIMIZERS.check(*component_spec(config.get("optimizer"), f"{where}.optimizer"))
        task.check(config, where)
    return card
