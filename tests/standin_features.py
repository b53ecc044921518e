"""A small stand-in feature network for tests of user-named feature extractors (no weights on disk)."""

import torch


class StandInFeatures(torch.nn.Module):
    """uint8 (N, 3, H, W) images -> (N, 12) features: a fixed random conv layer, ReLU and average pooling."""

    name = "stand-in"

    def __init__(self, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 12, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) * 0.3)
            self.conv.bias.copy_(torch.randn(12, generator=generator) * 0.1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1
        return torch.relu(self.conv(x)).mean((2, 3))
