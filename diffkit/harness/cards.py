"""Experiment cards: one JSON or TOML file per paper saying what to train (data, model, method, baseline,
budget, seeds), what to measure and what the paper leads us to expect.

A card's top-level ``data``, ``model``, ``optimizer``, ``loss``, ``algorithm`` and ``budget`` sections are the
shared setting; each entry of ``methods`` overrides some of them (section by section, key by key), so a method
is the baseline plus exactly what the paper changes. ``validate_card`` resolves every method against the
registries, so a card with a typo fails before it trains.
"""

import copy
import json
import tomllib
from pathlib import Path

from .diffgrad import FUNCTIONS_1D
from .registry import (ALGORITHMS, DATA_METHODS, DATASETS, IMAGE_SETS, INITIALIZERS, INR_TARGETS, LAYERS, LOSSES,
                       MODELS, NOISES, OPTIMIZERS)


TASKS = ("classify", "function_1d", "inr", "denoise", "grow", "condense")
SECTIONS = ("data", "model", "optimizer", "loss", "algorithm", "budget")
REQUIRED = ("name", "paper", "task", "methods", "baseline", "seeds", "metric", "metrics", "expected")
OPTIONAL = SECTIONS
CLASSIFY_METRICS = ("test_accuracy", "best_test_accuracy", "train_loss", "signal_mass", "estimating_error",
                    "gradient_stability", "noisy_train_fit", "steps_to_target", "examples_to_target", "reached_target",
                    "final_batch_size", "zero_weight_fraction", "level_flips_first_epoch",
                    "level_flips_last_epoch", "cga_frozen_fraction")
INR_METRICS = ("psnr", "best_psnr", "psnr_quarter")
# denoise: PSNR of the estimate and of the noisy input (both clipped to [0, 1]) and their difference
DENOISE_METRICS = ("psnr", "psnr_noisy", "psnr_gain")
# grow: the grown (or from-scratch) network's accuracy, and the members' and the just-grown network's
GROW_METRICS = ("test_accuracy", "best_test_accuracy", "train_loss", "members_test_accuracy", "grown_test_accuracy")
# condense: mean / min / max test accuracy of the networks trained on the condensed set, and the last matching loss
CONDENSE_METRICS = ("test_accuracy", "test_accuracy_min", "test_accuracy_max", "final_matching_loss")
CONDENSATION_ALGORITHMS = ("random_selection", "dc", "dcc")  # the ALGORITHMS entries that build a condensed set
GROWTH_ALGORITHMS = ("mixturegrowth", "random_growth")  # the ALGORITHMS entries that build a Growth
MODEL_LAYER_KEYS = ("norm", "binary", "linear", "reparam")  # model parameters that name a LAYERS entry
# target_accuracy (tested every eval_steps steps) adds the steps / examples a classifier needs to reach it
BUDGET_DEFAULTS = {"epochs": 10, "batch_size": 64, "eval_every": 0, "steps": 300, "x0": -1.0, "target_accuracy": None,
                   "eval_steps": 1, "eval_models": 5}


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


def component_spec(value, where: str) -> tuple[str, dict]:
    """A component given as "name" or {"name": ..., params}."""
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return value["name"], {k: v for k, v in value.items() if k != "name"}
    raise ValueError(f"{where} must be a name or a table with a 'name', got {value!r}")


def _check_data(config: dict, where: str) -> None:
    name, params = component_spec(config.get("data"), f"{where}.data")
    DATASETS.check(name, {k: v for k, v in params.items() if k != "methods"})
    for i, method in enumerate(params.get("methods", [])):
        DATA_METHODS.check(*component_spec(method, f"{where}.data.methods[{i}]"))


def _check_classify(config: dict, where: str) -> None:
    _check_data(config, where)
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


def _check_inr(config: dict, where: str) -> None:
    INR_TARGETS.check(*component_spec(config.get("data"), f"{where}.data"))
    name, params = component_spec(config.get("model"), f"{where}.model")
    INITIALIZERS.check(*component_spec(params.get("init", "siren"), f"{where}.model.init"))
    MODELS.check(name, {k: v for k, v in params.items() if k != "init"})


def _check_denoise(config: dict, where: str) -> None:
    name, params = component_spec(config.get("data"), f"{where}.data")
    if "noise" not in params:
        raise ValueError(f"{where}.data needs a noise model, one of {', '.join(NOISES)}")
    IMAGE_SETS.check(name, {k: v for k, v in params.items() if k != "noise"})
    NOISES.check(*component_spec(params["noise"], f"{where}.data.noise"))
    MODELS.check(*component_spec(config.get("model"), f"{where}.model"))
    LOSSES.check(*component_spec(config.get("loss", "mse"), f"{where}.loss"))
    name, params = component_spec(config.get("algorithm"), f"{where}.algorithm")
    ALGORITHMS.check(name, params)
    denoisers = sorted(n for n in ALGORITHMS if hasattr(ALGORITHMS.get(n).constructor, "estimate"))
    if name not in denoisers:
        raise ValueError(f"{where}.algorithm must be a denoiser, one of {', '.join(denoisers)}, got {name!r}")


def _check_data_and_model(config: dict, where: str, model: str, why: str) -> None:
    """The data section, and a model section that must name ``model`` (a task that builds one kind of network)."""
    _check_data(config, where)
    name, params = component_spec(config.get("model"), f"{where}.model")
    if name != model:
        raise ValueError(f"{where}.model must be {model} ({why}), got {name!r}")
    MODELS.check(name, params)


def _check_condense(config: dict, where: str) -> None:
    _check_data_and_model(config, where, "convnet", "DC's network")
    name, params = component_spec(config.get("algorithm"), f"{where}.algorithm")
    if name not in CONDENSATION_ALGORITHMS:
        raise ValueError(f"{where}.algorithm must build a condensed set, one of {', '.join(CONDENSATION_ALGORITHMS)}, "
                         f"got {name!r}")
    ALGORITHMS.build(name, **params)  # validates ipc, loops and learning rates now
    if not (isinstance(config["budget"]["eval_models"], int) and config["budget"]["eval_models"] >= 1):
        raise ValueError(f"{where}.budget.eval_models must be an int >= 1, got {config['budget']['eval_models']!r}")


def _check_grow(config: dict, where: str) -> None:
    _check_data_and_model(config, where, "template_mlp", "the growth members")
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
    if card["task"] == "classify":
        allowed_metrics = CLASSIFY_METRICS
    elif card["task"] == "inr":
        allowed_metrics = INR_METRICS
    elif card["task"] == "denoise":
        allowed_metrics = DENOISE_METRICS
    elif card["task"] == "grow":
        allowed_metrics = GROW_METRICS
    elif card["task"] == "condense":
        allowed_metrics = CONDENSE_METRICS
    else:
        functions = card.get("data", {}).get("functions") if isinstance(card.get("data"), dict) else None
        if not (isinstance(functions, list) and functions and set(functions) <= set(FUNCTIONS_1D)):
            raise ValueError(f"{source}: a function_1d card needs data.functions, a list from {sorted(FUNCTIONS_1D)}, "
                             f"got {functions!r}")
        allowed_metrics = tuple(f"{f}_{m}" for f in functions for m in ("x", "gap"))
    bad = sorted(set(card["metrics"]) - set(allowed_metrics))
    if bad:
        raise ValueError(f"{source}: unknown metric {bad[0]!r}; allowed: {', '.join(allowed_metrics)}")
    card = copy.deepcopy(card)
    card["budget"] = {**BUDGET_DEFAULTS, **card.get("budget", {})}
    unknown = sorted(set(card["budget"]) - set(BUDGET_DEFAULTS))
    if unknown:
        raise ValueError(f"{source}: budget has unknown key {unknown[0]!r}; allowed: {', '.join(BUDGET_DEFAULTS)}")
    for method in card["methods"]:
        if not isinstance(card["methods"][method], dict):
            raise ValueError(f"{source}: methods.{method} must be a table of overrides")
        bad = sorted(set(card["methods"][method]) - set(SECTIONS))
        if bad:
            raise ValueError(f"{source}: methods.{method} overrides unknown section {bad[0]!r}; allowed: {', '.join(SECTIONS)}")
        config = method_config(card, method)
        if card["task"] == "condense":  # the networks train as DC's evaluate_synset does, with its own SGD schedule
            if "optimizer" in config:
                raise ValueError(f"{source}: methods.{method}: a condense card takes no optimizer (networks train "
                                 "on the condensed set with DC's SGD schedule)")
        else:
            OPTIMIZERS.check(*component_spec(config.get("optimizer"), f"{source}: methods.{method}.optimizer"))
        if card["task"] == "classify":
            _check_classify(config, f"{source}: methods.{method}")
        elif card["task"] == "inr":
            _check_inr(config, f"{source}: methods.{method}")
        elif card["task"] == "denoise":
            _check_denoise(config, f"{source}: methods.{method}")
        elif card["task"] == "grow":
            _check_grow(config, f"{source}: methods.{method}")
        elif card["task"] == "condense":
            _check_condense(config, f"{source}: methods.{method}")
    return card
