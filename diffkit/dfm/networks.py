"""Generators for diffusion with forward models: (context, noisy target, their masks, noise level) -> signal.

A generator is called like a diffusers UNet2DModel, ``generator(inputs, timestep).sample``, where ``inputs``
stacks on the channel axis the lifted context, its mask, the lifted noisy target observation and its mask
(2 C + 2 channels on the signal's coordinates) and the output is the signal (C channels). For images a
UNet2DModel with ``in_channels = 2 C + 2`` is a generator as it is (``image_generator``); ``SignalMLP`` is
the generator of 1-D signals.
"""

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn


def generator_channels(signal_channels: int) -> int:
    """Input channels of a generator: lifted context, its mask, lifted noisy target, its mask."""
    return 2 * signal_channels + 2


class SignalMLP(ModelMixin, ConfigMixin):
    """An MLP generator for 1-D signals (C, L): flattened inputs plus a sinusoidal time embedding, SiLU."""

    @register_to_config
    def __init__(self, signal_channels: int = 1, signal_length: int = 32, width: int = 256, depth: int = 3):
        super().__init__()
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(width, width)
        self.inp = nn.Linear(generator_channels(signal_channels) * signal_length, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        self.out = nn.Linear(width, signal_channels * signal_length)

    def forward(self, sample: torch.Tensor, timestep, return_dict: bool = True):
        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).float().expand(b)
        h = self.inp(sample.flatten(1)) + self.time_embedding(self.time_proj(t).to(sample.dtype))
        for layer in self.hidden:
            h = layer(nn.functional.silu(h))
        out = self.out(nn.functional.silu(h)).view(b, self.config.signal_channels, self.config.signal_length)
        return UNet2DOutput(sample=out) if return_dict else (out,)


def image_generator(image_size: int = 16, channels: int = 3, block_out_channels=(32, 64, 64)) -> UNet2DModel:
    """A small UNet2DModel generator for (channels, image_size, image_size) images."""
    return UNet2DModel(
        sample_size=image_size,
        in_channels=generator_channels(channels),
        out_channels=channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * (len(block_out_channels) - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (len(block_out_channels) - 1),
        attention_head_dim=min(32, block_out_channels[-1]),
        norm_num_groups=16,
    )
