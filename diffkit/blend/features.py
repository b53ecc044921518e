"""Where modality networks meet a diffusers UNet: adding adapter features into the encoder, and reading the
encoder's features back.

Adapter features are added inside each down block after its last resnet / attention layer and before its
downsampler, exactly where ``UNet2DConditionModel`` adds ``down_intrablock_additional_residuals``, so they flow
through the rest of the encoder (T2I-Adapter; MaGIC's MCU-Net). Forward hooks do it, so the same code serves
``UNet2DModel`` (the default model), which has no such argument. In a ``UNet2DConditionModel`` (SD 1.x / 2.x,
SDXL) a down block without cross-attention gets its feature after the block, downsampler included, as diffusers
adds it there (SDXL's first block; its adapters are shaped for that). The encoder features are MaGIC's ``hs``:
``conv_in``'s output and every skip tensor of the down blocks.
"""

from contextlib import contextmanager

import torch


def _last_layer(block: torch.nn.Module) -> torch.nn.Module:
    attentions = getattr(block, "attentions", None)
    return attentions[-1] if attentions is not None and len(attentions) else block.resnets[-1]


def _add(output, feature: torch.Tensor):
    hidden = output[0] if isinstance(output, tuple) else output
    if hidden.shape[1:] != feature.shape[1:]:
        raise ValueError(f"adapter feature of shape {tuple(feature.shape[1:])} does not fit the UNet's {tuple(hidden.shape[1:])}")
    if hidden.shape[0] != feature.shape[0]:
        if hidden.shape[0] % feature.shape[0]:
            raise ValueError(f"adapter features for a batch of {feature.shape[0]} cannot serve a batch of {hidden.shape[0]}")
        feature = feature.repeat(hidden.shape[0] // feature.shape[0], 1, 1, 1)  # both halves of a guidance batch
    hidden = hidden + feature.to(hidden.dtype)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _add_after_block(output, feature: torch.Tensor):
    """A down block's (sample, skips) with ``feature`` added to the sample, and to its last skip where that is the
    same tensor (diffusers adds in place, so its skip carries the feature too)."""
    sample, skips = output
    added = _add(sample, feature)
    skips = tuple(added if s is sample else s for s in skips)
    return added, skips


def _adds_after_block(unet, block) -> bool:
    from ..backbones import family_of

    return family_of(unet) in ("sd", "sdxl") and not getattr(block, "has_cross_attention", False)


@contextmanager
def injected(unet: torch.nn.Module, features: list[torch.Tensor] | None):
    """Within the block, every forward of ``unet`` adds ``features[i]`` inside down block i (None: no-op)."""
    if features is None:
        yield
        return
    blocks = unet.down_blocks
    if len(features) != len(blocks):
        raise ValueError(f"the adapter gives {len(features)} feature maps; the UNet has {len(blocks)} down blocks")
    hooks = [b.register_forward_hook(lambda m, a, out, f=f: _add_after_block(out, f)) if _adds_after_block(unet, b)
             else _last_layer(b).register_forward_hook(lambda m, a, out, f=f: _add(out, f))
             for b, f in zip(blocks, features)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


class _EncoderDone(Exception):
    pass


def encoder_features(unet: torch.nn.Module, run) -> list[torch.Tensor]:
    """The encoder features of the forward pass ``run()`` makes through ``unet``; the mid and up blocks are
    skipped (MaGIC compares encoder features only, so the gradient needs nothing after them)."""
    feats: list[torch.Tensor] = []

    def stop(module, args):
        raise _EncoderDone

    hooks = [unet.conv_in.register_forward_hook(lambda m, a, out: feats.append(out))]
    hooks += [b.register_forward_hook(lambda m, a, out: feats.extend(out[1])) for b in unet.down_blocks]
    hooks.append(unet.mid_block.register_forward_pre_hook(stop))
    try:
        run()
    except _EncoderDone:
        pass
    finally:
        for h in hooks:
            h.remove()
    return feats
