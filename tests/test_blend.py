"""Modality blending (diffkit.blend, ModalityBlendPipeline) on the embedded default model."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, MultiAdapter, UNet2DConditionModel

import diffkit
from diffkit.blend import (LineSearch, OfficialStep, adapter_for, blend_loss, blend_update, complete, encoder_features,
                           extract, injected)
from diffkit.data import colored_digits
from diffkit.denoiser import Denoiser
from diffkit.pipelines import ModalityBlendPipeline


@pytest.fixture(scope="module")
def pipe():
    pipe = ModalityBlendPipeline.from_pipe(diffkit.load_pipeline())
    pipe.set_progress_bar_config(disable=True)
    for seed, name in enumerate(["edges", "ink_mask"]):
        torch.manual_seed(seed)  # untrained adapters: the properties below hold for any adapter
        pipe.adapters[name] = adapter_for(pipe.unet).eval()
    return pipe


@pytest.fixture(scope="module")
def digits():
    images, _ = colored_digits("test")
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 8:] = 1  # fill the bottom half
    return images[::100][:4], mask


def _controls(images, names=("edges", "ink_mask")):
    return {name: extract(name, images) for name in names}


def test_modalities_are_images_of_the_digit(digits):
    images, _ = digits
    for name in ("edges", "low_resolution", "ink_mask"):
        control = extract(name, images)
        assert control.shape == images.shape and control.min() >= -1 and control.max() <= 1
    # edges of a filled square: exactly the pixels whose 3x3 neighbourhood holds both ink and background
    square = -torch.ones(1, 3, 16, 16)
    square[..., 5:11, 4:12] = 1
    ink_map = (square[:, :1] > 0).float()
    boundary = torch.nn.functional.max_pool2d(ink_map, 3, 1, 1) != -torch.nn.functional.max_pool2d(-ink_map, 3, 1, 1)
    assert torch.equal(extract("edges", square)[:, :1] > 0, boundary)
    ink = extract("ink_mask", images)
    assert set(ink.unique().tolist()) == {-1.0, 1.0}
    # the low-resolution image keeps each 4x4 cell's mean colour
    low = extract("low_resolution", images)
    assert torch.allclose(low[..., :4, :4].mean(dim=(-1, -2)), images[..., :4, :4].mean(dim=(-1, -2)), atol=1e-6)
    with pytest.raises(ValueError, match="unknown modality"):
        extract("depth", images)


def test_injection_matches_diffusers_intrablock_residuals():
    """The hooks add adapter features where UNet2DConditionModel adds down_intrablock_additional_residuals."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=8, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()
    x, t, text = torch.randn(2, 3, 8, 8), torch.tensor(500.0), torch.randn(2, 4, 8)
    feats = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    with torch.no_grad():
        native = unet(x, t, text, down_intrablock_additional_residuals=[f.clone() for f in feats]).sample
        with injected(unet, feats):
            hooked = unet(x, t, text).sample
        plain = unet(x, t, text).sample
    assert torch.allclose(hooked, native, atol=1e-6)
    assert (hooked - plain).abs().max() > 1e-2


def test_encoder_features_are_the_skip_tensors(pipe):
    """conv_in plus every down-block output; adapter features change everything after the first resnet."""
    x, t, cond = torch.randn(2, 3, 16, 16), torch.tensor(400.0), {"class_labels": torch.tensor([10, 10])}
    denoiser = Denoiser.from_pipeline_components(pipe.unet, pipe.scheduler)
    with torch.no_grad():
        plain = encoder_features(pipe.unet, lambda: denoiser(x, t, cond))
        with injected(pipe.unet, pipe.adapters["edges"](torch.randn(2, 3, 16, 16))):
            guided = encoder_features(pipe.unet, lambda: denoiser(x, t, cond))
    assert len(plain) == 1 + 3 + 3 + 2  # conv_in, 2 resnets + downsampler, 2 resnets + downsampler, 2 resnets
    assert all(torch.equal(a, b) for a, b in zip(plain[:2], guided[:2]))
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(plain[2:], guided[2:]))


def _diffusers_repaint(pipe, known, mask, noise, n):
    """Plain completion as diffusers' inpainting pipelines run a UNet without mask channels: scheduler steps,
    then the known region replaced by the known image noised to the next timestep with the starting noise."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(n)
    labels = torch.full((len(known),), pipe.num_classes)
    x = noise
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(pipe.unet(x, t, class_labels=labels).sample, t, x).prev_sample
        known_t = scheduler.add_noise(known, noise, scheduler.timesteps[i + 1:i + 2]) if i + 1 < n else known
        x = mask * x + (1 - mask) * known_t
    return x


def test_plain_completion_matches_diffusers_repaint(pipe, digits):
    images, mask = digits
    # DDIM with trailing spacing: the step it takes is the one its timestep array holds ("linspace" is not)
    ddim = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", clip_sample=False)
    pipe = ModalityBlendPipeline.from_pipe(pipe, scheduler=ddim)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = _diffusers_repaint(pipe, images, mask, noise, 10)
    ours = pipe(images, mask, num_inference_steps=10, latents=noise, output_type="latent").images
    assert (ours - ref).abs().max() < 1e-4


@pytest.mark.parametrize("solver,guidance", [("ddim", None), ("dpmpp_2m", "cfg"), ("heun", "apg")])
def test_p0_reproduces_plain_completion_exactly(pipe, digits, solver, guidance):
    images, mask = digits
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    kwargs = dict(num_inference_steps=10, latents=noise, output_type="latent", solver=solver, guidance=guidance,
                  guidance_scale=3.0, class_labels=[1, 3, 5, 7])
    plain = pipe(images, mask, **kwargs).images
    p0 = pipe(images, mask, control_images=_controls(images), blend="cmb", blend_steps=0, **kwargs).images
    assert torch.equal(plain, p0)
    blended = pipe(images, mask, control_images=_controls(images), blend="cmb", blend_steps=4, **kwargs).images
    assert (blended - plain).abs().max() > 1e-2


@pytest.mark.parametrize("blend", ["cmb", "sum"])
def test_known_region_is_preserved(pipe, digits, blend):
    images, mask = digits
    out = pipe(images, mask, control_images=_controls(images), blend=blend, num_inference_steps=8, blend_steps=4,
               generator=torch.manual_seed(2), output_type="latent").images
    assert torch.isfinite(out).all()
    assert torch.equal(out * (1 - mask), images * (1 - mask))


def _targets(pipe, gen, z, t, cond, uncond, spread=0.3):
    """Two modalities' encoder features at a branch latent near z, on the (conditional; unconditional) batch."""
    denoiser = Denoiser.from_pipeline_components(pipe.unet, pipe.scheduler)
    branch = z + spread * torch.randn(z.shape, generator=gen)
    xx, cc = torch.cat([branch, branch]), {"class_labels": torch.cat([cond["class_labels"], uncond["class_labels"]])}
    targets = []
    with torch.no_grad():
        for name in ("edges", "ink_mask"):
            feats = pipe.adapters[name](torch.randn(2, 3, 16, 16, generator=gen))
            with injected(pipe.unet, feats):
                targets.append(encoder_features(pipe.unet, lambda: denoiser(xx, t, cc)))
    return denoiser, targets


def _blend_problem(pipe, t=600.0, seed=3):
    gen = torch.Generator().manual_seed(seed)
    z, t = torch.randn(2, 3, 16, 16, generator=gen), torch.tensor(t)
    cond, uncond = {"class_labels": torch.tensor([3, 5])}, {"class_labels": torch.tensor([10, 10])}
    denoiser, targets = _targets(pipe, gen, z, t, cond, uncond)
    return denoiser, z, t, targets, cond, uncond


def test_blend_loss_falls_over_the_gradient_steps(pipe):
    """Q steps on the CMB loss lower it, by the line search and by the (capped) official step; losses hold the
    loss before each step and after the last; the loss is per sample."""
    denoiser, z, t, targets, cond, uncond = _blend_problem(pipe)
    rho = (denoiser.schedule.sigma(t) / denoiser.schedule.alpha(t)).item()
    for rule in ("line_search", OfficialStep(max_step_size=10.0)):
        z_new, losses = blend_update(denoiser, z, t, targets, 6, rule, rho, cond, uncond)
        assert len(losses) == 7
        assert losses[-1] == pytest.approx(blend_loss(denoiser, z_new, t, targets, cond, uncond).sum().item(), rel=1e-5)
        assert all(b < a for a, b in zip(losses, losses[1:])), (rule, losses)
        assert losses[-1] < 0.97 * losses[0]
    # per-sample: a batch of one gives the same loss as its row in the batch
    one = blend_loss(denoiser, z[:1], t, [[f.view(2, 2, *f.shape[1:])[:, :1].flatten(0, 1) for f in tg] for tg in targets],
                     {"class_labels": cond["class_labels"][:1]}, {"class_labels": uncond["class_labels"][:1]})
    assert torch.allclose(one, blend_loss(denoiser, z, t, targets, cond, uncond)[:1], rtol=1e-5)


def test_official_step_is_magics_sigma_squared_rule(pipe):
    """OfficialStep: z - grad * sqrt(1 / alphas_cumprod[t] - 1)^2, MaGIC's ddim_infer.py update with its sigmas
    (sqrt_recipm1_alphas_cumprod, here from the diffusers scheduler's table), optionally capped."""
    denoiser, z, t, targets, cond, uncond = _blend_problem(pipe, t=300.0)
    abar = DDIMScheduler.from_config(pipe.scheduler.config).alphas_cumprod[300].double()
    sigma_official = torch.sqrt(1 / abar - 1).item()
    rho = (denoiser.schedule.sigma(t) / denoiser.schedule.alpha(t)).item()
    assert rho == pytest.approx(sigma_official, rel=1e-5)
    zg = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(blend_loss(denoiser, zg, t, targets, cond, uncond).sum(), zg)
    ours, _ = blend_update(denoiser, z, t, targets, 1, "official", rho, cond, uncond)
    assert torch.allclose(ours, z - sigma_official**2 * grad, atol=1e-6)
    capped, _ = blend_update(denoiser, z, t, targets, 1, OfficialStep(max_step_size=0.1), rho, cond, uncond)
    assert torch.allclose(capped, z - 0.1 * grad, atol=1e-6)
    assert OfficialStep(scale=4.0).size(rho) == pytest.approx(4 * rho**2)
    with pytest.raises(ValueError, match="needs rho"):
        blend_update(denoiser, z, t, targets, 1, "official", None, cond, uncond)


def test_line_search_is_free_of_the_loss_and_schedule_scale(pipe):
    """The line search takes the same steps whatever the loss's scale (strengths x1000) and whatever sigma / alpha
    says; the official step, sized by sigma^2 / alpha^2, changes with both."""
    denoiser, z, t, targets, cond, uncond = _blend_problem(pipe)
    base, losses = blend_update(denoiser, z, t, targets, 3, "line_search", 1.0, cond, uncond)
    scaled, scaled_losses = blend_update(denoiser, z, t, targets, 3, "line_search", 1e4, cond, uncond, weights=[1e3, 1e3])
    assert torch.allclose(base, scaled, atol=1e-5)
    assert scaled_losses[0] == pytest.approx(1e3 * losses[0], rel=1e-4)
    official, _ = blend_update(denoiser, z, t, targets, 1, "official", 0.5, cond, uncond)
    louder, _ = blend_update(denoiser, z, t, targets, 1, "official", 0.5, cond, uncond, weights=[1e3, 1e3])
    assert (official - louder).abs().max() > 1e-2


def test_line_search_descends_where_the_uncapped_official_step_diverges(pipe):
    """At t = 999 on the default model's cosine schedule sigma^2 / alpha^2 is 4e8: MaGIC's uncapped step blows the
    loss up; the line search lowers it at every step."""
    denoiser, z, t, targets, cond, uncond = _blend_problem(pipe, t=999.0)
    rho = (denoiser.schedule.sigma(t) / denoiser.schedule.alpha(t)).item()
    assert rho**2 > 1e8
    _, official = blend_update(denoiser, z, t, targets, 2, "official", rho, cond, uncond)
    assert not official[-1] < 10 * official[0]  # diverged (or NaN)
    _, searched = blend_update(denoiser, z, t, targets, 4, "line_search", rho, cond, uncond)
    assert all(b < a for a, b in zip(searched, searched[1:])), searched


def test_line_search_on_a_quadratic_stops_short_of_the_line_minimum():
    """Closed form: on L(z) = sum_i a_i z_i^2 the accepted step lies in [eta*/2, eta*], eta* = |g|^2 / g'Hg the
    minimiser along -g (Armijo with c = 1/2 backtracking from the Polyak step), for every sample on its own."""
    a = torch.tensor([[1.0, 4.0, 9.0], [0.5, 0.5, 20.0]])

    def objective(z, rows=None):
        return (a if rows is None else a[rows]).mul(z.pow(2)).sum(1)

    z = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -0.2]])
    grad = 2 * a * z
    loss = objective(z)
    memory = {}
    z_new, new_loss = LineSearch().step(objective, z, loss, grad, None, memory)
    g2 = grad.pow(2).sum(1)
    eta_star = g2 / (grad.pow(2) * 2 * a).sum(1)
    eta = memory["accepted"]
    assert torch.all(eta <= eta_star * (1 + 1e-6)) and torch.all(eta >= eta_star / 2 * (1 - 1e-6)), (eta, eta_star)
    assert torch.allclose(z_new, z - eta[:, None] * grad) and torch.allclose(new_loss, objective(z_new))
    with pytest.raises(ValueError, match="sufficient_decrease"):
        LineSearch(sufficient_decrease=1.5)


def test_summed_features_match_diffusers_multiadapter(pipe, digits):
    """blend="sum" is MultiAdapter's weighted sum of features added to the encoder."""
    images, mask = digits
    controls, scales = _controls(images), {"edges": 0.7, "ink_mask": 1.3}
    multi = MultiAdapter([pipe.adapters["edges"], pipe.adapters["ink_mask"]])
    with torch.no_grad():
        summed = multi([controls["edges"], controls["ink_mask"]], adapter_weights=[0.7, 1.3])
    denoiser = Denoiser.from_pipeline_components(pipe.unet, pipe.scheduler)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(4))
    setup = pipe.solver_setup("ddim", 6, 16, 16)  # DDIMScheduler.from_config(the pipeline's config): walk and clipping
    cond = {"class_labels": torch.full((4,), 10)}
    with torch.no_grad(), injected(pipe.unet, summed):
        ref = complete(denoiser, setup.fn, noise, setup.grid, images, mask, cond=cond, **setup.options).sample
    ours = pipe(images, mask, control_images=controls, adapter_conditioning_scale=scales, blend="sum",
                num_inference_steps=6, latents=noise, output_type="latent").images
    assert (ours - ref).abs().max() < 1e-5


def test_a_new_modality_plugs_in_without_code_changes(pipe, digits, tmp_path):
    """A user's modality (here one-channel: the top row of pixels repeated down) with its own adapter, saved and
    loaded like the shipped ones, joins a blend beside a built-in modality."""
    images, mask = digits
    torch.manual_seed(7)
    adapter_for(pipe.unet, in_channels=1).save_pretrained(tmp_path / "first_row")
    user = ModalityBlendPipeline.from_pipe(pipe)
    user.set_progress_bar_config(disable=True)
    user.adapters = dict(pipe.adapters)
    user.load_adapters(tmp_path)
    first_row = images.mean(dim=1, keepdim=True)[..., :1, :].expand(-1, -1, 16, -1)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(5))
    kwargs = dict(num_inference_steps=8, blend_steps=4, latents=noise, output_type="latent")
    both = user(images, mask, control_images={"edges": extract("edges", images), "first_row": first_row}, **kwargs).images
    edges_only = user(images, mask, control_images={"edges": extract("edges", images)}, **kwargs).images
    assert torch.isfinite(both).all() and (both - edges_only).abs().max() > 1e-2
    assert user.blend_losses.shape == (4, 6)


def test_save_pretrained_keeps_the_adapters(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    loaded = ModalityBlendPipeline.from_pretrained(tmp_path / "saved")
    assert sorted(loaded.adapters) == sorted(pipe.adapters)
    for name, adapter in pipe.adapters.items():
        theirs = loaded.adapters[name].state_dict()
        assert all(torch.equal(value, theirs[key]) for key, value in adapter.state_dict().items())
    assert sorted(p.name for p in (tmp_path / "saved" / "adapters" / "edges").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]


def test_pipeline_rejects_bad_input(pipe, digits):
    images, mask = digits
    with pytest.raises(ValueError, match="no adapter or ControlNet for modalities"):
        pipe(images, mask, control_images={"depth": images})
    with pytest.raises(ValueError, match="blend must be one of"):
        pipe(images, mask, blend="average")
    with pytest.raises(ValueError, match="mask_image must hold only 0"):
        pipe(images, mask * 0.5)
    with pytest.raises(ValueError, match="image must have shape"):
        pipe(images[:, :, :8], mask)
    with pytest.raises(ValueError, match="blend_steps must be in"):
        pipe(images, mask, control_images=_controls(images), num_inference_steps=5, blend_steps=9)
    with pytest.raises(ValueError, match="NaN"):
        pipe(images * float("nan"), mask)
    with pytest.raises(ValueError, match="adapter_conditioning_scale names"):
        pipe(images, mask, control_images=_controls(images, ["edges"]), adapter_conditioning_scale={"ink_mask": 1.0})
    with pytest.raises(ValueError, match="step_rule must be one of"):
        pipe(images, mask, control_images=_controls(images), blend_step_rule="adam")
    with pytest.raises(ValueError, match="blend_cond_tau must be in"):
        pipe(images, mask, control_images=_controls(images), blend_cond_tau=1.5)
    with pytest.raises(ValueError, match="max_step_size"):
        OfficialStep(max_step_size=float("inf"))
    pipe.controlnets = {"depth": object()}
    try:
        with pytest.raises(ValueError, match="ControlNetModel conditions a UNet2DConditionModel"):
            pipe(images, mask, control_images={"depth": images})
    finally:
        pipe.controlnets = {}


def test_cli_complete_keeps_the_known_half_and_refuses_to_overwrite(pipe, digits, tmp_path, capsys):
    from diffkit.cli import main
    from diffkit.images import to_pil

    images, _ = digits
    pipe.adapters["edges"].save_pretrained(tmp_path / "adapters" / "edges")
    to_pil(images[:1])[0].save(tmp_path / "digit.png")
    args = [str(tmp_path / "digit.png"), "--mask-half", "bottom", "--control-from-image", "edges", "--adapters",
            str(tmp_path / "adapters"), "--steps", "4", "--blend-steps", "2", "--out", str(tmp_path / "out.png")]
    assert main(["complete", *args]) == 0
    with PIL.Image.open(tmp_path / "out.png") as out, PIL.Image.open(tmp_path / "digit.png") as src:
        assert "Blend: cmb, Modalities: edges" in out.text["parameters"]
        done, given = np.asarray(out.convert("RGB")), np.asarray(src.convert("RGB"))
    assert (done[:8] == given[:8]).all() and (done[8:] != given[8:]).any()
    capsys.readouterr()
    assert main(["complete", *args]) == 2  # exists: kept
    assert main(["complete", *args[:-2], "--control", "edges", "--out", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "exists" in err[0] and "MODALITY=VALUE" in err[1]


def test_cli_complete_passes_the_step_rule_and_cond_tau_to_the_pipeline(pipe, digits, tmp_path, monkeypatch):
    from diffkit.blend import OfficialStep
    from diffkit.cli import main
    from diffkit.images import to_pil
    from diffkit.pipelines import ModalityBlendPipeline

    images, _ = digits
    pipe.adapters["edges"].save_pretrained(tmp_path / "adapters" / "edges")
    to_pil(images[:1])[0].save(tmp_path / "digit.png")
    seen = {}
    real_call = ModalityBlendPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(ModalityBlendPipeline, "__call__", spy)
    args = [str(tmp_path / "digit.png"), "--mask-half", "bottom", "--control-from-image", "edges", "--adapters",
            str(tmp_path / "adapters"), "--steps", "4", "--blend-steps", "2", "--blend-step-rule", "official",
            "--blend-step-cap", "10", "--cond-tau", "0.5", "--out", str(tmp_path / "out.png")]
    assert main(["complete", *args]) == 0
    assert seen["blend_step_rule"] == OfficialStep(max_step_size=10.0) and seen["blend_cond_tau"] == 0.5
    with PIL.Image.open(tmp_path / "out.png") as out:
        assert "Step rule: official, cond_tau: 0.5" in out.text["parameters"]


# -- latent text UNets: SD 1.x / 2.x (MaGIC's own setting) and SDXL -------------------------------------------


def test_injection_matches_diffusers_after_a_block_without_cross_attention():
    """SDXL's first down block has no cross-attention and a downsampler: diffusers adds the adapter feature after the
    whole block (to the sample and, in place, to its last skip); the hooks do the same."""
    from helpers import tiny_sdxl_components

    unet = tiny_sdxl_components()["unet"]
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor(500.0), torch.randn(2, 5, 64)
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}
    feats = [torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4)]  # after block 0's downsampler; inside block 1
    with torch.no_grad():
        native = unet(x, t, text, added_cond_kwargs=added, down_intrablock_additional_residuals=[f.clone() for f in feats]).sample
        with injected(unet, feats):
            hooked = unet(x, t, text, added_cond_kwargs=added).sample
        plain = unet(x, t, text, added_cond_kwargs=added).sample
    assert torch.allclose(hooked, native, atol=1e-6)
    assert (hooked - plain).abs().max() > 1e-2


@pytest.fixture(scope="module")
def sd_blend():
    """A tiny Stable Diffusion pipeline (DDIM, as MaGIC samples) with two random T2I-Adapters at pixel resolution."""
    from test_real_models import SD_SCHEDULE, diffusers_pipe

    pipe = ModalityBlendPipeline.from_pipe(diffusers_pipe("sd", scheduler=DDIMScheduler(**SD_SCHEDULE)))
    pipe.set_progress_bar_config(disable=True)
    for seed, name in enumerate(["edges", "low_resolution"]):
        torch.manual_seed(seed)
        pipe.adapters[name] = adapter_for(pipe.unet, downscale_factor=pipe.vae_scale_factor).eval()
    image = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(1, 1, 16, 24)
    mask[..., 12:] = 1  # fill the right half
    controls = {name: torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(i)) * 2 - 1
                for i, name in enumerate(["edges", "low_resolution"])}
    return pipe, image, mask, controls


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("blend", ["cmb", "sum"])
def test_latent_completion_keeps_the_known_region_with_prompts(sd_blend, blend):
    """Non-square SD completion with a prompt and two T2I-Adapters: the known pixels come back exactly, the fill
    depends on the prompt and on the modalities, and CMB's loss falls over each blended step's Q gradient steps."""
    pipe, image, mask, controls = sd_blend
    kw = dict(num_inference_steps=6, blend_steps=3, blend_iterations=3, height=16, width=24, output_type="pt")

    def run(**extra):
        return pipe(image, mask, generator=torch.Generator().manual_seed(1), **{**kw, **extra}).images * 2 - 1

    out = run(control_images=controls, blend=blend, prompt="a red fox")
    assert out.shape == image.shape
    assert torch.allclose(out * (1 - mask), image * (1 - mask), atol=1e-6)
    assert (out - run(control_images=controls, blend=blend, prompt="blue sky")).abs().max() > 1e-4
    assert (out - run(prompt="a red fox")).abs().max() > 1e-4
    if blend == "cmb":
        run(control_images=controls, blend=blend, prompt="a red fox")
        losses = pipe.blend_losses
        assert losses.shape == (3, 4) and torch.all(losses[:, 1:] < losses[:, :-1]), losses
        floor = pipe.blend_floor_losses  # the loss at the modalities' mean features: no latent gets below it
        assert floor.shape == (3,) and torch.all(floor > 0) and torch.all(floor < losses.min(1).values)


@pytest.mark.usefixtures("one_thread")
def test_latent_blending_with_no_blended_step_is_plain_completion(sd_blend):
    pipe, image, mask, controls = sd_blend
    kw = dict(num_inference_steps=5, height=16, width=24, prompt="a red fox", output_type="latent")
    plain = pipe(image, mask, generator=torch.Generator().manual_seed(1), **kw).images
    p0 = pipe(image, mask, control_images=controls, blend_steps=0, generator=torch.Generator().manual_seed(1), **kw).images
    assert torch.equal(plain, p0)


def test_transformers_are_refused_with_the_reason():
    from test_real_models import diffusers_pipe

    pipe = ModalityBlendPipeline.from_pipe(diffusers_pipe("flux"))
    with pytest.raises(ValueError, match="transformer, which has no encoder"):
        pipe(torch.zeros(1, 3, 16, 16), torch.ones(1, 1, 16, 16), prompt="a fox")


@pytest.mark.parametrize("blend", ["cmb", "sum"])
@pytest.mark.parametrize("cond_tau", [0.4, 1.0, 0.0])
def test_cond_tau_window_feeds_the_modalities_exactly_at_magics_steps(pipe, digits, monkeypatch, blend, cond_tau):
    """MaGIC's ddim_infer.py feeds branch k its adapter at step i (index = n - 1 - i counted down) iff
    index >= int((1 - cond_tau) n): with cond_tau = 0.4 and 10 steps, the first 4. Every forward that adds adapter
    features is recorded with its timestep; the fed timesteps are exactly those."""
    import diffkit.blend.cmb as cmb

    images, mask = digits
    n = 10
    seen = []  # (timestep, fed) for every forward under an adapter context
    current = {}
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: current.update(t=float(args[1].flatten()[0])))
    real_injected = cmb.injected

    def spying_injected(unet, features, when):
        def spy():
            fed = when()
            seen.append((round(current["t"]), fed))
            return fed
        return real_injected(unet, features, when=spy)

    monkeypatch.setattr(cmb, "injected", spying_injected)
    try:
        pipe(images[:1], mask, control_images=_controls(images[:1]), blend=blend, num_inference_steps=n, blend_steps=n,
             blend_iterations=1, blend_cond_tau=cond_tau, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(n)
    timesteps = [int(t) for t in scheduler.timesteps]
    official = {timesteps[i] for i in range(n) if n - 1 - i >= int((1 - cond_tau) * n)}
    assert {t for t, fed in seen if fed} == official
    assert {t for t, _ in seen} == set(timesteps)  # every (blended) step asked the window
    if cond_tau == 0.4:
        assert len(official) == 4


def test_line_search_never_raises_the_loss():
    """On a non-convex loss >= 0 the accepted step never raises any sample's loss, the returned loss is the loss at
    the returned point, and a sample for which no halving gives a decrease stays where it is."""
    gen = torch.Generator().manual_seed(0)
    freq = 1 + 5 * torch.rand(64, 6, generator=gen)

    def objective(z, rows=None):
        f = freq if rows is None else freq[rows]
        return (torch.sin(f * z) + 1.1).mul(1 + z.pow(2)).sum(1)

    z = 3 * torch.randn(64, 6, generator=gen)
    rule, memory = LineSearch(max_halvings=3), {}
    for _ in range(4):
        zg = z.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(zg).sum(), zg)
        loss = objective(z)
        new_z, new_loss = rule.step(objective, z, loss, grad, None, memory)
        assert torch.all(new_loss <= loss), (new_loss - loss).max()
        assert torch.allclose(new_loss, objective(new_z))
        stayed = memory["accepted"] == 0
        assert torch.equal(new_z[stayed], z[stayed]) and torch.all(new_loss[~stayed] < loss[~stayed])
        z = new_z
    assert memory["accepted"].gt(0).any()
