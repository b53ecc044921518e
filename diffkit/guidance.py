"""Guidance rules. Each gets the conditional and unconditional predictions of one step in x0 space and
returns the guided x0; ``space`` selects the parameterisation the rule acts in ("x0", "eps", "v", "flow", or
"model": the network's own prediction type, where diffusers pipelines apply guidance).

Scale convention (diffusers' and the APG paper's): ``guidance_scale`` w gives uncond + w (cond - uncond);
w = 1 is the conditional model alone. ``Guidance.from_diffusers(guider)`` runs any diffusers guider
(``diffusers.guiders``) that combines one conditional and one unconditional prediction.
"""

from abc import ABC, abstractmethod

import torch

from .denoiser import StepState, convert


SPACES = {"x0": "sample", "eps": "epsilon", "v": "v_prediction", "flow": "flow", "model": None}


def _check_interval(name, interval):
    if interval is not None and not (len(interval) == 2 and 0 <= interval[0] < interval[1]):
        raise ValueError(f"{name} must be a pair (lo, hi) with 0 <= lo < hi, got {interval}")


class Guidance(ABC):
    """Base class: converts to ``space``, applies ``guide``, converts back.

    A guidance interval (Kynkaanniemi et al. 2024) limits where the rule applies: ``sigma_range`` in
    sigma = sigma_t / alpha_t (the paper's form) or ``step_range`` = [start, stop) in step indices. Outside it
    the unconditional pass is skipped and the conditional prediction is used as is.
    """

    def __init__(self, guidance_scale: float, space: str = "x0", sigma_range=None, step_range=None):
        if space not in SPACES:
            raise ValueError(f"space must be one of {tuple(SPACES)}, got {space!r}")
        if not isinstance(guidance_scale, (int, float)) or guidance_scale != guidance_scale:
            raise ValueError(f"guidance_scale must be a number, got {guidance_scale!r}")
        _check_interval("sigma_range", sigma_range)
        _check_interval("step_range", step_range)
        self.guidance_scale, self.space = float(guidance_scale), space
        self.sigma_range, self.step_range = sigma_range, step_range

    def reset(self) -> None:
        """Called by every solver at the start of a sampling run."""

    def is_active(self, state: StepState) -> bool:
        """Whether this step needs the unconditional pass at all."""
        if self.guidance_scale == 1.0:
            return False
        if self.sigma_range is not None:
            sigma = state.sigma / state.alpha if state.alpha > 0 else float("inf")
            if not self.sigma_range[0] <= sigma <= self.sigma_range[1]:
                return False
        return self.step_range is None or self.step_range[0] <= state.step < self.step_range[1]

    @abstractmethod
    def guide(self, cond: torch.Tensor, uncond: torch.Tensor, state: StepState) -> torch.Tensor:
        """The rule itself, on predictions in ``self.space``."""

    def _space(self, state: StepState) -> str:
        """The prediction type the rule acts on at this step. Where alpha = 0 (pure noise: a flow model's first
        step, zero terminal SNR) every eps prediction is x / sigma and carries nothing of x0, so an eps-space rule
        acts in x0 space there."""
        space = SPACES[self.space] if self.space != "model" else state.prediction_type
        if space is None:
            raise ValueError("space='model' needs the network's prediction type, which Denoiser.guided_x0 puts in the step state")
        return "sample" if space == "epsilon" and state.alpha == 0 else space

    @classmethod
    def from_diffusers(cls, guider, space: str = "model") -> "Guidance":
        """A diffusers guider (``diffusers.guiders``) as a diffkit rule; see ``DiffusersGuider``."""
        return DiffusersGuider(guider, space)

    def __call__(self, x0_cond: torch.Tensor, x0_uncond: torch.Tensor, state: StepState) -> torch.Tensor:
        space = self._space(state)
        to = lambda p: convert(p, "sample", space, state.x, state.alpha, state.sigma)  # noqa: E731
        guided = self.guide(to(x0_cond), to(x0_uncond), state)
        return convert(guided, space, "sample", state.x, state.alpha, state.sigma)


class CFG(Guidance):
    """Classifier-free guidance (Ho & Salimans 2022): uncond + w (cond - uncond). Linear, so any space agrees."""

    def guide(self, cond, uncond, state):
        return uncond + self.guidance_scale * (cond - uncond)


class APG(Guidance):
    """Adaptive projected guidance (Sadat, Hilliges & Weber, ICLR 2025, Algorithm 1), in x0 space by default.

    delta = D_cond - D_uncond; reverse momentum m <- delta + beta m (buffer per sample, reset every run);
    norm clamp delta <- delta min(1, r / ||delta||) over (C, H, W); split delta into its parts parallel and
    orthogonal to D_cond (float64) and return D_cond + (w - 1)(delta_orth + eta delta_par).

    Scale convention: w is the paper's (w = 1 is no guidance; eta = 1, r = 0, beta = 0 is exactly CFG with
    scale w). diffusers' ``AdaptiveProjectedGuidance(use_original_formulation=True, guidance_scale=s)`` is
    ``APG(s + 1, space=...)``; its default formulation (uncond + s N) is not the paper's unless eta = 1, r = 0.
    """

    def __init__(self, guidance_scale, eta=0.0, norm_threshold=0.0, momentum=0.0, space="x0", sigma_range=None, step_range=None):
        super().__init__(guidance_scale, space, sigma_range, step_range)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"APG eta must lie in [0, 1], got {eta}")
        if not norm_threshold >= 0.0:
            raise ValueError(f"APG norm_threshold (r) must be >= 0 (0 = no clamp), got {norm_threshold}")
        if not momentum < 1.0:
            raise ValueError(f"APG momentum (beta) must be < 1 (negative = reverse momentum), got {momentum}")
        self.eta, self.norm_threshold, self.momentum = float(eta), float(norm_threshold), float(momentum)
        self._buffer = None

    def reset(self):
        self._buffer = None

    def guide(self, cond, uncond, state):
        delta = cond - uncond
        if self.momentum != 0.0:
            self._buffer = delta if self._buffer is None else delta + self.momentum * self._buffer
            delta = self._buffer
        dims = tuple(range(1, delta.ndim))
        if self.norm_threshold > 0:
            norm = delta.norm(p=2, dim=dims, keepdim=True)
            delta = delta * torch.clamp(self.norm_threshold / norm, max=1.0)
        # projection onto the conditional prediction, in float64 as the reference does
        d, u = delta.double(), torch.nn.functional.normalize(cond.double().flatten(1), dim=1).view_as(cond)
        parallel = (d * u).sum(dim=dims, keepdim=True) * u
        update = (d - parallel) + self.eta * parallel
        return cond + (self.guidance_scale - 1.0) * update.to(cond.dtype)


class Rescaled(Guidance):
    """CFG-rescale (Lin et al. 2024, Sec. 3.4 / eq. 15-16) around any guidance: match the guided prediction's
    per-sample std to the conditional one's and mix by phi. In eps space by default, as diffusers'
    ``guidance_rescale`` does."""

    def __init__(self, base: Guidance, phi: float = 0.7, space: str = "eps"):
        super().__init__(base.guidance_scale, space)
        if not 0.0 <= phi <= 1.0:
            raise ValueError(f"guidance_rescale (phi) must lie in [0, 1], got {phi}")
        self.base, self.phi = base, float(phi)

    def reset(self):
        self.base.reset()

    def is_active(self, state):
        return self.base.is_active(state)

    def __call__(self, x0_cond, x0_uncond, state):
        guided_x0 = self.base(x0_cond, x0_uncond, state)
        space = self._space(state)
        guided = convert(guided_x0, "sample", space, state.x, state.alpha, state.sigma)
        cond = convert(x0_cond, "sample", space, state.x, state.alpha, state.sigma)
        return convert(self.guide(cond, guided, state), space, "sample", state.x, state.alpha, state.sigma)

    def guide(self, cond, guided, state):
        dims = tuple(range(1, guided.ndim))
        rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp(min=1e-12))
        return self.phi * rescaled + (1 - self.phi) * guided


class DiffusersGuider(Guidance):
    """A diffusers guider (``diffusers.guiders``) on diffkit's solvers.

    Each step runs diffusers' per-step protocol on the guider, as its modular pipelines do: ``set_state(step,
    num_inference_steps, timestep)`` and ``prepare_inputs`` (where APG resets its momentum at step 0) in
    ``is_active``, which skips the unconditional pass where the guider asks for one condition (its start / stop
    window, a scale of 1); then ``forward(pred_cond, pred_uncond)`` on the predictions in ``space``. diffusers
    applies guiders to the network's raw output, so the default space is "model" (eps for SD 1.x / 2.x / SDXL,
    the flow velocity for SD3 / Flux); any other space of diffkit's can be chosen.

    Guiders that need more than one conditional and one unconditional prediction, or that modify the network for
    a pass (PAG, skip-layer guidance, SEG, AutoGuidance, LTX-2's guidance), are refused: diffkit's guidance sees
    those two predictions only.
    """

    def __init__(self, guider, space: str = "model"):
        from diffusers.guiders import BaseGuidance

        if not isinstance(guider, BaseGuidance):
            raise TypeError(f"guider must be a diffusers guider (diffusers.guiders.BaseGuidance), got {type(guider).__name__}")
        name = type(guider).__name__
        if list(guider._input_predictions) != ["pred_cond", "pred_uncond"]:
            raise ValueError(f"{name} combines the predictions {guider._input_predictions}; diffkit's guidance runs "
                             "guiders of one conditional and one unconditional prediction (pred_cond, pred_uncond)")
        if type(guider).prepare_models is not BaseGuidance.prepare_models:
            raise ValueError(f"{name} modifies the network for one of its passes (prepare_models); diffkit's guidance "
                             "sees the plain network's conditional and unconditional predictions only")
        self.guider = guider
        scale = getattr(guider, "guidance_scale", None)
        super().__init__(float(scale) if isinstance(scale, (int, float)) else 0.0, space)

    @property
    def guidance_scale(self) -> float:
        """The guider's own scale (where it has one), so that setting it here (diffusers' callbacks change
        ``pipe._guidance_scale``) changes the guider."""
        return getattr(self.guider, "guidance_scale", self._scale)

    @guidance_scale.setter
    def guidance_scale(self, value: float) -> None:
        self._scale = value
        if isinstance(getattr(self.guider, "guidance_scale", None), (int, float)):
            self.guider.guidance_scale = value

    @property
    def momentum(self) -> float:
        """APG's momentum, if the guider keeps one (stateful along a run: the adjoint refuses it)."""
        return getattr(self.guider, "adaptive_projected_guidance_momentum", None) or 0.0

    def is_active(self, state: StepState) -> bool:
        self.guider.set_state(state.step, state.num_steps, state.t)
        self.guider.prepare_inputs({})
        # CFG-Zero* zeroes its first steps' prediction whether or not guidance is on there
        return self.guider.num_conditions > 1 or state.step < getattr(self.guider, "zero_init_steps", 0)

    def guide(self, cond, uncond, state):
        return self.guider.forward(pred_cond=cond, pred_uncond=uncond).pred


GUIDANCES = {"cfg": CFG, "apg": APG}


def make_guidance(name: str | Guidance | None, guidance_scale: float, guidance_rescale: float = 0.0, **kwargs) -> Guidance | None:
    """A guidance rule from its registry name (or an instance, or a diffusers guider), optionally wrapped in
    CFG-rescale.
    ``None`` = no guidance; ``kwargs`` go to the rule (APG's eta, norm_threshold, momentum; sigma_range,
    step_range for an interval)."""
    if name is None:
        return None
    if type(name).__module__.startswith("diffusers.guiders"):
        name = Guidance.from_diffusers(name, **kwargs)
    elif not isinstance(name, Guidance):
        if name not in GUIDANCES:
            raise ValueError(f"guidance must be one of {sorted(GUIDANCES)} or a Guidance instance, got {name!r}")
        name = GUIDANCES[name](guidance_scale, **kwargs)
    if guidance_rescale:
        name = Rescaled(name, guidance_rescale)
    return name
