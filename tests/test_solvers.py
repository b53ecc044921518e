"""Each diffkit solver reproduces its diffusers scheduler on the same model, noise and config (max-abs 1e-4)."""

import diffusers
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
)

from diffkit.denoiser import Denoiser
from diffkit.guidance import CFG
from diffkit.schedule import NoiseSchedule, StepGrid, calculate_shift
from diffkit.solvers import SOLVERS, make_timesteps, sample_ddim, sample_euler, solver_for
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


# -- the step grid: every scheduler option diffkit reproduces, against diffusers' own loop ----------------------

FLOW_SCHEDULERS = {"FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler,
                   "FlowMatchHeunDiscreteScheduler": FlowMatchHeunDiscreteScheduler}


def _scheduler_loop(scheduler, model, noise, n, **set_kw):
    """The loop a diffusers pipeline runs: scale_model_input where the scheduler has it, step()."""
    scheduler.set_timesteps(n, **set_kw)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        x = scheduler.step(model(inp, t).sample, t, x).prev_sample
    return x


def _nearly_trained(scheduler):
    schedule = NoiseSchedule.from_config(scheduler.config, clamp_zero_snr=not isinstance(scheduler, DDIMScheduler))
    prediction_type = Denoiser.from_pipeline_components(None, scheduler).prediction_type
    return NearlyTrainedModel(schedule, prediction_type)


def _grid_error(scheduler, n=10, model=None, to_images=False, **set_kw):
    """max-abs between diffusers' loop and diffkit's solver on the grid ``solver_for`` builds for ``scheduler``."""
    model = model or _nearly_trained(scheduler)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = _scheduler_loop(scheduler, model, noise, n, **set_kw)
        setup = solver_for(scheduler, None if "sigmas" in set_kw else n, **set_kw)
        ours = setup.fn(Denoiser.from_pipeline_components(model, scheduler), noise * setup.grid.init_noise_scale,
                        setup.grid, **setup.options)
    if setup.grid.path == "vp" and setup.solver in VE_SOLVERS:
        ref = ref * setup.grid.alpha[-1]  # diffusers' Euler / Heun end in VE coordinates x / alpha
    if to_images:
        ref, ours = (ref / 2 + 0.5).clamp(0, 1), (ours / 2 + 0.5).clamp(0, 1)
    return (ours - ref).abs().max().item()


SIGMA_OPTIONS = [
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True, beta_schedule="scaled_linear", prediction_type="v_prediction")),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True, final_sigmas_type="sigma_min")),
    ("DPMSolverMultistepScheduler", dict(use_exponential_sigmas=True)),
    ("DPMSolverMultistepScheduler", dict(use_beta_sigmas=True)),
    ("DPMSolverMultistepScheduler", dict(use_lu_lambdas=True)),
    ("DPMSolverMultistepScheduler", dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")),
    ("DPMSolverMultistepScheduler", dict(lambda_min_clipped=-5.1, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")),
    ("DPMSolverMultistepScheduler", dict(euler_at_final=True, final_sigmas_type="sigma_min", lower_order_final=False)),
    ("DPMSolverMultistepScheduler", dict(solver_order=1, timestep_spacing="trailing")),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True)),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0, final_sigmas_type="sigma_min")),
    ("EulerDiscreteScheduler", dict(use_exponential_sigmas=True, prediction_type="v_prediction")),
    ("EulerDiscreteScheduler", dict(timestep_type="continuous", prediction_type="v_prediction")),
    ("HeunDiscreteScheduler", dict(use_karras_sigmas=True)),
    ("HeunDiscreteScheduler", dict(use_beta_sigmas=True, timestep_spacing="trailing")),
    ("DDIMScheduler", dict(timestep_spacing="linspace", clip_sample=False)),
    ("DDIMScheduler", dict(timestep_spacing="linspace", prediction_type="v_prediction")),  # clip_sample=True
    ("DDIMScheduler", dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction", clip_sample=False)),
]


@pytest.mark.parametrize("name, options", SIGMA_OPTIONS, ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={v}" for k, v in v.items()))
def test_sigma_options_match_diffusers(name, options):
    defaults = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    if name == "DPMSolverMultistepScheduler" or name == "DDIMScheduler":
        defaults = {"beta_schedule": "linear"}
    scheduler = getattr(diffusers, name)(**{**defaults, **options})
    for n in (7, 12):
        assert _grid_error(scheduler, n) <= 1e-4, (name, options, n)


@pytest.mark.parametrize(
    "name, options, set_kw",
    [
        ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0), {}),  # SD3
        ("FlowMatchEulerDiscreteScheduler", dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
         {"mu": calculate_shift(1024), "sigmas": np.linspace(1.0, 1 / 10, 10)}),  # Flux
        ("FlowMatchEulerDiscreteScheduler", dict(use_dynamic_shifting=True, time_shift_type="linear", shift_terminal=0.1), {"mu": 2.0}),
        ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0, use_karras_sigmas=True), {}),
        ("FlowMatchEulerDiscreteScheduler", dict(shift=2.0, use_exponential_sigmas=True), {}),
        ("FlowMatchEulerDiscreteScheduler", dict(use_beta_sigmas=True), {}),
        ("FlowMatchHeunDiscreteScheduler", dict(shift=3.0), {}),
        ("FlowMatchHeunDiscreteScheduler", dict(), {}),
        ("DPMSolverMultistepScheduler", dict(use_flow_sigmas=True, prediction_type="flow_prediction",
                                             use_dynamic_shifting=True), {"mu": 0.8}),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={v}" for k, v in v.items() if k != "sigmas"),
)
def test_flow_matching_schedulers_match_diffusers(name, options, set_kw):
    """Flow models (alpha = 1 - sigma, velocity prediction) on every solver diffusers' flow schedulers use: the
    walk is the scheduler's (shift, dynamic shifting with mu, the pipeline's sigmas, Karras / exponential / beta)."""
    scheduler = getattr(diffusers, name)(**options)
    assert _grid_error(scheduler, 10, **set_kw) <= 1e-4


@pytest.mark.parametrize("name, order", [("ddim", 1), ("dpmpp_2m", 2), ("euler", 1), ("heun", 2)])
def test_every_solver_converges_on_a_flow_model(name, order):
    """Any solver on a flow grid (SD3's shift 3, from pure noise at sigma = 1) converges to the exact
    probability-flow solution for Gaussian data N(0, c^2 I), x_0 = c x_1, at its order: the error falls about
    4x (order 1) or more than 6x (order 2; measured 8x for Heun, whose error reaches float32 rounding, and 15x for
    DPM-Solver++(2M)) from 25 to 100 steps."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    model = NearlyTrainedModel(NoiseSchedule.flow_matching(), "flow", c=0.5, weight=0.0)
    denoiser = Denoiser.from_pipeline_components(model, scheduler)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        errors = [(SOLVERS[name].fn(denoiser, noise, solver_for(scheduler, n, solver=name).grid) - 0.5 * noise).abs().max().item()
                  for n in (25, 100)]
    assert errors[1] < errors[0] / (3 if order == 1 else 6) and errors[1] < 0.05, errors


def test_flow_euler_is_ddim():
    """On the flow path an Euler step in sigma is a DDIM step: the same walk."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    denoiser = Denoiser.from_pipeline_components(_nearly_trained(scheduler), scheduler)
    grid, noise = solver_for(scheduler, 8).grid, torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(sample_euler(denoiser, noise, grid), sample_ddim(denoiser, noise, grid), atol=1e-6)


def test_issue_19_configurations_match_diffusers_on_a_bare_unet():
    """The audit's two configurations (bare random UNet, 12 steps, images in [0, 1]): DDIM trailing without
    set_alpha_to_one on v-prediction stepped to t - N // n off its 83/84-spaced array (3.7e-3 before); Euler with
    linspace spacing interpolates sigma linearly at fractional timesteps (2.3e-3 before). Both within 1e-4 now."""
    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
                         timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False)
    euler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for scheduler in (ddim, euler):
        err = _grid_error(scheduler, 12, model=tiny_unet(), to_images=True)
        assert err <= 1e-4, (type(scheduler).__name__, err)


def test_solver_override_follows_the_counterpart_scheduler():
    """solver= on a VP model walks the grid its diffusers counterpart builds from the same config (from_config)."""
    source = DPMSolverMultistepScheduler(beta_schedule="linear", use_karras_sigmas=True)
    model = _nearly_trained(source)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    euler = EulerDiscreteScheduler.from_config(source.config)
    with torch.no_grad():
        ref = _scheduler_loop(euler, model, noise, 9)
        setup = solver_for(source, 9, solver="euler")
        ours = setup.fn(Denoiser.from_pipeline_components(model, source), noise * setup.grid.init_noise_scale, setup.grid)
    assert setup.solver == "euler" and (ours - ref).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        solver_for(source, 9, solver="ddim")  # DDIM has no Karras sigmas: refused, not dropped


def test_solver_override_clamps_x0_only_where_the_config_says_so():
    """DDIMScheduler.from_config of a DPM-Solver config clips x0 by DDIM's class default (clip_sample=True), a clamp
    the model's own scheduler never applies (it cost the default model 10 points of class accuracy at 25 steps);
    solver="ddim" walks DDIM's grid without it, and keeps a clamp the config asks for. Options the source took by
    its class default give way to DDIM's defaults, as from_config does (_use_default_values: here DPM-Solver's
    "linspace" spacing becomes DDIM's "leading"); a config that states them (as a saved file does) keeps them."""
    source = DPMSolverMultistepScheduler(beta_schedule="linear", prediction_type="v_prediction")
    model = _nearly_trained(source)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    setup = solver_for(source, 9, solver="ddim")
    assert setup.solver == "ddim" and setup.options == {}
    ddim = DDIMScheduler.from_config({**source.config, "clip_sample": False})
    with torch.no_grad():
        ref = _scheduler_loop(ddim, model, noise, 9)
        ours = setup.fn(Denoiser.from_pipeline_components(model, source), noise, setup.grid, **setup.options)
    assert (ours - ref).abs().max() <= 1e-4
    assert setup.grid.timesteps[0] == 888  # "leading", as DDIMScheduler.from_config(source.config)
    stated = {k: v for k, v in source.config.items() if k != "_use_default_values"}
    assert solver_for(stated, 9, solver="ddim", class_name="DPMSolverMultistepScheduler").grid.timesteps[0] == 999
    assert solver_for(DDIMScheduler(), 9).options == {"clip_sample": 1.0}  # the scheduler's own: kept
    clipped = EulerDiscreteScheduler.from_config({**source.config, "clip_sample": True})  # a key the config states
    assert solver_for(clipped, 9, solver="ddim").options == {"clip_sample": 1.0}
    # Heun's own clip_sample=False, taken by default, does not become DDIM's default True either
    assert solver_for(HeunDiscreteScheduler(), 9, solver="ddim").options == {}


@pytest.mark.parametrize(
    "scheduler, match",
    [
        (DPMSolverMultistepScheduler(solver_order=3), "solver_order=3"),
        (DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), "algorithm_type"),
        (DPMSolverMultistepScheduler(solver_type="heun"), "solver_type"),
        (DPMSolverMultistepScheduler(thresholding=True), "thresholding"),
        (DDIMScheduler(thresholding=True), "thresholding"),
        (EulerDiscreteScheduler(interpolation_type="log_linear"), "interpolation_type"),
        (HeunDiscreteScheduler(clip_sample=True), "clip_sample"),
        (FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), "stochastic_sampling"),
        (FlowMatchEulerDiscreteScheduler(invert_sigmas=True), "invert_sigmas"),
        (diffusers.PNDMScheduler(), "PNDMScheduler is not one of them"),
        (diffusers.EulerAncestralDiscreteScheduler(), "EulerAncestralDiscreteScheduler"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_unreproduced_scheduler_options_are_refused(scheduler, match):
    with pytest.raises(ValueError, match=match):
        solver_for(scheduler, 10)


def test_refusals_of_the_plain_timestep_array_and_bad_arguments():
    schedule = NoiseSchedule.from_config({})
    with pytest.raises(ValueError, match="use_karras_sigmas=True"):  # was silently ignored (3e-2 off diffusers)
        make_timesteps(schedule, "dpmpp_2m", 10, DPMSolverMultistepScheduler(use_karras_sigmas=True).config)
    with pytest.raises(ValueError, match="flow"):
        make_timesteps(NoiseSchedule.flow_matching(), "euler", 10, FlowMatchEulerDiscreteScheduler().config)
    with pytest.raises(ValueError, match="mu must be given"):
        solver_for(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 10)
    with pytest.raises(ValueError, match="num_inference_steps"):
        solver_for(DDIMScheduler(), 0)
    with pytest.raises(ValueError, match="class_name"):
        solver_for({"beta_schedule": "linear"}, 10)
    with pytest.raises(ValueError, match="solver must be one of"):
        solver_for(DDIMScheduler(), 10, solver="lms")
    with pytest.raises(ValueError, match="only sample_ddim"):
        grid = solver_for(DDIMScheduler(timestep_spacing="trailing", clip_sample=False), 12).grid
        sample_euler(Denoiser(tiny_unet(), schedule), torch.randn(1, 3, 8, 8), grid)
    # a config dict with its class name works like the instance
    config = {**DDIMScheduler(clip_sample=False).config, "_class_name": "DDIMScheduler"}
    assert solver_for(config, 10).grid.timesteps.tolist() == solver_for(DDIMScheduler(clip_sample=False), 10).grid.timesteps.tolist()


def test_callback_can_stop_a_run():
    """{"stop": True} ends the run after that step and returns the sample there (no exception)."""
    schedule = NoiseSchedule.from_config({"beta_schedule": "linear"})
    denoiser = Denoiser(NearlyTrainedModel(schedule, "epsilon"), schedule, "epsilon")
    noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for name in SOLVERS:
        timesteps = make_timesteps(schedule, name, 6)
        seen = []
        with torch.no_grad():
            full = SOLVERS[name].fn(denoiser, noise, timesteps, callback=lambda info: seen.append(info["x"]))
            stopped = SOLVERS[name].fn(denoiser, noise, timesteps, callback=lambda info: {"stop": info["step"] == 2})
        assert torch.equal(full, seen[-1]) and torch.allclose(stopped, seen[2], atol=1e-6), name


def test_solver_contract_is_the_protocol():
    """An object with only what SolverDenoiser names (schedule, guided_x0) runs every solver, on a plain array
    and on a grid; Denoiser and PiGDM's guided view follow the protocol."""
    from diffkit.denoiser import SolverDenoiser
    from diffkit.inverse.pigdm import _PseudoinverseGuided

    schedule = NoiseSchedule.from_config({"beta_schedule": "linear"})

    class Minimal:
        def __init__(self):
            self.schedule = schedule

        def guided_x0(self, state, cond, uncond, guidance):
            return state.alpha * 0.25 / (state.alpha**2 * 0.25 + state.sigma**2) * state.x  # data N(0, 0.5^2 I)

    minimal = Minimal()
    assert isinstance(minimal, SolverDenoiser) and isinstance(Denoiser(tiny_unet(), schedule), SolverDenoiser)
    assert isinstance(_PseudoinverseGuided(Denoiser(tiny_unet(), schedule), None, None, 1.0), SolverDenoiser)
    noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for name in SOLVERS:
        for timesteps in (make_timesteps(schedule, name, 200), solver_for({"_class_name": SOLVERS[name].scheduler}, 200).grid):
            out = SOLVERS[name].fn(minimal, noise, timesteps)
            grid = timesteps if isinstance(timesteps, StepGrid) else StepGrid.from_timesteps(schedule, timesteps)
            exact = 0.5 * noise / (0.25 * grid.alpha[0] ** 2 + grid.sigma[0] ** 2) ** 0.5  # the flow's end from x_T
            assert (out - exact).abs().max() < 0.05, (name, (out - exact).abs().max())  # DDIM: 0.024


@pytest.mark.parametrize("name", ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_solver_for_keeps_the_plain_arrays_walk_where_they_agree(name, spacing):
    """Where a plain timestep array already reproduced diffusers (integer timesteps, no sigma options, DDIM steps
    landing on its next timestep), solver_for's grid is the same walk, to the bit: pipelines switching to it keep
    their outputs."""
    scheduler = getattr(diffusers, name)(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0,
                                         **({"clip_sample": False} if name == "DDIMScheduler" else {}))
    solver = {"DDIMScheduler": "ddim", "DPMSolverMultistepScheduler": "dpmpp_2m", "EulerDiscreteScheduler": "euler"}[name]
    schedule = NoiseSchedule.from_config(scheduler.config, clamp_zero_snr=name != "DDIMScheduler")
    plain = StepGrid.from_timesteps(schedule, make_timesteps(schedule, solver, 10, scheduler.config))
    grid = solver_for(scheduler, 10).grid
    assert grid.timesteps.tolist() == plain.timesteps.tolist() and not grid.jumps
    assert grid.alpha == plain.alpha and grid.sigma == plain.sigma
