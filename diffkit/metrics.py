"""diffkit's measuring stick. Images are float tensors in [-1, 1], shape (N, 3, H, W), unless said otherwise.

- ``fd``: Frechet distance between Gaussians fitted to two sets' digits-classifier penultimate features
  (FID's formula on a digits network; lower is closer). ``FeatureStats`` accumulates the Gaussian batch by batch.
- ``class_accuracy``: fraction of samples the digits classifier labels as the class that was asked for.
- ``saturation``: mean HSV saturation (max - min) / max over all pixels of the [0, 1] images.
- ``clipped_fraction``: fraction of channel values at or beyond the [-1, 1] range (on raw, unclamped output).
- ``psnr`` / ``ssim``: per-image fidelity to a reference (Wang et al. 2004 SSIM, 11x11 Gaussian window).
- ``precision_recall``: improved precision and recall (Kynkaanniemi et al. 2019) by k-NN balls in feature space,
  computed by blocks in O(N k) memory.
"""

import torch
import torch.nn.functional as F

from .classifier import load_classifier


def _check(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must be a (N, 3, H, W) tensor, got shape {tuple(getattr(images, 'shape', ()))}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contain NaN or inf")
    return images.float()


@torch.no_grad()
def classifier_features(images: torch.Tensor, classifier=None, batch_size: int = 500) -> torch.Tensor:
    """Penultimate digits-classifier features, (N, D), of images clamped to [-1, 1] and resized to 16x16."""
    images = _check(images)
    classifier = load_classifier(device=str(images.device)) if classifier is None else classifier
    if images.shape[-1] != 16 or images.shape[-2] != 16:
        images = F.interpolate(images, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    return torch.cat([classifier.features(b.clamp(-1, 1)) for b in images.split(batch_size)])


class FeatureStats:
    """Running mean and covariance of feature rows, in float64, updated one batch at a time.

    Batches merge by Chan et al.'s pairwise update (each batch's centred scatter plus the shift of its mean),
    which stays accurate where a raw sum of outer products would cancel; two ``FeatureStats`` merge the same
    way, so processes that saw different rows combine exactly. Memory is O(D^2) whatever the number of rows.
    """

    def __init__(self, dim: int):
        if not (isinstance(dim, int) and dim > 0):
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64)  # sum of (x - mean)(x - mean)^T

    def _merge(self, count: int, mean: torch.Tensor, scatter: torch.Tensor) -> None:
        total = self.count + count
        delta = mean - self.mean
        self.scatter += scatter + torch.outer(delta, delta) * (self.count * count / total)
        self.mean += delta * (count / total)
        self.count = total

    def update(self, feats: torch.Tensor) -> "FeatureStats":
        """Add the rows of an (N, D) batch."""
        if not torch.is_tensor(feats) or feats.ndim != 2 or feats.shape[1] != len(self.mean):
            raise ValueError(f"feats must be an (N, {len(self.mean)}) tensor, got shape {tuple(getattr(feats, 'shape', ()))}")
        if len(feats):
            x = feats.detach().to("cpu", torch.float64)
            if not torch.isfinite(x).all():
                raise ValueError("feats contain NaN or inf")
            mean = x.mean(0)
            centred = x - mean
            self._merge(len(x), mean, centred.T @ centred)
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add the rows another ``FeatureStats`` has seen."""
        if other.count:
            self._merge(other.count, other.mean, other.scatter)
        return self

    @property
    def covariance(self) -> torch.Tensor:
        """The unbiased sample covariance (divided by N - 1), as ``torch.cov`` and FID implementations use."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 rows, got {self.count}")
        return self.scatter / (self.count - 1)


def frechet_distance_from_stats(mu_a: torch.Tensor, cov_a: torch.Tensor, mu_b: torch.Tensor, cov_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2}), in float64.

    tr((S_a S_b)^{1/2}) is the sum of square roots of the eigenvalues of S_a^{1/2} S_b S_a^{1/2}, which is
    symmetric positive semi-definite, so no non-symmetric matrix square root is needed.
    """
    mu_a, mu_b, cov_a, cov_b = (torch.as_tensor(v, dtype=torch.float64) for v in (mu_a, mu_b, cov_a, cov_b))
    d = mu_a.shape[-1] if mu_a.ndim == 1 else -1
    if mu_a.ndim != 1 or mu_b.shape != (d,) or cov_a.shape != (d, d) or cov_b.shape != (d, d):
        raise ValueError(f"need means (D,) and covariances (D, D) of one D, got {tuple(mu_a.shape)}, {tuple(cov_a.shape)}, "
                         f"{tuple(mu_b.shape)}, {tuple(cov_b.shape)}")
    evals, evecs = torch.linalg.eigh(cov_a)
    sqrt_a = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets, each an (N >= 2, D) tensor or a
    ``FeatureStats`` (see ``frechet_distance_from_stats`` for the formula)."""
    stats = []
    for name, feats in (("feats_a", feats_a), ("feats_b", feats_b)):
        if isinstance(feats, FeatureStats):
            stats.append(feats)
            continue
        if not torch.is_tensor(feats) or feats.ndim != 2 or len(feats) < 2:
            raise ValueError(f"{name} must be an (N >= 2, D) tensor or FeatureStats, got shape {tuple(getattr(feats, 'shape', ()))}")
        stats.append(FeatureStats(feats.shape[1]).update(feats))
    a, b = stats
    if len(a.mean) != len(b.mean) or min(a.count, b.count) < 2:
        raise ValueError(f"need two feature sets of >= 2 rows and equal D, got {a.count} x {len(a.mean)} and "
                         f"{b.count} x {len(b.mean)}")
    return frechet_distance_from_stats(a.mean, a.covariance, b.mean, b.covariance)


def fd(images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """Frechet distance between two image sets on digits-classifier features."""
    return frechet_distance(classifier_features(images_a), classifier_features(images_b))


@torch.no_grad()
def class_accuracy(images: torch.Tensor, labels: torch.Tensor, classifier=None) -> float:
    """Fraction of images the digits classifier assigns to the requested ``labels``."""
    images = _check(images).clamp(-1, 1)
    classifier = load_classifier(device=str(images.device)) if classifier is None else classifier
    predicted = torch.cat([classifier(b) for b in images.split(500)]).argmax(1)
    return (predicted == torch.as_tensor(labels).to(predicted.device)).float().mean().item()


def saturation(images: torch.Tensor) -> float:
    """Mean HSV saturation (max - min) / max per pixel of the clamped [0, 1] images; 0 where max = 0."""
    rgb = (_check(images).clamp(-1, 1) + 1) / 2
    hi, lo = rgb.amax(1), rgb.amin(1)
    return torch.where(hi > 0, (hi - lo) / hi.clamp(min=1e-12), torch.zeros_like(hi)).mean().item()


def clipped_fraction(images: torch.Tensor, threshold: float = 1 / 255) -> float:
    """Fraction of raw (unclamped) channel values <= -1 + threshold or >= 1 - threshold: pinned at the range ends."""
    images = _check(images)
    # the default, half an 8-bit step (2 / 255 / 2), counts the values to_pil rounds to 0 or 255 (ties aside)
    return ((images <= -1 + threshold) | (images >= 1 - threshold)).float().mean().item()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image peak signal-to-noise ratio in dB (data range 2 for [-1, 1] images)."""
    mse = (_check(a, "a") - _check(b, "b")).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004): 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, per channel,
    averaged over the window positions inside the image (as scikit-image does). Images must be at least 11x11."""
    a, b = _check(a, "a").double(), _check(b, "b").double()  # E[x^2] - E[x]^2 cancels badly in float32
    if a.shape != b.shape or min(a.shape[-2:]) < 11:
        shapes = f"{tuple(a.shape)} and {tuple(b.shape)}"
        raise ValueError(f"ssim needs two equal-shape images of at least 11x11, got {shapes}")
    c = a.shape[1]
    window = _gaussian_window().to(a.device, a.dtype).expand(c, 1, 11, 11)
    filt = lambda x: F.conv2d(x, window, groups=c)
    mu_a, mu_b = filt(a), filt(b)
    var_a, var_b = filt(a * a) - mu_a**2, filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()


def _checked_pair(real_feats, fake_feats, k) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        raise ValueError(f"k must be a positive int, got {k!r}")
    for name, feats in (("real_feats", real_feats), ("fake_feats", fake_feats)):
        if not torch.is_tensor(feats) or feats.ndim != 2:
            raise ValueError(f"{name} must be an (N, D) tensor, got shape {tuple(getattr(feats, 'shape', ()))}")
        if not torch.isfinite(feats).all():
            raise ValueError(f"{name} contain NaN or inf")
    if real_feats.shape[1] != fake_feats.shape[1]:
        raise ValueError(f"real_feats and fake_feats must have one feature dimension, got {real_feats.shape[1]} and "
                         f"{fake_feats.shape[1]}")
    if min(len(real_feats), len(fake_feats)) <= k:
        raise ValueError(f"precision_recall needs more than k = {k} samples per set, got {len(real_feats)} real and "
                         f"{len(fake_feats)} fake")
    return real_feats.double(), fake_feats.double()


def _kth_neighbour_radii(support: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Distance from each row to its k-th nearest neighbour in ``support`` (the row itself is the 0-th), by
    blocks of rows x blocks of columns, keeping only the k + 1 smallest distances per row: O(N k + block^2)."""
    radii = torch.empty(len(support), dtype=support.dtype)
    for r in range(0, len(support), block):
        rows = support[r : r + block]
        nearest = torch.full((len(rows), 0), float("inf"), dtype=support.dtype)
        for c in range(0, len(support), block):
            candidates = torch.cat([nearest, torch.cdist(rows, support[c : c + block])], dim=1)
            nearest = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii[r : r + len(rows)] = nearest[:, k]
    return radii


def _covered(support: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, block: int) -> float:
    """Fraction of queries within some support row's k-NN ball, by blocks (no queries x support matrix)."""
    inside = torch.zeros(len(queries), dtype=torch.bool)
    for r in range(0, len(queries), block):
        q = queries[r : r + block]
        for c in range(0, len(support), block):
            inside[r : r + len(q)] |= (torch.cdist(q, support[c : c + block]) <= radii[c : c + block]).any(1)
    return inside.sum().item() / len(queries)


def precision_recall(real_feats: torch.Tensor, fake_feats: torch.Tensor, k: int = 3, block_size: int = 1024) -> tuple[float, float]:
    """Improved precision (fakes inside some real sample's k-NN ball) and recall (reals inside some fake
    sample's k-NN ball), Kynkaanniemi et al. (2019), with k = 3 as in the paper.

    Distances are computed in float64 by ``block_size`` x ``block_size`` blocks, keeping the k + 1 nearest per
    row: memory O(N k + block_size^2), never the N x N matrix (``precision_recall_dense`` is that reference).
    """
    if not (isinstance(block_size, int) and block_size >= 1):
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    real, fake = _checked_pair(real_feats, fake_feats, k)
    real_radii, fake_radii = _kth_neighbour_radii(real, k, block_size), _kth_neighbour_radii(fake, k, block_size)
    return _covered(real, real_radii, fake, block_size), _covered(fake, fake_radii, real, block_size)


def precision_recall_dense(real_feats: torch.Tensor, fake_feats: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """The same measure from full N x N distance matrices (memory O(N^2)): the reference ``precision_recall`` is
    tested and benchmarked against."""

    def covered(support: torch.Tensor, queries: torch.Tensor) -> float:
        radii = torch.cdist(support, support).kthvalue(k + 1, dim=1).values  # the point itself is the first
        return (torch.cdist(queries, support) <= radii[None, :]).any(1).sum().item() / len(queries)

    real, fake = _checked_pair(real_feats, fake_feats, k)
    return covered(real, fake), covered(fake, real)
