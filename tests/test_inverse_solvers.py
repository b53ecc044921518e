"""RED-Diff, DPS and PiGDM on a Gaussian prior, where the MAP, the posterior and its marginals are known exactly."""

import math

import pytest
import torch

from diffkit import Denoiser, NoiseSchedule, convert, make_timesteps, sample_ddim
from diffkit.inverse import OPERATORS as SPECS
from diffkit.inverse import Inpainting, SuperResolution, dps, make_operator, pigdm, random_mask, red_diff
from diffkit.inverse.red_diff import red_diff_timesteps
from helpers import tiny_unet


SHAPE = (1, 3, 4, 4)


pytestmark = pytest.mark.usefixtures("one_thread")


class GaussianPrior(torch.nn.Module):
    """The exact prediction for data N(m, diag(v)): eps = sigma (x - alpha m) / (alpha^2 v + sigma^2), returned as
    ``prediction_type``; ``forbid_grad`` asserts that the network is never run with autograd on."""

    def __init__(self, schedule, mean, var, prediction_type="epsilon", forbid_grad=False):
        super().__init__()
        self.schedule, self.mean, self.var = schedule, mean, var
        self.prediction_type, self.forbid_grad = prediction_type, forbid_grad

    def forward(self, x, t, return_dict=True):
        assert not (self.forbid_grad and (torch.is_grad_enabled() or x.requires_grad)), "backprop through the network"
        t = t.reshape(-1)[0].double()
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        eps = sigma * (x - alpha * self.mean) / (alpha**2 * self.var + sigma**2)
        return (convert(eps, "epsilon", self.prediction_type, x, alpha, sigma),)


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _matrix(f, shape):
    """The matrix of a linear map on tensors of ``shape`` (batch 1), column by column."""
    n = math.prod(shape[1:])
    return f(torch.eye(n, dtype=torch.float64).reshape(n, *shape[1:])).reshape(n, -1).T


def _gaussian_posterior(A, m, S, y, sigma_y):
    """Mean m + S A^T (A S A^T + sigma_y^2 I)^-1 (y - A m) (= the MAP) and covariance of x | y for x ~ N(m, S)."""
    K = A @ S @ A.T + sigma_y**2 * torch.eye(len(A), dtype=torch.float64)
    gain = S @ A.T @ torch.linalg.pinv(K)  # pinv: an inpainting y has all-zero rows where nothing is observed
    return m + gain @ (y - A @ m), S - gain @ A @ S


OPERATORS = {
    "inpaint_random": lambda sigma_y=0.0: Inpainting(random_mask(4, 0.5, seed=1), sigma_y),
    "sr2": lambda sigma_y=0.0: SuperResolution(2, sigma_y),
}
WEIGHTS = {  # w(rho) of each weighting, written out independently of diffkit's table
    "linear": lambda r: r,
    "sqrt": math.sqrt,
    "square": lambda r: r * r,
    "log": lambda r: math.log(1 + r),
    "const": lambda r: 1.0,
}


def _red_diff_problem(operator, decoder, seed=0):
    """A prior N(m, diag(V)) on the image (or the latent, with a decoder) and a measurement of a draw from it."""
    latent_shape = SHAPE if decoder is None else (1, 3, 2, 2)
    g = torch.Generator().manual_seed(seed)
    mean = 0.5 * torch.randn(latent_shape, generator=g, dtype=torch.float64)
    var = (0.1 + 0.5 * torch.rand(latent_shape, generator=g, dtype=torch.float64)) ** 2
    x = mean + var.sqrt() * torch.randn(latent_shape, generator=g, dtype=torch.float64)
    decode = (lambda z: z) if decoder is None else decoder
    y = operator.measure(decode(x), g)
    return mean, var, y


def _upsample_mix(z):
    """A linear 'decoder' from (B, 3, 2, 2) latents to (B, 3, 4, 4) images: nearest upsampling, then colour mixing."""
    mix = torch.tensor([[0.8, 0.3, 0.0], [0.1, 0.9, 0.2], [0.0, -0.4, 1.0]], dtype=z.dtype)
    return torch.einsum("oc,bchw->bohw", mix, z.repeat_interleave(2, -2).repeat_interleave(2, -1))


@pytest.mark.parametrize(
    "op_name, weighting, decoder",
    [
        ("inpaint_random", "linear", None),
        ("sr2", "linear", None),
        ("sr2", "sqrt", None),
        ("sr2", "square", None),
        ("sr2", "log", None),
        ("sr2", "const", None),
        ("inpaint_random", "linear", _upsample_mix),
    ],
)
def test_red_diff_converges_to_the_gaussian_map(op_name, weighting, decoder):
    """RED-Diff's fixed point is a Gaussian MAP, derived exactly here.

    At one noise level (a schedule with constant alpha_bar, so every step has the same alpha, sigma and
    rho = sigma / alpha) and x_t = alpha mu + sigma eps, the exact eps of the prior N(m, V) gives
    E[eps_hat - eps] = sigma alpha (mu - m) / (alpha^2 V + sigma^2) = rho (V + rho^2 I)^-1 (mu - m). RED-Diff's
    prior gradient, lambda_t (eps_hat - eps) / n_mu with lambda_t = lam w(rho), is therefore in expectation
    lam w(rho) rho / n_mu S^-1 (mu - m): the gradient of a Gaussian log-prior with covariance S = V + rho^2 I
    (the prior seen through noise rho), not V. The data gradient is obs_weight / n_y A^T (A mu - y). Their sum
    vanishes at the MAP m + S A^T (A S A^T + sigma_y^2 I)^-1 (y - A m) exactly when
    obs_weight = lam w(rho) rho n_y / (n_mu sigma_y^2). Adam with a constant step then only fluctuates around
    that point, by O(sqrt(lr)) (~2% here); the mean of 64 independent runs on the same y cuts that 8-fold.
    With a linear decoder D, mu is the latent and A becomes A D (n_mu = 12 latent entries, n_y = 48).
    """
    rho, sigma_y, lam, lr, steps, batch = 2.0, 1.0, 0.25, 0.01, 1500, 64
    operator = OPERATORS[op_name](sigma_y)
    mean, var, y = _red_diff_problem(operator, decoder)
    schedule = NoiseSchedule(torch.full((steps,), 1 / (1 + rho**2), dtype=torch.float64))
    denoiser = Denoiser(GaussianPrior(schedule, mean, var), schedule, "epsilon")
    n_mu, n_y = mean[0].numel(), y[0].numel()
    obs_weight = lam * WEIGHTS[weighting](rho) * rho * n_y / (n_mu * sigma_y**2)

    A = _matrix(operator.forward if decoder is None else (lambda z: operator.forward(decoder(z))), mean.shape)
    S = torch.diag(var.flatten() + rho**2)
    expected = _gaussian_posterior(A, mean.flatten(), S, y.flatten(), sigma_y)[0].reshape(mean.shape)

    if decoder is None:
        init, start = "pinv", operator.pinv(y)
    else:
        init = start = torch.zeros(batch, *mean.shape[1:], dtype=torch.float64)
    out = red_diff(
        denoiser, y.expand(batch, -1, -1, -1), operator, num_steps=steps, lr=lr, lam=lam, weighting=weighting,
        noise_levels="model", obs_weight=obs_weight, generator=torch.Generator().manual_seed(1), init=init, decoder=decoder,
    )
    expected_image = expected if decoder is None else decoder(expected)
    start_image = start[:1] if decoder is None else decoder(start[:1])

    def rel(a):
        return ((a - expected_image).flatten(1).norm(dim=1) / expected_image.norm()).max().item()

    assert rel(start_image) > 0.4
    assert rel(out) < 0.06  # every run, one Adam fluctuation away
    assert rel(out.mean(0, keepdim=True)) < 0.01  # the fixed point itself


def _linear_schedule_denoiser(prediction_type="epsilon", forbid_grad=False, var=None, seed=0):
    schedule = NoiseSchedule.from_config({"beta_schedule": "linear"})
    g = torch.Generator().manual_seed(seed)
    mean = 0.5 * torch.randn(SHAPE, generator=g, dtype=torch.float64)
    if var is None:
        var = (0.1 + 0.5 * torch.rand(SHAPE, generator=g, dtype=torch.float64)) ** 2
    model = GaussianPrior(schedule, mean, var, prediction_type, forbid_grad)
    return Denoiser(model, schedule, prediction_type), mean, var


def test_red_diff_runs_without_network_gradients_over_descending_timesteps():
    """The prior term is a stop-gradient residual: the network never runs under autograd. Timesteps are
    range(0, 1000, 1000 // num_steps), visited from the noisiest down."""
    denoiser, mean, _ = _linear_schedule_denoiser(forbid_grad=True)
    op = SuperResolution(2)
    seen = []
    red_diff(denoiser, op.forward(mean), op, num_steps=40, callback=lambda info: seen.append(info["t"]))
    assert seen == list(range(0, 1000, 25))[::-1]


def test_red_diff_defaults_are_the_official_benchmark_run():
    """sample_batch.sh: 1,000 steps, GRAD_WEIGHT (lam) 1.0, the yaml's lr 0.1; linear weighting, obs_weight 1."""
    import inspect

    defaults = {k: v.default for k, v in inspect.signature(red_diff).parameters.items()}
    assert (defaults["num_steps"], defaults["lr"], defaults["lam"]) == (1000, 0.1, 1.0)
    assert (defaults["weighting"], defaults["obs_weight"], defaults["sigma_y"]) == ("linear", 1.0, None)


def test_red_diff_noise_levels_are_the_papers_on_any_schedule():
    """"adm" visits, on a cosine schedule, the timesteps whose sigma / alpha are the ADM linear schedule's at the
    official range(0, 1000, 1000 // n); "model" visits the cosine schedule's own range(0, N, N // n)."""
    adm = NoiseSchedule.from_config({"beta_schedule": "linear"})
    cosine = NoiseSchedule.from_config({"beta_schedule": "squaredcos_cap_v2"})
    steps = torch.arange(0, 1000, 4, dtype=torch.float64).flip(0)
    t = red_diff_timesteps(cosine, 250, "adm")
    rho = lambda s, t: s.sigma(t) / s.alpha(t)  # noqa: E731
    torch.testing.assert_close(rho(cosine, t), rho(adm, steps), rtol=1e-9, atol=0)
    assert rho(adm, steps).sum() == pytest.approx(4395, abs=1)  # the sums over 250 steps
    assert rho(cosine, red_diff_timesteps(cosine, 250, "model")).sum() == pytest.approx(989, abs=1)
    assert torch.equal(red_diff_timesteps(cosine, 250, "model"), steps)
    assert torch.equal(red_diff_timesteps(adm, 250, "adm"), steps)  # exact integers on the ADM schedule itself
    sd = NoiseSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    t = red_diff_timesteps(sd, 1000, "adm")  # SD's rho spans 0.03 .. 14.6: ADM's levels outside it are clamped
    assert t.max() == 999 and t.min() == 0 and (t[1:] <= t[:-1]).all()
    with pytest.raises(ValueError, match="noise_levels must be one of"):
        red_diff_timesteps(sd, 10, "cosine")


def test_red_diff_means_the_same_on_any_schedule():
    """A Gaussian prior's exact eps depends on the noise level rho = sigma / alpha alone, so with the paper's noise
    levels RED-Diff gives the same result on a linear-beta and a cosine schedule (same noise draws); on each
    model's own timesteps it does not (the cosine schedule visits a quarter of the total rho)."""
    g = torch.Generator().manual_seed(0)
    mean = 0.5 * torch.randn(SHAPE, generator=g, dtype=torch.float64)
    var = (0.1 + 0.5 * torch.rand(SHAPE, generator=g, dtype=torch.float64)) ** 2
    op = Inpainting(random_mask(4, 0.5, seed=2))
    y = op.forward(mean + var.sqrt() * _randn(SHAPE, 3))
    out = {}
    for schedule_name in ("linear", "squaredcos_cap_v2"):
        schedule = NoiseSchedule.from_config({"beta_schedule": schedule_name})
        denoiser = Denoiser(GaussianPrior(schedule, mean, var), schedule, "epsilon")
        for levels in ("adm", "model"):
            out[schedule_name, levels] = red_diff(denoiser, y, op, num_steps=100, noise_levels=levels,
                                                  generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out["linear", "adm"], out["squaredcos_cap_v2", "adm"], rtol=0, atol=1e-5)  # rho to 1e-12
    assert (out["linear", "model"] - out["squaredcos_cap_v2", "model"]).abs().max() > 1e-2
    torch.testing.assert_close(out["linear", "adm"], out["linear", "model"], rtol=0, atol=0)


def test_red_diff_stops_each_sample_at_the_noise_level():
    """With sigma_y, a sample stops the first time its RMS residual over the measured entries (an inpainting's
    missing pixels excluded) falls back to discrepancy * sigma_y after having been above it, and keeps that mu;
    until then, and for the other samples throughout, the run is the run without stopping. Without sigma_y
    nothing stops."""
    denoiser, mean, var = _linear_schedule_denoiser()
    op = Inpainting(random_mask(4, 0.5, seed=2), sigma_y=0.05)
    y = op.measure(mean + var.sqrt() * _randn((2, *SHAPE[1:]), 5), torch.Generator().manual_seed(6))

    def run(**kwargs):
        log = []
        out = red_diff(denoiser, y, op, num_steps=200, generator=torch.Generator().manual_seed(1),
                       callback=lambda info: log.append({k: v.clone() if torch.is_tensor(v) else v for k, v in info.items()}),
                       **kwargs)
        return out, log

    level = 1.5 * 0.05
    out, log = run(sigma_y=0.05, discrepancy=1.5)
    plain, plain_log = run()
    assert not any(e["stopped"].any() for e in plain_log) and len(plain_log) == 200
    observed = op.mask.expand(2, 3, 4, 4).flatten(1) > 0

    def rms(mu):  # over the observed entries; Inpainting: A(mu) = mask * mu
        error = (y - op.forward(mu)).flatten(1) * observed
        return (error.square().sum(1) / observed.sum(1)).sqrt()

    before = [op.pinv(y)] + [e["mu"] for e in log]  # mu before each step
    torch.testing.assert_close(torch.stack([e["residual"] for e in log]), torch.stack([rms(m) for m in before[:-1]]))
    for b in range(2):
        stop = next((i for i, e in enumerate(log) if e["stopped"][b]), len(log))  # the last one ends the walk
        assert stop < 200, "the noisy measurement is over-fitted before the end"
        residuals = torch.stack([rms(m)[b] for m in before[: stop + 1]])
        armed = torch.cummax((residuals > level).int(), 0).values.bool()
        assert armed[stop - 1] and residuals[stop] <= level  # above the level once, then back down to it
        assert not (armed[:-2] & (residuals[1:-1] <= level)).any()  # ... for the first time
        assert all(torch.equal(e["mu"][b], p["mu"][b]) for e, p in zip(log[:stop], plain_log[:stop]))
        assert all(torch.equal(e["mu"][b], before[stop][b]) for e in log[stop:]) and torch.equal(out[b], before[stop][b])
    assert len(log) < 200  # the walk ends once every sample has stopped


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_red_diff_is_independent_of_the_prediction_type(prediction_type):
    """eps_hat comes from any parametrisation through diffkit.convert: same prior, same noise, same result."""
    op = Inpainting(random_mask(4, 0.5, seed=2))
    runs = []
    for kind in ("epsilon", prediction_type):
        denoiser, mean, _ = _linear_schedule_denoiser(kind)
        y = op.forward(mean + 0.3)
        runs.append(red_diff(denoiser, y, op, num_steps=50, lr=0.1, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(runs[0], runs[1], atol=1e-9)


def test_red_diff_validates_its_inputs():
    denoiser, mean, _ = _linear_schedule_denoiser()
    op = SuperResolution(2)
    y = op.forward(mean)
    with pytest.raises(ValueError, match="num_steps"):
        red_diff(denoiser, y, op, num_steps=0)
    with pytest.raises(ValueError, match="num_steps"):
        red_diff(denoiser, y, op, num_steps=1001)
    with pytest.raises(ValueError, match="weighting must be one of .*'linear'"):
        red_diff(denoiser, y, op, weighting="cubic")
    with pytest.raises(ValueError, match="NaN"):
        red_diff(denoiser, y * math.nan, op, num_steps=2)
    with pytest.raises(ValueError, match=r"y has shape \(1, 3, 4, 4\)"):
        red_diff(denoiser, mean, op, num_steps=2, init=torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="init must be"):
        red_diff(denoiser, y, op, num_steps=2, init="noise")
    with pytest.raises(ValueError, match="latent tensor"):
        red_diff(denoiser, y, op, num_steps=2, decoder=lambda z: z)
    with pytest.raises(ValueError, match="lr"):
        red_diff(denoiser, y, op, num_steps=2, lr=-1.0)


def test_red_diff_accepts_a_user_forward_model():
    """Anything with a differentiable forward is an operator; without pinv, adjoint or input_shape it needs init."""

    class Brighten:
        def forward(self, x):
            return torch.tanh(x + 0.5)

    denoiser, mean, _ = _linear_schedule_denoiser()
    y = Brighten().forward(mean)
    with pytest.raises(ValueError, match="no pinv, adjoint or input_shape"):
        red_diff(denoiser, y, Brighten(), num_steps=2)
    out = red_diff(denoiser, y, Brighten(), num_steps=200, lr=0.05, lam=0.25, init=torch.zeros(SHAPE, dtype=torch.float64))
    assert (Brighten().forward(out) - y).norm() < 0.1 * y.norm()


def _posterior_problem(op, sigma_y, var=None, batch=1, seed=3):
    denoiser, mean, var = _linear_schedule_denoiser(var=var)
    x = mean + var.sqrt() * _randn(SHAPE, seed)
    y = op.measure(x, torch.Generator().manual_seed(seed))
    A = _matrix(op.forward, SHAPE)
    S = torch.diag(var.expand(SHAPE).flatten())
    post_mean, post_cov = _gaussian_posterior(A, mean.flatten(), S, y.flatten(), sigma_y)
    return denoiser, y.expand(batch, -1, -1, -1), post_mean.reshape(SHAPE), post_cov


@pytest.mark.parametrize("op_name", OPERATORS)
def test_dps_fits_the_measurement_and_moves_toward_the_posterior_mean(op_name):
    """DPS (1000 ancestral steps, zeta = 0.3) from the same noise as an unconditional DDPM run: its residual
    ||y - A x0|| falls below 0.3 (the noise alone is ~0.2) and 5x below the unconditional one (~0.8-1.9), and the
    mean of 64 samples lands at least 2x nearer the exact posterior mean than the unconditional mean does."""
    op = OPERATORS[op_name](0.05)
    denoiser, y, post_mean, _ = _posterior_problem(op, 0.05, batch=64)
    x_T = _randn((64, *SHAPE[1:]), 4)
    timesteps = make_timesteps(denoiser.schedule, "ddim", 1000)
    free = sample_ddim(denoiser, x_T, timesteps, eta=1.0, generator=torch.Generator().manual_seed(5))
    out = dps(denoiser, y, op, zeta=0.3, x_T=x_T, generator=torch.Generator().manual_seed(5))

    def residual(x):
        return (y - op.forward(x)).flatten(1).norm(dim=1).mean()

    def distance(x):
        return (x.mean(0, keepdim=True) - post_mean).norm() / post_mean.norm()

    assert residual(out) < 0.2 * residual(free) and residual(out) < 0.3
    assert distance(out) < 0.5 * distance(free)


def test_dps_steps_each_sample_by_its_own_residual():
    """The norm is per sample (the official code takes one norm over the batch): with eta = 0 a sample's result
    does not depend on what else is in the batch."""
    denoiser, mean, var = _linear_schedule_denoiser()
    op = SuperResolution(2)
    y = op.forward(mean + var.sqrt() * _randn((2, *SHAPE[1:]), 8))
    x_T = _randn((2, *SHAPE[1:]), 9)
    pair = dps(denoiser, y, op, num_inference_steps=50, eta=0.0, x_T=x_T)
    alone = dps(denoiser, y[1:], op, num_inference_steps=50, eta=0.0, x_T=x_T[1:])
    assert torch.allclose(pair[1:], alone, rtol=0, atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_pigdm_samples_the_exact_posterior_of_a_unit_gaussian(eta):
    """For a prior N(m, I), p(x0 | x_t) is exactly N(x0_hat, r_t^2 I) with PiGDM's r_t^2 = sigma_t^2 / (alpha_t^2 +
    sigma_t^2), so for a noiseless measurement its guidance is the exact conditional score and the sampler draws
    the exact posterior: A x0 = y to rounding, the sample mean within Monte-Carlo error of the posterior mean, the
    spread that of the posterior covariance. Its marginals are exact on the way too: A x_t - alpha_t y ~
    N(0, sigma_t^2 A A^T) = N(0, sigma_t^2 / 4) at every step (a mis-weighted guidance, e.g. x0_hat + alpha_t g
    or 1.2x ours, drifts from it by many standard errors at mid-to-low noise)."""
    op = SuperResolution(2)
    batch = 512
    unit = torch.ones(SHAPE, dtype=torch.float64)
    denoiser, y, post_mean, post_cov = _posterior_problem(op, 0.0, var=unit, batch=batch)
    schedule = denoiser.schedule
    timesteps = make_timesteps(schedule, "ddim", 500)
    ratios = []

    def check_marginal(info):
        t_next = timesteps[info["step"] + 1]
        alpha, sigma = schedule.alpha(t_next).item(), schedule.sigma(t_next).item()
        if sigma > 0:
            u = (op.forward(info["x"]) - alpha * y).flatten(1) / (sigma / 2)
            ratios.append((u.mean(0).abs().max().item() * math.sqrt(batch), u.var(0).mean().item()))

    out = pigdm(denoiser, y, op, num_inference_steps=500, eta=eta, generator=torch.Generator().manual_seed(6),
                x_T=_randn((batch, *SHAPE[1:]), 7), callback=check_marginal)
    assert (op.forward(out) - y).abs().max() < 1e-10
    free = post_cov.diag() > 1e-9
    z = (out - post_mean).flatten(1).mean(0)[free] / (post_cov.diag()[free] / batch).sqrt()
    assert z.square().mean().sqrt() < 1.5 and z.abs().max() < 4.5
    spread = ((out - post_mean).flatten(1).square().sum(1).mean() / post_cov.trace()).item()
    # 36 free directions: a 1% standard error, plus DDIM's own O(1/steps) shrinkage of the prior (~0.5%)
    assert abs(spread - 1) < 0.05, spread
    assert len(ratios) == 499
    assert max(r[0] for r in ratios) < 4.5 and all(abs(r[1] - 1) < 0.15 for r in ratios), ratios[::10]


def test_dps_and_pigdm_validate_their_inputs():
    denoiser, mean, _ = _linear_schedule_denoiser()
    op = SuperResolution(2)
    y = op.forward(mean)

    class NoPinv:
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="pigdm needs operator.pinv"):
        pigdm(denoiser, y, NoPinv(), x_T=torch.zeros(SHAPE, dtype=torch.float64))
    with pytest.raises(ValueError, match="no input_shape: pass x_T"):
        dps(denoiser, y, NoPinv())
    with pytest.raises(ValueError, match="zeta"):
        dps(denoiser, y, op, zeta=-1.0)
    with pytest.raises(ValueError, match=r"y has shape \(1, 3, 2, 2\)"):
        dps(denoiser, y, op, x_T=torch.zeros(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        pigdm(denoiser, y * math.nan, op)


@pytest.mark.parametrize("spec", [*SPECS, "blur_gauss:1.0+sr:2"])
def test_every_operator_runs_through_every_solver_on_a_unet(spec):
    """float32, a class-conditional diffusers UNet, inside torch.no_grad() as pipelines call them: each solver
    returns a finite image of the right shape for every operator spec (nonlinear and shape-changing ones too)."""
    denoiser = Denoiser(tiny_unet(num_class_embeds=10), NoiseSchedule.from_config({"beta_schedule": "linear"}))
    op = make_operator(spec, sigma_y=0.05, image_size=8)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = op.measure(x, torch.Generator().manual_seed(1))
    cond = {"class_labels": torch.tensor([3, 7])}
    with torch.no_grad():
        outs = [
            red_diff(denoiser, y, op, num_steps=4, generator=torch.Generator().manual_seed(2), cond=cond),
            dps(denoiser, y, op, num_inference_steps=4, generator=torch.Generator().manual_seed(2), cond=cond),
            pigdm(denoiser, y, op, num_inference_steps=4, generator=torch.Generator().manual_seed(2), cond=cond),
        ]
    for out in outs:
        assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
        assert not out.requires_grad
