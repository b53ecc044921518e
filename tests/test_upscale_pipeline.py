"""UpscalePipeline: the same result as the sampler run by hand, UPSR's weighting on or off, PIL input, a save / load
round trip through load_pipeline, and clear errors."""

import numpy as np
import PIL.Image
import pytest
import torch

import diffkit
from diffkit.pipelines import UpscalePipeline, UpscalePipelineOutput
from diffkit.resshift import (ResShiftDenoiser, ResShiftScheduler, SRNet, resshift_unet, sample_resshift,
                              uncertainty_weight, upsr_inputs)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    p = UpscalePipeline(unet=resshift_unet(sample_size=8, width=8).eval(), sr_net=SRNet(width=4, depth=1).eval(),
                        scheduler=ResShiftScheduler(a=0.1, b=0.4))
    p.set_progress_bar_config(disable=True)
    return p


def _low(batch=2, seed=0):
    return torch.rand(batch, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("weighting", [True, False])
def test_pipeline_equals_the_sampler_by_hand(pipe, weighting):
    y0, noise = _low(), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    steps = []
    out = pipe(y0, noise_weighting=weighting, latents=noise, output_type="pt",
               callback_on_step_end=lambda p, i, t, kw: steps.append(t) or {})
    assert isinstance(out, UpscalePipelineOutput) and steps == [4, 3, 2, 1, 0]
    schedule = pipe.scheduler.schedule
    with torch.no_grad():
        y, g_y = upsr_inputs(pipe.sr_net, y0, 2)
        weight = uncertainty_weight(g_y, y, 0.1, 0.4) if weighting else None
        x = sample_resshift(ResShiftDenoiser(pipe.unet, schedule), schedule.prior_sample(y, noise, weight), y,
                            cond=[g_y, y])
    assert torch.allclose(out.images, (x / 2 + 0.5).clamp(0, 1), atol=1e-6)
    assert torch.equal(out.uncertainty, weight if weighting else torch.ones_like(y))
    if weighting:
        assert out.uncertainty.min() >= 0.4 and out.uncertainty.max() <= 1


def test_pil_input_and_output_types(pipe):
    array = ((_low(1)[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    image = PIL.Image.fromarray(array)
    generator = torch.Generator().manual_seed(0)
    pil = pipe(image, generator=generator).images
    assert len(pil) == 1 and pil[0].size == (8, 8)
    images, weight = pipe([image, image], output_type="np", return_dict=False, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 8, 8, 3) and weight.shape == (2, 3, 8, 8)
    assert pipe(image, output_type="latent").images.shape == (1, 3, 8, 8)


def test_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "upsr")
    loaded = diffkit.load_pipeline(tmp_path / "upsr")
    assert isinstance(loaded, UpscalePipeline)
    loaded.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(pipe(_low(), latents=noise, output_type="pt").images,
                       loaded(_low(), latents=noise, output_type="pt").images)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"image": torch.zeros(2, 1, 4, 4)}, ValueError, "image must have shape \\(B, 3, h, w\\)"),
        ({"image": torch.zeros(0, 3, 4, 4)}, ValueError, "image must have shape"),
        ({"image": torch.full((1, 3, 4, 4), float("nan"))}, ValueError, "image contains NaN"),
        ({"image": "low.png"}, TypeError, "image must be a tensor or PIL image"),
        ({"latents": torch.zeros(1, 3, 8, 8)}, ValueError, "latents must have shape \\(2, 3, 8, 8\\)"),
        ({"output_type": "jpg"}, ValueError, "output_type must be one of"),
        ({"generator": [torch.Generator()]}, ValueError, "a list of 1 generators for a batch of 2"),
    ],
)
def test_bad_inputs(pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        pipe(**{"image": _low(), **kwargs})


def test_shipped_model_upscales_held_out_digits():
    """The shipped UPSR (assets/upsr, bench_upsr's seed 0) recovers 16x16 held-out digits from their 8x8 bicubic
    downsampling far better than bicubic upsampling does (measured: 32.2 vs 24.8 dB on 64 digits)."""
    from diffkit.assets import UPSR_MODEL
    from diffkit.data import colored_digits
    from diffkit.inverse import make_operator
    from diffkit.metrics import psnr
    from diffkit.resshift import bicubic_upsample

    shipped = diffkit.load_pipeline(UPSR_MODEL)
    shipped.set_progress_bar_config(disable=True)
    x = colored_digits("test")[0][:32]
    y0 = make_operator("sr_bicubic:2").forward(x)
    out = shipped(y0, generator=torch.Generator().manual_seed(0), output_type="pt").images * 2 - 1
    assert psnr(out, x).mean() > psnr(bicubic_upsample(y0, 2).clamp(-1, 1), x).mean() + 5
