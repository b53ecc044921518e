"""PTQ4DM: post-training quantisation of diffusion models with time-step-aware calibration."""

from .calibration import POLICIES, CalibrationSet, build_calibration_set, calibration_run, record_network_inputs
from .layers import QuantizedLayer, SplitShortcut
from .model import BIT_WIDTHS, QuantizedModel, find_shortcut_splits, quantize_model, quantize_pipeline
from .scales import METHODS, activation_range, weight_scales


__all__ = [
    "BIT_WIDTHS",
    "METHODS",
    "POLICIES",
    "CalibrationSet",
    "QuantizedLayer",
    "QuantizedModel",
    "SplitShortcut",
    "activation_range",
    "build_calibration_set",
    "calibration_run",
    "find_shortcut_splits",
    "quantize_model",
    "quantize_pipeline",
    "record_network_inputs",
    "weight_scales",
]
