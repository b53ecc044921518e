"""Metrics against closed forms and reference implementations; the shipped classifier's accuracy."""

import colorsys
import json

import pytest
import torch

from diffkit import metrics
from diffkit.classifier import CLASSIFIER_PATH, load_classifier
from diffkit.data import colored_digits


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    """Diagonal S: tr((S_a S_b)^1/2) = sum sqrt(s_a s_b), so FD = |mu_a - mu_b|^2 + sum (sqrt s_a - sqrt s_b)^2."""
    g = torch.Generator().manual_seed(0)
    n, d = 200_000, 4
    mu_a, mu_b = torch.tensor([0.0, 1.0, -2.0, 0.5]), torch.tensor([1.0, 1.0, 0.0, 0.0])
    s_a, s_b = torch.tensor([1.0, 4.0, 0.25, 2.0]), torch.tensor([2.0, 1.0, 1.0, 2.0])
    a = mu_a + s_a.sqrt() * torch.randn(n, d, generator=g, dtype=torch.float64)
    b = mu_b + s_b.sqrt() * torch.randn(n, d, generator=g, dtype=torch.float64)
    expected = ((mu_a - mu_b) ** 2).sum() + ((s_a.sqrt() - s_b.sqrt()) ** 2).sum()
    assert metrics.frechet_distance(a, b) == pytest.approx(expected.item(), abs=0.05)
    assert metrics.frechet_distance(a, b) == pytest.approx(metrics.frechet_distance(b, a), rel=1e-9)
    assert abs(metrics.frechet_distance(a, a)) < 1e-6


def test_frechet_distance_matches_scipy_sqrtm_on_full_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    a, b = randn(500, 6) @ randn(6, 6), randn(400, 6) @ randn(6, 6) + 0.3
    ca, cb = torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
    mean_term = ((a.mean(0) - b.mean(0)) ** 2).sum().item()
    ref = mean_term + ca.trace() + cb.trace() - 2 * scipy_linalg.sqrtm(ca @ cb).real.trace()
    assert metrics.frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)


def test_saturation_against_colorsys():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    rgb = ((images + 1) / 2).permute(0, 2, 3, 1).reshape(-1, 3).tolist()
    expected = sum(colorsys.rgb_to_hsv(*p)[1] for p in rgb) / len(rgb)
    assert metrics.saturation(images) == pytest.approx(expected, abs=1e-6)
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert metrics.saturation(red) == 1.0 and metrics.saturation(torch.zeros(1, 3, 2, 2)) == 0.0
    assert metrics.saturation(-torch.ones(1, 3, 2, 2)) == 0.0  # black: max = 0


def test_clipped_fraction_counts_values_at_or_beyond_the_range():
    x = torch.tensor([-1.5, -1.0, -0.99, 0.0, 0.5, 0.99, 1.0, 2.0]).view(1, 1, 2, 4).expand(1, 3, 2, 4)
    assert metrics.clipped_fraction(x) == pytest.approx(4 / 8)
    assert metrics.clipped_fraction(x, threshold=0.02) == pytest.approx(6 / 8)
    assert metrics.clipped_fraction(torch.full((1, 3, 2, 2), 1 - 0.5 / 255)) == 1.0  # exports as 255


def test_psnr_closed_form_and_ssim_properties():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    # constant offset 0.1 on data range 2: PSNR = 10 log10(4 / 0.01)
    assert torch.allclose(metrics.psnr(a, a + 0.1), torch.full((3,), 10 * torch.log10(torch.tensor(400.0))), atol=1e-4)
    assert torch.allclose(metrics.ssim(a, a), torch.ones(3), atol=1e-6)
    # two constant images c and d: every window has zero variance, SSIM = (2cd + C1) / (c^2 + d^2 + C1)
    c, d, c1 = 0.2, -0.4, (0.01 * 2) ** 2
    s = metrics.ssim(torch.full((1, 3, 16, 16), c), torch.full((1, 3, 16, 16), d))
    assert s.item() == pytest.approx((2 * c * d + c1) / (c * c + d * d + c1), rel=1e-5)
    noisy = a + 0.3 * torch.randn(a.shape, generator=g)
    assert torch.all(metrics.ssim(a, noisy) < metrics.ssim(a, a + 0.05 * torch.randn(a.shape, generator=g)))


def test_ssim_matches_scikit_image_when_available():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(3)
    a = torch.rand(1, 3, 20, 20, generator=g) * 2 - 1
    b = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    ref = skimage_metrics.structural_similarity(
        a[0].numpy(), b[0].numpy(), data_range=2.0, channel_axis=0,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    )
    # skimage filters with reflection but then drops the 5-pixel border: the same windows as ours
    assert metrics.ssim(a, b).item() == pytest.approx(ref, abs=1e-5)


def test_precision_recall_extremes():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(100, 8, generator=g)
    assert metrics.precision_recall(real, real.clone()) == (1.0, 1.0)
    assert metrics.precision_recall(real, real + 100.0) == (0.0, 0.0)
    # fakes collapsed onto a few reals: high precision, low recall
    precision, recall = metrics.precision_recall(real, real[:5].repeat(20, 1))
    assert precision == 1.0 and recall < 0.3


def test_bad_inputs():
    with pytest.raises(ValueError, match="N, 3, H, W"):
        metrics.saturation(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="NaN"):
        metrics.clipped_fraction(torch.full((1, 3, 2, 2), float("nan")))


def test_missing_classifier_names_the_training_script(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_classifier.py"):
        load_classifier(tmp_path / "nowhere")


def test_shipped_classifier_reaches_97_percent_on_held_out_digits():
    classifier = load_classifier()
    images, labels = colored_digits("test", seed=1)
    accuracy = metrics.class_accuracy(images, labels, classifier)
    assert accuracy >= 0.97
    recorded = json.loads((CLASSIFIER_PATH / "metrics.json").read_text())
    assert recorded["heldout_mnist_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    # features separate classes: FD between two digits' sets is far larger than between two halves of one
    fives, sevens = images[labels == 5], images[labels == 7]
    assert metrics.fd(fives[:25], fives[25:]) * 3 < metrics.fd(fives, sevens)


# -- streaming statistics and blocked k-NN (issue 23) -------------------------------------------------------------


def test_feature_stats_streamed_in_batches_equal_one_pass_covariance():
    """Chan's batch merge gives torch.cov's mean and covariance, also for features far from zero (where a raw sum
    of outer products would lose the covariance to cancellation), and two halves merge into the whole."""
    g = torch.Generator().manual_seed(0)
    feats = 1e4 + torch.randn(1000, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    stats = metrics.FeatureStats(6)
    for chunk in feats.split([1, 2, 97, 300, 600]):
        stats.update(chunk)
    assert stats.count == 1000
    assert torch.allclose(stats.mean, feats.mean(0), rtol=0, atol=1e-9)
    assert torch.allclose(stats.covariance, torch.cov(feats.T), rtol=1e-9, atol=1e-9)
    halves = metrics.FeatureStats(6).update(feats[:400]).merge(metrics.FeatureStats(6).update(feats[400:]))
    assert torch.allclose(halves.covariance, torch.cov(feats.T), rtol=1e-9, atol=1e-9)
    other = torch.randn(800, 6, generator=g, dtype=torch.float64) * 2
    assert metrics.frechet_distance(stats, metrics.FeatureStats(6).update(other)) == pytest.approx(
        metrics.frechet_distance(feats, other), rel=1e-9)


def _precision_recall_loops(real, fake, k):
    """The definition, point by point: a sample is covered if it lies within the k-th neighbour distance of some
    sample of the other set (that sample's own k nearest others, itself excluded)."""
    def radius(support, i):
        return sorted(float((support[i] - support[j]).norm()) for j in range(len(support)) if j != i)[k - 1]

    def covered(support, queries):
        radii = [radius(support, i) for i in range(len(support))]
        return sum(any(float((q - s).norm()) <= r for s, r in zip(support, radii)) for q in queries) / len(queries)

    return covered(real, fake), covered(fake, real)


def test_blocked_precision_recall_equals_the_dense_and_the_definition():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(40, 3, generator=g, dtype=torch.float64)
    fake = 0.6 * torch.randn(30, 3, generator=g, dtype=torch.float64) + 0.5
    expected = _precision_recall_loops(real, fake, k=3)
    assert metrics.precision_recall_dense(real, fake, k=3) == pytest.approx(expected, abs=1e-12)
    for block in (1, 4):
        assert metrics.precision_recall(real, fake, k=3, block_size=block) == pytest.approx(expected, abs=1e-12)
    for n_real, n_fake, d, k, shift in ((300, 250, 5, 3, 0.7), (500, 400, 16, 5, 0.2), (257, 300, 2, 1, 1.5)):
        real = torch.randn(n_real, d, generator=g)
        fake = torch.randn(n_fake, d, generator=g) * 0.8 + shift
        dense = metrics.precision_recall_dense(real, fake, k=k)
        assert 0 < dense[0] < 1 and 0 < dense[1] < 1
        for block in (13, 64, 10_000):
            assert metrics.precision_recall(real, fake, k=k, block_size=block) == dense, (n_real, block)


def test_blocked_precision_recall_never_holds_an_n_by_n_matrix(monkeypatch):
    largest = []
    cdist = torch.cdist
    monkeypatch.setattr(metrics.torch, "cdist", lambda a, b, *args, **kw: largest.append(len(a) * len(b)) or cdist(a, b))
    g = torch.Generator().manual_seed(1)
    metrics.precision_recall(torch.randn(600, 8, generator=g), torch.randn(500, 8, generator=g), block_size=50)
    assert max(largest) <= 50 * 50
    largest.clear()
    metrics.precision_recall_dense(torch.randn(600, 8, generator=g), torch.randn(500, 8, generator=g))
    assert max(largest) == 600 * 600  # the reference does build it: the counter can see it


def test_precision_recall_and_feature_stats_refuse_bad_input():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="k must be a positive int"):
        metrics.precision_recall(x, x, k=0)
    with pytest.raises(ValueError, match="fake_feats contain NaN"):
        metrics.precision_recall(x, torch.full((10, 4), float("nan")))
    with pytest.raises(ValueError, match="one feature dimension"):
        metrics.precision_recall(x, torch.randn(10, 5))
    with pytest.raises(ValueError, match="more than k = 3"):
        metrics.precision_recall(x[:3], x)
    with pytest.raises(ValueError, match="block_size"):
        metrics.precision_recall(x, x, block_size=0)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        metrics.FeatureStats(4).update(torch.randn(3, 5))
    with pytest.raises(ValueError, match="NaN"):
        metrics.FeatureStats(4).update(torch.full((3, 4), float("inf")))
    with pytest.raises(ValueError, match="at least 2 rows"):
        metrics.FeatureStats(4).update(x[:1]).covariance
