"""Learning-rate schedules for harness cards, set once per epoch as the papers' codes step their schedulers
(torch's ``CosineAnnealingLR``, timm's ``CosineLRScheduler`` in epochs).

A schedule is a list of stages run one after the other, each ``epochs`` long, with its own ``shape``:

- ``cosine``: lr from ``lr`` to ``end`` (both as factors of the optimizer's initial learning rate) along
  end + (lr - end) (1 + cos(pi e / E)) / 2 for epoch e = 0 .. E - 1 of the stage (torch's CosineAnnealingLR with
  T_max = E and eta_min = end);
- ``constant``: lr held at ``lr``;

and ``weight_decay``, a factor of the optimizer's initial weight decay for the stage. ``"cosine"`` is shorthand for one
cosine stage over the whole budget down to 0. Several stages express the papers' two-phase recipes: BiPer's two
training stages with their own learning rates and weight decays (``edmav4/BiPer`` ``run_stg1.sh``, ``run_stg2.sh``),
OFQ's cosine decay followed by a fine-tune at the minimum rate (``nbasyl/OFQ`` ``cga.py``).
"""

import math


SHAPES = ("cosine", "constant")
STAGE_DEFAULTS = {"shape": "cosine", "lr": 1.0, "end": 0.0, "weight_decay": 1.0}


def _factor(name: str, value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{where}.{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def schedule_stages(schedule, epochs: int) -> list[dict]:
    """The validated stages of ``schedule`` (``"constant"``, ``"cosine"`` or ``{"stages": [...]}``) for a budget of
    ``epochs`` epochs; [] for ``"constant"`` (the optimizer's rate throughout)."""
    if schedule == "constant":
        return []
    if schedule == "cosine":
        return [{**STAGE_DEFAULTS, "epochs": epochs}]
    if not (isinstance(schedule, dict) and set(schedule) == {"stages"} and isinstance(schedule["stages"], list)
            and schedule["stages"]):
        raise ValueError(f"lr_schedule must be 'constant', 'cosine' or {{'stages': [...]}} (a non-empty list), got "
                         f"{schedule!r}")
    stages = []
    for i, stage in enumerate(schedule["stages"]):
        where = f"lr_schedule.stages[{i}]"
        if not isinstance(stage, dict):
            raise ValueError(f"{where} must be a table, got {stage!r}")
        unknown = sorted(set(stage) - set(STAGE_DEFAULTS) - {"epochs"})
        if unknown:
            raise ValueError(f"{where} has unknown key {unknown[0]!r}; allowed: epochs, {', '.join(STAGE_DEFAULTS)}")
        stage = {**STAGE_DEFAULTS, **stage}
        if not (isinstance(stage.get("epochs"), int) and not isinstance(stage.get("epochs"), bool)
                and stage["epochs"] > 0):
            raise ValueError(f"{where}.epochs must be a positive int, got {stage.get('epochs')!r}")
        if stage["shape"] not in SHAPES:
            raise ValueError(f"{where}.shape must be one of {list(SHAPES)}, got {stage['shape']!r}")
        for name in ("lr", "end", "weight_decay"):
            stage[name] = _factor(name, stage[name], where)
        stages.append(stage)
    total = sum(s["epochs"] for s in stages)
    if total != epochs:
        raise ValueError(f"lr_schedule stages last {total} epochs; the budget has {epochs}")
    return stages


def schedule_factors(stages: list[dict], epoch: int) -> tuple[float, float]:
    """(learning-rate factor, weight-decay factor) for ``epoch`` (0-based) of a validated stage list."""
    start = 0
    for stage in stages:
        if epoch < start + stage["epochs"]:
            e = epoch - start
            if stage["shape"] == "constant":
                return stage["lr"], stage["weight_decay"]
            cosine = (1 + math.cos(math.pi * e / stage["epochs"])) / 2
            return stage["end"] + (stage["lr"] - stage["end"]) * cosine, stage["weight_decay"]
        start += stage["epochs"]
    raise ValueError(f"epoch must be in [0, {start}), got {epoch!r}")


class LRSchedule:
    """Training hook: before every epoch, each optimizer group's lr and weight decay become its initial value times
    the schedule's factors for that epoch."""

    def __init__(self, schedule, epochs: int):
        self.stages = schedule_stages(schedule, epochs)
        self.initial = []

    def _set(self, state, epoch: int) -> None:
        lr_factor, wd_factor = schedule_factors(self.stages, epoch)
        for group, (lr, wd) in zip(self.optimizer.param_groups, self.initial):
            group["lr"] = lr * lr_factor
            if "weight_decay" in group:
                group["weight_decay"] = wd * wd_factor

    def on_train_start(self, state) -> None:
        self.optimizer = getattr(state.optimizer, "optimizer", state.optimizer)  # accelerate wraps the optimizer
        self.initial = [(g["lr"], g.get("weight_decay", 0.0)) for g in self.optimizer.param_groups]
        self._set(state, 0)

    def on_epoch_end(self, state) -> None:
        if state.epoch + 1 < state.epochs:
            self._set(state, state.epoch + 1)
