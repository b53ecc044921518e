"""The digits classifier behind diffkit's metrics: class accuracy of samples and features for FD.

A small CNN for 16x16 RGB digits in [-1, 1], trained by scripts/train_classifier.py on the bundled MNIST
digits with random colours, saved in assets/classifier (safetensors + config.json).
"""

from functools import lru_cache
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .assets import CLASSIFIER


CLASSIFIER_PATH = CLASSIFIER


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
    )


class DigitClassifier(ModelMixin, ConfigMixin):
    """Two conv blocks at 16x16 and 8x8, a third at 4x4, global average pooling, a feature layer, a head."""

    @register_to_config
    def __init__(self, in_channels: int = 3, width: int = 32, feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            _block(in_channels, width), nn.MaxPool2d(2),
            _block(width, 2 * width), nn.MaxPool2d(2),
            _block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.feature = nn.Sequential(nn.Linear(4 * width, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (the FD embedding)."""
        return self.feature(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, (N, num_classes)."""
        return self.head(self.features(x))


@lru_cache(maxsize=4)
def load_classifier(path: str | Path | None = None, device: str = "cpu") -> DigitClassifier:
    """The shipped classifier (or one at ``path``), in eval mode on ``device``."""
    path = Path(path) if path is not None else CLASSIFIER_PATH
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no digits classifier at {path}; train one with scripts/train_classifier.py")
    return DigitClassifier.from_pretrained(path, use_safetensors=True).to(device).eval().requires_grad_(False)
