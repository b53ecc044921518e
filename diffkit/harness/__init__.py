"""Training and evaluation harness for classifier-side methods: registries, one accelerate training loop,
experiment cards and a results report. ``diffkit harness run CARD`` / ``diffkit harness report``."""

from .adadagrad import (AdaGradNorm, AdaGradNormRowwise, AdaptiveBatchSize, augmented_inner_product_test_batch_size,
                        inner_product_test_batch_size, norm_test_batch_size)
from .attribution import input_gradients, signal_mass
from .binary import BinaryLinear, estimating_error, gradient_stability, reste_derivative, reste_o
from .cards import load_card, method_config, validate_card
from .compander import CompanderStep, WeightCompander, apply_weight_compander
from .diffgrad import DiffGrad, function_1d, global_minimum_1d
from .elr import ELRLoss
from .experiment import run_method
from .ghost_bn import GhostBatchNorm1d
from .growth import Growth, TemplateLinear, TemplateMLP, grow
from .hessian_alignment import HessianAlignment, hessian_gradient_product, hutchinson_diagonal
from .loop import TrainState, load_checkpoint, save_checkpoint, train
from .noise2score import GammaNoise, GaussianNoise, Noise2Score, ScoreUNet, SupervisedDenoiser, ardae_loss
from .ofq import ConfidenceGuidedAnnealing, StatsQAttention, TinyViT, cga_frozen_mask
from .registry import ALGORITHMS, DATA_METHODS, DATASETS, IMAGE_SETS, LAYERS, LOSSES, MODELS, NOISES, OPTIMIZERS
from .report import append_results, detectable_difference, paired_interval, read_results, write_report
from .shift import ShiftLinear, denseshift_levels, pot_levels
from .statsq import LevelFlips, StatsQLinear, statsq
from .winner import siren, siren_init, spectral_centroid, winner_init, winner_noise_scales_empirical


__all__ = [
    "ALGORITHMS", "DATASETS", "DATA_METHODS", "IMAGE_SETS", "LAYERS", "LOSSES", "MODELS", "NOISES", "OPTIMIZERS",
    "AdaGradNorm", "AdaGradNormRowwise", "AdaptiveBatchSize", "BinaryLinear", "DiffGrad", "ELRLoss", "GammaNoise", "GaussianNoise",
    "GhostBatchNorm1d", "Growth", "HessianAlignment", "LevelFlips", "Noise2Score", "ScoreUNet", "ShiftLinear",
    "StatsQLinear", "SupervisedDenoiser", "TemplateLinear", "TemplateMLP", "TrainState", "WeightCompander", "CompanderStep",
    "ConfidenceGuidedAnnealing", "StatsQAttention", "TinyViT", "cga_frozen_mask",  # OFQ's CGA and QKR
    "append_results", "apply_weight_compander", "augmented_inner_product_test_batch_size", "detectable_difference", "ardae_loss", "denseshift_levels", "estimating_error", "function_1d",
    "global_minimum_1d", "gradient_stability", "grow", "hessian_gradient_product", "hutchinson_diagonal",
    "inner_product_test_batch_size", "input_gradients", "load_card", "load_checkpoint", "method_config",
    "norm_test_batch_size", "paired_interval", "pot_levels", "read_results", "reste_derivative", "reste_o",
    "run_method", "save_checkpoint", "signal_mass", "siren", "siren_init", "spectral_centroid", "statsq", "train",
    "validate_card", "winner_init", "winner_noise_scales_empirical", "write_report"
]
