"""AnagramPipeline: the same sample as the view denoiser run by hand, both views in the output, text models, a
save / load round trip, and clear errors."""

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

import diffkit
from diffkit.anagram import AnagramDenoiser, classifier_alignment, stack_views
from diffkit.guidance import CFG
from diffkit.pipelines import AnagramPipeline, AnagramPipelineOutput
from diffkit.solvers import make_timesteps, sample_dpmpp_2m
from diffkit.views import make_view
from helpers import tiny_text_components


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    p = AnagramPipeline.from_pipe(diffkit.load_pipeline())
    p.set_progress_bar_config(disable=True)
    return p


def _latents(batch=2, seed=0):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rectify, balance", [(False, False), (True, False), (True, True)])
def test_pipeline_equals_the_view_denoiser_by_hand(pipe, rectify, balance):
    latents = _latents()
    out = pipe(class_labels=[6, 9], views=["identity", "rot90"], rectify=rectify, balance=balance, latents=latents,
               num_inference_steps=8, guidance_scale=3.0, num_images_per_prompt=2, output_type="pt")
    assert isinstance(out, AnagramPipelineOutput)
    denoiser = diffkit.Denoiser.from_pipeline_components(pipe.unet, pipe.scheduler)
    views = AnagramDenoiser(denoiser, ["identity", "rot90"], rectify=rectify,
                            alignment=classifier_alignment() if balance else None)
    cond = stack_views([{"class_labels": torch.tensor([6, 6])}, {"class_labels": torch.tensor([9, 9])}])
    with torch.no_grad():
        x = sample_dpmpp_2m(views, latents, make_timesteps(denoiser.schedule, "dpmpp_2m", 8, pipe.scheduler.config),
                            cond=cond, uncond={"class_labels": torch.full((4,), 10)}, guidance=CFG(3.0))
    expected = (x / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(out.images, expected, atol=1e-6)
    rot90 = make_view("rot90")
    assert torch.equal(out.view_images[0], out.images)
    assert torch.allclose(out.view_images[1], (rot90.apply(x) / 2 + 0.5).clamp(0, 1), atol=1e-6)


def test_output_types_and_tuple(pipe):
    kw = dict(class_labels=[1, 7], views=["identity", "vflip"], num_inference_steps=3, latents=_latents(1))
    pil = pipe(**kw).view_images
    assert len(pil) == 2 and all(len(v) == 1 and v[0].size == (16, 16) for v in pil)
    images, views = pipe(**kw, output_type="np", return_dict=False)
    assert images.shape == (1, 16, 16, 3) and np.allclose(views[1], images[:, ::-1])  # vflip flips rows
    latent = pipe(**kw, output_type="latent").view_images[1]
    assert latent.shape == (1, 3, 16, 16)


def test_text_model_takes_one_prompt_per_view():
    components = tiny_text_components()
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    text = AnagramPipeline(**components, scheduler=scheduler)
    text.set_progress_bar_config(disable=True)
    out = text(prompt=["a red digit", "a blue seven"], views=["identity", "rot180"], num_inference_steps=3,
               output_type="latent", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 4, 8, 8) and torch.isfinite(out.images).all()
    with pytest.raises(ValueError, match="balance=True scores each view with the digits classifier"):
        text(prompt=["a", "b"], balance=True, num_inference_steps=2)


def test_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    loaded = diffkit.load_pipeline(tmp_path / "p")
    assert isinstance(loaded, AnagramPipeline)
    loaded.set_progress_bar_config(disable=True)
    kw = dict(class_labels=[2, 5], num_inference_steps=3, latents=_latents(1), output_type="pt")
    assert torch.equal(pipe(**kw).images, loaded(**kw).images)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"class_labels": [3]}, "one entry per view \\(2 views\\)"),
        ({"class_labels": 3}, "one entry per view"),
        ({"class_labels": [3, 12]}, "class_labels must lie in \\[0, 9\\]"),
        ({"class_labels": [3, 4], "views": ["identity", "blur"]}, "unknown view 'blur'"),
        ({"class_labels": [3, 4], "views": []}, "views must be a non-empty list"),
        ({"class_labels": [3, 4], "correlation": "pearson"}, "correlation must be one of"),
        ({"class_labels": [3, 4], "num_images_per_prompt": 0}, "num_images_per_prompt must be a positive integer"),
        ({"class_labels": [3, 4], "height": 10}, "height must be a positive multiple of 4"),
        ({"class_labels": [3, 4], "height": 12},
         "view .rot90. must keep the sample shape \\(3, 12, 16\\), got \\(3, 16, 12\\)"),
        ({"class_labels": [3, 4], "solver": "plms"}, "solver must be one of"),
        ({}, "pass exactly one of"),
    ],
)
def test_bad_inputs(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(num_inference_steps=2, **kwargs)
