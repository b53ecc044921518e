"""Denoiser: a diffusers network plus its noise schedule and prediction type, seen as x0 / eps / v / flow predictions.

The network knows nothing of schedules; the solvers know nothing of networks. This wrapper is the one place
where a raw model output becomes a denoised estimate, and where conditioning reaches the network. What the
solvers need of it is written down as ``SolverDenoiser``; what it needs of a network as ``DiffusersModel``.
"""

import dataclasses
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from .schedule import NoiseSchedule, is_flow_config


PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow")
ALIASES = {"flow_prediction": "flow"}  # diffusers' config name for "flow"


def _prediction_type(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in PREDICTION_TYPES:
        raise ValueError(f"prediction type must be one of {PREDICTION_TYPES} (or 'flow_prediction'), got {name!r}")
    return name


def convert(pred: torch.Tensor, source: str, target: str, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """Convert a prediction between "epsilon", "sample" (x0), "v_prediction" and "flow" at x = alpha x0 + sigma eps.

    v = alpha eps - sigma x0 (Salimans & Ho 2022): x0 = (alpha x - sigma v) / (alpha^2 + sigma^2), which is
    alpha x - sigma v on a VP path. "flow" is the flow-matching velocity u = eps - x0 (Lipman et al. 2023; SD3 and
    Flux predict it): x0 = (x - sigma u) / (alpha + sigma), which is x - sigma u on the flow path alpha = 1 - sigma.
    diffusers' name "flow_prediction" is accepted for "flow".
    """
    source, target = _prediction_type(source), _prediction_type(target)
    if source == target:
        return pred
    norm = alpha * alpha + sigma * sigma  # 1 on a VP path (up to rounding), where v needs no normalisation
    off = (norm - 1).abs().max().item() if torch.is_tensor(norm) else abs(norm - 1)
    vp = off < 1e-6
    # to x0 first ...
    if source == "epsilon":
        x0 = (x - sigma * pred) / alpha
    elif source == "v_prediction":
        x0 = alpha * x - sigma * pred if vp else (alpha * x - sigma * pred) / norm
    elif source == "flow":
        x0 = (x - sigma * pred) / (alpha + sigma)
    else:
        x0 = pred
    # ... then to the target
    if target == "sample":
        return x0
    # exact even where alpha = 0
    if source == "v_prediction" and target == "epsilon":
        return alpha * pred + sigma * x if vp else (alpha * pred + sigma * x) / norm
    if source == "flow" and target == "epsilon":
        return (x + alpha * pred) / (alpha + sigma)
    eps = pred if source == "epsilon" else (x - alpha * x0) / sigma
    if target == "epsilon":
        return eps
    if target == "flow":
        return eps - x0
    return alpha * eps - sigma * x0


@dataclass
class StepState:
    """What guidance and callbacks see of the current step."""

    step: int  # index of the current step, 0-based
    num_steps: int
    t: torch.Tensor  # the model's timestep input
    alpha: float
    sigma: float
    x: torch.Tensor  # the current noisy sample, x = alpha x0 + sigma eps
    prediction_type: str | None = None  # the network's, set by Denoiser.guided_x0 for guidance in space "model"


def _batch_cat(a, b):
    """Concatenate two conditioning values along the batch (tensors, lists/tuples of tensors, dicts)."""
    if a is None:
        return None
    if torch.is_tensor(a):
        return torch.cat([a, b])
    if isinstance(a, (list, tuple)):
        return type(a)(_batch_cat(u, v) for u, v in zip(a, b))
    if isinstance(a, dict):
        return {k: _batch_cat(a[k], b[k]) for k in a}
    return a  # scalars such as a conditioning scale are shared


@runtime_checkable
class SolverDenoiser(Protocol):
    """What ``sample_*`` (and the adjoint, modality blending, PiGDM) need of their ``denoiser`` argument.

    ``guided_x0(state, cond, uncond, guidance)`` returns the (guided) x0 estimate for the sample ``state.x`` at
    ``state.t`` / ``state.alpha`` / ``state.sigma``; it owns the network calls, the conversion from the network's
    prediction type and the batching of the conditional and unconditional passes. ``schedule`` turns a plain
    timestep array into a ``StepGrid`` (a solver given a grid does not read it). ``Denoiser`` follows this; so do
    wrappers such as PiGDM's pseudo-inverse-guided view, which change what x0 means and delegate the rest.
    """

    schedule: NoiseSchedule

    def guided_x0(self, state: "StepState", cond: dict | None, uncond: dict | None, guidance) -> torch.Tensor: ...


@runtime_checkable
class DiffusersModel(Protocol):
    """What ``Denoiser`` needs of its network: diffusers' call convention, ``model(x, t, **cond, return_dict=False)``
    returning a tuple whose first element is the prediction (in the Denoiser's ``prediction_type``). diffusers'
    UNets follow it, and so does DFM's ``RenderedX0``."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *args, **kwargs): ...


class Denoiser:
    """``Denoiser(unet, schedule, prediction_type)(x, t, cond)`` runs the network; ``x0``/``eps``/``v`` convert.

    ``cond`` is a dict of keyword arguments for the network: ``class_labels`` for a class-conditional
    UNet2DModel (plus optionally ``class_embeds``, continuous embeddings that replace the label lookup);
    ``encoder_hidden_states`` (and ``down_block_additional_residuals`` /
    ``mid_block_additional_residual`` / ``down_intrablock_additional_residuals`` for ControlNet and
    T2I-Adapter residuals) for a UNet2DConditionModel. A ``controlnet`` module, if given, is run every step
    on ``cond["controlnet_cond"]`` and its residuals are added.
    """

    def __init__(self, model, schedule: NoiseSchedule, prediction_type: str = "epsilon", controlnet=None):
        if ALIASES.get(prediction_type, prediction_type) not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES} (or 'flow_prediction'), got {prediction_type!r}")
        self.model, self.schedule, self.controlnet = model, schedule, controlnet
        self.prediction_type = _prediction_type(prediction_type)

    @classmethod
    def from_pipeline_components(cls, unet, scheduler, controlnet=None) -> "Denoiser":
        """From a network and its diffusers scheduler: the schedule its config describes and its prediction type
        (a FlowMatch scheduler's model predicts the flow velocity)."""
        config = {**scheduler.config, "_class_name": type(scheduler).__name__}
        default = "flow" if is_flow_config(config) else "epsilon"
        return cls(unet, NoiseSchedule.from_config(config), config.get("prediction_type", default), controlnet)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        """The raw network output (in ``self.prediction_type``) at model timestep t."""
        cond = dict(cond or {})
        t_in = t.to(device=x.device, dtype=torch.float32)
        if self.controlnet is not None and "controlnet_cond" in cond:
            down, mid = self.controlnet(
                x,
                t_in,
                encoder_hidden_states=cond.get("encoder_hidden_states"),
                controlnet_cond=cond.pop("controlnet_cond"),
                conditioning_scale=cond.pop("conditioning_scale", 1.0),
                return_dict=False,
            )
            cond["down_block_additional_residuals"] = down
            cond["mid_block_additional_residual"] = mid
        cond.pop("controlnet_cond", None)
        cond.pop("conditioning_scale", None)
        class_embeds = cond.pop("class_embeds", None)
        if class_embeds is None:
            return self.model(x, t_in, **cond, return_dict=False)[0]
        # A continuous class embedding (e.g. one being optimised) replaces the lookup of the labels.
        hook = self.model.class_embedding.register_forward_hook(lambda module, args, out: class_embeds.to(out.dtype))
        try:
            return self.model(x, t_in, **cond, return_dict=False)[0]
        finally:
            hook.remove()

    def guided_x0(self, state: StepState, cond: dict | None, uncond: dict | None, guidance) -> torch.Tensor:
        """x0 at this step: conditional only, or the guidance rule applied to the (cond, uncond) pair.

        The pair is run as one batch of 2B; outside a guidance interval the unconditional pass is skipped.
        """
        x, t = state.x, state.t
        if guidance is None or uncond is None or not guidance.is_active(state):
            out = self(x, t, cond)
            return convert(out, self.prediction_type, "sample", x, state.alpha, state.sigma)
        xx = torch.cat([x, x])
        out = self(xx, t, _batch_cat(cond, uncond))
        x0_cond, x0_uncond = convert(out, self.prediction_type, "sample", xx, state.alpha, state.sigma).chunk(2)
        return guidance(x0_cond, x0_uncond, dataclasses.replace(state, prediction_type=self.prediction_type))
