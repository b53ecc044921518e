"""Epoch-wise learning-rate schedules: cosine against torch's CosineAnnealingLR, staged schedules (BiPer's two stages,
OFQ's cool-down), and the hook inside the training loop."""

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from diffkit.harness.data import HarnessData
from diffkit.harness.loop import train
from diffkit.harness.registry import CrossEntropy
from diffkit.harness.schedules import LRSchedule, schedule_factors, schedule_stages


def test_cosine_matches_torch_cosine_annealing_per_epoch():
    epochs, lr = 12, 0.3
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    stages = schedule_stages("cosine", epochs)
    for epoch in range(epochs):
        assert lr * schedule_factors(stages, epoch)[0] == pytest.approx(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()


def test_stages_run_one_after_the_other():
    # OFQ's cool-down: cosine to 2 % over 6 epochs, then 3 epochs held there; BiPer-like second stage with its own
    # learning rate and weight decay
    stages = schedule_stages({"stages": [{"epochs": 6, "end": 0.02}, {"epochs": 3, "shape": "constant", "lr": 0.02},
                                         {"epochs": 4, "lr": 0.2, "weight_decay": 0.1}]}, 13)
    factors = [schedule_factors(stages, e) for e in range(13)]
    torch.testing.assert_close(torch.tensor([f for f, _ in factors[:6]]),
                               torch.tensor([0.02 + 0.98 * (1 + torch.cos(torch.tensor(torch.pi * e / 6))) / 2
                                             for e in range(6)]))
    assert [f for f, _ in factors[6:9]] == [0.02] * 3 and factors[9] == (0.2, 0.1)
    assert factors[12][0] == pytest.approx(0.2 * (1 + torch.cos(torch.tensor(3 * torch.pi / 4)).item()) / 2)
    with pytest.raises(ValueError, match="epoch must be in"):
        schedule_factors(stages, 13)


@pytest.mark.parametrize("bad,match", [
    ("linear", "lr_schedule must be"),
    ({"stages": []}, "lr_schedule must be"),
    ({"stages": [{"epochs": 5}]}, "stages last 5 epochs; the budget has 6"),
    ({"stages": [{"epochs": 6, "shape": "step"}]}, "shape must be one of"),
    ({"stages": [{"epochs": 6, "lr": -1}]}, "lr must be a finite number >= 0"),
    ({"stages": [{"epochs": 6, "warmup": 1}]}, "unknown key 'warmup'"),
    ({"stages": [{"epochs": 0}, {"epochs": 6}]}, "epochs must be a positive int"),
])
def test_bad_schedules_are_refused_by_name(bad, match):
    with pytest.raises(ValueError, match=match):
        schedule_stages(bad, 6)


def test_hook_sets_every_epochs_rate_and_decay_in_the_loop():
    g = torch.Generator().manual_seed(0)
    data = HarnessData(torch.randn(32, 3, generator=g), torch.randint(0, 2, (32,), generator=g),
                       torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g), num_classes=2)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=1e-3)
    seen = []

    class Record:
        def on_step_start(self, state):
            group = state.optimizer.param_groups[0]
            seen.append((state.epoch, group["lr"], group["weight_decay"]))

    schedule = {"stages": [{"epochs": 2, "end": 0.1}, {"epochs": 2, "shape": "constant", "lr": 0.1,
                                                        "weight_decay": 0.0}]}
    train(model, data, optimizer=optimizer, criterion=CrossEntropy(), epochs=4, batch_size=16, seed=0,
          hooks=[LRSchedule(schedule, 4), Record()], accelerator=Accelerator(cpu=True), progress=False)
    per_epoch = sorted(set(seen))
    assert [e for e, _, _ in per_epoch] == [0, 1, 2, 3] and len(seen) == 8  # set once per epoch, 2 steps each
    assert [lr for _, lr, _ in per_epoch] == pytest.approx([0.5, 0.5 * 0.55, 0.05, 0.05])
    assert [wd for _, _, wd in per_epoch] == pytest.approx([1e-3, 1e-3, 0.0, 0.0])
