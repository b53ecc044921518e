"""GuidedPipeline on the models people have: SD 1.x / 2.x, SDXL, SD3 and Flux (tiny random components built offline),
against the diffusers pipeline each comes from, called with the same arguments."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    PNDMScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

import diffkit
from diffkit.backbones import as_backbone, family_of
from diffkit.pipelines import GuidedPipeline
from helpers import tiny_flux_components, tiny_sd3_components, tiny_sdxl_components, tiny_text_components


pytestmark = pytest.mark.usefixtures("one_thread")

SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _quiet(*pipes):
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    return pipes


def diffusers_pipe(family: str, scheduler=None, **components):
    """The diffusers pipeline of ``family`` on tiny components, with the scheduler its real checkpoints ship."""
    if family == "sd":
        components = components or tiny_text_components()
        pipe = StableDiffusionPipeline(**components, scheduler=scheduler or DPMSolverMultistepScheduler(**SD_SCHEDULE),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif family == "sdxl":
        components = components or tiny_sdxl_components()
        scheduler = scheduler or EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading", steps_offset=1)
        pipe = StableDiffusionXLPipeline(**components, scheduler=scheduler, add_watermarker=False)
    elif family == "sd3":
        components = components or tiny_sd3_components()
        pipe = StableDiffusion3Pipeline(**components, scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0))
    else:  # "flux" (guidance-distilled, as FLUX.1-dev) or "flux-schnell" (no guidance embedding, as FLUX.1-schnell)
        components = components or tiny_flux_components(guidance_embeds=family == "flux")
        scheduler = scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                                 max_shift=1.15)
        pipe = FluxPipeline(**components, scheduler=scheduler)
    return _quiet(pipe)[0]


FAMILIES = ["sd", "sdxl", "sd3", "flux", "flux-schnell"]


def _gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _same_call(family: str, **kw):
    """(diffusers kwargs, diffkit kwargs) for one call: CFG with a negative prompt, non-square, two images per
    prompt from a generator list. Flux's CFG over the negative prompt is diffusers' true_cfg_scale; its embedded
    guidance is diffusers' guidance_scale."""
    common = dict(prompt=["a red fox", "blue sky"], negative_prompt=["blurry", "dark"], num_images_per_prompt=2,
                  height=16, width=24, num_inference_steps=4, generator=_gens(4), output_type="np", **kw)
    if family.startswith("flux"):
        ours = dict(common, guidance_scale=3.0, max_sequence_length=16, generator=_gens(4))
        theirs = dict(common, true_cfg_scale=3.0, max_sequence_length=16)
        if family == "flux":
            ours["embedded_guidance_scale"], theirs["guidance_scale"] = 2.5, 2.5
        return theirs, ours
    if family == "sd3":
        common["max_sequence_length"] = 16
    return dict(common, guidance_scale=4.0), dict(common, guidance_scale=4.0, generator=_gens(4))


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pipe_equals_the_diffusers_pipeline(family):
    ref = diffusers_pipe(family)
    ours = _quiet(GuidedPipeline.from_pipe(ref))[0]
    assert ours.family == family.split("-")[0] and ours.network is ref.components.get("unet", ref.components.get("transformer"))
    theirs_kw, ours_kw = _same_call(family)
    expected, got = ref(**theirs_kw).images, ours(**ours_kw).images
    assert got.shape == (4, 16, 24, 3)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(got[0] - got[1]).max() > 1e-3  # the generator list gives each image its own noise


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_embeddings_without_text_encoders(family):
    """Text encoders left out: the embeddings diffusers' own encode_prompt makes give the same images."""
    ref = diffusers_pipe(family)
    theirs_kw, ours_kw = _same_call(family)
    encode = dict(device="cpu", num_images_per_prompt=1)
    if family == "flux":
        embeds, pooled, _ = ref.encode_prompt(theirs_kw["prompt"], None, max_sequence_length=16, **encode)
        negative, negative_pooled, _ = ref.encode_prompt(theirs_kw["negative_prompt"], None, max_sequence_length=16, **encode)
    elif family == "sd3":
        embeds, negative, pooled, negative_pooled = ref.encode_prompt(
            theirs_kw["prompt"], None, None, negative_prompt=theirs_kw["negative_prompt"], max_sequence_length=16, **encode)
    else:
        embeds, negative, pooled, negative_pooled = ref.encode_prompt(
            theirs_kw["prompt"], negative_prompt=theirs_kw["negative_prompt"], **encode)
    network = {"unet": ref.unet} if family == "sdxl" else {"transformer": ref.transformer}
    ours = _quiet(GuidedPipeline(**network, scheduler=ref.scheduler, vae=ref.vae))[0]
    for key in ("prompt", "negative_prompt"):
        del ours_kw[key]
    got = ours(**ours_kw, prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
               negative_pooled_prompt_embeds=negative_pooled).images
    assert np.abs(got - ref(**theirs_kw).images).max() <= 1e-4
    with pytest.raises(ValueError, match="a prompt needs the pipeline's"):
        ours(prompt="a red fox", num_inference_steps=2, height=16, width=16)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        ours(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2, height=16, width=16)
    if family != "sdxl":  # SDXL's empty negative prompt is zeros, which needs no encoder
        with pytest.raises(ValueError, match="negative_prompt_embeds"):
            ours(prompt_embeds=embeds, pooled_prompt_embeds=pooled, guidance_scale=3.0, num_inference_steps=2, height=16,
                 width=16)


@pytest.mark.parametrize("scheduler, solver", [
    (DPMSolverMultistepScheduler(**SD_SCHEDULE, use_karras_sigmas=True), None),  # DPM++ 2M Karras (issue #18)
    (EulerDiscreteScheduler(**SD_SCHEDULE, use_karras_sigmas=True), None),
    (DDIMScheduler(**SD_SCHEDULE, timestep_spacing="trailing"), None),
    (DPMSolverMultistepScheduler(**SD_SCHEDULE), "euler"),  # solver= runs the Euler scheduler's walk from this config
])
def test_sd_follows_the_scheduler_or_the_solver_asked_for(scheduler, solver):
    ref = diffusers_pipe("sd", scheduler=scheduler)
    ours = _quiet(GuidedPipeline.from_pipe(ref))[0]
    if solver is not None:
        ref.scheduler = EulerDiscreteScheduler.from_config(scheduler.config)
    kw = dict(prompt="a red fox", num_inference_steps=5, guidance_scale=5.0, output_type="latent")
    expected = ref(**kw, generator=torch.Generator().manual_seed(0)).images
    got = ours(**kw, solver=solver, generator=torch.Generator().manual_seed(0)).images
    assert (got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())


def test_a_scheduler_diffkit_does_not_reproduce_is_refused_not_ignored():
    ours = GuidedPipeline.from_pipe(diffusers_pipe("sd", scheduler=PNDMScheduler(**SD_SCHEDULE)))
    with pytest.raises(ValueError, match="PNDMScheduler is not one of them"):
        ours(prompt="a red fox", num_inference_steps=3)
    out = ours(prompt="a red fox", num_inference_steps=3, solver="dpmpp_2m", output_type="latent").images
    assert torch.isfinite(out).all()  # solver= runs a diffkit solver on its schedule instead
    thresholded = GuidedPipeline.from_pipe(diffusers_pipe("sd", scheduler=DDIMScheduler(**SD_SCHEDULE, thresholding=True)))
    with pytest.raises(ValueError, match="thresholding"):
        thresholded(prompt="a red fox", num_inference_steps=3)


def test_flux_takes_packed_latents_and_returns_spatial_ones():
    ref = diffusers_pipe("flux")
    ours = _quiet(GuidedPipeline.from_pipe(ref))[0]
    packed, _ = ref.prepare_latents(1, 4, 16, 24, torch.float32, "cpu", torch.Generator().manual_seed(3))
    kw = dict(prompt="a red fox", height=16, width=24, num_inference_steps=3, max_sequence_length=16, output_type="latent")
    expected = ref(**kw, latents=packed).images
    got = ours(**kw, latents=packed).images
    assert got.shape == (1, 4, 8, 12)
    assert torch.allclose(FluxPipeline._pack_latents(got, 1, 4, 8, 12), expected, atol=1e-5)
    spatial = FluxPipeline._unpack_latents(packed, 16, 24, ours.vae_scale_factor)
    assert torch.equal(ours(**kw, latents=spatial).images, got)


def test_interrupt_stops_where_diffusers_stops():
    """A callback that sets pipe._interrupt stops the run after that step; the latents are where diffusers' are."""
    def stop_after_two(pipe, step, t, kwargs):
        if step == 1:
            pipe._interrupt = True
        return kwargs

    ref = diffusers_pipe("sd")
    ours = _quiet(GuidedPipeline.from_pipe(ref))[0]
    kw = dict(prompt="a red fox", num_inference_steps=6, guidance_scale=5.0, output_type="latent")
    expected = ref(**kw, generator=torch.Generator().manual_seed(0), callback_on_step_end=stop_after_two).images
    calls = []
    hook = ours.unet.register_forward_hook(lambda *args: calls.append(1))
    got = ours(**kw, generator=torch.Generator().manual_seed(0), callback_on_step_end=stop_after_two).images
    hook.remove()
    assert len(calls) == 2 and ours.interrupt
    assert (got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())
    full = ours(**kw, generator=torch.Generator().manual_seed(0)).images
    assert not ours.interrupt and (full - got).abs().max() > 1e-2  # the next call starts afresh


def test_sdxl_cfg_cutoff_callback_as_in_diffusers():
    from diffusers.callbacks import SDXLCFGCutoffCallback

    ref = diffusers_pipe("sdxl")
    ours = _quiet(GuidedPipeline.from_pipe(ref))[0]
    kw = dict(prompt="a red fox", negative_prompt="blurry", num_inference_steps=6, guidance_scale=5.0, height=16,
              width=16, output_type="latent", callback_on_step_end=SDXLCFGCutoffCallback(cutoff_step_ratio=0.5))
    expected = ref(**kw, generator=torch.Generator().manual_seed(0)).images
    got = ours(**kw, generator=torch.Generator().manual_seed(0)).images
    assert (got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())
    full = ours(**{**kw, "callback_on_step_end": None}, generator=torch.Generator().manual_seed(0)).images
    assert (full - got).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_guidance_rescale_equals_diffusers(family):
    """CFG-rescale (Lin et al. 2024), diffusers' guidance_rescale in SD and SDXL."""
    ref = diffusers_pipe(family)
    ours = _quiet(GuidedPipeline.from_pipe(ref))[0]
    kw = dict(prompt="a red fox", num_inference_steps=4, guidance_scale=6.0, guidance_rescale=0.7, height=16, width=16,
              output_type="latent")
    expected = ref(**kw, generator=torch.Generator().manual_seed(0)).images
    got = ours(**kw, generator=torch.Generator().manual_seed(0)).images
    assert (got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_guidance_rules_on_every_family(family):
    """APG with eta = 1, r = 0, no momentum is CFG (the paper's identity); APG proper and a guidance interval change the
    images; an interval holding every step is CFG again."""
    ours = _quiet(GuidedPipeline.from_pipe(diffusers_pipe(family)))[0]
    kw = dict(prompt="a red fox", num_inference_steps=4, guidance_scale=4.0, height=16, width=16, output_type="latent")
    if family in ("sd3", "flux"):
        kw["max_sequence_length"] = 16

    def run(**extra):
        return ours(**kw, **extra, generator=torch.Generator().manual_seed(0)).images

    cfg = run()
    scale = max(1.0, cfg.abs().max().item())
    assert (run(guidance="apg", guidance_kwargs={"eta": 1.0}) - cfg).abs().max() <= 1e-4 * scale
    assert (run(guidance="apg", guidance_kwargs={"eta": 0.0, "norm_threshold": 0.5}) - cfg).abs().max() > 1e-3
    assert (run(guidance_kwargs={"step_range": (0, 4)}) - cfg).abs().max() <= 1e-5 * scale
    assert (run(guidance_kwargs={"step_range": (1, 3)}) - cfg).abs().max() > 1e-3
    assert (run(guidance_rescale=0.7) - cfg).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_load_pipeline_reads_a_standard_diffusers_folder(family, tmp_path):
    ref = diffusers_pipe(family)
    ref.save_pretrained(tmp_path / family)
    loaded = _quiet(diffkit.load_pipeline(tmp_path / family))[0]
    assert type(loaded) is GuidedPipeline and loaded.family == family
    theirs_kw, ours_kw = _same_call(family)
    assert np.abs(loaded(**ours_kw).images - ref(**theirs_kw).images).max() <= 1e-4


def test_generate_cli_on_a_diffusers_folder(tmp_path):
    """`diffkit generate --model <an SDXL folder> --prompt ...`: images named, seeded and recorded as for diffkit's
    own models; the solver and guidance scale recorded are the model's defaults it used."""
    import json

    import PIL.Image

    from diffkit.cli import main

    diffusers_pipe("sdxl").save_pretrained(tmp_path / "sdxl")
    argv = ["generate", "--model", str(tmp_path / "sdxl"), "--prompt", "a red fox", "-n", "2", "--steps", "3",
            "--height", "16", "--width", "24", "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 0
    image = PIL.Image.open(tmp_path / "out" / "prompt0-seed000001.png")
    assert image.size == (24, 16)
    record = json.loads(image.text["diffkit"])
    assert (record["solver"], record["guidance_scale"], record["seed"]) == ("euler", 5.0, 1)


def test_backbones_call_the_transformers_as_their_pipelines_do():
    """SD3: the latents are hidden_states, t per sample. Flux: 2x2 packing, ids and t / 1000 in, unpacking out."""
    sd3 = tiny_sd3_components(text_encoders=False)["transformer"]
    x, t = torch.randn(2, 4, 8, 12), torch.tensor(700.0)
    text, pooled = torch.randn(2, 5, 64), torch.randn(2, 64)
    out = as_backbone(sd3)(x, t, encoder_hidden_states=text, pooled_projections=pooled)[0]
    direct = sd3(hidden_states=x, timestep=t.expand(2), encoder_hidden_states=text, pooled_projections=pooled).sample
    assert family_of(sd3) == "sd3" and torch.equal(out, direct)

    flux = tiny_flux_components(guidance_embeds=True, text_encoders=False)["transformer"]
    text, pooled, guidance = torch.randn(2, 5, 32), torch.randn(2, 32), torch.full((2,), 3.5)
    out = as_backbone(flux)(x, t, encoder_hidden_states=text, pooled_projections=pooled, guidance=guidance)[0]
    packed = FluxPipeline._pack_latents(x, 2, 4, 8, 12)
    direct = flux(hidden_states=packed, timestep=t.expand(2) / 1000, guidance=guidance, pooled_projections=pooled,
                  encoder_hidden_states=text, txt_ids=torch.zeros(5, 3),
                  img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32)).sample
    assert out.shape == x.shape and torch.equal(FluxPipeline._pack_latents(out, 2, 4, 8, 12), direct)
    with pytest.raises(ValueError, match="needs `guidance`"):
        as_backbone(flux)(x, t, encoder_hidden_states=text, pooled_projections=pooled)
    with pytest.raises(ValueError, match="even"):
        as_backbone(flux)(x[..., :7, :], t, encoder_hidden_states=text, pooled_projections=pooled, guidance=guidance)


BAD_CALLS = {
    "sigmas on SD": ("sd", dict(sigmas=[1.0, 0.5]), "sigmas= applies to flow-matching"),
    "clip_skip on Flux": ("flux", dict(clip_skip=1), "do not apply to a FLUX model"),
    "embedded guidance on schnell": ("flux-schnell", dict(embedded_guidance_scale=3.0), "guidance-distilled"),
    "pooled embeds on SD": ("sd", dict(prompt=None, prompt_embeds=torch.zeros(1, 16, 32),
                                      pooled_prompt_embeds=torch.zeros(1, 32)), "pooled embeddings belong"),
    "negative prompts per prompt": ("sdxl", dict(prompt=["a", "b"], negative_prompt=["c"]), "negative_prompt has 1"),
    "size off the patch grid": ("sd3", dict(height=15), "height must be a positive multiple of 4"),
    "SDXL size pair": ("sdxl", dict(original_size=(16,)), "original_size must be a pair"),
    "class labels on a text model": ("sd", dict(prompt=None, class_labels=[1]), "no class embeddings"),
    "eta off DDIM": ("sd3", dict(eta=0.5), "eta is DDIM's"),
    "unknown callback tensor": ("sd", dict(callback_on_step_end_tensor_inputs=["add_time_ids"]), "do not exist"),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_text_calls_are_refused_by_name(name):
    family, kwargs, match = BAD_CALLS[name]
    ours = GuidedPipeline.from_pipe(diffusers_pipe(family))
    kwargs = {"prompt": "a red fox", "num_inference_steps": 2, "height": 16, "width": 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        ours(**kwargs)


def test_from_pipe_keeps_each_modules_dtype():
    """diffusers' from_pipe would cast every shared module to float32 (the source pipeline's too); diffkit's keeps
    them as they are, and casts only when asked (dtype=)."""
    ref = diffusers_pipe("sd3")
    ref.transformer.to(torch.bfloat16)
    ours = GuidedPipeline.from_pipe(ref)
    assert (ours.transformer.dtype, ours.vae.dtype, ref.transformer.dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)
    assert GuidedPipeline.from_pipe(ref, dtype=torch.float32).transformer.dtype == torch.float32


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_half_precision_models_keep_the_solver_in_float32(family):
    """A bfloat16 model: the backbone runs in bfloat16, the solver's arithmetic in float32 (as diffusers' schedulers
    upcast theirs), so diffkit's images are as close to the float32 run as diffusers' own bfloat16 images are
    (measured: 0.010-0.021 for both)."""
    ref = diffusers_pipe(family)
    ours = _quiet(GuidedPipeline.from_pipe(ref))[0]
    exact = ref(**_same_call(family)[0]).images
    ref.to(torch.bfloat16)
    theirs, mine = ref(**_same_call(family)[0]).images, ours(**_same_call(family)[1]).images
    assert ours.network.dtype == torch.bfloat16
    assert np.abs(mine - exact).max() <= 1.25 * np.abs(theirs - exact).max() + 1e-3
