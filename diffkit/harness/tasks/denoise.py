"""The ``denoise`` task: train a denoiser on noisy images and report the PSNR of its estimate on held-out images."""

import torch
from accelerate import Accelerator

from ..data import HarnessData
from ..loop import train
from ..noise2score import image_psnr
from ..registry import ALGORITHMS, IMAGE_SETS, LOSSES, MODELS, NOISES, OPTIMIZERS
from ..schedules import LRSchedule
from .base import Task, build, component_spec


# PSNR of the estimate and of the noisy input (both clipped to [0, 1]) and their difference
METRICS = ("psnr", "psnr_noisy", "psnr_gain")


def check(config: dict, where: str) -> None:
    name, params = component_spec(config.get("data"), f"{where}.data")
    if "noise" not in params:
        raise ValueError(f"{where}.data needs a noise model, one of {', '.join(NOISES)}")
    IMAGE_SETS.check(name, {k: v for k, v in params.items() if k != "noise"})
    NOISES.check(*component_spec(params["noise"], f"{where}.data.noise"))
    MODELS.check(*component_spec(config.get("model"), f"{where}.model"))
    LOSSES.check(*component_spec(config.get("loss", "mse"), f"{where}.loss"))
    name, params = component_spec(config.get("algorithm"), f"{where}.algorithm")
    ALGORITHMS.check(name, params)
    denoisers = sorted(n for n in ALGORITHMS if hasattr(ALGORITHMS.get(n).constructor, "estimate"))
    if name not in denoisers:
        raise ValueError(f"{where}.algorithm must be a denoiser, one of {', '.join(denoisers)}, got {name!r}")


def run(config: dict, card: dict, seed: int, accelerator: Accelerator, progress: bool) -> dict:
    """Train a denoiser on noisy images (Noise2Score sees only those; the supervised reference also the clean ones)
    and report the mean per-image PSNR of its estimate and of the noisy input on the held-out images, both clipped to
    [0, 1] as the reference's ``forward_psnr`` clips its estimate, so clipping alone earns no gain."""
    budget = config["budget"]
    name, params = component_spec(config["data"], "data")
    noise = build(NOISES, params.pop("noise"))
    clean_train, clean_test = IMAGE_SETS.build(name, **params)
    # the noise draw is fixed per seed, like a data set of noisy photographs; the same for every method of a seed
    data = HarnessData(noise.sample(clean_train, 50_000 + 2 * seed), clean_train,
                       noise.sample(clean_test, 50_001 + 2 * seed), clean_test, num_classes=0)
    name, params = component_spec(config["model"], "model")
    torch.manual_seed(seed)
    channels = clean_train.shape[1]
    model = MODELS.build(name, channels, channels, **params)
    optimizer = build(OPTIMIZERS, config["optimizer"], model.parameters())
    criterion = build(LOSSES, config.get("loss", "mse"), len(clean_train), 0, None)
    algorithm = build(ALGORITHMS, config["algorithm"])
    hooks = [LRSchedule(budget["lr_schedule"], budget["epochs"])] if budget["lr_schedule"] != "constant" else []
    state = train(model, data, optimizer=optimizer, criterion=criterion, epochs=budget["epochs"],
                  batch_size=budget["batch_size"], seed=seed, algorithm=algorithm, hooks=hooks,
                  accelerator=accelerator, progress=progress)
    device = accelerator.device
    y, x = data.x_test.to(device), data.y_test.to(device)
    estimate = algorithm.estimate(state.unwrapped_model.eval(), y, noise)
    per_image = image_psnr(estimate.clamp(0, 1), x)
    psnr, noisy = per_image.mean().item(), image_psnr(y.clamp(0, 1), x).mean().item()
    # per test image (x = its index), so methods can be compared image by image
    return {"psnr": psnr, "psnr_noisy": noisy, "psnr_gain": psnr - noisy, "curves": {"psnr_per_image": per_image.tolist()}}


TASK = Task("denoise", METRICS, check, run, algorithms=("noise2score", "supervised_denoiser"))
