"""MaGIC's blending with ControlNet modalities (diffkit.blend.controlnets) on a tiny Stable Diffusion UNet.

Tiny random components: these tests check the wiring against diffusers, not any result on real weights."""

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from diffkit.blend import ControlNetModality, controlled, controlnet_for, encoder_features
from diffkit.pipelines import ModalityBlendPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def _controlnet(unet, seed: int):
    """A ControlNet for the tiny UNet with its zero-initialised outputs randomised, so its residuals are not 0."""
    torch.manual_seed(seed)
    net = controlnet_for(unet, conditioning_embedding_out_channels=(8, 16))  # halves once: the tiny VAE's factor 2
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                "controlnet_cond_embedding.conv_out")):
                p.normal_(0, 0.3)
    return net.eval()


@pytest.fixture(scope="module")
def sd_controlnets():
    from helpers import tiny_text_components
    from test_real_models import SD_SCHEDULE, diffusers_pipe

    components = tiny_text_components()
    ref = diffusers_pipe("sd", scheduler=DDIMScheduler(**SD_SCHEDULE), **components)
    pipe = ModalityBlendPipeline.from_pipe(ref)
    pipe.set_progress_bar_config(disable=True)
    nets = {name: _controlnet(components["unet"], seed) for seed, name in enumerate(["edges", "depth"])}
    pipe.controlnets = nets
    gen = torch.Generator().manual_seed(0)
    # control images in [-1, 1], as the pipeline takes them
    controls = {name: torch.rand(2, 3, 16, 24, generator=gen) * 2 - 1 for name in nets}
    return ref, pipe, nets, controls


def _diffusers_controlnet(ref, nets):
    net = nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
    out = StableDiffusionControlNetPipeline(**{k: v for k, v in ref.components.items() if k != "image_encoder"},
                                            controlnet=net, image_encoder=None)
    out.set_progress_bar_config(disable=True)
    return out


@pytest.mark.parametrize("names", [["edges"], ["edges", "depth"]])
def test_summed_controlnets_with_nothing_known_match_diffusers_controlnet_pipeline(sd_controlnets, names):
    """Blending off (blend="sum") and the whole image masked: one ControlNet is diffusers' ControlNet pipeline, two
    are its MultiControlNetModel (residuals summed), with CFG, a negative prompt, per-net scales and the same noise."""
    ref, pipe, nets, controls = sd_controlnets
    latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(5))
    scales = [0.8, 1.3][: len(names)]
    kw = dict(prompt=["a red fox", "blue sky"], negative_prompt=["dark", "blurry"], num_inference_steps=4,
              guidance_scale=4.0, height=16, width=24, output_type="pt")
    theirs = _diffusers_controlnet(ref, [nets[n] for n in names])(
        image=[(controls[n] + 1) / 2 for n in names] if len(names) > 1 else (controls[names[0]] + 1) / 2,
        controlnet_conditioning_scale=scales if len(names) > 1 else scales[0], latents=latents.clone(), **kw).images
    image = torch.zeros(2, 3, 16, 24)
    ours = pipe(image, torch.ones(1, 1, 16, 24), control_images={n: controls[n] for n in names}, blend="sum",
                controlnet_conditioning_scale=dict(zip(names, scales)), solver="ddim", latents=latents.clone(),
                **kw).images
    assert ours.shape == theirs.shape == (2, 3, 16, 24)
    assert (ours - theirs).abs().max() <= 1e-4
    plain = pipe(image, torch.ones(1, 1, 16, 24), solver="ddim", latents=latents.clone(), **kw).images
    assert (ours - plain).abs().max() > 1e-3  # the ControlNets do condition the fill


def test_effective_skip_features_are_the_skips_plus_the_controlnet_residuals(sd_controlnets):
    """encoder_features(mid=True) under ``controlled``: every skip tensor and the mid block's output plus the
    ControlNet's residual, as the decoder receives them; ControlNet residuals leave the encoder features unchanged."""
    _, pipe, nets, controls = sd_controlnets
    unet, net = pipe.unet, nets["edges"]
    x, t, text = torch.randn(2, 4, 8, 12), torch.tensor(500), torch.randn(2, 5, 32)
    image = (controls["edges"] + 1) / 2
    with torch.no_grad():
        down, mid = net(x, t, encoder_hidden_states=text, controlnet_cond=image, conditioning_scale=0.7,
                        return_dict=False)
        plain = encoder_features(unet, lambda: unet(x, t, text), mid=True)
        with controlled(unet, [ControlNetModality(net, image, 0.7)]):
            effective = encoder_features(unet, lambda: unet(x, t, text), mid=True)
            encoder = encoder_features(unet, lambda: unet(x, t, text))
    assert len(effective) == len(down) + 1
    for got, base, r in zip(effective, plain, [*down, mid]):
        assert torch.allclose(got, base + r, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(encoder, plain[: len(encoder)]))


def test_controlnet_blending_lowers_its_loss_and_changes_the_fill(sd_controlnets):
    """CMB with two ControlNets on the SD UNet: the line search lowers the loss at every gradient step; the fill
    differs from summing and from plain completion; the known pixels come back exactly."""
    _, pipe, _, controls = sd_controlnets
    image = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = torch.zeros(1, 1, 16, 24)
    mask[..., 12:] = 1
    kw = dict(prompt="a red fox", num_inference_steps=5, blend_steps=3, blend_iterations=3, height=16, width=24,
              output_type="pt")

    def run(**extra):
        return pipe(image, mask, generator=torch.Generator().manual_seed(2), **{**kw, **extra}).images * 2 - 1

    cmb = run(control_images=controls, blend="cmb")
    losses = pipe.blend_losses
    assert losses.shape == (3, 4) and torch.all(losses[:, 1:] < losses[:, :-1]), losses
    assert pipe.blend_loss_removed.shape == (3,) and torch.all(pipe.blend_loss_removed > 0)
    assert torch.allclose(cmb * (1 - mask), image * (1 - mask), atol=1e-6)
    assert (cmb - run(control_images=controls, blend="sum")).abs().max() > 1e-3
    assert (cmb - run()).abs().max() > 1e-3


def test_controlnets_are_refused_where_they_cannot_condition(sd_controlnets):
    _, pipe, _, controls = sd_controlnets
    image, mask = torch.zeros(2, 3, 16, 24), torch.ones(1, 1, 16, 24)
    with pytest.raises(ValueError, match="controlnet_conditioning_scale names"):
        pipe(image, mask, control_images={"edges": controls["edges"]}, controlnet_conditioning_scale={"depth": 1.0})
    pipe.adapters["depth"] = object()
    try:
        with pytest.raises(ValueError, match="both an adapter and a ControlNet"):
            pipe(image, mask, control_images=controls)
    finally:
        del pipe.adapters["depth"]


def test_save_pretrained_keeps_the_controlnets(sd_controlnets, tmp_path):
    """save_pretrained writes every ControlNet under controlnets/<modality> as safetensors; from_pretrained and
    load_controlnets bring them back with the same weights."""
    _, pipe, nets, _ = sd_controlnets
    pipe.save_pretrained(tmp_path / "p")
    saved = (tmp_path / "p" / "controlnets").glob("*/diffusion_pytorch_model.safetensors")
    assert sorted(p.parent.name for p in saved) == sorted(nets)
    loaded = ModalityBlendPipeline.from_pretrained(tmp_path / "p")
    assert sorted(loaded.controlnets) == sorted(nets)
    for name, net in nets.items():
        theirs = loaded.controlnets[name].state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match="no ControlNet for"):
        loaded.load_controlnets(tmp_path / "p" / "controlnets", names=["depth", "sketch"])


def test_summed_controlnet_on_sdxl_matches_diffusers_sdxl_controlnet_pipeline():
    """SDXL: the ControlNet gets the pooled text embeddings and size ids (``added_cond_kwargs``) as diffusers'
    SDXL ControlNet pipeline gives them; blending off and the whole image masked, the two agree."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline
    from helpers import tiny_sdxl_components
    from test_real_models import SD_SCHEDULE, diffusers_pipe

    components = tiny_sdxl_components()
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading", steps_offset=1)
    ref = diffusers_pipe("sdxl", scheduler=scheduler, **components)
    net = _controlnet(components["unet"], 0)
    theirs_pipe = StableDiffusionXLControlNetPipeline(**{k: v for k, v in ref.components.items()
                                                         if k not in ("image_encoder", "feature_extractor")},
                                                      controlnet=net, add_watermarker=False)
    theirs_pipe.set_progress_bar_config(disable=True)
    pipe = ModalityBlendPipeline.from_pipe(ref)
    pipe.set_progress_bar_config(disable=True)
    pipe.controlnets = {"edges": net}
    control = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(5))
    kw = dict(prompt="a red fox", negative_prompt="dark", num_inference_steps=4, guidance_scale=5.0, height=16,
              width=24, output_type="pt")
    theirs = theirs_pipe(image=(control + 1) / 2, controlnet_conditioning_scale=0.8, latents=latents.clone(), **kw).images
    kw["solver"] = None  # the scheduler's own walk (SDXL's Euler), not the pipeline's default DDIM
    ours = pipe(torch.zeros(1, 3, 16, 24), torch.ones(1, 1, 16, 24), control_images={"edges": control}, blend="sum",
                controlnet_conditioning_scale={"edges": 0.8}, latents=latents.clone(), **kw).images
    assert ours.shape == theirs.shape == (1, 3, 16, 24)
    assert (ours - theirs).abs().max() <= 1e-4
    plain = pipe(torch.zeros(1, 3, 16, 24), torch.ones(1, 1, 16, 24), latents=latents.clone(), **kw).images
    assert (ours - plain).abs().max() > 1e-3  # the ControlNet does condition the fill
