"""ControlNet modalities: each modality through a diffusers ``ControlNetModel`` whose residuals condition the UNet.

A ControlNet runs beside the UNet at every call, on the same latent, timestep and text, and returns one residual
per skip tensor plus one for the mid block's output (scaled by its conditioning scale); the UNet adds them after
its encoder (``down_block_additional_residuals``, ``mid_block_additional_residual``). Summing several ControlNets'
residuals is diffusers' ``MultiControlNetModel``. ``controlled`` adds them by a forward pre-hook on the UNet, so
every path that calls the network (diffkit's solvers, guidance, the blending loss) gets them.

Control images follow diffusers' ControlNet pipelines: RGB in [0, 1] at the image's pixel size.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import ControlNetModel

from .features import _always, network


@dataclass
class ControlNetModality:
    """One modality's ControlNet, its control image for the batch, (B, C, H, W) in [0, 1], and its conditioning
    scale (diffusers' ``controlnet_conditioning_scale``)."""

    controlnet: ControlNetModel
    image: torch.Tensor
    scale: float = 1.0


def controlnet_for(unet, conditioning_channels: int = 3,
                   conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)) -> ControlNetModel:
    """A ControlNet for ``unet`` (a ``UNet2DConditionModel``) to train for a new modality: its encoder copied from the
    UNet and its residual convolutions zero, as in the ControlNet paper (``ControlNetModel.from_unet``). Its
    conditioning embedding halves the control image once per entry of ``conditioning_embedding_out_channels`` after
    the first, so the default (diffusers') takes control images at 8 times the latent size, Stable Diffusion's VAE
    factor."""
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
                                     conditioning_channels=conditioning_channels)


def _rows(value, groups: int, batch: int, j: int):
    """Group j of a batch stacked as (copies, groups, batch): rows copy * groups * batch + j * batch + r."""
    if torch.is_tensor(value) and value.ndim and value.shape[0] > 1:
        return value.reshape(-1, groups, batch, *value.shape[1:])[:, j].reshape(-1, *value.shape[1:])
    if isinstance(value, dict):
        return {name: _rows(v, groups, batch, j) for name, v in value.items()}
    return value


def _repeat_to(image: torch.Tensor, n: int) -> torch.Tensor:
    if n % image.shape[0]:
        raise ValueError(f"a control image batch of {image.shape[0]} cannot serve a UNet batch of {n}")
    return image.repeat(n // image.shape[0], 1, 1, 1)


def _residuals(part: ControlNetModality, sample, timestep, text, added):
    net = part.controlnet
    down, mid = net(sample.to(net.dtype), timestep, encoder_hidden_states=text,
                    controlnet_cond=_repeat_to(part.image, sample.shape[0]).to(sample.device, net.dtype),
                    conditioning_scale=part.scale, added_cond_kwargs=added, return_dict=False)
    return list(down), mid


@contextmanager
def controlled(unet: torch.nn.Module, modalities: list[ControlNetModality] | None, stacked: bool = False, when=_always):
    """Within the block, every forward of ``unet`` (a ``UNet2DConditionModel``, bare or behind a diffkit backbone)
    gets the ControlNet residuals of ``modalities``, while ``when()`` is true.

    ``stacked=False``: every ControlNet sees the whole batch and their residuals are summed (``MultiControlNetModel``).
    ``stacked=True``: the batch stacks one group of B images per modality (as (copies, K, B), copies being the halves of
    a guidance batch): modality k conditions group k only, the K branch trajectories of consistent modality blending.
    """
    if not modalities:
        yield
        return
    model = network(unet)

    def add_residuals(module, args, kwargs):
        if not when():
            return None
        kwargs = dict(kwargs)
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        text = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        added = kwargs.get("added_cond_kwargs")
        if not stacked:
            down = mid = None
            for part in modalities:  # summed in order, as MultiControlNetModel sums them
                d, m = _residuals(part, sample, timestep, text, added)
                down = d if down is None else [a + b for a, b in zip(down, d)]
                mid = m if mid is None else mid + m
        else:
            k, b = len(modalities), modalities[0].image.shape[0]
            if sample.shape[0] % (k * b):
                raise ValueError(f"a batch of {sample.shape[0]} does not stack {k} modalities x {b} images")
            down = mid = None
            for j, part in enumerate(modalities):
                d, m = _residuals(part, _rows(sample, k, b, j), _rows(timestep, k, b, j), _rows(text, k, b, j),
                                  _rows(added, k, b, j))
                if down is None:
                    down = [r.new_zeros(sample.shape[0], *r.shape[1:]) for r in d]
                    mid = m.new_zeros(sample.shape[0], *m.shape[1:])
                for full, r in zip([*down, mid], [*d, m]):
                    full.view(-1, k, b, *r.shape[1:])[:, j] = r.view(-1, b, *r.shape[1:])
        kwargs["down_block_additional_residuals"] = tuple(down)
        kwargs["mid_block_additional_residual"] = mid
        return args, kwargs

    hook = model.register_forward_pre_hook(add_residuals, with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()
