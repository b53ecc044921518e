"""Guidance rules against diffusers' guiders and closed-form identities."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance
from diffusers.guiders.guider_utils import rescale_noise_cfg

from diffkit.denoiser import Denoiser, StepState, convert
from diffkit.guidance import APG, CFG, Guidance, Rescaled, make_guidance
from diffkit.pipelines import GuidedPipeline
from diffkit.schedule import NoiseSchedule
from diffkit.solvers import SOLVERS, make_timesteps, solver_for
from helpers import NearlyTrainedModel, tiny_text_components, tiny_unet


def _state(step=0, alpha=0.6, shape=(3, 3, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    return StepState(step, 10, torch.tensor(500.0), alpha, (1 - alpha**2) ** 0.5, x)


def _preds(state, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(state.x.shape, generator=g), torch.randn(state.x.shape, generator=g)


@pytest.mark.parametrize("space", ["x0", "eps", "v"])
def test_apg_with_eta_one_and_no_clamp_or_momentum_is_cfg(space):
    state = _state()
    cond, uncond = _preds(state)
    apg = APG(7.0, eta=1.0, norm_threshold=0.0, momentum=0.0, space=space)
    assert torch.allclose(apg(cond, uncond, state), CFG(7.0)(cond, uncond, state), atol=1e-5)


def test_apg_in_eps_space_equals_diffusers_normalized_guidance_with_momentum():
    """diffkit's APG(w) in eps space == diffusers' normalized_guidance(s = w - 1, use_original_formulation=True),
    over several steps of a run, momentum buffer included."""
    w, eta, r, beta = 8.0, 0.3, 2.5, -0.5
    apg = APG(w, eta=eta, norm_threshold=r, momentum=beta, space="eps")
    apg.reset()
    buffer = MomentumBuffer(beta)
    for step in range(4):
        state = _state(step, alpha=0.9 - 0.2 * step, seed=step)
        eps_c, eps_u = _preds(state, seed=10 + step)
        to_x0 = lambda e: convert(e, "epsilon", "sample", state.x, state.alpha, state.sigma)  # noqa: E731
        ours = convert(apg(to_x0(eps_c), to_x0(eps_u), state), "sample", "epsilon", state.x, state.alpha, state.sigma)
        ref = normalized_guidance(eps_c, eps_u, w - 1, buffer, eta, r, use_original_formulation=True)
        assert torch.allclose(ours, ref, atol=1e-4), step


def test_apg_projection_removes_the_parallel_part_and_clamps_the_norm():
    state = _state()
    cond, uncond = _preds(state)
    w, r = 5.0, 0.5
    update = (APG(w, eta=0.0, norm_threshold=r, space="x0")(cond, uncond, state) - cond) / (w - 1)
    per_sample = lambda t: t.flatten(1)  # noqa: E731
    assert torch.allclose((per_sample(update) * per_sample(cond)).sum(1), torch.zeros(3), atol=1e-5)  # orthogonal to D_cond
    assert torch.all(per_sample(update).norm(dim=1) <= r + 1e-5)  # the clamp bounds the update before projecting


def test_momentum_buffer_resets_each_run():
    scheduler = DPMSolverMultistepScheduler(prediction_type="v_prediction")
    pipe = GuidedPipeline(tiny_unet(num_class_embeds=5), scheduler)
    pipe.set_progress_bar_config(disable=True)
    apg = APG(6.0, momentum=-0.5, norm_threshold=1.0)
    run = lambda: pipe(class_labels=[1, 2], num_inference_steps=5, guidance=apg, latents=torch.ones(2, 3, 8, 8), output_type="pt").images  # noqa: E731
    assert torch.equal(run(), run())


def test_cfg_rescale_equals_diffusers_rescale_noise_cfg():
    state = _state()
    eps_c, eps_u = _preds(state)
    to_x0 = lambda e: convert(e, "epsilon", "sample", state.x, state.alpha, state.sigma)  # noqa: E731
    ours = Rescaled(CFG(5.0), phi=0.7)(to_x0(eps_c), to_x0(eps_u), state)
    ref = rescale_noise_cfg(eps_u + 5.0 * (eps_c - eps_u), eps_c, guidance_rescale=0.7)
    assert torch.allclose(convert(ours, "sample", "epsilon", state.x, state.alpha, state.sigma), ref, atol=1e-5)


@pytest.mark.parametrize("solver", SOLVERS)
def test_pipeline_apg_reduces_to_cfg_for_every_solver(solver):
    pipe = GuidedPipeline(tiny_unet(num_class_embeds=5), DPMSolverMultistepScheduler(prediction_type="v_prediction"))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(class_labels=[0, 3], num_inference_steps=4, guidance_scale=4.0, solver=solver, output_type="latent")
    cfg = pipe(**kw, latents=torch.ones(2, 3, 8, 8)).images
    apg = pipe(**kw, latents=torch.ones(2, 3, 8, 8), guidance="apg", guidance_kwargs={"eta": 1.0}).images
    default_apg = pipe(**kw, latents=torch.ones(2, 3, 8, 8), guidance="apg", guidance_kwargs={"norm_threshold": 0.1}).images
    scale = cfg.abs().max().item()
    # equal up to float rounding, which Heun's first step (sigma ~ 2e4 on this schedule) amplifies to ~1e-5
    # relative with 2 threads on some CPUs; a real difference (default APG) is > 1e-2
    assert (cfg - apg).abs().max() <= 1e-4 * scale and (cfg - default_apg).abs().max() > 1e-2 * scale


def test_guidance_interval_skips_the_unconditional_pass_outside():
    pipe = GuidedPipeline(tiny_unet(num_class_embeds=5), DPMSolverMultistepScheduler(prediction_type="v_prediction"))
    pipe.set_progress_bar_config(disable=True)
    batches = []
    pipe.unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    kw = dict(class_labels=[0, 3], num_inference_steps=6, guidance_scale=4.0, latents=torch.ones(2, 3, 8, 8), output_type="pt")
    pipe(**kw, guidance_kwargs={"step_range": (2, 4)})
    assert batches == [2, 2, 4, 4, 2, 2]
    batches.clear()
    # sigma = sigma_t / alpha_t at each step's timestep; guide only where it lies in the range
    schedule = NoiseSchedule.from_config(pipe.scheduler.config)
    t = make_timesteps(schedule, "dpmpp_2m", 6, pipe.scheduler.config)[:-1]
    sigmas = (schedule.sigma(t) / schedule.alpha(t)).tolist()
    lo, hi = sigmas[4], sigmas[1]
    pipe(**kw, guidance_kwargs={"sigma_range": (lo, hi)})
    assert batches == [4 if lo <= s <= hi else 2 for s in sigmas] == [2, 4, 4, 4, 4, 2]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"eta": 1.5}, "eta must lie"),
        ({"eta": -0.1}, "eta must lie"),
        ({"norm_threshold": -1.0}, "norm_threshold"),
        ({"momentum": 1.0}, "momentum"),
        ({"step_range": (3, 1)}, "step_range"),
        ({"sigma_range": (-1.0, 2.0)}, "sigma_range"),
    ],
)
def test_invalid_apg_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_guidance("apg", 5.0, **kwargs)


def test_invalid_rescale():
    with pytest.raises(ValueError, match="guidance_rescale"):
        make_guidance("cfg", 5.0, guidance_rescale=1.5)


def test_text_pipeline_apg_reduces_to_cfg_and_differs_otherwise():
    components = tiny_text_components()
    pipe = GuidedPipeline(**components, scheduler=DPMSolverMultistepScheduler(beta_schedule="scaled_linear"))
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(prompt="a red digit", num_inference_steps=4, guidance_scale=6.0, output_type="latent")
    cfg = pipe(**kw, latents=latents).images
    apg_as_cfg = pipe(**kw, latents=latents, guidance="apg", guidance_kwargs={"eta": 1.0}).images
    apg = pipe(**kw, latents=latents, guidance="apg", guidance_kwargs={"momentum": -0.5, "norm_threshold": 1.0}).images
    scale = cfg.abs().max().item()
    assert (cfg - apg_as_cfg).abs().max() <= 1e-5 * scale and (cfg - apg).abs().max() > 1e-2 * scale


# -- diffusers' guiders on diffkit's solvers ---------------------------------------------------------------------

GUIDERS = [
    ("ClassifierFreeGuidance", dict(guidance_scale=4.0)),
    ("ClassifierFreeGuidance", dict(guidance_scale=4.0, use_original_formulation=True, guidance_rescale=0.5, start=0.2, stop=0.8)),
    ("AdaptiveProjectedGuidance", dict(guidance_scale=5.0, adaptive_projected_guidance_momentum=-0.5,
                                       adaptive_projected_guidance_rescale=2.0, eta=0.3)),
    ("AdaptiveProjectedMixGuidance", dict(guidance_scale=3.0, adaptive_projected_guidance_scale=6.0,
                                          adaptive_projected_guidance_start_step=3, adaptive_projected_guidance_momentum=-0.5)),
    ("ClassifierFreeZeroStarGuidance", dict(guidance_scale=4.0, zero_init_steps=1)),
    ("TangentialClassifierFreeGuidance", dict(guidance_scale=4.0)),
    ("FrequencyDecoupledGuidance", dict(guidance_scales=[6.0, 3.0], parallel_weights=[1.0, 0.5])),
]


def _guider_by_hand(scheduler, model, guider, noise, cond, uncond, n):
    """A diffusers loop that applies the guider as its modular pipelines do, to the raw model output."""
    scheduler.set_timesteps(n)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    for i, t in enumerate(scheduler.timesteps):
        guider.set_state(step=i, num_inference_steps=n, timestep=t)
        guider.prepare_inputs({})
        inp = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        if guider.num_conditions == 1:
            pred = guider.forward(pred_cond=model(inp, t, class_labels=cond).sample).pred
        else:
            out_c, out_u = model(torch.cat([inp, inp]), t, class_labels=torch.cat([cond, uncond])).sample.chunk(2)
            pred = guider.forward(pred_cond=out_c, pred_uncond=out_u).pred
        x = scheduler.step(pred, t, x).prev_sample
    return x


@pytest.mark.parametrize("name, kwargs", GUIDERS, ids=[f"{n}{i}" for i, (n, _) in enumerate(GUIDERS)])
@pytest.mark.parametrize("scheduler_name", ["DPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler"])
def test_diffusers_guiders_equal_the_guider_applied_by_hand(name, kwargs, scheduler_name):
    """Guidance.from_diffusers(guider) on diffkit's solver equals the guider applied to the raw model output in
    a diffusers loop: eps on a VP model, the flow velocity on a flow model."""
    if name == "FrequencyDecoupledGuidance":
        pytest.importorskip("kornia")
    import diffusers

    scheduler = getattr(diffusers, scheduler_name)(**({"shift": 3.0} if "FlowMatch" in scheduler_name else {}))
    denoiser_schedule = Denoiser.from_pipeline_components(None, scheduler)
    model = NearlyTrainedModel(denoiser_schedule.schedule, denoiser_schedule.prediction_type, num_class_embeds=4)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    cond, uncond = torch.tensor([0, 2]), torch.tensor([3, 3])
    make = lambda: getattr(diffusers.guiders, name)(**kwargs)  # noqa: E731
    with torch.no_grad():
        ref = _guider_by_hand(scheduler, model, make(), noise, cond, uncond, 8)
        setup = solver_for(scheduler, 8)
        ours = setup.fn(Denoiser.from_pipeline_components(model, scheduler), noise, setup.grid,
                        cond={"class_labels": cond}, uncond={"class_labels": uncond}, guidance=Guidance.from_diffusers(make()),
                        **setup.options)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_diffusers_guiders_run_in_any_space_and_in_pipelines():
    """The same guider in x0 space is a different rule from eps space (APG is nonlinear), and pipelines take a
    guider as their guidance; a CFG guider in any space is CFG."""
    from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance

    pipe = GuidedPipeline(tiny_unet(num_class_embeds=5), DPMSolverMultistepScheduler(prediction_type="v_prediction"))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(class_labels=[0, 3], num_inference_steps=4, guidance_scale=4.0, output_type="latent")
    cfg = pipe(**kw, latents=torch.ones(2, 3, 8, 8)).images
    for space in ("model", "x0", "eps"):
        guider = Guidance.from_diffusers(ClassifierFreeGuidance(guidance_scale=4.0), space=space)
        assert (pipe(**kw, latents=torch.ones(2, 3, 8, 8), guidance=guider).images - cfg).abs().max() <= 1e-5 * cfg.abs().max()
    apg = AdaptiveProjectedGuidance(guidance_scale=4.0, adaptive_projected_guidance_rescale=1.0)
    in_x0 = pipe(**kw, latents=torch.ones(2, 3, 8, 8), guidance=Guidance.from_diffusers(apg, space="x0")).images
    in_eps = pipe(**kw, latents=torch.ones(2, 3, 8, 8), guidance=Guidance.from_diffusers(apg, space="eps")).images
    assert (in_x0 - in_eps).abs().max() > 1e-3


def test_guiders_that_change_the_network_are_refused():
    from diffusers.guiders import AutoGuidance, LTX2Guidance, PerturbedAttentionGuidance, SkipLayerGuidance

    for guider in (PerturbedAttentionGuidance(perturbed_guidance_layers=[0]), SkipLayerGuidance(skip_layer_guidance_layers=[0]),
                   LTX2Guidance()):
        with pytest.raises(ValueError, match="pred_cond, pred_uncond"):
            Guidance.from_diffusers(guider)
    with pytest.raises(ValueError, match="modifies the network"):
        Guidance.from_diffusers(AutoGuidance(auto_guidance_layers=[0], dropout=0.1))
    with pytest.raises(TypeError, match="diffusers guider"):
        Guidance.from_diffusers(CFG(3.0))


def test_magnitude_aware_guider_on_token_sequences():
    """MAMBO-G's norm is written for (B, tokens, C) predictions (Flux's packed latents; diffusers' own code fails on
    4-D images): the wrapped guider equals it applied by hand to the flow velocities."""
    from diffusers.guiders import MagnitudeAwareGuidance

    g = torch.Generator().manual_seed(0)
    x, x0_c, x0_u = (torch.randn(2, 16, 4, generator=g) for _ in range(3))
    state = StepState(1, 10, torch.tensor(700.0), 0.3, 0.7, x, prediction_type="flow")
    to_flow = lambda x0: convert(x0, "sample", "flow", x, 0.3, 0.7)  # noqa: E731
    by_hand = MagnitudeAwareGuidance(guidance_scale=4.0)
    by_hand.set_state(1, 10, state.t)
    ref = by_hand.forward(pred_cond=to_flow(x0_c), pred_uncond=to_flow(x0_u)).pred
    guider = Guidance.from_diffusers(MagnitudeAwareGuidance(guidance_scale=4.0))
    assert guider.is_active(state)
    assert torch.allclose(to_flow(guider(x0_c, x0_u, state)), ref, atol=1e-5)


@pytest.mark.parametrize("solver", SOLVERS)
def test_guidance_rules_run_on_a_flow_model(solver):
    """diffkit's rules on a flow-matching model (velocity prediction), every solver: APG with eta = 1, r = 0 and
    no momentum is CFG in any space, CFG-rescale with phi = 0 is its base, and real APG differs."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    model = NearlyTrainedModel(NoiseSchedule.flow_matching(), "flow", num_class_embeds=4)
    denoiser = Denoiser.from_pipeline_components(model, scheduler)
    grid = solver_for(scheduler, 6, solver=solver).grid
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(cond={"class_labels": torch.tensor([0, 1])}, uncond={"class_labels": torch.tensor([3, 3])})
    run = lambda rule: SOLVERS[solver].fn(denoiser, noise, grid, guidance=rule, **kw)  # noqa: E731
    with torch.no_grad():
        cfg = run(CFG(4.0))
        for space in ("x0", "eps", "v", "flow", "model"):
            assert torch.allclose(run(APG(4.0, eta=1.0, space=space)), cfg, atol=1e-5), space
        assert torch.allclose(run(Rescaled(CFG(4.0), phi=0.0)), cfg, atol=1e-5)
        assert (run(APG(4.0, eta=0.0, norm_threshold=0.5)) - cfg).abs().max() > 1e-3  # 5e-3: the class term is small


def test_a_diffusers_guider_follows_scale_changes():
    """diffusers' callbacks change the pipeline's guidance scale; on a wrapped guider the change reaches it."""
    from diffusers.guiders import ClassifierFreeGuidance

    guider = Guidance.from_diffusers(ClassifierFreeGuidance(guidance_scale=5.0))
    assert guider.guidance_scale == 5.0
    guider.guidance_scale = 1.0  # what pipelines set to turn guidance off
    state = StepState(3, 10, torch.tensor(400.0), 0.6, 0.8, torch.randn(1, 3, 4, 4), prediction_type="epsilon")
    assert guider.guider.guidance_scale == 1.0 and not guider.is_active(state)
