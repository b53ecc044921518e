"""Diffusion with forward models (Tewari et al., NeurIPS 2023): learn to sample signals that are only ever
observed through a differentiable forward model."""

from .forward_models import CropView, ForwardModel, MaskView, WindowView, merge_lifted
from .gp import GaussianProcessSignals
from .networks import SignalMLP, generator_channels, image_generator
from .sampling import RenderedX0, regress_signal, sample_signal
from .training import MODES, dfm_loss, generator_inputs, observe, train_dfm


__all__ = [
    "CropView",
    "ForwardModel",
    "GaussianProcessSignals",
    "MODES",
    "MaskView",
    "RenderedX0",
    "SignalMLP",
    "WindowView",
    "dfm_loss",
    "generator_channels",
    "generator_inputs",
    "image_generator",
    "merge_lifted",
    "observe",
    "regress_signal",
    "sample_signal",
    "train_dfm",
]
