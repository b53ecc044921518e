"""ScoreDVI: the Tweedie prior term against a Gaussian prior's closed form, lambda = 0 and K = 1 fitting the noisy
image, grouped networks = independent networks, the noise model's moments, its Tweedie approximation against the exact
posterior mean for Gaussian noise, the noise estimate and lambda rule, and a card run end to end."""

import math

import pytest
import torch

from diffkit.harness import validate_card
from diffkit.harness.experiment import run_method
from diffkit.harness.scoredvi import (DeepImagePrior, DenoiserBank, GroupedDnCNN, GroupedUNet, PoissonGaussianBlurNoise,
                                      ScoreDVI, box_blur, deep_image_prior, estimate_noise_std, prior_term, prior_weight,
                                      score_dvi)


pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(shape, seed, dtype=torch.float64):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_prior_term_gradient_with_a_gaussian_prior_is_the_closed_form():
    """Prior N(m, s0^2) per pixel and its exact MMSE denoiser at the variational noise level sigma:
    D(z) = m + s0^2 / (s0^2 + sigma^2) (z - m). The gradient of the prior term in mu is then (z - m) / (s0^2 +
    sigma^2) averaged over the Monte-Carlo samples (exactly, per realised sample), whose expectation is
    (mu - m) / (s0^2 + sigma^2)."""
    m, s0 = 0.3, 0.5
    mu = (_rand((1, 1, 1, 2, 2), 0) - 0.5).requires_grad_(True)
    log_var = torch.log(torch.full((1, 1, 1, 2, 2), 0.04, dtype=torch.float64))
    var = log_var.exp()
    pi = torch.ones_like(mu)
    seen = []

    def mmse(z, k):
        seen.append(z.clone())
        return m + s0**2 / (s0**2 + var.view(1, 1, 2, 2)) * (z - m)

    samples = 4000
    g = torch.Generator().manual_seed(1)
    (grad,) = torch.autograd.grad(prior_term(mu, log_var, pi, mmse, samples, g).sum(), mu)
    grad = grad * 4  # the term is a mean over the 4 pixels
    z = seen[0].view(samples, 1, 1, 1, 2, 2)
    torch.testing.assert_close(grad, ((z - m) / (s0**2 + var)).mean(0), rtol=1e-10, atol=1e-12)
    expected = (mu - m) / (s0**2 + var)
    standard_error = (var.sqrt() / (s0**2 + var)) / math.sqrt(samples)
    assert torch.all((grad - expected).abs() < 4 * standard_error)


def test_prior_term_value_and_log_variance_gradient():
    """The term's value is -1/2 log sigma^2 - mean(z) (z stands for log p in the forward pass, as officially), and
    log sigma^2 gets -1/2 from its own term plus the Tweedie path through z = mu + sigma n."""
    mu, log_var = torch.zeros(1, 1, 1, 1, 1, dtype=torch.float64), torch.zeros(1, 1, 1, 1, 1, dtype=torch.float64)
    log_var.requires_grad_(True)
    value = prior_term(mu, log_var, torch.ones_like(mu), lambda z, k: z, 3, torch.Generator().manual_seed(0))
    noise = torch.randn((3, 1, 1, 1, 1, 1), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(value, torch.tensor([-noise.mean().item()], dtype=torch.float64))
    (grad,) = torch.autograd.grad(value.sum(), log_var)
    torch.testing.assert_close(grad.flatten(), torch.tensor([-0.5], dtype=torch.float64))  # D(z) = z: no score


def test_without_the_prior_and_one_component_mu_fits_the_noisy_image():
    """lambda = 0, K = 1: nothing but the likelihood ties mu to y, so mu converges to the noisy image (a maximum-
    likelihood fit with a learned noise precision)."""
    torch.manual_seed(0)
    y = _rand((2, 1, 8, 8), 3, torch.float32)
    out = score_dvi(y, None, components=1, lam=0.0, iterations=100, lr=1e-2, width=8)
    start = (y - y.mean()).square().mean().sqrt()
    error = (out["mu"] - y).square().mean().sqrt()
    assert error < 0.1 * start, (error, start)


def test_grouped_networks_are_independent_networks():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 8, 8)
    for make in (lambda n: GroupedUNet(n, 1, 2, 4), lambda n: GroupedDnCNN(n, 1, 2, 4)):
        grouped = make(3)
        out = grouped(x)
        for i in range(3):
            single = make(1)
            state = {}
            for name, tensor in grouped.state_dict().items():
                if tensor.ndim == 0:
                    state[name] = tensor
                else:  # slice image i's block out of every grouped parameter and buffer
                    size = tensor.shape[0] // 3
                    state[name] = tensor[i * size:(i + 1) * size]
            single.load_state_dict(state)
            torch.testing.assert_close(single(x[i:i + 1]), out[i:i + 1], rtol=1e-5, atol=1e-5)
        # and one image's loss reaches only its own weights
        out[0].sum().backward()
        first = next(grouped.parameters()).grad
        size = first.shape[0] // 3
        assert first[size:].abs().sum() == 0 and first[:size].abs().sum() > 0


def test_noise_moments_and_correlation():
    """Constant x: per pixel Var = (gain x + sigma^2) / 4 after the 2 x 2 box; neighbours share half the box
    (correlation 1/2), diagonal ones a quarter, pixels two apart nothing."""
    noise = PoissonGaussianBlurNoise(gain=0.05, sigma=0.08, blur=2)
    x = torch.full((200, 1, 16, 16), 0.4)
    residual = (noise.sample(x, 0) - x).double()
    variance = (0.05 * 0.4 + 0.08**2) / 4
    assert abs(residual.mean()) < 0.002
    assert abs(residual.var() / variance - 1) < 0.02

    def corr(dy, dx):
        shifted = torch.roll(residual, (dy, dx), dims=(-2, -1))
        return ((residual * shifted).mean() / residual.var()).item()

    assert abs(corr(0, 1) - 0.5) < 0.02 and abs(corr(1, 0) - 0.5) < 0.02
    assert abs(corr(1, 1) - 0.25) < 0.02 and abs(corr(0, 2)) < 0.02


def test_tweedie_is_the_posterior_mean_for_correlated_gaussian_noise():
    """With gain -> 0 the noise is Gaussian with covariance sigma^2 B B^T; for a prior N(m, s0^2 I) the exact score
    of y is -C^-1 (y - m), C = s0^2 I + sigma^2 B B^T, and Tweedie must give the posterior mean m + s0^2 C^-1 (y - m)."""
    noise, s0, m = PoissonGaussianBlurNoise(gain=1e-12, sigma=0.3, blur=2), 0.5, 0.2
    side = 4
    n = side * side
    eye = torch.eye(n, dtype=torch.float64).view(n, 1, side, side)
    B = box_blur(eye, 2).view(n, n).T  # column j: the blur of pixel j
    C = s0**2 * torch.eye(n, dtype=torch.float64) + 0.09 * B @ B.T
    y = _rand((3, 1, side, side), 5) + 0.5
    residual = (y - m).view(3, n).T
    score = -(torch.linalg.solve(C, residual)).T.reshape(3, 1, side, side)
    exact = m + s0**2 * torch.linalg.solve(C, residual).T.reshape(3, 1, side, side)
    torch.testing.assert_close(noise.tweedie(y, score), exact, rtol=1e-9, atol=1e-9)


def test_noise_estimate_and_lambda_rule():
    g = torch.Generator().manual_seed(0)
    white = 0.5 + 0.1 * torch.randn(4, 1, 64, 64, generator=g)
    assert torch.allclose(estimate_noise_std(white), torch.full((4,), 0.1), rtol=0.05)
    blurred = 0.5 + box_blur(0.2 * torch.randn(4, 1, 64, 64, generator=g), 2)  # per-pixel std 0.1, correlated
    assert torch.allclose(estimate_noise_std(blurred, shuffle=2), torch.full((4,), 0.1), rtol=0.06)
    assert estimate_noise_std(blurred, shuffle=1).mean() < 0.06  # unshuffled, the correlation hides the noise
    levels = torch.tensor([5, 10.9, 15, 25.5, 30]) / 255
    assert prior_weight(0.5, levels).tolist() == [0.5, 0.5, 1.0, 1.0, 2.0]
    assert prior_weight(0.0, levels).tolist() == [0.0] * 5


def test_estimates_are_finite_and_denoise_on_a_tiny_run():
    clean = _rand((4, 1, 8, 8), 0, torch.float32) * 0.5 + 0.25
    y = PoissonGaussianBlurNoise().sample(clean, 1)
    torch.manual_seed(0)
    bank = DenoiserBank().eval()
    out = score_dvi(y, bank, iterations=3)
    assert out["estimate"].shape == y.shape and torch.isfinite(out["estimate"]).all()
    assert out["lam"].shape == (4,) and torch.all(out["lam"] > 0)
    assert deep_image_prior(y, iterations=3).shape == y.shape


def test_card_runs_end_to_end():
    card = validate_card({
        "name": "scoredvi_smoke", "paper": "test", "task": "denoise", "expected": "runs",
        "data": {"name": "sample_patches", "size": 8, "train": 64, "test": 4, "noise": {"name": "poisson_gaussian_blur"}},
        "model": {"name": "denoiser_bank", "width": 4, "depth": 3},
        "optimizer": {"name": "adam", "lr": 1e-3}, "budget": {"epochs": 1, "batch_size": 32},
        "methods": {"scoredvi": {"algorithm": {"name": "scoredvi", "iterations": 2, "width": 4}},
                    "dip": {"algorithm": {"name": "deep_image_prior", "iterations": 2, "width": 4}}},
        "baseline": "scoredvi", "seeds": [0], "metric": "psnr", "metrics": ["psnr", "psnr_noisy", "psnr_gain"],
    })
    for method in ("scoredvi", "dip"):
        record = run_method(card, method, 0, progress=False)
        assert math.isfinite(record["metrics"]["psnr"]) and len(record["curves"]["psnr_per_image"]) == 4
    with pytest.raises(ValueError, match="trains a denoiser_bank model, got ScoreUNet"):
        bad = dict(card, model={"name": "score_unet"})
        run_method(validate_card(bad), "scoredvi", 0, progress=False)


def test_bad_inputs():
    with pytest.raises(ValueError, match="components must be an int >= 1"):
        ScoreDVI(components=0)
    with pytest.raises(ValueError, match="lam must be a number >= 0"):
        ScoreDVI(lam=-1)
    with pytest.raises(ValueError, match="ema must be in \\[0, 1\\)"):
        DeepImagePrior(ema=1.0)
    with pytest.raises(ValueError, match="lam > 0 needs the prior's denoisers"):
        score_dvi(torch.zeros(1, 1, 8, 8), None)
    with pytest.raises(ValueError, match="multiples of 4"):
        score_dvi(torch.zeros(1, 1, 6, 6), None, lam=0.0)
    with pytest.raises(ValueError, match="y contains NaN"):
        score_dvi(torch.full((1, 1, 8, 8), float("nan")), None, lam=0.0)
    with pytest.raises(ValueError, match="gain must be a number > 0"):
        PoissonGaussianBlurNoise(gain=0)
    with pytest.raises(ValueError, match="sigma_max must be a non-empty list"):
        DenoiserBank(sigma_max=[])
    with pytest.raises(ValueError, match="in_channels 1 != out_channels 3"):
        DenoiserBank(1, 3)
