"""InverseProblemPipeline (RedDiffPipeline, its old name) and `diffkit restore` on the embedded default model: restorations beat the measurement's
pseudo-inverse, the pipeline round-trips, bad input is refused with the shapes named."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

import diffkit
from diffkit.cli import main
from diffkit.data import colored_digits
from diffkit.inverse import make_operator, red_diff
from diffkit.metrics import psnr
from diffkit.pipelines import InverseProblemPipeline, RedDiffPipeline


@pytest.fixture(scope="module")
def pipe():
    pipe = RedDiffPipeline.from_pipe(diffkit.load_pipeline())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def digits():
    return colored_digits("test")[0][:4]


@pytest.mark.parametrize("method, steps", [("red_diff", 50), ("pigdm", 25)])
def test_restoration_beats_the_pseudo_inverse(pipe, digits, method, steps):
    """Half the image boxed out: the prior must fill it in better than the zero fill of pinv(y)."""
    op = make_operator("inpaint_box", sigma_y=0.05, image_size=16)
    y = op.measure(digits, generator=torch.Generator().manual_seed(0))
    out = pipe(y, op, method=method, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt")
    restored = out.images * 2 - 1
    assert psnr(restored, digits).mean() > psnr(op.pinv(y).clamp(-1, 1), digits).mean() + 2


def test_pipeline_is_the_solver_with_the_unconditional_prior(pipe, digits):
    op = make_operator("sr:2", sigma_y=0.05)
    y = op.measure(digits, generator=torch.Generator().manual_seed(0))
    ours = pipe(y, op, num_inference_steps=10, generator=torch.Generator().manual_seed(1), output_type="pt").images
    denoiser = diffkit.Denoiser.from_pipeline_components(pipe.unet, pipe.scheduler)
    ref = red_diff(denoiser, y, op, num_steps=10, generator=torch.Generator().manual_seed(1),
                   cond={"class_labels": torch.full((4,), 10)})
    assert torch.allclose(ours, (ref / 2 + 0.5).clamp(0, 1), atol=1e-6)


def test_save_and_load_round_trip(pipe, digits, tmp_path):
    pipe.save_pretrained(tmp_path / "rd")
    loaded = diffkit.load_pipeline(tmp_path / "rd")
    assert isinstance(loaded, RedDiffPipeline)
    op = make_operator("blur_gauss:1.0", sigma_y=0.05)
    y = op.measure(digits[:1], generator=torch.Generator().manual_seed(0))
    a, b = (p(y, op, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np").images for p in (pipe, loaded))
    assert np.array_equal(a, b)


def test_bad_input_is_refused(pipe, digits):
    op = make_operator("sr:2")
    with pytest.raises(ValueError, match=r"\(1, 3, 16, 16\)"):  # an image given where an 8x8 measurement belongs
        pipe(digits[:1], op, num_inference_steps=2)
    with pytest.raises(ValueError, match="method"):
        pipe(op.forward(digits[:1]), op, method="ddrm")
    with pytest.raises(ValueError, match="lrr"):
        pipe(op.forward(digits[:1]), op, method_kwargs={"lrr": 0.1})
    with pytest.raises(ValueError, match="NaN"):
        pipe(torch.full((1, 3, 8, 8), float("nan")), op, num_inference_steps=2)


def test_cli_restore_writes_a_png_with_its_parameters(digits, tmp_path, capsys):
    clean = tmp_path / "clean.png"
    PIL.Image.fromarray(((digits[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)).save(clean)
    out = tmp_path / "restored.png"
    args = ["restore", str(clean), "--operator", "inpaint_box", "--simulate", "--steps", "20", "--out", str(out)]
    assert main(args) == 0
    image = PIL.Image.open(out)
    assert image.size == (16, 16)
    assert json.loads(image.text["diffkit"])["operator"] == "inpaint_box"
    assert main(args) == 2  # never replaced silently
    assert "--overwrite" in capsys.readouterr().err
    bad = ["restore", str(clean), "--operator", "sr:2", "--steps", "2", "--out", str(tmp_path / "x.png")]
    assert main(bad) == 2  # a 16x16 file is no SR x2 measurement for a 16x16 model
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "(1, 3, 8, 8)" in err and len(err.splitlines()) == 1
    assert main(["restore", str(clean), "--operator", "warp:3", "--out", str(tmp_path / "y.png")]) == 2
    assert "unknown operator" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_latent_model_fits_the_measurement_through_the_decoder(digits):
    """A latent model (UNet + VAE), called as a user calls it (no no_grad, every output type): the forward model is
    A after the VAE's decoder, so RED-Diff's mu is a latent and, with the prior switched off (lam = 0), the decoded
    restoration fits y better than the encoded start (by 13% here: the tiny random decoder cannot draw digits, so
    the fit levels off near 0.65). DPS and PiGDM (the encoder as the decoder's pseudo-inverse) run on it too."""
    from diffusers import DDIMScheduler
    from helpers import tiny_text_components

    pipe = InverseProblemPipeline(scheduler=DDIMScheduler(), **tiny_text_components())
    pipe.set_progress_bar_config(disable=True)
    op = make_operator("sr:2", sigma_y=0.0)
    y = op.forward(digits)

    def residual(images):
        return (op.forward(images) - y).pow(2).mean().item()

    vae = pipe.vae
    start = vae.decode(vae.encode(op.pinv(y)).latent_dist.mean, return_dict=False)[0].detach()
    kw = dict(num_inference_steps=60, method_kwargs={"lam": 0.0, "lr": 0.2})
    fitted = pipe(y, op, **kw, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert fitted.shape == digits.shape and not fitted.requires_grad
    assert residual(fitted * 2 - 1) < 0.92 * residual(start)
    as_np = pipe(y, op, **kw, generator=torch.Generator().manual_seed(0), output_type="np").images
    as_pil = pipe(y, op, **kw, generator=torch.Generator().manual_seed(0), output_type="pil").images
    assert np.allclose(as_np, fitted.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert np.abs(np.asarray(as_pil[0]) / 255 - as_np[0]).max() <= 1 / 255
    for method in ("dps", "pigdm"):
        images = pipe(y, op, method=method, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                      output_type="pil").images
        assert len(images) == len(digits) and images[0].size == (16, 16)


# -- latent text models: SD 1.x / 2.x, SDXL, SD3, Flux ---------------------------------------------------------


def _text_pipe(family):
    from test_real_models import diffusers_pipe

    pipe = InverseProblemPipeline.from_pipe(diffusers_pipe(family))
    pipe.set_progress_bar_config(disable=True)
    return pipe


TEXT = {"sd3": {"max_sequence_length": 16}, "flux": {"max_sequence_length": 16}}
FAMILY_METHODS = [(f, m) for f in ("sd", "sdxl", "sd3", "flux") for m in ("red_diff", "dps", "pigdm")
                  if not (m == "red_diff" and f in ("sd3", "flux"))]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family, method", FAMILY_METHODS)
def test_every_method_on_latent_text_models_is_the_method_through_the_decoder(family, method):
    """Non-square 16x24 images, a prompt: the pipeline is the method run on the latents with the forward model after
    the VAE's decoder (its scaling and shift undone), the prompt's embeddings as the prior's conditioning and, on SD3 /
    Flux, the scheduler's own flow grid; another prompt changes the restoration."""
    from diffkit.inverse import Compose, VaeDecoder, dps, pigdm

    pipe = _text_pipe(family)
    op = make_operator("sr:2", sigma_y=0.0)
    y = op.forward(torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    kw = dict(method=method, num_inference_steps=4, height=16, width=24, output_type="pt", **TEXT.get(family, {}))
    images = pipe(y, op, prompt="a red fox", generator=torch.Generator().manual_seed(1), **kw).images
    assert images.shape == (1, 3, 16, 24) and not images.requires_grad
    other = pipe(y, op, prompt="blue sky", generator=torch.Generator().manual_seed(1), **kw).images
    assert (images - other).abs().max() > 1e-4
    cond, _, _ = pipe.encode_condition(prompt="a red fox", do_guidance=False, height=16, width=24, **TEXT.get(family, {}))
    forward = Compose(VaeDecoder(pipe.vae), op)
    generator = torch.Generator().manual_seed(1)
    if method == "red_diff":
        latents = red_diff(pipe.denoiser(), y, forward, num_steps=4, cond=cond, generator=generator)
    else:
        x_T = torch.randn(1, pipe.latent_channels, 8, 12, generator=generator)
        grid = pipe.solver_setup("ddim", 4, 16, 24).grid if family in ("sd3", "flux") else None
        latents = {"dps": dps, "pigdm": pigdm}[method](pipe.denoiser(), y, forward, num_inference_steps=4, x_T=x_T,
                                                       cond=cond, generator=generator, timesteps=grid)
    assert torch.allclose(images, pipe.decode(latents, "pt"), atol=1e-5)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_dps_step_pulls_latent_models_toward_the_measurement(family):
    """DPS's gradient step, taken through the VAE's decoder, lowers the measurement residual against the same run
    without it (zeta = 0), on every latent family."""
    pipe = _text_pipe(family)
    op = make_operator("sr:2", sigma_y=0.0)
    y = op.forward(torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    residual = []
    for zeta in (0.0, 1.0):
        images = pipe(y, op, method="dps", prompt="a red fox", num_inference_steps=10, height=16, width=24,
                      method_kwargs={"zeta": zeta}, generator=torch.Generator().manual_seed(1), output_type="pt",
                      **TEXT.get(family, {})).images
        residual.append((op.forward(images * 2 - 1) - y).pow(2).mean().item())
    assert residual[1] < residual[0], residual


def test_red_diff_on_a_flow_model_is_refused_with_the_reason():
    pipe = _text_pipe("sd3")
    op = make_operator("sr:2")
    with pytest.raises(ValueError, match="RED-Diff visits the VP schedule"):
        pipe(torch.zeros(1, 3, 8, 8), op, prompt="a fox", height=16, width=16)


def test_default_steps_are_the_methods_own(pipe, digits, monkeypatch):
    """Without num_inference_steps each method runs its own default: RED-Diff the official run's 1,000 steps."""
    import diffkit.pipelines.inverse as inverse_module

    seen = {}
    for name in ("red_diff", "dps", "pigdm"):
        def record(denoiser, y, operator, _name=name, **kwargs):
            seen[_name] = kwargs[inverse_module.STEPS_KEYWORD[_name]]
            return torch.zeros(len(y), 3, 16, 16)
        monkeypatch.setitem(inverse_module.METHODS, name, record)
    op = make_operator("sr:2")
    for name in ("red_diff", "dps", "pigdm"):
        pipe(op.forward(digits[:1]), op, method=name)
    assert seen == {"red_diff": 1000, "dps": 1000, "pigdm": 100}
