"""Visual anagrams: views, the view denoiser (Geng's mean, NVR, NVB) against the plain sampler, rot90 equivariance,
NVR's variance, and AdjointDPM through the wrapper against a closed form."""

import math

import pytest
import torch

import diffkit
from diffkit.adjoint import adjoint_sample, adjoint_timesteps
from diffkit.anagram import (AnagramDenoiser, balancing_weights, classifier_alignment, rectification_scale,
                             stack_views)
from diffkit.denoiser import Denoiser
from diffkit.guidance import CFG
from diffkit.schedule import NoiseSchedule
from diffkit.solvers import SOLVERS, make_timesteps, sample_dpmpp_2m
from diffkit.views import VIEWS, View, check_view, make_view


pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (3, 16, 16)
MODES = {
    "geng": {},
    "nvr": {"rectify": True},
    "nvb+nvr": {"rectify": True, "alignment": classifier_alignment()},
}


@pytest.fixture(scope="module")
def default():
    pipe = diffkit.load_pipeline()
    return Denoiser.from_pipeline_components(pipe.unet, pipe.scheduler), pipe.scheduler.config


def _noise(batch, seed=0):
    return torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed))


# -- views ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*VIEWS, "channels:201"])
def test_named_views_are_orthogonal_with_their_inverse(name):
    view = make_view(name)
    check_view(view, SHAPE)
    x = _noise(2).double()
    assert torch.equal(view.inverse(view.apply(x)), x)
    assert torch.allclose(view.apply(x).square().sum(), x.square().sum())


def test_views_move_pixels_as_named():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(make_view("rot90").apply(x)[0, 0, 0], torch.tensor([3.0, 7, 11, 15]))  # counter-clockwise
    assert torch.equal(make_view("vflip").apply(x)[0, 0, 0], torch.tensor([12.0, 13, 14, 15]))
    assert torch.equal(make_view("transpose").apply(x)[0, 0, :, 0], torch.tensor([0.0, 1, 2, 3]))
    rgb = torch.arange(3.0).view(1, 3, 1, 1)
    assert make_view("channels:201").apply(rgb).flatten().tolist() == [2.0, 0.0, 1.0]
    # rot90 is not an involution: applying it twice is rot180, and its inverse is rot270
    assert not torch.equal(make_view("rot90").apply(x), make_view("rot90").inverse(x))
    assert torch.equal(make_view("rot90").inverse(x), make_view("rot270").apply(x))


def test_jigsaw_moves_every_block_and_keeps_blocks_whole():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)  # block ids, 16x16
    moved = make_view("jigsaw").apply(x)
    blocks = moved.view(4, 4, 4, 4).permute(0, 2, 1, 3).reshape(16, 16)  # each row: one output block's pixels
    assert all(torch.all(row == row[0]) for row in blocks)  # blocks stay whole
    assert torch.all(blocks[:, 0] != torch.arange(16.0))  # and none stays in place
    assert sorted(blocks[:, 0].tolist()) == list(range(16))


def test_non_orthogonal_and_wrong_views_are_refused():
    blur = View("blur", lambda x: torch.nn.functional.avg_pool2d(x, 3, 1, 1), lambda x: x)
    with pytest.raises(ValueError, match="'blur' is not a noise-preserving view.*not orthogonal"):
        check_view(blur, SHAPE)
    scale = View("brighten", lambda x: 1.1 * x, lambda x: x / 1.1)
    with pytest.raises(ValueError, match="not orthogonal"):
        check_view(scale, SHAPE)
    rot90 = make_view("rot90")
    wrong_inverse = View("rot90?", rot90.apply, rot90.apply)
    with pytest.raises(ValueError, match="inverse does not undo"):
        check_view(wrong_inverse, SHAPE)
    with pytest.raises(ValueError, match="unknown view 'blur'.*allowed: identity"):
        make_view("blur")
    with pytest.raises(ValueError, match="permutation of 0..C-1"):
        make_view("channels:112")
    with pytest.raises(ValueError, match="permutes 3 channels"):
        check_view(make_view("channels:201"), (4, 16, 16))
    with pytest.raises(ValueError, match="divisible by 4"):
        check_view(make_view("jigsaw"), (3, 6, 6))
    with pytest.raises(TypeError, match="a view must be a name or a View"):
        make_view(90)


# -- NVR and NVB formulas ---------------------------------------------------------------------------


@pytest.mark.parametrize("correlation", ["cosine", "mean"])
@pytest.mark.parametrize("views, rho", [(2, 0.0), (3, 0.0), (4, 0.0), (2, 0.6), (3, -0.3)])
def test_rectification_gives_unit_variance(correlation, views, rho):
    """Unit-variance eps_i with pairwise correlation rho (independent for rho = 0), any weights summing to 1: c times
    the weighted sum has unit std (to sampling error, 1e5 values per sample), while the plain weighted sum shrinks."""
    g = torch.Generator().manual_seed(views)
    d, batch = 100_000, 3
    shared = torch.randn(1, batch, d, generator=g, dtype=torch.float64)
    # equicorrelated: sqrt(rho) shared + sqrt(1 - rho) own for rho >= 0; for rho < 0 mix in views centred on their
    # mean, whose pairwise correlation is -1 / (V - 1)
    own = torch.randn(views, batch, d, generator=g, dtype=torch.float64)
    if rho >= 0:
        eps = math.sqrt(rho) * shared + math.sqrt(1 - rho) * own
    else:
        z = torch.randn(views, batch, d, generator=g, dtype=torch.float64)
        centred = (z - z.mean(0, keepdim=True)) * math.sqrt(views / (views - 1))
        mix = -rho * (views - 1)
        eps = math.sqrt(mix) * centred + math.sqrt(1 - mix) * own
    weights = torch.softmax(torch.randn(views, batch, generator=g, dtype=torch.float64), 0)
    combined = (weights[..., None] * eps).sum(0)
    c = rectification_scale(eps, weights, correlation)
    assert torch.all(((c[:, None] * combined).std(1) - 1).abs() < 0.01)
    assert torch.all(c > 1)  # a weighted mean of imperfectly correlated noise shrinks; c undoes that


def test_rectification_with_agreeing_views():
    """Identical predictions: the cosine estimate leaves them alone (c = 1 exactly); the official mean(eps_i eps_j)
    with its unit diagonal gives c = (1/2 + ms / 2)^-1/2 for two equal weights, ms = mean(eps^2), not 1 -- which near
    pure noise is what blows x0 up (see diffkit.anagram)."""
    eps = (1.2 * _noise(2).double()).unsqueeze(0).repeat(2, 1, 1, 1, 1)
    weights = torch.full((2, 2), 0.5, dtype=torch.float64)
    assert torch.allclose(rectification_scale(eps, weights, "cosine"), torch.ones(2, dtype=torch.float64))
    ms = eps[0].flatten(1).square().mean(1)
    assert torch.allclose(rectification_scale(eps, weights, "mean"), (0.5 + 0.5 * ms).rsqrt())


def test_balancing_weights_follow_the_official_formula():
    s = torch.tensor([[0.5], [0.25]], dtype=torch.float64)
    assert torch.allclose(balancing_weights(s, 0.0).flatten(), torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    # exponent 1 + progress = 2: alpha proportional to s^-2 = 4, 16
    assert torch.allclose(balancing_weights(s, 1.0).flatten(), torch.tensor([0.2, 0.8], dtype=torch.float64))


def test_classifier_alignment_is_the_probability_of_each_views_class():
    from diffkit.classifier import load_classifier

    x0 = _noise(4).clamp(-1, 1)
    labels = torch.tensor([3, 1, 4, 1])
    s = classifier_alignment()(x0, {"class_labels": labels})
    expected = load_classifier()(x0).softmax(1)[torch.arange(4), labels]
    assert torch.allclose(s, expected)
    with pytest.raises(ValueError, match="needs cond\\['class_labels'\\]"):
        classifier_alignment()(x0, {})


# -- the view denoiser on the default model ---------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_identity_view_reproduces_the_plain_sampler(default, mode):
    denoiser, config = default
    labels = torch.tensor([2, 7])
    cond, uncond = {"class_labels": labels}, {"class_labels": torch.full((2,), 10)}
    timesteps = make_timesteps(denoiser.schedule, "dpmpp_2m", 10, config)
    x = _noise(2)
    with torch.no_grad():
        plain = sample_dpmpp_2m(denoiser, x, timesteps, cond=cond, uncond=uncond, guidance=CFG(3.0))
        views = AnagramDenoiser(denoiser, ["identity"], **MODES[mode])
        ours = sample_dpmpp_2m(views, x, timesteps, cond=cond, uncond=uncond, guidance=CFG(3.0))
    assert (ours - plain).abs().max() <= 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_rot90_equivariance(default, mode):
    """Views (I, R), classes (a, b) from x_T equal R^-1 of views (R^-1, I), classes (a, b) from R x_T: the inverse
    map back is the right one (rot90 is no involution, so a view that used R for R^-1 would fail)."""
    denoiser, config = default
    timesteps = make_timesteps(denoiser.schedule, "dpmpp_2m", 10, config)
    cond = stack_views([{"class_labels": torch.tensor([6, 1])}, {"class_labels": torch.tensor([9, 7])}])
    uncond = {"class_labels": torch.full((4,), 10)}
    R, x = make_view("rot90"), _noise(2, seed=1)
    with torch.no_grad():
        first = AnagramDenoiser(denoiser, ["identity", "rot90"], **MODES[mode])
        a = sample_dpmpp_2m(first, x, timesteps, cond=cond, uncond=uncond, guidance=CFG(3.0))
        second = AnagramDenoiser(denoiser, ["rot270", "identity"], **MODES[mode])
        b = sample_dpmpp_2m(second, R.apply(x), timesteps, cond=cond, uncond=uncond, guidance=CFG(3.0))
    assert (R.inverse(b) - a).abs().max() <= 1e-5
    # and the two views did not collapse to one symmetric image
    assert (R.apply(a) - a).abs().max() > 0.5


@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_runs_on_the_view_denoiser(default, solver):
    """Each solver, unchanged, on the wrapper: with the identity view (NVR on, so through eps space) it reproduces the
    plain run (Heun leaves the data range on this model at 4 steps with or without views: its first step in VE
    coordinates starts at sigma = 2e4), and with two views it runs every step."""
    denoiser, config = default
    timesteps = make_timesteps(denoiser.schedule, solver, 4, config)
    fn, x, rule = SOLVERS[solver].fn, _noise(1), CFG(2.0)
    cond, uncond = {"class_labels": torch.tensor([0])}, {"class_labels": torch.tensor([10])}
    steps = []
    with torch.no_grad():
        plain = fn(denoiser, x, timesteps, cond=cond, uncond=uncond, guidance=rule)
        ours = fn(AnagramDenoiser(denoiser, ["identity"], rectify=True), x, timesteps, cond=cond, uncond=uncond,
                  guidance=rule)
        two = fn(AnagramDenoiser(denoiser, ["identity", "vflip"], rectify=True), x, timesteps,
                 cond=stack_views([cond, {"class_labels": torch.tensor([8])}]), uncond=stack_views([uncond, uncond]),
                 guidance=rule, callback=lambda info: steps.append(info["step"]))
    assert torch.allclose(ours, plain, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(two).all() and steps == [0, 1, 2, 3]


def test_call_returns_the_combined_prediction(default):
    """``__call__`` (what RED-Diff reads) converts the combined x0 to the model's prediction type."""
    denoiser, _ = default
    views = AnagramDenoiser(denoiser, ["identity", "hflip"])
    cond = stack_views([{"class_labels": torch.tensor([3])}, {"class_labels": torch.tensor([5])}])
    x, t = _noise(1), torch.tensor(400.0)
    alpha, sigma = denoiser.schedule.alpha(t).item(), denoiser.schedule.sigma(t).item()
    with torch.no_grad():
        v = views(x, t, cond)
        v_a = denoiser(x, t, {"class_labels": torch.tensor([3])})
        x0_a = diffkit.convert(v_a, "v_prediction", "sample", x, alpha, sigma)
        flip = make_view("hflip")
        x0_b = flip.inverse(diffkit.convert(denoiser(flip.apply(x), t, {"class_labels": torch.tensor([5])}),
                                            "v_prediction", "sample", flip.apply(x), alpha, sigma))
    expected = diffkit.convert((x0_a + x0_b) / 2, "sample", "v_prediction", x, alpha, sigma)
    assert torch.allclose(v, expected, atol=1e-5)


def test_bad_inputs(default):
    denoiser, _ = default
    with pytest.raises(ValueError, match="views must be a non-empty list"):
        AnagramDenoiser(denoiser, [])
    with pytest.raises(ValueError, match="correlation must be one of"):
        AnagramDenoiser(denoiser, ["identity"], correlation="pearson")
    with pytest.raises(TypeError, match="alignment must be callable"):
        AnagramDenoiser(denoiser, ["identity"], alignment=0.5)
    views = AnagramDenoiser(denoiser, ["identity", "rot90"])
    with pytest.raises(ValueError, match="must stack one condition per view.*2 views x 1 samples = 2, got 1"):
        views(_noise(1), torch.tensor(10.0), {"class_labels": torch.tensor([3])})
    with pytest.raises(TypeError, match="one per view"):
        stack_views({"class_labels": torch.tensor([3])})


# -- AdjointDPM through the wrapper, against a closed form -----------------------------------------


class GaussianEps(torch.nn.Module):
    """The exact eps prediction for data N(mean, s^2 I); the mean arrives as conditioning."""

    def __init__(self, schedule, s=0.7):
        super().__init__()
        self.schedule, self.s = schedule, s

    def forward(self, x, t, mean=None, return_dict=True):
        t = t.reshape(-1)[0].double()
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        return (sigma * (x - alpha * mean) / (alpha**2 * self.s**2 + sigma**2),)


def test_adjoint_through_the_view_denoiser():
    """Geng's mean of two views of isotropic Gaussians N(m_i, s^2 I) is the Gaussian N((m_1 + R^-1 m_2) / 2, s^2 I).
    AdjointDPM, unchanged, through the wrapper gives the same sample and gradients (for x_T and, by the chain rule,
    for the per-view means given as conditioning) as on the plain denoiser of that Gaussian, and the sample is the
    probability-flow ODE's closed form up to the solver's error."""
    schedule = NoiseSchedule.from_config({"beta_schedule": "linear"})
    denoiser = Denoiser(GaussianEps(schedule), schedule, "epsilon")
    views = AnagramDenoiser(denoiser, ["identity", "rot90"])
    R = make_view("rot90")
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    means = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64).requires_grad_(True)  # view-major
    weights = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    timesteps = adjoint_timesteps(views, 200)

    x0 = adjoint_sample(views, x_T, timesteps, cond={"mean": means}, backend="adjoint")
    grad_x, grad_means = torch.autograd.grad((x0 * weights).sum(), [x_T, means])
    mean = ((means[:2] + R.inverse(means[2:])) / 2).detach().requires_grad_(True)
    ref = adjoint_sample(denoiser, x_T, timesteps, cond={"mean": mean}, backend="adjoint")
    ref_x, ref_mean = torch.autograd.grad((ref * weights).sum(), [x_T, mean])
    assert torch.allclose(x0, ref, atol=1e-10) and torch.allclose(grad_x, ref_x, atol=1e-10)
    assert torch.allclose(grad_means, torch.cat([ref_mean / 2, R.apply(ref_mean) / 2]), atol=1e-10)

    a_T, s_T = schedule.alpha(timesteps[0]), schedule.sigma(timesteps[0])
    a_e, s_e = schedule.alpha(timesteps[-1]), schedule.sigma(timesteps[-1])
    exact = a_e * (mean + (x_T / a_T - mean) * math.sqrt(0.49 + (s_e / a_e) ** 2) / math.sqrt(0.49 + (s_T / a_T) ** 2))
    assert ((x0 - exact).norm() / exact.norm()).item() < 2e-3
