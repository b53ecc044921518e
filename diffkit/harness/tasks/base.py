"""What every task shares: the ``Task`` entry, component specs ("name" or {"name": ..., params}) and the data
section (a data set and its data methods), checked and built."""

from collections.abc import Callable
from dataclasses import dataclass, field

from ..registry import DATA_METHODS, DATASETS, MODELS


@dataclass(frozen=True)
class Task:
    """One harness task: the metrics a card of it may list, the check of one method's resolved setting and the
    runner of one method for one seed.

    - ``metrics``: the allowed metric names, or a function ``(card, source) -> names`` for a task whose metrics
      depend on the card (it raises ``ValueError`` for a card it cannot run);
    - ``check(config, where)``: raises ``ValueError`` naming ``where`` for a setting the runner would refuse;
    - ``run(config, card, seed, accelerator, progress)``: the metrics dict; an optional ``"curves"`` entry holds
      per-step curves that ride along in the record;
    - ``optimizer``: whether its methods name an optimizer (checked against the registry before ``check``);
    - ``budget``: budget keys of this task beyond the cards' common ones (``cards.BUDGET_DEFAULTS``), with defaults;
    - ``algorithms``: the ALGORITHMS entries only this task can run (a classify card naming one is refused).
    """

    name: str
    metrics: tuple[str, ...] | Callable[[dict, str], tuple[str, ...]]
    check: Callable[[dict, str], None]
    run: Callable[..., dict]
    optimizer: bool = True
    budget: dict = field(default_factory=dict)
    algorithms: tuple[str, ...] = ()

    def allowed_metrics(self, card: dict, source: str) -> tuple[str, ...]:
        return self.metrics(card, source) if callable(self.metrics) else self.metrics


def component_spec(value, where: str) -> tuple[str, dict]:
    """A component given as "name" or {"name": ..., params}."""
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return value["name"], {k: v for k, v in value.items() if k != "name"}
    raise ValueError(f"{where} must be a name or a table with a 'name', got {value!r}")


def refuse_sections(config: dict, where: str, sections: tuple[str, ...], why: str) -> None:
    """Refuse card sections a task does not use (nothing a card says is silently ignored)."""
    for section in sections:
        if section in config:
            raise ValueError(f"{where}: this task takes no {section} section ({why})")


def build(registry, spec, *context):
    """Build a component spec from ``registry`` with the given context arguments."""
    name, params = component_spec(spec, registry.kind)
    return registry.build(name, *context, **params)


def check_data(config: dict, where: str) -> None:
    name, params = component_spec(config.get("data"), f"{where}.data")
    DATASETS.check(name, {k: v for k, v in params.items() if k != "methods"})
    for i, method in enumerate(params.get("methods", [])):
        DATA_METHODS.check(*component_spec(method, f"{where}.data.methods[{i}]"))


def check_data_and_model(config: dict, where: str, model: str, why: str) -> None:
    """The data section, and a model section that must name ``model`` (a task that builds one kind of network)."""
    check_data(config, where)
    name, params = component_spec(config.get("model"), f"{where}.model")
    if name != model:
        raise ValueError(f"{where}.model must be {model} ({why}), got {name!r}")
    MODELS.check(name, params)


def build_data(config: dict, seed: int):
    """The data set of a method's setting for ``seed``, with its data methods applied in order."""
    name, params = component_spec(config["data"], "data")
    methods = params.pop("methods", [])
    data = DATASETS.build(name, seed, **params)
    for method in methods:
        data = build(DATA_METHODS, method, data, seed)
    return data
