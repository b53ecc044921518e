"""Each diffkit solver reproduces its diffusers scheduler on the same model, noise and config (max-abs 1e-4)."""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler

from diffkit.denoiser import Denoiser
from diffkit.guidance import CFG
from diffkit.schedule import NoiseSchedule
from diffkit.solvers import SOLVERS, make_timesteps
from helpers import NearlyTrainedModel, tiny_unet


SCHEDULERS = {
    "ddim": DDIMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
}
VE_SOLVERS = ("euler", "heun")  # diffusers keeps their samples in VE coordinates x / alpha


def _diffusers_loop(scheduler, model, noise, n, generator=None, eta=None, guidance_scale=None, cond=None):
    scheduler.set_timesteps(n)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        if guidance_scale is None:
            out = model(inp, t).sample
        else:  # classifier-free guidance on the raw model output, as diffusers pipelines do it
            out_c, out_u = model(torch.cat([inp, inp]), t, class_labels=torch.cat(cond)).sample.chunk(2)
            out = out_u + guidance_scale * (out_c - out_u)
        kwargs = {"eta": eta, "generator": generator} if eta is not None else {}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


def _compare(name, config, n=10, clamp_zero_snr=True, eta=None):
    scheduler = SCHEDULERS[name](**config)
    schedule = NoiseSchedule.from_config(scheduler.config, clamp_zero_snr=clamp_zero_snr)
    model = NearlyTrainedModel(schedule, config["prediction_type"])
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = _diffusers_loop(scheduler, model, noise, n, torch.Generator().manual_seed(5), eta)
        timesteps = make_timesteps(schedule, name, n, scheduler.config)
        x_start = noise * scheduler.init_noise_sigma
        if name in VE_SOLVERS:
            x_start = x_start * schedule.alpha(timesteps[0]).item()
        opts = {"eta": eta, "generator": torch.Generator().manual_seed(5)} if eta is not None else {}
        ours = SOLVERS[name].fn(Denoiser(model, schedule, config["prediction_type"]), x_start, timesteps, **opts)
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4, f"{name} {config}: max-abs {err:.2e}"


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_solver_matches_diffusers(name, prediction_type, beta_schedule):
    config = dict(beta_schedule=beta_schedule, prediction_type=prediction_type, timestep_spacing="leading")
    if name == "ddim":
        config["clip_sample"] = False
    _compare(name, config)


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_solver_spacings_match_diffusers(name, spacing):
    if name == "ddim" and spacing == "linspace":
        pytest.skip("diffusers' DDIM steps from t to t - N//n, not to the next linspace point; diffkit walks the grid")
    config = dict(beta_schedule="scaled_linear", prediction_type="epsilon", timestep_spacing=spacing)
    if name == "ddim":
        config["clip_sample"] = False
    _compare(name, config)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_cosine_from_t_max_with_v_prediction(name):
    # Trailing spacing starts at t = 999 where the cosine schedule has alpha ~ 5e-5. In VE coordinates (Euler,
    # Heun) that is sigma ~ 2e4, where float32 rounding in diffusers' own loop reaches ~1e-4, so they are left out.
    config = dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing")
    if name == "ddim":
        config["clip_sample"] = False
    _compare(name, config)


def test_ddim_eta_draws_the_same_noise():
    config = dict(beta_schedule="linear", prediction_type="epsilon", clip_sample=False)
    _compare("ddim", config, eta=0.7)


def test_ddim_final_alpha_not_one():
    config = dict(beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    _compare("ddim", config)


def test_dpmpp_2m_many_steps_second_order_throughout():
    _compare("dpmpp_2m", dict(beta_schedule="linear", prediction_type="epsilon"), n=20)


def test_dpmpp_2m_sigma_min_end():
    _compare("dpmpp_2m", dict(beta_schedule="linear", prediction_type="v_prediction", final_sigmas_type="sigma_min"), n=20)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler"])
def test_zero_terminal_snr(name):
    config = dict(
        beta_schedule="scaled_linear", prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True
    )
    if name == "ddim":
        config["clip_sample"] = False
    # diffusers' DDIM keeps alpha_bar = 0 at the last step; its Euler and DPM-Solver clamp it to 2^-24.
    _compare(name, config, clamp_zero_snr=name != "ddim")


def test_cfg_matches_diffusers_guided_loop():
    """CFG applied in x0 space by diffkit equals CFG on the raw eps output in a diffusers loop (it is linear)."""
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", prediction_type="epsilon")
    unet = NearlyTrainedModel(NoiseSchedule.from_config(scheduler.config), "epsilon", num_class_embeds=4)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    cond, uncond = torch.tensor([0, 2]), torch.tensor([3, 3])
    with torch.no_grad():
        ref = _diffusers_loop(scheduler, unet, noise, 8, guidance_scale=4.0, cond=(cond, uncond))
        denoiser = Denoiser.from_pipeline_components(unet, scheduler)
        timesteps = make_timesteps(denoiser.schedule, "dpmpp_2m", 8, scheduler.config)
        ours = SOLVERS["dpmpp_2m"].fn(
            denoiser, noise, timesteps, cond={"class_labels": cond}, uncond={"class_labels": uncond}, guidance=CFG(4.0)
        )
    assert (ours - ref).abs().max().item() <= 1e-4


def test_solvers_are_differentiable():
    """No hidden no_grad: a gradient reaches the initial noise, and it matches a finite difference."""
    schedule = NoiseSchedule.from_config({"beta_schedule": "linear"})
    denoiser = Denoiser(NearlyTrainedModel(schedule, "epsilon"), schedule, "epsilon")
    timesteps = schedule.timesteps(4, "leading")
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    denoiser.model.double()
    direction = torch.randn_like(x)
    for name in SOLVERS:
        xr = x.clone().requires_grad_(True)
        SOLVERS[name].fn(denoiser, xr, timesteps).sum().backward()
        with torch.no_grad():
            h = 1e-5
            f = lambda z: SOLVERS[name].fn(denoiser, z, timesteps).sum()  # noqa: E731
            fd = (f(x + h * direction) - f(x - h * direction)) / (2 * h)
        assert torch.allclose((xr.grad * direction).sum(), fd, rtol=1e-5), name


def test_bad_timesteps_are_rejected():
    schedule = NoiseSchedule.from_config({})
    denoiser = Denoiser(tiny_unet(), schedule)
    with pytest.raises(ValueError, match="decreasing"):
        SOLVERS["ddim"].fn(denoiser, torch.randn(1, 3, 8, 8), torch.tensor([10.0, 500.0, -1.0]))
    with pytest.raises(ValueError, match="timesteps must lie"):
        SOLVERS["ddim"].fn(denoiser, torch.randn(1, 3, 8, 8), torch.tensor([1000.0, -1.0]))
