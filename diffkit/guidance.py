"""Guidance rules. Each gets the conditional and unconditional predictions of one step in x0 space and
returns the guided x0; ``space`` selects the parameterisation the rule acts in ("x0", "eps" or "v").

Scale convention (diffusers'): ``guidance_scale`` w gives uncond + w (cond - uncond); w = 1 is the
conditional model alone.
"""

from abc import ABC, abstractmethod

import torch

from .denoiser import StepState, convert


SPACES = {"x0": "sample", "eps": "epsilon", "v": "v_prediction"}


class Guidance(ABC):
    """Base class: converts to ``space``, applies ``guide``, converts back. Stateless unless overridden."""

    def __init__(self, guidance_scale: float, space: str = "x0"):
        if space not in SPACES:
            raise ValueError(f"space must be one of {tuple(SPACES)}, got {space!r}")
        if not isinstance(guidance_scale, (int, float)) or guidance_scale != guidance_scale:
            raise ValueError(f"guidance_scale must be a number, got {guidance_scale!r}")
        self.guidance_scale, self.space = float(guidance_scale), space

    def reset(self) -> None:
        """Called by every solver at the start of a sampling run."""

    def is_active(self, state: StepState) -> bool:
        """Whether this step needs the unconditional pass at all."""
        return self.guidance_scale != 1.0

    @abstractmethod
    def guide(self, cond: torch.Tensor, uncond: torch.Tensor, state: StepState) -> torch.Tensor:
        """The rule itself, on predictions in ``self.space``."""

    def __call__(self, x0_cond: torch.Tensor, x0_uncond: torch.Tensor, state: StepState) -> torch.Tensor:
        space = SPACES[self.space]
        to = lambda p: convert(p, "sample", space, state.x, state.alpha, state.sigma)  # noqa: E731
        guided = self.guide(to(x0_cond), to(x0_uncond), state)
        return convert(guided, space, "sample", state.x, state.alpha, state.sigma)


class CFG(Guidance):
    """Classifier-free guidance (Ho & Salimans 2022): uncond + w (cond - uncond). Linear, so any space agrees."""

    def guide(self, cond, uncond, state):
        return uncond + self.guidance_scale * (cond - uncond)


GUIDANCES = {"cfg": CFG}


def make_guidance(name: str | Guidance | None, guidance_scale: float, **kwargs) -> Guidance | None:
    """A guidance object from its registry name, or pass an instance through. ``None`` = no guidance."""
    if name is None or isinstance(name, Guidance):
        return name
    if name not in GUIDANCES:
        raise ValueError(f"guidance must be one of {sorted(GUIDANCES)} or a Guidance instance, got {name!r}")
    return GUIDANCES[name](guidance_scale, **kwargs)
