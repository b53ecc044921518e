"""The ``inr`` task: fit an implicit neural representation (coordinates -> values) of one fixed target full-batch
and report its PSNR."""

import torch
from accelerate import Accelerator

from ..data import inr_grid
from ..loop import train
from ..registry import INITIALIZERS, INR_TARGETS, MODELS, OPTIMIZERS
from .base import Task, build, component_spec


METRICS = ("psnr", "best_psnr", "psnr_quarter")


def check(config: dict, where: str) -> None:
    INR_TARGETS.check(*component_spec(config.get("data"), f"{where}.data"))
    name, params = component_spec(config.get("model"), f"{where}.model")
    INITIALIZERS.check(*component_spec(params.get("init", "siren"), f"{where}.model.init"))
    MODELS.check(name, {k: v for k, v in params.items() if k != "init"})


class PSNRCurve:
    """Hook: PSNR of the model's fit to the whole target before every ``every``-th step and at the end, in dB with
    the target's peak-to-peak range as the peak."""

    def __init__(self, data, every: int):
        if not (isinstance(every, int) and every > 0):
            raise ValueError(f"eval_steps must be a positive int, got {every!r}")
        self.data, self.every, self.curve = data, every, []

    @torch.no_grad()
    def _evaluate(self, state) -> None:
        device = state.accelerator.device
        x, y = self.data.x_train.to(device), self.data.y_train.to(device)
        mse = (state.unwrapped_model(x) - y).square().mean()
        self.curve.append([state.step, (10 * torch.log10((y.max() - y.min()) ** 2 / mse)).item()])

    def on_step_start(self, state) -> None:
        if state.step % self.every == 0:
            self._evaluate(state)

    def on_train_end(self, state) -> None:
        self._evaluate(state)


def run(config: dict, card: dict, seed: int, accelerator: Accelerator, progress: bool) -> dict:
    """Fit the target full-batch for ``budget.steps`` steps."""
    budget = config["budget"]
    target = build(INR_TARGETS, config["data"])
    data = inr_grid(target)
    name, params = component_spec(config["model"], "model")
    init = params.pop("init", "siren")
    torch.manual_seed(seed)
    model = MODELS.build(name, data.num_features, 1, **params)
    build(INITIALIZERS, init, model, target, torch.Generator().manual_seed(seed))
    optimizer = build(OPTIMIZERS, config["optimizer"], model.parameters())
    curve = PSNRCurve(data, budget["eval_steps"])

    def mse(prediction, y, index=None):
        return (prediction - y).square().mean()

    train(model, data, optimizer=optimizer, criterion=mse, epochs=budget["steps"], batch_size=len(data.y_train),
          seed=seed, hooks=[curve], accelerator=accelerator, progress=progress)
    values = [v for _, v in curve.curve]
    quarter = next(v for step, v in curve.curve if step >= budget["steps"] // 4)
    return {"psnr": values[-1], "best_psnr": max(values), "psnr_quarter": quarter, "curves": {"psnr": curve.curve}}


TASK = Task("inr", METRICS, check, run)
