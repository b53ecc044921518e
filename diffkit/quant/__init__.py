"""PTQ4DM: post-training quantisation of diffusion models with time-step-aware calibration."""

from .calibration import (
    POLICIES,
    CalibrationSet,
    build_calibration_set,
    build_calibration_sets,
    denoising_network,
    record_network_inputs,
)
from .layers import QuantizedLayer, SplitShortcut
from .model import (
    ACT_CALIBRATIONS,
    BIT_WIDTHS,
    QuantizedModel,
    find_io_layers,
    find_shortcut_splits,
    quantize_model,
    quantize_pipeline,
)
from .scales import METHODS, activation_range, symmetric_range, weight_scales


__all__ = [
    "ACT_CALIBRATIONS",
    "BIT_WIDTHS",
    "METHODS",
    "POLICIES",
    "CalibrationSet",
    "QuantizedLayer",
    "QuantizedModel",
    "SplitShortcut",
    "activation_range",
    "build_calibration_set",
    "build_calibration_sets",
    "denoising_network",
    "find_io_layers",
    "find_shortcut_splits",
    "quantize_model",
    "quantize_pipeline",
    "record_network_inputs",
    "symmetric_range",
    "weight_scales",
]
