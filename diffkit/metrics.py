"""diffkit's measuring stick. Images are float tensors in [-1, 1], shape (N, 3, H, W), unless said otherwise.

- ``fd``: Frechet distance between Gaussians fitted to two sets' digits-classifier penultimate features
  (FID's formula on a digits network; lower is closer).
- ``class_accuracy``: fraction of samples the digits classifier labels as the class that was asked for.
- ``saturation``: mean HSV saturation (max - min) / max over all pixels of the [0, 1] images.
- ``clipped_fraction``: fraction of channel values at or beyond the [-1, 1] range (on raw, unclamped output).
- ``psnr`` / ``ssim``: per-image fidelity to a reference (Wang et al. 2004 SSIM, 11x11 Gaussian window).
- ``precision_recall``: improved precision and recall (Kynkaanniemi et al. 2019) by k-NN balls in feature space.
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


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2}), in float64.

    tr((S_a S_b)^{1/2}) is the sum of square roots of the eigenvalues of S_a^{1/2} S_b S_a^{1/2}, which is
    symmetric positive semi-definite, so no non-symmetric matrix square root is needed.
    """
    a, b = feats_a.double(), feats_b.double()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (N >= 2, D) feature sets of equal D, got {tuple(a.shape)} and {tuple(b.shape)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    evals, evecs = torch.linalg.eigh(cov_a)
    sqrt_a = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


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


def precision_recall(real_feats: torch.Tensor, fake_feats: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision (fakes inside some real sample's k-NN ball) and recall (reals inside some fake
    sample's k-NN ball), Kynkaanniemi et al. (2019)."""

    def covered(support: torch.Tensor, queries: torch.Tensor) -> float:
        d_support = torch.cdist(support, support)
        radii = d_support.kthvalue(k + 1, dim=1).values  # k-th neighbour, the point itself is the first
        return (torch.cdist(queries, support) <= radii[None, :]).any(1).float().mean().item()

    real, fake = real_feats.double(), fake_feats.double()
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision_recall needs more than k = {k} samples per set")
    return covered(real, fake), covered(fake, real)
