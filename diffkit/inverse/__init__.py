"""Inverse problems with a diffusion prior: forward operators, RED-Diff, DPS and PiGDM."""

from .dps import dps
from .operators import (
    HDR,
    OPERATORS,
    BicubicDownsampling,
    Blur,
    Colorization,
    Compose,
    Denoising,
    Inpainting,
    Operator,
    PhaseRetrieval,
    SuperResolution,
    box_mask,
    check_measurement,
    initial_estimate,
    make_operator,
    random_mask,
    stroke_mask,
)
from .latent import VaeDecoder
from .pigdm import pigdm
from .red_diff import WEIGHTINGS, red_diff


__all__ = [
    "HDR",
    "OPERATORS",
    "WEIGHTINGS",
    "BicubicDownsampling",
    "Blur",
    "Colorization",
    "Compose",
    "Denoising",
    "Inpainting",
    "Operator",
    "PhaseRetrieval",
    "SuperResolution",
    "VaeDecoder",
    "box_mask",
    "check_measurement",
    "dps",
    "initial_estimate",
    "make_operator",
    "pigdm",
    "random_mask",
    "red_diff",
    "stroke_mask",
]
