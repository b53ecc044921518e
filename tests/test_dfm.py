"""Diffusion with forward models: forward models against their transposes, the GP posterior against
scikit-learn's, the loss's reach (which outputs it supervises in each mode), and the sampler against the exact
posterior of a Gaussian-process world, driven by the exact x0-predictor (Gaussian conditioning)."""

import pytest
import torch
from diffusers import DDIMScheduler

from diffkit import NoiseSchedule, make_timesteps
from diffkit.dfm import (
    CropView, GaussianProcessSignals, MaskView, SignalMLP, WindowView, dfm_loss, merge_lifted, observe, regress_signal,
    sample_signal, train_dfm,
)


def random_mask(n, generator=None):
    return (torch.rand(n, 1, 6, 6, generator=generator) < 0.5).float()


@pytest.mark.parametrize("forward_model", [WindowView(20, 7, channels=2), CropView(8, 5, channels=3), MaskView((3, 6, 6), random_mask)])
def test_lift_is_the_transpose_of_the_forward_model(forward_model):
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(4, *forward_model.signal_shape, generator=g, dtype=torch.float64)
    view = forward_model.random_views(4, g)
    observation = forward_model(signal, view)
    other = torch.randn(observation.shape, generator=g, dtype=torch.float64)
    canvas, mask = forward_model.lift(other, view)
    assert torch.allclose((observation * other).sum(), (signal * canvas).sum())  # <A s, o> = <s, A^T o>
    lifted, mask = forward_model.lift(observation, view)
    assert torch.allclose(lifted, signal * mask)  # lifting an observation recovers the signal where it is seen


def test_merged_views_recover_the_signal_on_their_union():
    forward_model = WindowView(16, 6)
    signal = torch.randn(2, 1, 16)
    views = [torch.tensor([0, 3]), torch.tensor([4, 8])]
    canvas, mask = merge_lifted([forward_model.lift(forward_model(signal, v), v) for v in views])
    assert torch.allclose(canvas, signal * mask)
    assert mask[0, 0].tolist() == [1.0] * 10 + [0.0] * 6


def test_bad_views_are_refused():
    with pytest.raises(ValueError, match="start indices"):
        WindowView(16, 6)(torch.zeros(2, 1, 16), torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="signal must have shape"):
        CropView(8, 5)(torch.zeros(2, 1, 8, 8), torch.zeros(2, 2))


def test_gp_posterior_matches_scikit_learn():
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF

    gp = GaussianProcessSignals(24, length_scale=3.0, jitter=1e-6)
    signal, _ = gp.sample(1, torch.Generator().manual_seed(0))
    index = torch.arange(5, 13)
    weights, means, covariance = gp.posterior(signal[0, 0, index], index)
    reference = GaussianProcessRegressor(RBF(3.0), alpha=1e-6, optimizer=None)
    reference.fit(index[:, None].numpy(), signal[0, 0, index].double().numpy())
    # off the window, where the jitter conventions (ours on the prior, sklearn's on the data) agree
    unseen = torch.cat([torch.arange(5), torch.arange(13, 24)])
    mean, cov = reference.predict(unseen[:, None].double().numpy(), return_cov=True)
    assert torch.allclose(weights, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(means[1][unseen], torch.from_numpy(mean), atol=1e-6)
    assert torch.allclose(covariance[unseen][:, unseen], torch.from_numpy(cov), atol=1e-5)
    assert torch.allclose(means[1][index], signal[0, 0, index].double(), atol=1e-4)  # the window is reproduced


def test_bimodal_posterior_is_a_coin_flip_off_the_bump():
    gp = GaussianProcessSignals(32, bump=2.0, bump_width=10)
    signals, signs = gp.sample(1, torch.Generator().manual_seed(1))
    weights, means, _ = gp.posterior(signals[0, 0, :12], torch.arange(12))
    assert torch.allclose(weights, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(means[1] - means[0], 2 * gp.bump)  # the modes differ by twice the bump, nothing else
    weights, _, _ = gp.posterior(signals[0, 0, 20:], torch.arange(20, 32))  # a window on the bump decides the sign
    assert weights[(signs[0] + 1) // 2] > 0.99


def schedule_and_config():
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                              clip_sample=False)
    return NoiseSchedule.from_config(scheduler.config), scheduler.config


@pytest.mark.parametrize("mode, supervised", [("dfm", "everywhere"), ("regression", "everywhere"), ("observation", "target")])
def test_the_loss_supervises_the_signal_only_where_views_see_it(mode, supervised):
    """DFM's extra clean views reach the whole signal; diffusion on observations only reaches the target view."""
    forward_model = WindowView(16, 4)
    schedule, _ = schedule_and_config()
    g = torch.Generator().manual_seed(0)
    observations, views = observe(forward_model, torch.randn(64, 1, 16, generator=g), 6, g)
    output = torch.zeros(64, 1, 16, requires_grad=True)
    seen_t = []

    def generator(inputs, t, return_dict=False):
        seen_t.append(t)
        return (output + 0 * inputs[:, :1],)

    dfm_loss(generator, forward_model, schedule, observations, views, num_context=2, mode=mode, generator=g).backward()
    reached = output.grad.abs().sum(1) > 0  # (B, L)
    target_mask = forward_model.lift(observations[:, 2], views[:, 2])[1][:, 0] > 0
    assert torch.equal(reached & ~target_mask, torch.zeros_like(reached)) == (supervised == "target")
    assert reached[target_mask].all()
    assert (seen_t[0] == 999).all() == (mode == "regression")


class ExactGenerator:
    """E[S | context, noisy target] for the GP world: Gaussian conditioning on the seen coordinates and on
    alpha_t S_w + sigma_t eps, read from the generator's inputs (canvas and mask channels) as a network would."""

    def __init__(self, gp, schedule):
        self.k, self.schedule = gp.covariance, schedule

    def __call__(self, inputs, t, return_dict=False):
        inputs = inputs.double()
        alpha, sigma = self.schedule.alpha(t).item(), self.schedule.sigma(t).item()
        out = []
        for context, context_mask, target, target_mask in zip(*inputs.unbind(1)):
            c, w = context_mask.nonzero().flatten(), target_mask.nonzero().flatten()
            cross = torch.cat([self.k[:, c], alpha * self.k[:, w]], 1)
            joint = torch.cat([
                torch.cat([self.k[c][:, c], alpha * self.k[c][:, w]], 1),
                torch.cat([alpha * self.k[w][:, c], alpha**2 * self.k[w][:, w] + sigma**2 * torch.eye(len(w))], 1),
            ])
            values = torch.cat([context[c], target[w]])
            out.append(cross @ torch.linalg.solve(joint, values))
        return (torch.stack(out)[:, None].float(),)


def test_sampling_with_the_exact_generator_draws_the_exact_posterior():
    """With the exact x0-predictor, DDIM on each target view in turn (autoregressive, views covering the signal)
    samples p(S | context): mean and per-coordinate std against the closed form."""
    gp = GaussianProcessSignals(24, length_scale=3.0)
    forward_model = WindowView(24, 8)
    schedule, config = schedule_and_config()
    signal, _ = gp.sample(1, torch.Generator().manual_seed(3))
    n = 400
    context_view = torch.full((n,), 8)
    context = [(forward_model(signal.expand(n, -1, -1), context_view), context_view)]
    targets = [torch.full((n,), 0), torch.full((n,), 16)]
    timesteps = make_timesteps(schedule, "ddim", 100, config)
    samples, observations = sample_signal(ExactGenerator(gp, schedule), forward_model, schedule, context, targets,
                                          timesteps, generator=torch.Generator().manual_seed(0))
    _, means, covariance = gp.posterior(signal[0, 0, 8:16], torch.arange(8, 16))
    std = covariance.diagonal().sqrt()
    s = samples[:, 0].double()
    assert ((s.mean(0) - means[1]).abs() / gp.prior_std()).max() < 0.2  # Monte Carlo error ~ 1 / sqrt(400) = 0.05
    far = std > 0.5
    ratio = s.std(0)[far] / std[far]
    assert ((ratio > 0.8) & (ratio < 1.2)).all(), ratio
    assert s.std(0)[8:16].max() < 0.05  # the context window is reproduced
    assert torch.allclose(forward_model(samples, targets[1]), observations[1], atol=1e-4)


def test_training_lowers_the_loss():
    gp = GaussianProcessSignals(16, length_scale=3.0)
    forward_model = WindowView(16, 6)
    schedule, _ = schedule_and_config()
    g = torch.Generator().manual_seed(0)
    observations, views = observe(forward_model, gp.sample(512, g)[0], 4, g)
    model, losses = train_dfm(SignalMLP(1, 16, 64, 2), forward_model, schedule, observations, views, steps=300,
                              batch_size=64, ema_decay=None, progress=False)
    assert sum(losses[-50:]) / 50 < 0.8 * sum(losses[:50]) / 50


def test_every_view_of_a_group_serves_as_context_and_as_target(monkeypatch):
    """The official loaders pick a scene's context and target frames at random for every item; a fixed order (the
    first stored view always the context) lets a generator memorise each group's one context and over-fit."""
    import diffkit.dfm.training as training

    seen = []
    real_loss = training.dfm_loss

    def spy(model, forward_model, schedule, observations, views, **kwargs):
        seen.append((views.clone(), observations.clone()))
        return real_loss(model, forward_model, schedule, observations, views, **kwargs)

    monkeypatch.setattr(training, "dfm_loss", spy)
    forward_model = WindowView(16, 6)
    schedule, _ = schedule_and_config()
    g = torch.Generator().manual_seed(0)
    observations, views = observe(forward_model, GaussianProcessSignals(16, 3.0).sample(1, g)[0], 4, g)
    train_dfm(SignalMLP(1, 16, 16, 2), forward_model, schedule, observations, views, steps=40, batch_size=2,
              ema_decay=None, progress=False)
    stored = views[0].tolist()
    first = {v[0].tolist() for batch, _ in seen for v in batch}
    assert first == set(stored)  # each stored view was the context at some step
    for batch, obs in seen:  # and each observation still travels with its own view
        for group_views, group_obs in zip(batch, obs):
            for k, view in enumerate(group_views.tolist()):
                assert torch.equal(group_obs[k], observations[0, stored.index(view)])


@pytest.mark.slow
@pytest.mark.parametrize("bump", [0.0, 2.0])
def test_trained_dfm_samples_the_gp_posterior(bump):
    """Trained from windows alone (10,000 steps, ~2 minutes), DFM given the first window samples p(S | window):
    mean near the posterior mean, spread near the posterior's off the window and ~0 on it, and in the bimodal
    world both signs of the bump. The regressor trained by the same loss has no spread."""
    length, width, samples = 32, 12, 300
    gp = GaussianProcessSignals(length, 4.0, bump=bump, bump_width=10)
    forward_model = WindowView(length, width)
    schedule, config = schedule_and_config()
    g = torch.Generator().manual_seed(0)
    observations, views = observe(forward_model, gp.sample(20000, g)[0], 5, g)
    train = lambda mode: train_dfm(SignalMLP(1, length, 256, 3), forward_model, schedule, observations, views,  # noqa: E731
                                   steps=10000, batch_size=256, max_context=2, mode=mode, seed=0, progress=False)[0]
    dfm, regressor = train("dfm"), train("regression")
    timesteps = make_timesteps(schedule, "ddim", 50, config)
    context_view, targets = torch.zeros(samples, dtype=torch.long), [torch.full((samples,), 10), torch.full((samples,), 20)]
    prior_std, off = gp.prior_std(), torch.arange(length) >= width
    rmse, ratio, on, plus = [], [], [], []
    for c, truth in enumerate(gp.sample(4, torch.Generator().manual_seed(100))[0]):
        context = [(forward_model(truth[None].expand(samples, -1, -1), context_view), context_view)]
        weights, means, cov = gp.posterior(truth[0, :width], torch.arange(width))
        mean = (weights[:, None] * means).sum(0)
        std = (cov.diagonal() + (weights[:, None] * (means - mean) ** 2).sum(0)).sqrt()
        with torch.no_grad():
            s = sample_signal(dfm, forward_model, schedule, context, targets, timesteps,
                              generator=torch.Generator().manual_seed(c))[0][:, 0].double()
            regressed = regress_signal(regressor, forward_model, schedule, context, targets[0])[:, 0]
        rmse.append(((s.mean(0) - mean) ** 2).mean().sqrt() / prior_std.mean())
        ratio.append((s.std(0) / std)[off].median())
        on.append((s.std(0)[:width] / prior_std[:width]).mean())
        plus.append((((s - (means[0] + means[1]) / 2) @ gp.bump) > 0).double().mean())
        assert regressed.std(0).max() < 1e-5
    assert torch.stack(rmse).mean() < 0.5
    assert 0.7 < torch.stack(ratio).mean() < 1.3
    assert torch.stack(on).mean() < 0.2
    if bump:
        assert 0.3 < torch.stack(plus).mean() < 0.7
