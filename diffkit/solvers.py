"""Samplers as plain functions over a step grid (k-diffusion style, no hidden state).

``sample_<name>(denoiser, x, timesteps, *, cond=None, uncond=None, guidance=None, generator=None,
callback=None, **opts) -> x0``: ``timesteps`` is a ``StepGrid`` (``solver_for`` builds the one a diffusers
scheduler walks) or a plain decreasing timestep array, whose coefficients are then the denoiser's schedule's.
x is the sample at the first entry, x = alpha x0 + sigma eps on any Gaussian path (VP or flow matching); the
network runs at every entry but the last, which is where sampling ends. Nothing here disables autograd, so
gradients flow through a run for AdjointDPM, DPS and modality blending; pipelines wrap calls in
``torch.no_grad()``. ``denoiser`` is anything that follows ``diffkit.denoiser.SolverDenoiser``.

Each solver reproduces its diffusers scheduler on the same model, noise and config (tests/test_solvers.py,
tests/test_flow.py). ``callback(info)`` is called after every step with {"step", "t", "x", "x0"}; if it returns a
dict with key "x", that tensor replaces the sample (diffusers' ``callback_on_step_end`` may edit latents), and
with "stop": True the run ends there: the solver returns that sample (at the next entry's noise level).
"""

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor

from .denoiser import StepState
from .schedule import (
    BETA_SCHEDULES,
    CLEAN,
    SPACINGS,
    NoiseSchedule,
    StepGrid,
    ddim_grid,
    dpm_grid,
    euler_grid,
    flow_match_grid,
    is_flow_config,
)


def _as_grid(denoiser, timesteps, solver: str) -> StepGrid:
    grid = timesteps if isinstance(timesteps, StepGrid) else StepGrid.from_timesteps(denoiser.schedule, timesteps)
    if grid.jumps and solver != "ddim":
        raise ValueError(
            f"this grid steps to noise levels other than its next entries (diffusers' DDIM steps to t - N // n); "
            f"only sample_ddim walks it, not {solver}"
        )
    return grid


def _start(guidance, x: torch.Tensor):
    if not torch.is_tensor(x) or x.ndim < 2:
        raise ValueError(f"x must be a batched tensor, got {type(x).__name__} with shape {getattr(x, 'shape', None)}")
    if guidance is not None:
        guidance.reset()


def _after_step(callback, i, t_model, x, x0):
    """The callback's replacement sample (or x) and whether it stops the run."""
    if callback is None:
        return x, False
    out = callback({"step": i, "t": t_model[i], "x": x, "x0": x0})
    if not isinstance(out, dict):
        return x, False
    return out.get("x", x), bool(out.get("stop", False))


def sample_ddim(
    denoiser, x, timesteps, *, cond=None, uncond=None, guidance=None, generator=None, callback=None, eta=0.0, clip_sample=None
):
    """DDIM (Song et al. 2021, eq. 12): re-noise the x0 estimate along its own eps, plus eta-scaled fresh noise.

    ``clip_sample``: clamp x0 to [-clip_sample, clip_sample] before re-noising (diffusers' DDIM ``clip_sample``;
    eps stays the network's). Steps land where the grid says (``StepGrid.targets``: diffusers' t - N // n).
    """
    if not 0.0 <= eta:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if clip_sample is not None and not (isinstance(clip_sample, (int, float)) and clip_sample > 0):
        raise ValueError(f"clip_sample must be None or a number > 0 (the clamp range), got {clip_sample!r}")
    _start(guidance, x)
    grid = _as_grid(denoiser, timesteps, "ddim")
    t_model = grid.model_timesteps(x.device)
    for i in range(grid.num_steps):
        a, s, a_next, s_next = grid.alpha[i], grid.sigma[i], grid.next_alpha[i], grid.next_sigma[i]
        x0 = denoiser.guided_x0(StepState(i, grid.num_steps, t_model[i], a, s, x), cond, uncond, guidance)
        eps = (x - a * x0) / s
        if clip_sample is not None:
            x0 = x0.clamp(-clip_sample, clip_sample)
        # std of the fresh noise: the DDPM posterior's, eq. 16 on a VP path; sqrt(s^2 - (a s_next / a_next)^2)
        # replaces sqrt(1 - a^2 / a_next^2) s on any other Gaussian path
        if grid.path == "vp":
            std = eta * (s_next / s) * math.sqrt(max(0.0, 1 - (a / a_next) ** 2))
        else:
            std = eta * (s_next / s) * math.sqrt(max(0.0, s**2 - (a * s_next / a_next) ** 2))
        x = a_next * x0 + math.sqrt(max(0.0, s_next**2 - std**2)) * eps
        if eta > 0:
            x = x + std * randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x, stop = _after_step(callback, i, t_model, x, x0)
        if stop:
            break
    return x


def sample_dpmpp_2m(
    denoiser, x, timesteps, *, cond=None, uncond=None, guidance=None, generator=None, callback=None,
    lower_order_final=True, euler_at_final=False,
):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), data prediction, midpoint form as diffusers runs it.

    The first step and a step into sigma = 0 are first order; ``lower_order_final`` also makes the last step
    first order when there are fewer than 15 steps (stabilises few-step guided sampling), ``euler_at_final``
    always.
    """
    _start(guidance, x)
    grid = _as_grid(denoiser, timesteps, "dpmpp_2m")
    t_model, n, lam = grid.model_timesteps(x.device), grid.num_steps, grid.lam
    x0_prev = None
    for i in range(n):
        a_next, s, s_next = grid.alpha[i + 1], grid.sigma[i], grid.sigma[i + 1]
        x0 = denoiser.guided_x0(StepState(i, n, t_model[i], grid.alpha[i], s, x), cond, uncond, guidance)
        h = lam[i + 1] - lam[i]
        phi = -math.expm1(-h)  # 1 - e^{-h}
        last = i == n - 1
        first_order = x0_prev is None or (last and (s_next == 0 or euler_at_final or (lower_order_final and n < 15)))
        if first_order:
            d = x0
        else:
            r = (lam[i] - lam[i - 1]) / h
            d = x0 + (x0 - x0_prev) / (2 * r)  # D0 + D1/2, with D1 = (D0 - D_prev) / r
        x = (s_next / s) * x + a_next * phi * d
        x0_prev = x0
        x, stop = _after_step(callback, i, t_model, x, x0)
        if stop:
            break
    return x


def _ode_coordinates(grid: StepGrid, solver: str):
    """Euler and Heun integrate dy/dtau = (y - D) / tau in y = x / c: on a VP grid the VE coordinates of Karras
    et al. (c = alpha, tau = sigma / alpha, as diffusers' Euler / Heun), on a flow grid the flow coordinates
    (c = alpha + sigma = 1, tau = sigma, as its FlowMatch schedulers; Heun's averaged slope differs between the
    two). Returns (c, tau) per entry."""
    if grid.path == "flow":
        c = [a + s for a, s in zip(grid.alpha, grid.sigma)]
        return c, [s / ci for s, ci in zip(grid.sigma, c)]
    if grid.alpha[0] == 0:
        raise ValueError(
            f"{solver} works in VE coordinates x / alpha, which need alpha > 0 at the start; this VP grid starts at "
            "zero SNR (clamp the last alpha_bar to 2^-24 as diffusers' Euler does: NoiseSchedule.from_config's default)"
        )
    return grid.alpha, grid.rho


def sample_euler(denoiser, x, timesteps, *, cond=None, uncond=None, guidance=None, generator=None, callback=None):
    """Euler on the probability-flow ODE dy/dtau = (y - D(y)) / tau (Karras et al. 2022, Algorithm 2 without
    churn); in VE coordinates on VP grids, in flow coordinates on flow grids (FlowMatchEuler's step), where it
    is the same walk."""
    _start(guidance, x)
    grid = _as_grid(denoiser, timesteps, "euler")
    c, tau = _ode_coordinates(grid, "euler")
    t_model, n = grid.model_timesteps(x.device), grid.num_steps
    y = x / c[0]
    for i in range(n):
        x0 = denoiser.guided_x0(StepState(i, n, t_model[i], grid.alpha[i], grid.sigma[i], y * c[i]), cond, uncond, guidance)
        d = (y - x0) / tau[i]
        y = y + d * (tau[i + 1] - tau[i])
        x, stop = _after_step(callback, i, t_model, y * c[i + 1], x0)
        y = x / c[i + 1]
        if stop:
            break
    return y * c[i + 1]


def sample_heun(denoiser, x, timesteps, *, cond=None, uncond=None, guidance=None, generator=None, callback=None):
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1); the step into
    sigma = 0 is an Euler step. 2n - 1 network evaluations for n steps. VE coordinates on VP grids (diffusers'
    HeunDiscrete), flow coordinates on flow grids (its FlowMatchHeun)."""
    _start(guidance, x)
    grid = _as_grid(denoiser, timesteps, "heun")
    c, tau = _ode_coordinates(grid, "heun")
    t_model, n = grid.model_timesteps(x.device), grid.num_steps

    def state(i, y):
        return StepState(i, n, t_model[i], grid.alpha[i], grid.sigma[i], y * c[i])

    y = x / c[0]
    for i in range(n):
        x0 = denoiser.guided_x0(state(i, y), cond, uncond, guidance)
        d = (y - x0) / tau[i]
        y_euler = y + d * (tau[i + 1] - tau[i])
        if tau[i + 1] > 0:
            # Correct with the slope at the Euler point (trapezoidal rule).
            x0_next = denoiser.guided_x0(state(i + 1, y_euler), cond, uncond, guidance)
            d_next = (y_euler - x0_next) / tau[i + 1]
            y = y + 0.5 * (d + d_next) * (tau[i + 1] - tau[i])
        else:
            y = y_euler
        x, stop = _after_step(callback, i, t_model, y * c[i + 1], x0)
        y = x / c[i + 1]
        if stop:
            break
    return y * c[i + 1]


@dataclass(frozen=True)
class Solver:
    fn: Callable
    grid_includes_end: bool  # diffusers' spacing for this scheduler counts the end point (DPM-Solver)
    scheduler: str  # the diffusers scheduler it reproduces on VP models


SOLVERS = {
    "ddim": Solver(sample_ddim, False, "DDIMScheduler"),
    "dpmpp_2m": Solver(sample_dpmpp_2m, True, "DPMSolverMultistepScheduler"),
    "euler": Solver(sample_euler, False, "EulerDiscreteScheduler"),
    "heun": Solver(sample_heun, False, "HeunDiscreteScheduler"),
}


def get_solver(name: str) -> Solver:
    if name not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {name!r}")
    return SOLVERS[name]


# -- diffusers schedulers: which solver and grid reproduce them -----------------------------------------------


def _anything(value, config) -> bool:
    return True


def _one_of(*allowed):
    def check(value, config):
        return value in allowed

    check.allowed = allowed
    return check


def _number(lo=-math.inf, hi=math.inf, none=False):
    def check(value, config):
        if value is None:
            return none
        return isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi

    check.allowed = f"a number in [{lo}, {hi}]" + (" or None" if none else "")
    return check


def _when(key, value=True):
    """An option that only acts when ``key`` has ``value`` (otherwise diffusers ignores it)."""
    return lambda config: config.get(key) == value


_BOOL = _one_of(True, False)
_SCHEDULE = {  # the model's noise schedule: read by NoiseSchedule.from_config
    "num_train_timesteps": _number(2),
    "beta_start": _number(0, 1),
    "beta_end": _number(0, 1),
    "beta_schedule": _one_of(*BETA_SCHEDULES),
    "trained_betas": _anything,
    "rescale_betas_zero_snr": _BOOL,
}
_SPACING = {"timestep_spacing": _one_of(*SPACINGS), "steps_offset": _number(0)}
_VP_PREDICTIONS = ("epsilon", "sample", "v_prediction")
_SIGMAS = {"use_karras_sigmas": _BOOL, "use_exponential_sigmas": _BOOL, "use_beta_sigmas": _BOOL}
_THRESHOLDING = {"thresholding": _one_of(False)}
_THRESHOLDING_INERT = {"dynamic_thresholding_ratio": _when("thresholding"), "sample_max_value": _when("thresholding")}
# grid options a scheduler's config may carry that another scheduler class does not have (with their defaults)
_GRID_DEFAULTS = {
    "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
    "final_sigmas_type": "zero", "interpolation_type": "linear", "timestep_type": "discrete",
    "lambda_min_clipped": -math.inf, "sigma_min": None, "sigma_max": None,
}

# step options that clamp the model's x0; DDIMScheduler clips by default (clip_sample=True), which from_config would
# turn on when a DPM-Solver or Euler config (which has no such key) is run by DDIM
_X0_CLAMPS = ("clip_sample", "thresholding")


@dataclass(frozen=True)
class _Reproduced:
    """A diffusers scheduler class diffkit reproduces: its solver, grid builder, the options it reproduces
    (key -> check of the value), options that only act with another one on (key -> when), options of the step
    alone (ignored when another solver walks its grid) and the solver options its config sets."""

    solver: Callable[[dict], str]
    grid: Callable
    supported: dict
    inert: dict = field(default_factory=dict)
    step_keys: tuple = ()
    options: Callable[[dict], dict] = lambda config: {}


def _dpm_solver(config):
    return "ddim" if config["solver_order"] == 1 else "dpmpp_2m"  # order 1 DPM-Solver++ is DDIM's step


_REPRODUCED = {
    "DDIMScheduler": _Reproduced(
        solver=lambda config: "ddim",
        grid=lambda config, n, mu, sigmas: ddim_grid(config, n),
        supported={**_SCHEDULE, **_SPACING, **_THRESHOLDING, "prediction_type": _one_of(*_VP_PREDICTIONS),
                   "clip_sample": _BOOL, "clip_sample_range": _number(0), "set_alpha_to_one": _BOOL},
        inert={**_THRESHOLDING_INERT, "clip_sample_range": _when("clip_sample")},
        step_keys=("clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio", "sample_max_value"),
        options=lambda config: {"clip_sample": config["clip_sample_range"]} if config["clip_sample"] else {},
    ),
    "DPMSolverMultistepScheduler": _Reproduced(
        solver=_dpm_solver,
        grid=lambda config, n, mu, sigmas: dpm_grid(config, n, mu),
        supported={
            **_SCHEDULE, **_SPACING, **_SIGMAS, **_THRESHOLDING,
            "prediction_type": _one_of(*_VP_PREDICTIONS, "flow_prediction"),
            "solver_order": _one_of(1, 2), "algorithm_type": _one_of("dpmsolver++"), "solver_type": _one_of("midpoint"),
            "lower_order_final": _BOOL, "euler_at_final": _BOOL, "use_lu_lambdas": _BOOL, "use_flow_sigmas": _BOOL,
            "flow_shift": _number(1e-6), "final_sigmas_type": _one_of("zero", "sigma_min"),
            "lambda_min_clipped": _number(), "variance_type": _one_of(None), "use_dynamic_shifting": _BOOL,
            "time_shift_type": _one_of("exponential"),
        },
        inert={**_THRESHOLDING_INERT, "flow_shift": _when("use_flow_sigmas"), "solver_type": _when("solver_order", 2)},
        step_keys=("solver_order", "algorithm_type", "solver_type", "lower_order_final", "euler_at_final",
                   "thresholding", "dynamic_thresholding_ratio", "sample_max_value"),
        options=lambda config: (
            {"lower_order_final": config["lower_order_final"], "euler_at_final": config["euler_at_final"]}
            if config["solver_order"] == 2 else {}
        ),
    ),
    "EulerDiscreteScheduler": _Reproduced(
        solver=lambda config: "euler",
        grid=lambda config, n, mu, sigmas: euler_grid(config, n),
        supported={**_SCHEDULE, **_SPACING, **_SIGMAS, "prediction_type": _one_of(*_VP_PREDICTIONS),
                   "interpolation_type": _one_of("linear"), "sigma_min": _number(0, none=True),
                   "sigma_max": _number(0, none=True), "timestep_type": _one_of("discrete", "continuous"),
                   "final_sigmas_type": _one_of("zero", "sigma_min")},
    ),
    "HeunDiscreteScheduler": _Reproduced(
        solver=lambda config: "heun",
        grid=lambda config, n, mu, sigmas: euler_grid(config, n),
        supported={**_SCHEDULE, **_SPACING, **_SIGMAS, "prediction_type": _one_of(*_VP_PREDICTIONS),
                   "clip_sample": _one_of(False)},
        inert={"clip_sample_range": _when("clip_sample")},
        step_keys=("clip_sample", "clip_sample_range"),
    ),
    "FlowMatchEulerDiscreteScheduler": _Reproduced(
        solver=lambda config: "euler",
        grid=lambda config, n, mu, sigmas: flow_match_grid(config, n, mu, sigmas),
        supported={
            "num_train_timesteps": _number(2), "shift": _number(1e-6), "use_dynamic_shifting": _BOOL,
            # read by the pipelines to compute mu (calculate_shift), not by the scheduler
            "base_shift": _anything, "max_shift": _anything, "base_image_seq_len": _anything, "max_image_seq_len": _anything,
            "invert_sigmas": _one_of(False), "shift_terminal": _number(0, 1 - 1e-9, none=True), **_SIGMAS,
            "time_shift_type": _one_of("exponential", "linear"), "stochastic_sampling": _one_of(False),
        },
        step_keys=("stochastic_sampling",),
    ),
    "FlowMatchHeunDiscreteScheduler": _Reproduced(
        solver=lambda config: "heun",
        grid=lambda config, n, mu, sigmas: flow_match_grid(config, n, None, None),
        supported={"num_train_timesteps": _number(2), "shift": _number(1e-6)},
    ),
}
REPRODUCED_SCHEDULERS = tuple(_REPRODUCED)


@dataclass(frozen=True)
class SolverSetup:
    """How to run a diffusers scheduler on diffkit's solvers: the solver's name, the grid it walks and the
    keyword options the scheduler config sets for it (DDIM's ``clip_sample``, DPM-Solver's ``lower_order_final`` /
    ``euler_at_final``). ``setup.fn(denoiser, setup.grid.init_noise_scale * noise, setup.grid, **setup.options)``
    is the scheduler's sampling loop."""

    solver: str
    grid: StepGrid
    options: dict

    @property
    def fn(self) -> Callable:
        return SOLVERS[self.solver].fn


def _scheduler_classes():
    import diffusers

    return {name: getattr(diffusers, name) for name in _REPRODUCED}


def _read_scheduler(scheduler, class_name):
    if hasattr(scheduler, "config") and hasattr(scheduler, "set_timesteps"):
        if class_name is not None and class_name != type(scheduler).__name__:
            raise ValueError(f"class_name={class_name!r} disagrees with the scheduler's class {type(scheduler).__name__}")
        config = dict(scheduler.config)
        shift = getattr(scheduler, "_shift", None)
        if shift is not None and "shift" in config and shift != config["shift"]:
            raise ValueError(f"set_shift({shift}) changed this scheduler's shift from its config's {config['shift']}; "
                             "diffkit reads the config: build the scheduler with that shift")
        return config, type(scheduler).__name__
    if isinstance(scheduler, dict) or hasattr(scheduler, "items"):
        config = dict(scheduler)
        name = class_name or config.get("_class_name")
        if name is None:
            raise ValueError("a scheduler config needs its class: pass class_name= or a config with '_class_name'")
        return config, name
    raise TypeError(f"scheduler must be a diffusers scheduler or its config (dict), got {type(scheduler).__name__}")


def _complete(name: str, config: dict, switched: bool = False) -> dict:
    """The config the scheduler class builds from ``config``, as its ``from_config`` would: the class's defaults,
    overridden by the keys it accepts, plus the model's schedule keys. ``switched``: ``config`` is another class's,
    whose keys that took that class's defaults give way to this class's defaults (from_config's
    ``_use_default_values``). A scheduler's own config is read as it stands: pipelines edit it in place (SD's sets
    ``steps_offset`` and ``clip_sample``) without updating that list."""
    cls = _scheduler_classes()[name]
    params = inspect.signature(cls.__init__).parameters
    full = {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}
    defaulted = set(config.get("_use_default_values", ())) if switched else set()
    full.update({k: v for k, v in config.items() if (k in params or k in _SCHEDULE) and k not in defaulted})
    return full


def _check(name: str, spec: _Reproduced, full: dict, skip=()) -> None:
    """Refuse every option of ``full`` that diffkit does not reproduce, naming it."""
    cls = _scheduler_classes()[name]
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
    for key, value in full.items():
        if key in skip or (key in spec.inert and not spec.inert[key](full)):
            continue
        check = spec.supported.get(key)
        if check is None:
            if key in defaults and value != defaults[key]:
                raise ValueError(f"{name}: {key}={value!r} is not reproduced by diffkit's solvers (only the default "
                                 f"{defaults[key]!r} is)")
            continue
        if not check(value, full):
            allowed = getattr(check, "allowed", None)
            raise ValueError(f"{name}: {key}={value!r} is not reproduced by diffkit's solvers"
                             + (f"; supported: {allowed}" if allowed is not None else ""))


def solver_for(
    scheduler,
    num_inference_steps: int | None = None,
    *,
    solver: str | None = None,
    mu: float | None = None,
    sigmas=None,
    class_name: str | None = None,
) -> SolverSetup:
    """The diffkit solver, step grid and solver options that reproduce a diffusers scheduler.

    ``scheduler``: a diffusers scheduler instance, or its config (a dict with "_class_name", or pass
    ``class_name``). Reproduced: DDIMScheduler (-> "ddim"), DPMSolverMultistepScheduler (order 2 data
    prediction, midpoint -> "dpmpp_2m"; order 1 -> "ddim"), EulerDiscreteScheduler and
    FlowMatchEulerDiscreteScheduler (-> "euler"), HeunDiscreteScheduler and FlowMatchHeunDiscreteScheduler
    (-> "heun"), with their timestep spacings, Karras / exponential / beta / Lu / flow sigmas, shifts and
    final sigmas. Any other class, and any option these classes have that diffkit does not reproduce (order 3,
    SDE variants, ``thresholding``, stochastic sampling, ...), is refused with a ValueError naming it.

    ``solver``: run another of diffkit's solvers instead (``SOLVERS``). On a VP model it walks the grid its own
    diffusers counterpart would build from this config (as ``Counterpart.from_config(config)`` in diffusers, class
    defaults for options the config lacks), except that it clamps x0 (DDIM's ``clip_sample``, ``thresholding``) only
    where the config says so: ``DDIMScheduler.from_config`` of a DPM-Solver or Euler config, which has no such key,
    would clip by DDIM's class default, a clamp the model's own scheduler never applies. A grid option the
    counterpart cannot express is refused. On a flow model (FlowMatch schedulers, ``use_flow_sigmas``) it walks the
    scheduler's own flow grid.

    ``mu``: the dynamic-shifting exponent (``calculate_shift``), needed with ``use_dynamic_shifting``; a
    FlowMatch scheduler ignores it otherwise, as diffusers does. ``sigmas``: custom flow sigmas for
    FlowMatchEulerDiscreteScheduler, as the Flux pipeline passes ``linspace(1, 1 / n, n)``.
    """
    config, name = _read_scheduler(scheduler, class_name)
    if solver is not None:
        get_solver(solver)
    if num_inference_steps is not None and not (isinstance(num_inference_steps, int) and num_inference_steps >= 1):
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    if num_inference_steps is None and sigmas is None:
        raise ValueError("give num_inference_steps (or sigmas, for FlowMatchEulerDiscreteScheduler)")
    if mu is not None and not (isinstance(mu, (int, float)) and math.isfinite(mu)):
        raise ValueError(f"mu must be a finite number, got {mu!r}")
    flow = name.startswith("FlowMatch") or is_flow_config({**config, "_class_name": name})
    if solver is None or flow:
        if name not in _REPRODUCED:
            raise ValueError(
                f"diffkit reproduces {', '.join(REPRODUCED_SCHEDULERS)}; {name} is not one of them"
                + ("" if flow else " (pass solver= to run one of diffkit's solvers on this model's schedule)")
            )
        target = name
    else:
        target = SOLVERS[solver].scheduler
        for key, default in _GRID_DEFAULTS.items():  # options of the source that the counterpart would drop
            if key in config and key not in _complete(target, {}) and config[key] != default:
                raise ValueError(f"solver={solver!r} walks {target}'s grid, which has no {key} (the {name} config "
                                 f"sets {key}={config[key]!r}); keep the scheduler's own solver or drop the option")
    spec = _REPRODUCED[target]
    full = _complete(target, config, switched=target != name)
    if target != name:  # a clamp of x0 the model's own scheduler does not apply is not switched on by a class default
        stated = set(config) - set(config.get("_use_default_values", ()))
        full.update({key: False for key in _X0_CLAMPS if key in full and key not in stated})
    own = spec.solver(full)
    _check(target, spec, full, skip=spec.step_keys if solver not in (None, own) else ())
    if sigmas is not None and target != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"custom sigmas are taken for FlowMatchEulerDiscreteScheduler only, not {target}")
    if mu is not None and target not in ("FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler"):
        raise ValueError(f"mu (dynamic shifting) applies to flow-matching schedulers, not {target}")
    grid = spec.grid(full, num_inference_steps, mu, sigmas)
    name_out = solver or own
    return SolverSetup(name_out, grid, spec.options(full) if name_out == own else {})


# -- the plain timestep array (kept for callers that pass arrays) ---------------------------------------------

_LEGACY_REFUSED = {  # options a plain timestep array cannot carry: key -> (solvers it matters for, check)
    "use_karras_sigmas": (None, lambda v: not v),
    "use_exponential_sigmas": (None, lambda v: not v),
    "use_beta_sigmas": (None, lambda v: not v),
    "use_lu_lambdas": (None, lambda v: not v),
    "use_flow_sigmas": (None, lambda v: not v),
    "interpolation_type": (None, lambda v: v == "linear"),
    "timestep_type": (None, lambda v: v == "discrete"),
    "variance_type": (None, lambda v: v not in ("learned", "learned_range")),
    "thresholding": (("ddim", "dpmpp_2m"), lambda v: not v),
    "clip_sample": (("ddim", "heun"), lambda v: not v),
    "lambda_min_clipped": (("dpmpp_2m",), lambda v: v == -math.inf),
    "solver_order": (("dpmpp_2m",), lambda v: v == 2),
    "algorithm_type": (("dpmpp_2m",), lambda v: v == "dpmsolver++"),
    "solver_type": (("dpmpp_2m",), lambda v: v == "midpoint"),
    "lower_order_final": (("dpmpp_2m",), lambda v: v),
    "euler_at_final": (("dpmpp_2m",), lambda v: not v),
}


def make_timesteps(schedule: NoiseSchedule, solver: str, num_inference_steps: int, scheduler_config=None) -> torch.Tensor:
    """The timestep array diffusers' counterpart of ``solver`` would walk for this VP scheduler config: its
    ``timestep_spacing`` and ``steps_offset``, and where it ends (``set_alpha_to_one`` for DDIM,
    ``final_sigmas_type`` for DPM-Solver / Euler); the solver takes each entry's coefficients from ``schedule``.

    A plain array carries no sigmas, so configs whose walk needs them (Karras / exponential / beta / flow sigmas,
    flow-matching schedulers) and options of the step (``thresholding``, ``clip_sample``, DPM-Solver's order and
    variants) are refused: ``solver_for(scheduler, n)`` reproduces those. Where diffusers' Euler and Heun
    interpolate sigma linearly at fractional ("linspace") timesteps, or its DDIM steps to t - N // n off the
    array, only ``solver_for``'s grid reproduces them exactly (the array's walk is within ~1e-3).
    """
    config = dict(scheduler_config or {})
    spec = get_solver(solver)
    if schedule.path != "vp" or is_flow_config(config):
        raise ValueError("a flow-matching model's walk comes from its scheduler: use diffkit.solvers.solver_for(scheduler, n)")
    for key, (solvers, ok) in _LEGACY_REFUSED.items():
        if key in config and (solvers is None or solver in solvers) and not ok(config[key]):
            raise ValueError(f"scheduler option {key}={config[key]!r} is not carried by a plain timestep array: "
                             "use diffkit.solvers.solver_for(scheduler, n) and pass its grid")
    end = CLEAN
    if solver == "ddim" and not config.get("set_alpha_to_one", True):
        end = 0.0
    if solver in ("dpmpp_2m", "euler") and config.get("final_sigmas_type", "zero") == "sigma_min":
        end = 0.0
    spacing = config.get("timestep_spacing", "linspace" if solver != "ddim" else "leading")
    return schedule.timesteps(
        num_inference_steps, spacing, int(config.get("steps_offset", 0)), end, grid_includes_end=spec.grid_includes_end
    )
