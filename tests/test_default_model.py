"""The embedded default model: format, size, and the quality bar measured by the shipped classifier."""

import pytest
import torch
from diffusers import UNet2DModel

import diffkit
from diffkit.classifier import load_classifier


def _accuracy(per_class: int, seed: int = 0) -> float:
    pipe = diffkit.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(10).repeat_interleave(per_class)
    generator = torch.Generator().manual_seed(seed)
    images = torch.cat([
        pipe(class_labels=chunk.tolist(), guidance_scale=3.0, num_inference_steps=25, generator=generator, output_type="latent").images
        for chunk in labels.split(250)
    ])
    with torch.no_grad():
        return (load_classifier()(images.clamp(-1, 1)).argmax(1) == labels).float().mean().item()


def test_default_model_is_small_diffusers_format():
    files = [p for p in diffkit.DEFAULT_MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    assert not any(p.suffix in (".bin", ".pt", ".pkl", ".ckpt") for p in files)  # safetensors only
    unet = UNet2DModel.from_pretrained(diffkit.DEFAULT_MODEL, subfolder="unet")  # plain diffusers can read it
    assert unet.config.in_channels == 3 and unet.config.num_class_embeds == 11


def test_default_model_draws_the_requested_digit():
    """The issue's bar (>= 90% of samples classified as the class asked for) on 20 samples per class."""
    assert _accuracy(per_class=20) >= 0.9


@pytest.mark.slow
def test_default_model_quality_bar_full():
    """The bar as stated: 100 samples per class, CFG 3, 25 DPM-Solver++ steps."""
    assert _accuracy(per_class=100, seed=1) >= 0.9


def test_the_default_models_builder_is_importable_and_builds_the_shipped_architecture():
    """diffkit.recipe's builders (the recipe diffkit/recipes/default.json) make the shipped UNet and scheduler: the
    same config, and the shipped weights load into the built UNet with every key matching."""
    from diffusers import DPMSolverMultistepScheduler

    from diffkit.recipe import build_default_scheduler, build_unet

    public = lambda config: {k: v for k, v in dict(config).items() if not k.startswith("_")}  # noqa: E731
    shipped = UNet2DModel.from_pretrained(diffkit.DEFAULT_MODEL, subfolder="unet")
    unet = build_unet()
    assert public(unet.config) == public(shipped.config)
    unet.load_state_dict(shipped.state_dict(), strict=True)
    scheduler = DPMSolverMultistepScheduler.from_pretrained(diffkit.DEFAULT_MODEL, subfolder="scheduler")
    assert public(build_default_scheduler().config) == public(scheduler.config)
