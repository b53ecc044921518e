"""Per-modality conditional networks: diffusers T2I-Adapters shaped for a UNet's encoder, saved one folder per
modality (``<folder>/<modality>/`` with config.json and safetensors weights)."""

from pathlib import Path

import torch
from diffusers import T2IAdapter

from ..assets import MODALITY_ADAPTERS as DEFAULT_ADAPTERS


def adapter_for(unet, in_channels: int = 3, num_res_blocks: int = 2, downscale_factor: int = 1) -> T2IAdapter:
    """A full T2I-Adapter whose feature maps match ``unet``'s down blocks (channels and resolutions): a pixel
    unshuffle by ``downscale_factor`` (1 for a pixel-space UNet; the VAE's factor, 8 for Stable Diffusion, for a
    latent one, whose control images stay at pixel resolution), then one halving per block after the first, as
    the UNet downsamples."""
    channels = list(unet.config.block_out_channels)
    return T2IAdapter(in_channels=in_channels, channels=channels, num_res_blocks=num_res_blocks,
                      downscale_factor=downscale_factor, adapter_type="full_adapter")


def load_adapters(folder: str | Path | None = None, names: list[str] | None = None) -> dict[str, T2IAdapter]:
    """{modality: adapter} for every adapter folder under ``folder`` (default: the ones shipped for the default
    model), or for ``names`` only."""
    folder = Path(folder) if folder is not None else DEFAULT_ADAPTERS
    if not folder.is_dir():
        raise FileNotFoundError(f"no adapter folder at {folder}")
    found = sorted(p.parent.name for p in folder.glob("*/config.json"))
    names = found if names is None else list(names)
    missing = sorted(set(names) - set(found))
    if missing:
        raise ValueError(f"no adapter for {missing} in {folder}; found {found}")
    return {name: T2IAdapter.from_pretrained(folder / name, use_safetensors=True).eval() for name in names}


@torch.no_grad()
def adapter_features(adapter: T2IAdapter, control: torch.Tensor) -> list[torch.Tensor]:
    return [f for f in adapter(control.to(adapter.dtype))]
