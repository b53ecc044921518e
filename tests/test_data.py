"""Bundled data and the training loss."""

import colorsys

import torch

from diffkit.data import HELD_OUT_PER_CLASS, colored_digits, gray_digits, random_colors, to_unit
from diffkit.schedule import NoiseSchedule
from diffkit.training import diffusion_loss


def test_splits_are_disjoint_balanced_and_complete():
    train, ytr = gray_digits("train")
    test, yte = gray_digits("test")
    assert len(train) + len(test) == 5000 and len(test) == 10 * HELD_OUT_PER_CLASS
    assert torch.bincount(yte).tolist() == [HELD_OUT_PER_CLASS] * 10
    # no held-out image appears in the training split
    flat_train = {tuple(r) for r in (train.flatten(1) * 255).round().int().tolist()}
    assert not any(tuple(r) in flat_train for r in (test.flatten(1) * 255).round().int().tolist())


def test_colored_digits_are_seeded_and_keep_ink_colour():
    a, ya = colored_digits("test", seed=3)
    b, _ = colored_digits("test", seed=3)
    assert a.shape == (500, 3, 16, 16) and torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    ink, bg = random_colors(64, torch.Generator().manual_seed(0))
    sat = [colorsys.rgb_to_hsv(*c)[1] for c in ink.tolist()]
    val = [colorsys.rgb_to_hsv(*c)[2] for c in bg.tolist()]
    assert min(sat) >= 0.55 - 1e-6 and max(val) <= 0.25 + 1e-6  # saturated ink on a dark background
    # the brightest pixel of each image is (close to) its ink colour
    gray, _ = gray_digits("test")
    colored = to_unit(colored_digits("test", seed=3)[0])
    i = 0
    p = gray[i, 0].argmax()
    assert gray[i, 0].flatten()[p] > 0.9 and colored[i].flatten(1)[:, p].max() > 0.7


class _Oracle(torch.nn.Module):
    """For data x0 = 0 the noise is x_t / sigma_t exactly: the optimal network, known in closed form."""

    def __init__(self, schedule, prediction_type):
        super().__init__()
        self.schedule, self.prediction_type = schedule, prediction_type

    def forward(self, x, t, return_dict=True):
        shape = (-1,) + (1,) * (x.ndim - 1)
        alpha, sigma = self.schedule.alpha(t).float().view(shape), self.schedule.sigma(t).float().view(shape)
        eps = x / sigma
        out = {"epsilon": eps, "v_prediction": alpha * eps, "sample": torch.zeros_like(x)}[self.prediction_type]
        return (out,)


def test_diffusion_loss_targets():
    schedule = NoiseSchedule.from_config({"beta_schedule": "squaredcos_cap_v2"})
    x0 = torch.zeros(64, 3, 4, 4)
    for pred in ("epsilon", "v_prediction", "sample"):
        assert diffusion_loss(_Oracle(schedule, pred), schedule, pred, x0) < 1e-8
    # the oracle of one parameterisation is wrong for another
    assert diffusion_loss(_Oracle(schedule, "epsilon"), schedule, "v_prediction", x0) > 1e-2
