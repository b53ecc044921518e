"""Denoiser: a diffusers UNet plus its noise schedule and prediction type, seen as x0 / eps / v predictions.

The network knows nothing of schedules; the solvers know nothing of networks. This wrapper is the one place
where a raw model output becomes a denoised estimate, and where conditioning reaches the network.
"""

from dataclasses import dataclass

import torch

from .schedule import NoiseSchedule


PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def convert(pred: torch.Tensor, source: str, target: str, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """Convert a prediction between "epsilon", "sample" (x0) and "v_prediction" at x_t = alpha x0 + sigma eps.

    With v = alpha eps - sigma x0: x0 = alpha x - sigma v, eps = alpha v + sigma x (Salimans & Ho 2022).
    """
    for name in (source, target):
        if name not in PREDICTION_TYPES:
            raise ValueError(f"prediction type must be one of {PREDICTION_TYPES}, got {name!r}")
    if source == target:
        return pred
    # to x0 first ...
    if source == "epsilon":
        x0 = (x - sigma * pred) / alpha
    elif source == "v_prediction":
        x0 = alpha * x - sigma * pred
    else:
        x0 = pred
    # ... then to the target
    if target == "sample":
        return x0
    if source == "v_prediction" and target == "epsilon":
        return alpha * pred + sigma * x  # exact even where alpha = 0
    eps = pred if source == "epsilon" else (x - alpha * x0) / sigma
    if target == "epsilon":
        return eps
    return alpha * eps - sigma * x0


@dataclass
class StepState:
    """What guidance and callbacks see of the current step."""

    step: int  # index of the current step, 0-based
    num_steps: int
    t: torch.Tensor  # model timestep
    alpha: torch.Tensor
    sigma: torch.Tensor
    x: torch.Tensor  # the current noisy sample


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
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.model, self.schedule, self.prediction_type, self.controlnet = model, schedule, prediction_type, controlnet

    @classmethod
    def from_pipeline_components(cls, unet, scheduler, controlnet=None) -> "Denoiser":
        config = scheduler.config
        return cls(unet, NoiseSchedule.from_config(config), config.get("prediction_type", "epsilon"), controlnet)

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
        return guidance(x0_cond, x0_uncond, state)
