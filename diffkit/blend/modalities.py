"""Modalities computed from an image itself: the control images the per-modality adapters are trained on.

Each extractor maps images in [-1, 1], shape (B, 3, H, W), to a 3-channel control image in [-1, 1] of the same
size (diffusers' convention: control images are RGB). A new modality needs only an entry in ``MODALITIES``
(or no entry at all: the pipeline takes any control image with a trained adapter).
"""

import torch
import torch.nn.functional as F


def _check(images: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(getattr(images, 'shape', ()))}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf")
    return images


def ink(images: torch.Tensor) -> torch.Tensor:
    """Ink intensity in [0, 1], (B, 1, H, W): the brightest channel, so a digit of any colour counts as ink."""
    return ((_check(images) + 1) / 2).amax(dim=1, keepdim=True).clamp(0, 1)


def _as_control(gray: torch.Tensor) -> torch.Tensor:
    return (gray * 2 - 1).expand(-1, 3, -1, -1).contiguous()


def edges(images: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Binary edge map: Sobel gradient magnitude of the ink above ``threshold`` (a Canny-like line drawing)."""
    gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device)
    kernel = torch.stack([gx, gx.T]).unsqueeze(1).to(images.dtype)
    grad = F.conv2d(F.pad(ink(images), (1, 1, 1, 1), mode="replicate"), kernel)
    return _as_control((grad.norm(dim=1, keepdim=True) > threshold).to(images.dtype))


def low_resolution(images: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """The image average-pooled by ``factor`` and blown back up (nearest): coarse shape and the colour."""
    _check(images)
    if images.shape[-1] % factor or images.shape[-2] % factor:
        raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by factor {factor}")
    return F.interpolate(F.avg_pool2d(images, factor), scale_factor=factor, mode="nearest")


def ink_mask(images: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Binary segmentation of the digit: ink above ``threshold``, without its colour."""
    return _as_control((ink(images) > threshold).to(images.dtype))


MODALITIES = {"edges": edges, "low_resolution": low_resolution, "ink_mask": ink_mask}


def extract(name: str, images: torch.Tensor) -> torch.Tensor:
    """The control image of modality ``name`` for ``images``."""
    if name not in MODALITIES:
        raise ValueError(f"unknown modality {name!r}; built in: {sorted(MODALITIES)}")
    return MODALITIES[name](images)
