"""GuidedPipeline: diffusers conventions, the text path against StableDiffusionPipeline, Hub/local loading."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

import diffkit
from diffkit.pipelines import GuidedPipeline
from helpers import tiny_text_components, tiny_unet


def _class_pipe(prediction_type="v_prediction"):
    pipe = GuidedPipeline(tiny_unet(num_class_embeds=5), DPMSolverMultistepScheduler(prediction_type=prediction_type))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, **kw):
    kw = {"class_labels": [0, 3], "num_inference_steps": 4, "generator": torch.Generator().manual_seed(0), **kw}
    return pipe(**kw).images


def test_output_types_agree_and_tuple_equals_dict():
    pipe = _class_pipe()
    pt, np_images = _run(pipe, output_type="pt"), _run(pipe, output_type="np")
    pil = _run(pipe, output_type="pil")
    assert pt.shape == (2, 3, 8, 8) and np_images.shape == (2, 8, 8, 3)
    assert np.allclose(pt.permute(0, 2, 3, 1).numpy(), np_images)
    assert np.abs(np.asarray(pil[1]) / 255.0 - np_images[1]).max() <= 1 / 255
    latents = _run(pipe, output_type="latent")
    assert torch.allclose((latents / 2 + 0.5).clamp(0, 1), pt)
    (as_tuple,) = pipe(class_labels=[0, 3], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np", return_dict=False)
    assert np.array_equal(as_tuple, np_images)


def test_batch_equals_single_with_per_image_generators():
    pipe = _class_pipe()
    batch = _run(pipe, output_type="pt", generator=[torch.Generator().manual_seed(s) for s in (7, 8)])
    single = _run(pipe, class_labels=[3], output_type="pt", generator=[torch.Generator().manual_seed(8)])
    assert torch.allclose(batch[1:], single, atol=1e-5)


def test_save_load_round_trip(tmp_path):
    pipe = _class_pipe()
    pipe.save_pretrained(tmp_path / "p")
    assert (tmp_path / "p" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = diffkit.load_pipeline(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, GuidedPipeline)
    assert torch.equal(_run(pipe, output_type="pt"), _run(loaded, output_type="pt"))


def test_guidance_scale_one_skips_the_unconditional_pass():
    pipe = _class_pipe()
    calls = []
    pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    a = _run(pipe, output_type="pt", guidance_scale=1.0)
    assert set(calls) == {2}  # batch of 2, never 4
    b = _run(pipe, output_type="pt", guidance=None)
    assert torch.equal(a, b)


def test_callback_on_step_end_sees_every_step_and_can_edit_latents():
    pipe = _class_pipe()
    seen = []

    def callback(p, step, t, kwargs):
        seen.append(step)
        return {"latents": torch.zeros_like(kwargs["latents"])} if step == 3 else kwargs

    out = _run(pipe, output_type="latent", callback_on_step_end=callback)
    assert seen == [0, 1, 2, 3] and torch.equal(out, torch.zeros_like(out))


def test_ddim_eta_is_seeded():
    pipe = GuidedPipeline(tiny_unet(num_class_embeds=5), DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    a, b = (_run(pipe, solver="ddim", eta=1.0, output_type="pt") for _ in range(2))
    c = _run(pipe, solver="ddim", eta=0.0, output_type="pt")
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"class_labels": [5]}, "class_labels must lie"),
        ({"class_labels": [-1]}, "class_labels must lie"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"output_type": "jpeg"}, "output_type"),
        ({"solver": "plms"}, "solver must be one of"),
        ({"guidance": "pag"}, "guidance must be one of"),
        ({"latents": torch.zeros(1, 3, 8, 8)}, "latents must have shape"),
        ({"latents": torch.full((2, 3, 8, 8), float("nan"))}, "NaN"),
        ({"class_labels": None}, "exactly one of"),
        ({"height": 5}, "height must be a positive multiple of 2"),
        ({"width": -8}, "width must be a positive multiple"),
        ({"height": 8.0}, "height must be"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _run(_class_pipe(), **kwargs)


def _text_pipes():
    components = tiny_text_components()
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = GuidedPipeline(**components, scheduler=scheduler)
    ref = StableDiffusionPipeline(
        **components, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    return ours, ref


def test_text_path_equals_stable_diffusion_pipeline():
    ours, ref = _text_pipes()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(prompt=["a red digit", "blue seven"], num_inference_steps=6, guidance_scale=4.0, latents=latents)
    a = ours(**kw, output_type="latent").images
    b = ref(**kw, output_type="latent").images
    assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max().item())
    images_a, images_b = ours(**kw, output_type="np").images, ref(**kw, output_type="np").images
    assert images_a.shape == (2, 16, 16, 3) and np.abs(images_a - images_b).max() <= 1e-4


def test_text_pipeline_round_trips_and_loads_offline_from_hub_cache(tmp_path, monkeypatch):
    ours, _ = _text_pipes()
    ours.save_pretrained(tmp_path / "saved")
    # Populate a Hub cache the way huggingface_hub lays it out: refs/main -> snapshots/<commit>/...
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--diffkit-test--tiny-text"
    shutil.copytree(tmp_path / "saved", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    loaded = diffkit.load_pipeline("diffkit-test/tiny-text", cache_dir=tmp_path / "hub")
    loaded.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red digit", num_inference_steps=3, output_type="pt")
    a = ours(**kw, generator=torch.Generator().manual_seed(1)).images
    assert torch.equal(a, loaded(**kw, generator=torch.Generator().manual_seed(1)).images)
    with pytest.raises(FileNotFoundError, match="cannot load"):
        diffkit.load_pipeline("diffkit-test/not-cached", cache_dir=tmp_path / "hub")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        diffkit.load_pipeline(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        diffkit.load_pipeline(tmp_path / "empty")
    _class_pipe().save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    (tmp_path / "p" / "model_index.json").write_text(json.dumps({**index, "_class_name": "NoSuchPipeline"}))
    with pytest.raises(ValueError, match="unknown pipeline class"):
        diffkit.load_pipeline(tmp_path / "p")
    (tmp_path / "p" / "model_index.json").write_text(json.dumps(index))
    weights = tmp_path / "p" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated download
    with pytest.raises(Exception):
        diffkit.load_pipeline(tmp_path / "p")


def test_pipeline_cfg_equals_solver_call():
    """The pipeline adds nothing to the solver: same noise, same call, same numbers."""
    scheduler = DPMSolverMultistepScheduler(prediction_type="epsilon")
    model = tiny_unet(num_class_embeds=5)
    latents = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    denoiser = diffkit.Denoiser.from_pipeline_components(model, scheduler)
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        ref = diffkit.sample_dpmpp_2m(
            denoiser, latents, diffkit.make_timesteps(denoiser.schedule, "dpmpp_2m", 5, scheduler.config),
            cond={"class_labels": labels}, uncond={"class_labels": torch.full_like(labels, 4)}, guidance=diffkit.CFG(2.5),
        )
    pipe = GuidedPipeline(model, scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[1, 2], num_inference_steps=5, guidance_scale=2.5, latents=latents, output_type="latent").images
    assert torch.equal(out, ref)


def test_diffusers_cfg_cutoff_callback_works_as_in_stable_diffusion():
    """diffusers' own SDCFGCutoffCallback (reads num_timesteps, sets _guidance_scale, keeps the positive half of
    prompt_embeds) gives the same latents on GuidedPipeline as on StableDiffusionPipeline."""
    from diffusers.callbacks import SDCFGCutoffCallback

    ours, ref = _text_pipes()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(prompt="a red digit", num_inference_steps=6, guidance_scale=4.0, latents=latents, output_type="latent",
              callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5),
              callback_on_step_end_tensor_inputs=["prompt_embeds"])
    a, b = ours(**kw).images, ref(**kw).images
    assert ours.num_timesteps == 6 and ours.guidance_scale == 0.0  # as the callback left them, as in diffusers
    assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max().item())
    full = ours(**{**kw, "callback_on_step_end": None}).images
    assert (a - full).abs().max() > 1e-3  # the cutoff changed the run


def test_loader_runs_no_code_from_a_model(tmp_path):
    """trust_remote_code / custom_pipeline are refused; a component named from a module inside the folder is refused
    by diffusers' own check, and the module never runs."""
    _class_pipe().save_pretrained(tmp_path / "p")
    for keyword in ({"trust_remote_code": True}, {"custom_pipeline": "evil_pipe"}, {"use_safetensors": False}):
        with pytest.raises(ValueError, match="never runs code|safetensors only"):
            diffkit.load_pipeline(tmp_path / "p", **keyword)
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    (tmp_path / "p" / "model_index.json").write_text(json.dumps({**index, "unet": ["evil_unet", "EvilUNet"]}))
    (tmp_path / "p" / "unet" / "evil_unet.py").write_text(
        "from pathlib import Path\nPath(__file__).with_name('RAN').write_text('x')\n"
        "from diffusers import UNet2DModel\nclass EvilUNet(UNet2DModel):\n    pass\n")
    with pytest.raises(Exception):
        diffkit.load_pipeline(tmp_path / "p")
    assert not (tmp_path / "p" / "unet" / "RAN").exists()


def test_adapters_load_from_safetensors_only(tmp_path):
    from diffkit.blend import adapter_for, load_adapters

    adapter_for(_class_pipe().unet).save_pretrained(tmp_path / "edges", safe_serialization=False)
    assert (tmp_path / "edges" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(Exception, match="safetensors"):
        load_adapters(tmp_path)
