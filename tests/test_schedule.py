"""NoiseSchedule against diffusers' tables and DPM-Solver's continuous-time definition; conversions."""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler

from diffkit.denoiser import PREDICTION_TYPES, convert
from diffkit.schedule import CLEAN, NoiseSchedule
from diffkit.solvers import make_timesteps


CONFIGS = [
    {"beta_schedule": "linear"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "scaled_linear", "rescale_betas_zero_snr": True},
    {"trained_betas": torch.linspace(1e-4, 3e-2, 500).tolist(), "num_train_timesteps": 500},
]


@pytest.mark.parametrize("config", CONFIGS)
def test_alphas_cumprod_equal_diffusers(config):
    ours = NoiseSchedule.from_config(config, clamp_zero_snr=False)
    ref = DDIMScheduler(**config).alphas_cumprod.double()
    assert torch.allclose(ours.alphas_cumprod, ref, rtol=1e-6, atol=1e-12)
    t = torch.arange(len(ref), dtype=torch.float64)
    assert torch.allclose(ours.alpha(t) ** 2, ours.alphas_cumprod, rtol=1e-12, atol=1e-15)
    assert torch.allclose(ours.sigma(t) ** 2, 1 - ours.alphas_cumprod, rtol=1e-12, atol=1e-15)


def test_zero_snr_clamp_follows_diffusers_euler():
    config = {"beta_schedule": "scaled_linear", "rescale_betas_zero_snr": True}
    ours = NoiseSchedule.from_config(config)
    ref = EulerDiscreteScheduler(**config).alphas_cumprod.double()
    assert ours.alphas_cumprod[-1] == ref[-1] == 2**-24
    assert torch.allclose(ours.alphas_cumprod, ref, rtol=1e-6, atol=1e-12)


def test_continuous_time_interpolates_log_alpha():
    """Between grid points log(alpha) is linear in t (DPM-Solver's discrete NoiseScheduleVP); t = -1 is clean."""
    s = NoiseSchedule.from_config({"beta_schedule": "linear"})
    la = 0.5 * s.alphas_cumprod.log()
    t = torch.tensor([10.25, 500.5, 998.75], dtype=torch.float64)
    lo = t.floor().long()
    expected = la[lo] + (t - lo) * (la[lo + 1] - la[lo])
    assert torch.allclose(s.log_alpha(t), expected, rtol=0, atol=1e-14)
    assert s.alpha(CLEAN) == 1 and s.sigma(CLEAN) == 0 and s.lam(CLEAN) == float("inf")
    lam = s.lam(t)
    assert torch.allclose(lam, s.log_alpha(t) - 0.5 * torch.log1p(-torch.exp(2 * s.log_alpha(t))))
    with pytest.raises(ValueError, match="timesteps must lie"):
        s.alpha(1000.0)


SCHEDULERS = {"ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler, "heun": HeunDiscreteScheduler}


@pytest.mark.parametrize("solver", SCHEDULERS)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [7, 25])
def test_timestep_spacings_equal_diffusers(solver, spacing, n):
    if solver == "ddim" and spacing == "linspace":
        pytest.skip("diffkit's DDIM walks its grid; diffusers' DDIM steps to t - N//n (see test_solvers)")
    kwargs = {"clip_sample": False} if solver == "ddim" else {}  # a plain array cannot carry DDIM's default clipping
    scheduler = SCHEDULERS[solver](timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0, **kwargs)
    scheduler.set_timesteps(n)
    ref = scheduler.timesteps.double()
    if solver == "heun":
        ref = torch.cat([ref[:1], ref[1::2]])  # diffusers repeats every timestep but the first
    ours = make_timesteps(NoiseSchedule.from_config(scheduler.config), solver, n, scheduler.config)
    assert torch.allclose(ours[:-1], ref, atol=1e-3) and ours[-1] == CLEAN


@pytest.mark.parametrize("source", PREDICTION_TYPES)
@pytest.mark.parametrize("target", PREDICTION_TYPES)
@pytest.mark.parametrize("alpha, sigma", [(0.6, 0.8), (0.3, 0.7)], ids=["vp", "flow"])
def test_conversions_round_trip_and_agree_with_definitions(source, target, alpha, sigma):
    """On a VP path (alpha^2 + sigma^2 = 1) and on the flow path (alpha + sigma = 1), from the definitions
    x = alpha x0 + sigma eps, v = alpha eps - sigma x0, u = eps - x0."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    x = alpha * x0 + sigma * eps
    truth = {"sample": x0, "epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "flow": eps - x0}
    assert torch.allclose(convert(truth[source], source, target, x, alpha, sigma), truth[target])


def test_flow_prediction_is_diffusers_name_for_flow():
    x, u = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(convert(u, "flow_prediction", "sample", x, 0.25, 0.75), convert(u, "flow", "sample", x, 0.25, 0.75))
    with pytest.raises(ValueError, match="prediction type"):
        convert(u, "velocity", "sample", x, 0.25, 0.75)


def test_bad_schedule_configs():
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule.from_config({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="spacing"):
        NoiseSchedule.from_config({}).timesteps(10, "uniform")
    with pytest.raises(ValueError, match="num_inference_steps"):
        NoiseSchedule.from_config({}).timesteps(0)


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_timestep_at_rho_inverts_sigma_over_alpha(beta_schedule):
    schedule = NoiseSchedule.from_config({"beta_schedule": beta_schedule})
    t = torch.tensor([0.0, 0.3, 5.5, 123.25, 500.0, 998.7, 999.0], dtype=torch.float64)
    rho = schedule.sigma(t) / schedule.alpha(t)
    assert torch.allclose(schedule.timestep_at_rho(rho), t, atol=1e-9)


def test_flow_matching_path():
    """alpha = 1 - t / N, sigma = t / N (diffusers' FlowMatch timesteps); FlowMatch configs give it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    schedule = NoiseSchedule.from_config({**FlowMatchEulerDiscreteScheduler(shift=3.0).config})
    assert schedule.path == "flow" and schedule.t_clean == 0 and schedule.t_max == 1000
    t = torch.tensor([0.0, 250.0, 999.5, 1000.0], dtype=torch.float64)
    assert torch.equal(schedule.sigma(t), t / 1000) and torch.equal(schedule.alpha(t), 1 - t / 1000)
    rho = schedule.sigma(t[:3]) / schedule.alpha(t[:3])
    assert torch.allclose(schedule.timestep_at_rho(rho), t[:3], atol=1e-9)
    assert torch.allclose(schedule.alpha_at_rho(rho), schedule.alpha(t[:3]))
    assert schedule.timestep_at_rho(float("inf")) == 1000
    with pytest.raises(ValueError, match="timesteps must lie"):
        schedule.alpha(1000.5)
    with pytest.raises(ValueError, match="flow"):
        schedule.timesteps(10)


def test_calculate_shift_equals_the_flux_pipeline():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_shift

    from diffkit.schedule import calculate_shift

    for seq_len in (256, 1024, 4096, 777):
        assert calculate_shift(seq_len) == pytest.approx(flux_shift(seq_len), abs=1e-12)
        assert calculate_shift(seq_len, 256, 4096, 0.5, 1.16) == pytest.approx(flux_shift(seq_len, 256, 4096, 0.5, 1.16), abs=1e-12)


@pytest.mark.parametrize("path", ["vp", "flow"])
def test_add_noise_is_the_path(path):
    schedule = NoiseSchedule.from_config({"beta_schedule": "scaled_linear"}) if path == "vp" else NoiseSchedule.flow_matching()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    x_t = schedule.add_noise(x0, eps, t)
    for i in range(3):
        a, s = schedule.alpha(t[i]).item(), schedule.sigma(t[i]).item()
        assert torch.allclose(x_t[i], a * x0[i] + s * eps[i], atol=1e-6)
        assert torch.equal(schedule.add_noise(x0[i], eps[i], t[i]), a * x0[i] + s * eps[i])  # one timestep: floats
    with pytest.raises(ValueError, match="one per sample"):
        schedule.add_noise(x0, eps, torch.tensor([1, 2]))


def test_step_grid_from_timesteps_and_its_checks():
    from diffkit.schedule import StepGrid

    schedule = NoiseSchedule.from_config({"beta_schedule": "linear"})
    ts = make_timesteps(schedule, "dpmpp_2m", 5)
    grid = StepGrid.from_timesteps(schedule, ts)
    assert len(grid) == 6 and grid.num_steps == 5 and not grid.jumps and grid.path == "vp"
    assert grid.alpha == schedule.alpha(ts).tolist() and grid.sigma == schedule.sigma(ts).tolist()
    assert grid.rho[-1] == 0 and grid.lam[-1] == float("inf")
    x0, eps = torch.randn(1, 3), torch.randn(1, 3)
    assert torch.equal(grid.add_noise(x0, eps, 2), grid.alpha[2] * x0 + grid.sigma[2] * eps)
    with pytest.raises(ValueError, match="decreasing"):
        StepGrid.from_timesteps(schedule, torch.tensor([10.0, 500.0, -1.0]))
    with pytest.raises(ValueError, match="must decrease"):
        StepGrid([3.0, 2.0, 1.0], [0.9, 0.6, 0.5], [0.1, 0.7, 0.8])
    with pytest.raises(ValueError, match="same length"):
        StepGrid([1.0, 0.0], [0.5], [0.8, 0.0])
    with pytest.raises(ValueError, match="both be 0"):
        StepGrid([1.0, 0.0], [0.5, 0.0], [0.8, 0.0])
    with pytest.raises(ValueError, match="targets"):
        StepGrid([2.0, 1.0, 0.0], [0.5, 0.7, 1.0], [0.8, 0.6, 0.0], targets=[(0.7, 0.6)])
