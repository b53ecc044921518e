"""Training and evaluation harness for classifier-side methods: registries, one accelerate training loop,
experiment cards and a results report. ``diffkit harness run CARD`` / ``diffkit harness report``."""

from .attribution import input_gradients, signal_mass
from .binary import BinaryLinear, estimating_error, gradient_stability, reste_derivative, reste_o
from .cards import load_card, method_config, validate_card
from .diffgrad import DiffGrad, function_1d, global_minimum_1d
from .elr import ELRLoss
from .experiment import run_method
from .ghost_bn import GhostBatchNorm1d
from .loop import TrainState, load_checkpoint, save_checkpoint, train
from .registry import ALGORITHMS, DATA_METHODS, DATASETS, LAYERS, LOSSES, MODELS, OPTIMIZERS
from .report import append_results, paired_interval, read_results, write_report


__all__ = [
    "ALGORITHMS", "DATASETS", "DATA_METHODS", "LAYERS", "LOSSES", "MODELS", "OPTIMIZERS",
    "BinaryLinear", "DiffGrad", "ELRLoss", "GhostBatchNorm1d", "TrainState",
    "append_results", "estimating_error", "function_1d", "global_minimum_1d", "gradient_stability",
    "input_gradients", "load_card", "load_checkpoint", "method_config", "paired_interval", "read_results",
    "reste_derivative", "reste_o", "run_method", "save_checkpoint", "signal_mass", "train", "validate_card",
    "write_report",
]
