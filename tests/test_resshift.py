"""ResShift / UPSR: the schedule against the official formula, the forward process's moments, the sampler against a
transcription of the official code (w_u = 1 is ResShift bit for bit), an oracle run that stays on the forward
process, the uncertainty weight's closed form, and a falling training loss."""

import math

import numpy as np
import pytest
import torch

from diffkit.resshift import (ResShiftDenoiser, ResShiftSchedule, ResShiftScheduler, SRNet, bicubic_upsample,
                              resshift_loss, sample_resshift, uncertainty_weight)
from helpers import tiny_unet


pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (2, 3, 8, 8)


def _randn(seed, shape=SHAPE, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _official_sqrt_etas(steps, min_noise_level, etas_end, kappa, power):
    """UPSR ``get_named_eta_schedule("exponential")``, transcribed in numpy."""
    etas_start = min(min_noise_level / kappa, min_noise_level, math.sqrt(0.001))
    increaser = math.exp(1 / (steps - 1) * math.log(etas_end / etas_start))
    base = np.ones([steps]) * increaser
    power_timestep = np.linspace(0, 1, steps, endpoint=True) ** power * (steps - 1)
    return np.power(base, power_timestep) * etas_start


def test_exponential_schedule_is_the_official_one():
    schedule = ResShiftSchedule.exponential()
    reference = _official_sqrt_etas(5, 0.2, 0.99, 2.5, 0.2)
    assert np.allclose(schedule.sqrt_etas.numpy(), reference, rtol=1e-12)
    assert schedule.kappa == 2.5 and schedule.num_steps == 5
    assert math.isclose(schedule.sqrt_etas[0].item(), math.sqrt(0.001))
    assert math.isclose(schedule.sqrt_etas[-1].item(), 0.99)
    # ResShift's own floor min_noise_level / kappa wins when it is the smallest
    assert np.allclose(ResShiftSchedule.exponential(15, kappa=2.0, min_noise_level=0.04).sqrt_etas.numpy(),
                       _official_sqrt_etas(15, 0.04, 0.99, 2.0, 0.2), rtol=1e-12)


def test_forward_process_moments():
    """Per pixel, x_t has mean x0 + eta_t (y - x0) and variance kappa^2 eta_t w_u^2 (200k draws, float64)."""
    schedule = ResShiftSchedule.exponential()
    x0, y = _randn(0, (1, 1, 2, 2), torch.float64), _randn(1, (1, 1, 2, 2), torch.float64)
    weight = torch.tensor([[[[0.4, 0.55], [0.9, 1.0]]]], dtype=torch.float64)
    n, t = 200_000, 2
    noise = _randn(2, (n, 1, 2, 2), torch.float64)
    x_t = schedule.q_sample(x0.expand(n, -1, -1, -1), y.expand(n, -1, -1, -1), torch.full((n,), t), noise,
                            weight.expand(n, -1, -1, -1))
    eta = schedule.etas[t]
    assert torch.allclose(x_t.mean(0), (x0 + eta * (y - x0))[0], atol=0.01)
    assert torch.allclose(x_t.var(0), (schedule.kappa**2 * eta * weight**2)[0], rtol=0.01)


class OfficialUPSR:
    """UPSR's gaussian_diffusion.py with un = ones (its code path for ``un <= 0``: that is ResShift), transcribed:
    coefficients in float64 numpy, cast to float32 per use as ``_extract_into_tensor`` does. y_tilde = y_hat +
    f_t (y - y_hat) with f = ones is y."""

    def __init__(self, sqrt_etas, kappa):
        self.sqrt_etas, self.kappa = sqrt_etas, kappa
        self.etas = sqrt_etas**2
        self.etas_prev = np.append(0.0, self.etas[:-1])

    @staticmethod
    def _extract(arr, t, shape):
        res = torch.from_numpy(arr)[t].float()
        while len(res.shape) < len(shape):
            res = res[..., None]
        return res.expand(shape)

    def q_sample(self, x_start, y, un, t, noise):
        return (x_start + self._extract(self.etas, t, x_start.shape) * (y - x_start)
                + self._extract(self.sqrt_etas * self.kappa, t, x_start.shape) * un * noise)

    def prior_sample(self, y, un, noise):
        t = torch.tensor([len(self.etas) - 1] * y.shape[0]).long()
        return y + self._extract(self.sqrt_etas * self.kappa, t, y.shape) * un * noise

    def ddim_step(self, pred_xstart, x, y, t):
        etas = self._extract(self.etas, t, x.shape)
        etas_prev = self._extract(self.etas_prev, t, x.shape)
        m_t = torch.sqrt(etas_prev / etas)
        k_t = 1 - etas_prev - (1 - etas) * m_t
        y_t = (etas_prev - torch.sqrt(etas * etas_prev)) * y
        return pred_xstart * k_t + x * m_t + y_t

    def scale_input(self, inputs, t):
        std = torch.sqrt(self._extract(self.etas, t, inputs.shape) * self.kappa**2 * 0.3 + 0.5**2)
        return inputs / std


def _predictor(seed=0):
    """A fixed random map standing in for a network, so every step's prediction depends on x_t."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(3, 9, generator=g) * 0.3

    def model(inputs, t):
        return torch.einsum("oc,bchw->bohw", mix, inputs) + 0.01 * t.float().view(-1, 1, 1, 1)

    return model


@pytest.mark.parametrize("weight", [None, "ones"])
def test_unit_weight_reproduces_official_resshift_bit_for_bit(weight):
    schedule = ResShiftSchedule.exponential()
    official = OfficialUPSR(schedule.sqrt_etas.numpy(), schedule.kappa)
    x0, y, noise, g_y = _randn(0), _randn(1), _randn(2), _randn(3)
    w = torch.ones(SHAPE) if weight == "ones" else None
    ones = torch.ones(SHAPE)
    t = torch.tensor([1, 4])
    assert torch.equal(schedule.q_sample(x0, y, t, noise, w), official.q_sample(x0, y, ones, t, noise))
    x_T = schedule.prior_sample(y, noise, w)
    assert torch.equal(x_T, official.prior_sample(y, ones, noise))

    model = _predictor()
    ours = sample_resshift(ResShiftDenoiser(model, schedule), x_T, y, cond=[g_y, y])
    x = official.prior_sample(y, ones, noise)
    for i in reversed(range(5)):
        tt = torch.tensor([i] * 2)
        pred = model(torch.cat([official.scale_input(x, tt), g_y, y], 1), tt)
        x = official.ddim_step(pred, x, y, tt)
    assert torch.equal(ours, x)


def test_oracle_stays_on_the_forward_process_and_ends_at_x0():
    """With the true x0 as prediction, the deterministic step keeps the starting noise: from x_T = q_sample(x0, y,
    T - 1, eps, w_u), every x_{t-1} is q_sample(x0, y, t - 1, eps, w_u), whatever w_u; the last step lands on x0
    exactly. (Sampling starts from ``prior_sample``, which takes eta_T = 0.98 for 1 as the official code does.)"""
    schedule = ResShiftSchedule.exponential()
    x0, y, noise = _randn(0, dtype=torch.float64), _randn(1, dtype=torch.float64), _randn(2, dtype=torch.float64)
    weight = uncertainty_weight(_randn(3, dtype=torch.float64) * 0.1 + y, y)
    assert weight.min() < 0.5 and weight.max() == 1  # a mix of flat and uncertain pixels
    seen = []
    oracle = ResShiftDenoiser(lambda inputs, t: x0, schedule)
    x_T = schedule.q_sample(x0, y, 4, noise, weight)
    out = sample_resshift(oracle, x_T, y, callback=lambda info: seen.append(info))
    assert torch.equal(out, x0)
    for info in seen[:-1]:
        assert torch.allclose(info["x"], schedule.q_sample(x0, y, info["t"] - 1, noise, weight), atol=1e-12)
    assert [info["t"] for info in seen] == [4, 3, 2, 1, 0]


def test_uncertainty_weight_closed_form():
    y = torch.zeros(1, 1, 1, 4)
    g_y = torch.tensor([[[[0.0, 0.1, 0.2, -0.6]]]])  # |g - y| / 2 = 0, 0.05, 0.1, 0.3
    assert torch.allclose(uncertainty_weight(g_y, y), torch.tensor([[[[0.4, 0.7, 1.0, 1.0]]]]))
    assert torch.allclose(uncertainty_weight(g_y, y, a=0.2, b=0.0), torch.tensor([[[[0.0, 0.25, 0.5, 1.0]]]]))


def test_input_std_and_denoiser_inputs():
    schedule = ResShiftSchedule.exponential()
    x = _randn(0)
    expected = math.sqrt(0.3 * 2.5**2 * schedule.etas[3].item() + 0.25)
    assert torch.allclose(schedule.input_std(3, x).flatten(), torch.tensor([expected]))
    seen = {}

    def model(inputs, t):
        seen.update(inputs=inputs, t=t)
        return inputs[:, :3]

    cond = [_randn(1), _randn(2)]
    ResShiftDenoiser(model, schedule)(x, 3, cond)
    assert torch.allclose(seen["inputs"], torch.cat([x / expected, *cond], 1))
    assert seen["t"].tolist() == [3, 3] and seen["t"].dtype == torch.long


def test_gradients_flow_through_the_sampler():
    schedule = ResShiftSchedule.exponential()
    y = _randn(1)
    x_T = schedule.prior_sample(y, _randn(2)).requires_grad_(True)
    out = sample_resshift(ResShiftDenoiser(_predictor(), schedule), x_T, y, cond=[y, y])
    (grad,) = torch.autograd.grad(out.sum(), x_T)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_training_loss_falls():
    """The x0 loss of a tiny UNet on one batch of 8x8 'images' falls within 40 Adam steps."""
    torch.manual_seed(0)
    unet = tiny_unet()
    unet.conv_in = torch.nn.Conv2d(9, 8, 3, padding=1)  # [x_t, g(y0), y]
    schedule = ResShiftSchedule.exponential()
    denoiser = ResShiftDenoiser(unet, schedule)
    x0 = torch.tanh(_randn(0) * 2)
    y = bicubic_upsample(torch.nn.functional.avg_pool2d(x0, 2), 2)
    optimizer = torch.optim.Adam(unet.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        loss = resshift_loss(denoiser, x0, y, [y, y], uncertainty_weight(y + 0.05, y), generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_sr_net_is_bicubic_plus_a_residual():
    net = SRNet(factor=2, width=8, depth=2)
    y0 = _randn(0, (2, 3, 4, 4))
    torch.nn.init.zeros_(net.body[-2].weight)
    torch.nn.init.zeros_(net.body[-2].bias)
    assert torch.allclose(net(y0), bicubic_upsample(y0, 2))
    assert net(y0).shape == (2, 3, 8, 8)


def test_scheduler_config_builds_the_schedule(tmp_path):
    scheduler = ResShiftScheduler(num_steps=4, kappa=2.0)
    scheduler.save_pretrained(tmp_path)
    loaded = ResShiftScheduler.from_pretrained(tmp_path)
    assert torch.equal(loaded.schedule.sqrt_etas, ResShiftSchedule.exponential(4, kappa=2.0).sqrt_etas)


def test_bad_inputs():
    with pytest.raises(ValueError, match="kappa must be a number > 0"):
        ResShiftSchedule.exponential(kappa=0)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 2"):
        ResShiftSchedule.exponential(num_steps=1)
    with pytest.raises(ValueError, match="etas_end must be a number > 0.0 and <= 1.0"):
        ResShiftSchedule.exponential(etas_end=1.5)
    with pytest.raises(ValueError, match="sqrt_etas must increase"):
        ResShiftSchedule([0.5, 0.2], 1.0)
    schedule = ResShiftSchedule.exponential()
    x = _randn(0)
    with pytest.raises(ValueError, match="timesteps must lie in \\[0, 4\\]"):
        schedule.q_sample(x, x, 5, x)
    with pytest.raises(ValueError, match="y must have the shape of the other images"):
        schedule.q_sample(x, x[:1], 0, x)
    with pytest.raises(ValueError, match="noise contains NaN"):
        schedule.prior_sample(x, x * float("nan"))
    with pytest.raises(ValueError, match="b must be a number >= 0.0 and <= 1.0"):
        uncertainty_weight(x, x, b=1.5)
    with pytest.raises(TypeError, match="schedule must be a ResShiftSchedule"):
        ResShiftDenoiser(_predictor(), ResShiftScheduler())
    with pytest.raises(ValueError, match="x must be a \\(B, C, H, W\\) tensor"):
        sample_resshift(ResShiftDenoiser(_predictor(), schedule), x[0], x)
