"""Noise2Score: Tweedie's formulas against posterior means computed by quadrature (Gaussian noise on a Gaussian and a
two-Gaussian prior; Gamma noise on its conjugate prior), the AR-DAE loss's minimiser (the score smoothed by sigma_a),
the annealing schedule, and the whole route (AR-DAE score + Tweedie) on a 1-D toy."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diffkit.harness import validate_card
from diffkit.harness.noise2score import (GammaNoise, GaussianNoise, Noise2Score, ScoreUNet, SupervisedDenoiser,
                                         annealed_sigma, ardae_loss, image_psnr)


def _score(log_density, y: torch.Tensor) -> torch.Tensor:
    y = y.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(log_density(y).sum(), y)
    return score


# --- Tweedie, Gaussian noise ---------------------------------------------------------------------------------------

def test_gaussian_tweedie_with_the_exact_score_is_the_posterior_mean_of_a_gaussian_prior():
    mu, tau, sigma = 0.3, 0.7, 0.4
    y = torch.linspace(-2, 3, 11, dtype=torch.float64)
    marginal = torch.distributions.Normal(mu, math.sqrt(tau**2 + sigma**2))  # y = x + sigma n, x ~ N(mu, tau^2)
    estimate = GaussianNoise(sigma).tweedie(y, _score(marginal.log_prob, y))
    posterior_mean = (tau**2 * y + sigma**2 * mu) / (tau**2 + sigma**2)  # the conjugate update
    torch.testing.assert_close(estimate, posterior_mean)


def test_gaussian_tweedie_matches_quadrature_on_a_two_gaussian_prior():
    sigma, centres, width = 0.5, torch.tensor([-1.0, 1.5], dtype=torch.float64), 0.3
    weights = torch.tensor([0.3, 0.7], dtype=torch.float64)

    def log_marginal(y):  # a mixture of N(c, width^2 + sigma^2)
        comp = torch.distributions.Normal(centres, math.sqrt(width**2 + sigma**2))
        return torch.logsumexp(weights.log() + comp.log_prob(y[:, None]), 1)

    y = torch.linspace(-2.5, 3.0, 23, dtype=torch.float64)
    estimate = GaussianNoise(sigma).tweedie(y, _score(log_marginal, y))
    # E[x | y] by quadrature: the prior density times the likelihood on a fine grid
    x = torch.linspace(-6, 7, 40_001, dtype=torch.float64)
    prior = (weights * torch.distributions.Normal(centres, width).log_prob(x[:, None]).exp()).sum(1)
    likelihood = torch.distributions.Normal(x, sigma).log_prob(y[:, None]).exp()
    posterior_mean = (likelihood * prior * x).sum(1) / (likelihood * prior).sum(1)
    torch.testing.assert_close(estimate, posterior_mean, rtol=1e-7, atol=1e-7)
    # the estimate is not the noisy value: the non-Gaussian prior pulls points towards the nearer mode
    assert (estimate - y).abs().max() > 0.3


# --- Tweedie, Gamma noise ------------------------------------------------------------------------------------------

def test_gamma_tweedie_with_the_exact_score_is_the_harmonic_posterior_mean_on_the_conjugate_prior():
    k, a, b = 5.0, 3.0, 2.0  # y | x ~ Gamma(k, rate k / x); the rate lam = k / x has the conjugate prior Gamma(a, b)
    lam = torch.linspace(1e-6, 60, 300_001, dtype=torch.float64)
    log_prior = torch.distributions.Gamma(a, b).log_prob(lam)

    def log_joint(y):  # log p(y | lam) + log p(lam) on the grid, from torch's Gamma density (not the formula)
        return torch.distributions.Gamma(k, lam).log_prob(y[:, None]) + log_prior

    y = torch.tensor([0.3, 1.0, 2.5, 6.0], dtype=torch.float64)
    score = _score(lambda v: torch.logsumexp(log_joint(v), 1), y)
    estimate = GammaNoise(k).tweedie(y, score)
    posterior = torch.softmax(log_joint(y), 1)
    inverse_x = (posterior * lam / k).sum(1)  # E[1 / x | y] by quadrature
    torch.testing.assert_close(estimate, 1 / inverse_x, rtol=1e-6, atol=1e-8)
    # by hand: lam | y ~ Gamma(a + k, b + y), so 1 / E[1/x | y] = k (b + y) / (a + k)
    torch.testing.assert_close(estimate, k * (b + y) / (a + k))
    # it is the harmonic, not the arithmetic posterior mean E[x | y] = k (b + y) / (a + k - 1)
    arithmetic = (posterior * k / lam).sum(1)
    assert (arithmetic / estimate).sub((a + k) / (a + k - 1)).abs().max() < 1e-4


def test_noise_models_sample_their_distributions_and_validate():
    x = torch.full((200_000,), 0.6)
    y = GammaNoise(100.0).sample(x, seed=0)
    assert y.mean().item() == pytest.approx(0.6, rel=2e-3)  # mean x
    assert y.var().item() == pytest.approx(0.6**2 / 100, rel=0.02)  # variance x^2 / k
    assert torch.equal(y, GammaNoise(100.0).sample(x, seed=0)) and not torch.equal(y, GammaNoise(100.0).sample(x, 1))
    n = GaussianNoise(0.1).sample(x, seed=0) - x
    assert n.mean().abs().item() < 1e-3 and n.std().item() == pytest.approx(0.1, rel=0.01)
    with pytest.raises(ValueError, match="k must be > 1"):
        GammaNoise(1.0)
    with pytest.raises(ValueError, match="sigma"):
        GaussianNoise(0)
    with pytest.raises(TypeError, match="score"):
        GaussianNoise(0.1).tweedie(x, 1.0)


# --- AR-DAE --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma_a", [0.5, 0.2])
def test_ardae_minimiser_is_the_score_smoothed_by_sigma_a(sigma_a):
    """For y ~ N(mu, v) and a linear s(y) = w y + c, the minimiser of E||sigma_a s(y + sigma_a u) + u||^2 is the score
    of y + sigma_a u ~ N(mu, v + sigma_a^2): w = -1 / (v + sigma_a^2), c = mu / (v + sigma_a^2). The true score
    (w = -1 / v) is reached only as sigma_a -> 0: the bias the annealing removes."""
    mu, v = 0.7, 1.0
    y = mu + math.sqrt(v) * torch.randn(400_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    score = nn.Linear(1, 1).double()
    optimizer = torch.optim.LBFGS(score.parameters(), lr=1, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        torch.manual_seed(1)  # the same u on every evaluation: a fixed quadratic objective
        optimizer.zero_grad()
        loss = ardae_loss(score, y, sigma_a)
        loss.backward()
        return loss

    optimizer.step(closure)
    w, c = score.weight.item(), score.bias.item()
    assert w == pytest.approx(-1 / (v + sigma_a**2), abs=0.01)
    assert c == pytest.approx(mu / (v + sigma_a**2), abs=0.01)
    assert abs(w - (-1 / v)) == pytest.approx(sigma_a**2 / (v + sigma_a**2), abs=0.01)


def test_annealing_schedule_and_the_algorithm_never_reads_clean_images():
    assert annealed_sigma(0, 100, 0.05, 0.001) == pytest.approx(0.05 * 0.99 + 0.001 * 0.01)
    assert annealed_sigma(99, 100, 0.05, 0.001) == pytest.approx(0.001)
    assert annealed_sigma(500, 100, 0.05, 0.001) == pytest.approx(0.001)  # held at the end
    values = [annealed_sigma(s, 10, 0.05, 0.001) for s in range(10)]
    steps = [a - b for a, b in zip(values, values[1:])]
    assert all(d == pytest.approx(steps[0]) for d in steps)  # linear
    with pytest.raises(ValueError, match="total"):
        annealed_sigma(0, 0, 0.05, 0.001)
    with pytest.raises(ValueError, match="sigma_end"):
        Noise2Score(sigma_start=0.01, sigma_end=0.1)

    model = ScoreUNet(1, 1, width=4)
    noisy = torch.rand(8, 1, 8, 8)
    state = SimpleNamespace(model=model, step=3, epochs=2, train_size=80, batch_size=8, logs={})
    batch = {"x": noisy, "y": torch.full_like(noisy, float("nan")), "index": torch.arange(8)}
    torch.manual_seed(0)
    loss, _ = Noise2Score()(state, batch)
    sigma_a = annealed_sigma(3, 20, 0.05, 0.001)
    torch.manual_seed(0)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ardae_loss(model, noisy, sigma_a).item())
    assert state.logs["sigma_a"] == pytest.approx(sigma_a)


def test_learned_score_and_tweedie_approach_the_posterior_mean_on_a_1d_toy():
    """The whole route on x ~ 0.5 N(-1, 0.2^2) + 0.5 N(1, 0.2^2), y = x + 0.4 n: an MLP trained by AR-DAE on y alone,
    then Tweedie. Its MSE to the clean x must come close to the Bayes (posterior-mean) MSE, far below the noisy MSE."""
    gen = torch.Generator().manual_seed(0)
    sigma, n = 0.4, 1024
    x = torch.where(torch.rand(n, 1, generator=gen) < 0.5, -1.0, 1.0) + 0.2 * torch.randn(n, 1, generator=gen)
    noise = GaussianNoise(sigma)
    y = noise.sample(x, seed=1)
    torch.manual_seed(0)
    score = nn.Sequential(nn.Linear(1, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1))
    optimizer = torch.optim.Adam(score.parameters(), lr=3e-3)
    steps = 800
    for step in range(steps):
        optimizer.zero_grad()
        ardae_loss(score, y, annealed_sigma(step, steps, 0.2, 0.02)).backward()
        optimizer.step()
    with torch.no_grad():
        estimate = noise.tweedie(y, score(y))
    grid = torch.linspace(-3, 3, 6001)
    prior = torch.distributions.Normal(torch.tensor([-1.0, 1.0]), 0.2).log_prob(grid[:, None]).exp().sum(1)
    likelihood = torch.distributions.Normal(grid, sigma).log_prob(y).exp()
    bayes = (likelihood * prior * grid).sum(1, keepdim=True) / (likelihood * prior).sum(1, keepdim=True)
    mse = (estimate - x).square().mean().item()
    bayes_mse, noisy_mse = (bayes - x).square().mean().item(), (y - x).square().mean().item()
    assert bayes_mse < mse < bayes_mse * 1.25 and mse < 0.5 * noisy_mse, (mse, bayes_mse, noisy_mse)


# --- network, metric, card ------------------------------------------------------------------------------------------

def test_score_unet_supervised_residual_and_psnr():
    model = ScoreUNet(1, 1, width=4)
    y = torch.rand(3, 1, 16, 16)
    assert model(y).shape == y.shape
    with pytest.raises(ValueError, match="even"):
        model(torch.rand(1, 1, 15, 16))
    torch.testing.assert_close(SupervisedDenoiser().estimate(model, y, None), y + model(y).detach())
    reference = torch.zeros(2, 1, 4, 4)
    estimate = reference.clone()
    estimate[0] += 0.1  # MSE 0.01 -> 20 dB
    estimate[1, 0, 0, 0] = 0.4  # MSE 0.16 / 16 = 0.01 -> 20 dB
    torch.testing.assert_close(image_psnr(estimate, reference), torch.tensor([20.0, 20.0]))


def test_denoise_cards_need_a_noise_model_and_a_denoiser():
    card = {"name": "t", "paper": "p", "task": "denoise", "model": {"name": "score_unet", "width": 4},
            "data": {"name": "sample_patches", "train": 64, "test": 8, "noise": {"name": "gaussian"}},
            "optimizer": {"name": "adam"}, "methods": {"n2s": {"algorithm": {"name": "noise2score"}}},
            "baseline": "n2s", "seeds": [0], "metric": "psnr", "metrics": ["psnr", "psnr_gain"], "expected": "e"}
    validate_card(card)
    with pytest.raises(ValueError, match="must be a denoiser, one of deep_image_prior, noise2score, scoredvi, supervised_denoiser, got 'erm'"):
        validate_card({**card, "methods": {"n2s": {"algorithm": {"name": "erm"}}}})
    with pytest.raises(ValueError, match="needs a noise model"):
        validate_card({**card, "data": {"name": "sample_patches"}})
    with pytest.raises(ValueError, match="noise 'gamma' has no parameter 'sigma'; allowed: k"):
        validate_card({**card, "data": {"name": "sample_patches", "noise": {"name": "gamma", "sigma": 0.1}}})


def test_zero_output_makes_the_supervised_residual_denoiser_start_as_the_identity():
    y = torch.rand(3, 1, 16, 16)
    torch.manual_seed(0)
    zero = ScoreUNet(1, 1, width=4, zero_output=True)
    torch.testing.assert_close(SupervisedDenoiser().estimate(zero, y, None), y, rtol=0, atol=0)
    # the output layer still trains: its weight gets a gradient although it starts at zero
    (zero(y) - 1).square().mean().backward()
    assert zero.decode[-1].weight.grad.abs().sum() > 0
    torch.manual_seed(0)
    assert not torch.allclose(SupervisedDenoiser().estimate(ScoreUNet(1, 1, width=4), y, None), y)
    with pytest.raises(TypeError, match="zero_output must be a bool"):
        ScoreUNet(1, 1, width=4, zero_output=1)
    # both shipped denoise cards train their supervised reference from the identity
    from diffkit.harness.cards import load_card

    for name in ("noise2score_gaussian", "noise2score_gamma"):
        card = load_card(f"cards/{name}.json")
        assert card["methods"]["supervised"]["model"] == {"zero_output": True}
