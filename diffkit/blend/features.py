"""Where modality networks meet a diffusers UNet: adding adapter features into the encoder, and reading the
features that the blending loss compares back.

Adapter features are added inside each down block after its last resnet / attention layer and before its
downsampler, exactly where ``UNet2DConditionModel`` adds ``down_intrablock_additional_residuals``, so they flow
through the rest of the encoder (T2I-Adapter; MaGIC's MCU-Net). Forward hooks do it, so the same code serves
``UNet2DModel`` (the default model), which has no such argument. In a ``UNet2DConditionModel`` (SD 1.x / 2.x,
SDXL) a down block without cross-attention gets its feature after the block, downsampler included, as diffusers
adds it there (SDXL's first block; its adapters are shaped for that). The encoder features are MaGIC's ``hs``:
``conv_in``'s output and every skip tensor of the down blocks.

ControlNet residuals (``down_block_additional_residuals``, ``mid_block_additional_residual``) are added to the skip
tensors after the encoder and to the mid block's output, so they leave the encoder features unchanged. For
ControlNet modalities the blending compares the "effective skip features" instead: every skip tensor and the mid
block's output as the decoder receives them, residuals included (``encoder_features(..., mid=True)``).
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


def _always() -> bool:
    return True


@contextmanager
def injected(unet: torch.nn.Module, features: list[torch.Tensor] | None, when=_always):
    """Within the block, every forward of ``unet`` adds ``features[i]`` inside down block i (None: no-op), while
    ``when()`` is true (MaGIC's ``cond_tau`` window)."""
    if features is None:
        yield
        return
    blocks = unet.down_blocks
    if len(features) != len(blocks):
        raise ValueError(f"the adapter gives {len(features)} feature maps; the UNet has {len(blocks)} down blocks")

    def after_block(out, f):
        return _add_after_block(out, f) if when() else out

    def after_layer(out, f):
        return _add(out, f) if when() else out

    hooks = [b.register_forward_hook(lambda m, a, out, f=f: after_block(out, f)) if _adds_after_block(unet, b)
             else _last_layer(b).register_forward_hook(lambda m, a, out, f=f: after_layer(out, f))
             for b, f in zip(blocks, features)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


class _EncoderDone(Exception):
    pass


def network(unet: torch.nn.Module) -> torch.nn.Module:
    """The diffusers model itself behind a ``diffkit.backbones`` wrapper (whose forward calls it)."""
    from ..backbones import _Backbone

    return unet.model if isinstance(unet, _Backbone) else unet


def encoder_features(unet: torch.nn.Module, run, mid: bool = False) -> list[torch.Tensor]:
    """The features of the forward pass ``run()`` makes through ``unet``, which stops there.

    ``mid=False``: MaGIC's encoder features (``conv_in``'s output and every down block's skip tensors); the mid and
    up blocks are skipped, so the gradient needs nothing after them. ``mid=True``: the effective skip features of
    a ControlNet-conditioned UNet, those skip tensors and the mid block's output each with the ControlNet residual
    the call passes (``down_block_additional_residuals``, ``mid_block_additional_residual``) added, as the decoder
    receives them; the up blocks are skipped."""
    feats: list[torch.Tensor] = []
    residuals: dict = {}

    def stop(module, args):
        raise _EncoderDone

    def read_residuals(module, args, kwargs):
        residuals["down"] = kwargs.get("down_block_additional_residuals")
        residuals["mid"] = kwargs.get("mid_block_additional_residual")

    hooks = [unet.conv_in.register_forward_hook(lambda m, a, out: feats.append(out))]
    hooks += [b.register_forward_hook(lambda m, a, out: feats.extend(out[1])) for b in unet.down_blocks]
    if mid:
        hooks.append(network(unet).register_forward_pre_hook(read_residuals, with_kwargs=True))
        hooks.append(unet.mid_block.register_forward_hook(lambda m, a, out: feats.append(out)))
        hooks.append(unet.up_blocks[0].register_forward_pre_hook(stop))
    else:
        hooks.append(unet.mid_block.register_forward_pre_hook(stop))
    try:
        run()
    except _EncoderDone:
        pass
    finally:
        for h in hooks:
            h.remove()
    if mid and residuals.get("down") is not None:
        added = [*residuals["down"], residuals["mid"]]
        if len(added) != len(feats):
            raise ValueError(f"the ControlNet gives {len(added)} residuals for the UNet's {len(feats)} skip features")
        feats = [f + r.to(f.dtype) for f, r in zip(feats, added)]
    return feats
