"""SIREN's initialisation bounds, WINNER's added noise against its formula, the spectral centroid on pure tones, and
the mechanism the paper names: at initialisation WINNER's activations carry high-frequency power SIREN's lack."""

import math

import pytest
import torch
from torch import nn

from diffkit.harness.data import highfreq_signal, inr_grid, sample_image
from diffkit.harness.winner import (Sine, siren, siren_init, spectral_centroid, winner_init,
                                    winner_noise_scales_empirical)


def _uniform_checks(weight: torch.Tensor, bound: float) -> None:
    assert weight.abs().max() <= bound and weight.abs().max() > 0.98 * bound
    # U(-a, a) has standard deviation a / sqrt(3)
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)


def test_siren_init_follows_sitzmann_bounds():
    model = siren(2, 1, hidden=256, layers=3, omega0=30.0)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert linears[0].weight.abs().max() <= 1 / 2  # first layer U(-1/fan_in, 1/fan_in), fan_in = 2
    assert linears[0].weight.std().item() == pytest.approx(0.5 / math.sqrt(3), rel=0.1)
    for layer in linears[1:-1]:
        _uniform_checks(layer.weight, math.sqrt(6 / 256) / 30)
    _uniform_checks(linears[-1].weight, math.sqrt(6 / 256) / 30)


def test_siren_audio_setting_has_first_omega0_3000_and_hidden_omega0_30():
    torch.manual_seed(0)
    model = siren(1, 1, hidden=256, layers=3, omega0=30.0, first_omega0=3000.0)
    sines = [m for m in model if isinstance(m, Sine)]
    assert [s.omega0 for s in sines] == [3000.0, 30.0, 30.0]
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert linears[0].weight.abs().max() <= 1.0  # U(-1/fan_in, 1/fan_in), fan_in = 1
    bound = math.sqrt(6 / 256) / 30.0  # hidden layers scaled by the hidden omega0, not the first one
    assert bound * 0.98 < linears[1].weight.abs().max() <= bound
    x = torch.linspace(-1, 1, 5)[:, None]
    torch.testing.assert_close(model[1](model[0](x)), torch.sin(3000.0 * model[0](x)))
    noisy = winner_init(siren(1, 1, hidden=256, layers=3, omega0=30.0, first_omega0=3000.0), 0.0, 3.0,
                        torch.Generator().manual_seed(1))
    # the noise on layer 1 has std s1 / 30 (the hidden omega0), far above the uniform part's sqrt(6/256) / 30 / sqrt(3)
    assert noisy[2].weight.std().item() == pytest.approx(3.0 / 30.0, rel=0.02)
    with pytest.raises(ValueError, match="first_omega0 must be > 0"):
        siren(1, 1, first_omega0=0)


def test_winner_adds_gaussian_noise_of_std_s_over_omega0_to_the_first_two_layers_only():
    s0, s1, omega0 = 600.0, 1.5, 30.0
    plain, noisy = siren(1, 1, hidden=256, layers=3, omega0=omega0), siren(1, 1, hidden=256, layers=3, omega0=omega0)
    torch.manual_seed(3)
    siren_init(plain)
    torch.manual_seed(3)  # the same uniform draw underneath, so the difference is the noise alone
    winner_init(noisy, s0, s1, generator=torch.Generator().manual_seed(0))
    diffs = [b.weight - a.weight for a, b in zip(plain, noisy) if isinstance(a, torch.nn.Linear)]
    assert diffs[0].std().item() == pytest.approx(s0 / omega0, rel=0.1)  # 256 draws
    assert diffs[1].std().item() == pytest.approx(s1 / omega0, rel=0.02)  # 65,536 draws
    assert abs(diffs[1].mean().item()) < 4 * (s1 / omega0) / 256
    # Gaussian, not uniform: the kurtosis of N(0, 1) is 3 (a uniform's is 1.8)
    z = diffs[1] / diffs[1].std()
    assert z.pow(4).mean().item() == pytest.approx(3.0, abs=0.1)
    assert all(d.abs().max() == 0 for d in diffs[2:])
    with pytest.raises(ValueError, match="s0"):
        winner_init(noisy, -1.0, 0.0)


def test_spectral_centroid_of_pure_tones_and_the_empirical_scales():
    n = 1024
    t = torch.arange(n, dtype=torch.float64)
    for cycles in (32, 128, 400):  # an exact rfft bin: all magnitude at f = cycles / n cycles per sample
        assert spectral_centroid(torch.sin(2 * math.pi * cycles * t / n)) == pytest.approx(2 * cycles / n, abs=1e-9)
    image = torch.sin(2 * math.pi * 64 * t / n).repeat(8, 1)  # every row the same tone
    assert spectral_centroid(image) == pytest.approx(2 * 64 / n, abs=1e-9)
    c = 0.3
    assert winner_noise_scales_empirical(c, 1) == pytest.approx((3500 * (1 - math.exp(-7 * c)), 3 * c))
    assert winner_noise_scales_empirical(c, 2) == pytest.approx((50 * (1 - math.exp(-5 * c)), 0.4 * c))
    low, high = winner_noise_scales_empirical(0.1, 1), winner_noise_scales_empirical(0.6, 1)
    assert high[0] > low[0] and high[1] > low[1]  # more high-frequency content, more noise
    with pytest.raises(ValueError, match="in_features"):
        winner_noise_scales_empirical(c, 3)


def _activation_centroid(model, coords) -> float:
    # spectral centroid of the mean |FFT| of the second sine layer's activations over the grid
    with torch.no_grad():
        h = model[:4](coords)
    spectrum = torch.fft.rfft(h.T.double(), dim=1).abs().mean(0)
    freqs = torch.fft.rfftfreq(len(coords), dtype=torch.float64)
    return (2 * (spectrum * freqs).sum() / spectrum.sum()).item()


def test_winner_moves_activation_spectra_to_high_frequencies():
    target = highfreq_signal(length=2048)
    coords = inr_grid(target).x_train
    torch.manual_seed(0)
    plain = siren(1, 1, hidden=128, layers=3)
    torch.manual_seed(0)
    noisy = winner_init(siren(1, 1, hidden=128, layers=3),
                        *winner_noise_scales_empirical(spectral_centroid(target), 1))
    # SIREN's activations at initialisation are low-pass (the bottleneck); WINNER's reach the target's band
    assert _activation_centroid(plain, coords) < 0.1 < _activation_centroid(noisy, coords)
    assert spectral_centroid(target) > 0.3


def test_inr_targets():
    signal = highfreq_signal(length=1024, low=0.2, high=0.3)
    spectrum = torch.fft.rfft(signal.double()).abs()
    freqs = torch.fft.rfftfreq(1024)
    assert spectrum[(freqs < 0.2) | (freqs > 0.3)].max() < 1e-3 * spectrum.max()
    assert signal.abs().max().item() == pytest.approx(1.0)
    image = sample_image(size=32)
    assert image.shape == (32, 32) and -1 <= image.min() < image.max() <= 1
    grid = inr_grid(image)
    assert grid.x_train.shape == (1024, 2) and torch.equal(grid.y_train.view(32, 32), image)
