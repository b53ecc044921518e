"""deepinv's DPS and DiffPIR on diffkit's default network: the peer rows of scripts/bench_inverse.py.

deepinv needs a newer torch than diffkit, so this runs in its own environment and imports no diffkit, only
torch, diffusers, deepinv, safetensors and numpy:

    /path/to/peer/bin/python scripts/inverse_peer.py --data IN.safetensors --config IN.json \\
        --out OUT.safetensors --model assets/default

IN.json: {"tasks": {NAME: {"kind": "inpainting" | "sr" | "blur", "factor": int (sr)}}, "sigma_y": float,
"methods": {"dps": {"steps": int}, "diffpir": {"steps": int}}, "seed": int}. IN.safetensors: x_NAME, images
(B, 3, H, W), y_NAME, their measurements, and ax_NAME, the noise-free A(x_NAME), all on diffkit's [-1, 1]
scale; mask_NAME (1 = observed) for inpainting, kernel_NAME (k, k) for blur.

Writes OUT.safetensors (dps_NAME, diffpir_NAME: restorations in [-1, 1]) and, beside it, the same path with
the suffix .json (OUT.json): seconds_per_image, network_evaluations, operator_check (max |A_deepinv(x) - ax|),
denoiser_check, settings and versions. Both are written atomically. The physics must reproduce diffkit's
operators and the wrapped network the UNet's own x0-estimate (as diffusers computes it), or the script stops
before sampling.
"""

import argparse
import json
import math
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

import deepinv as dinv
import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

OPERATOR_TOL = 1e-5  # float32 rounding of an FFT / convolution on [-1, 1] images is ~3e-7
DENOISER_TOL = 1e-5


def die(message: str):
    sys.exit(f"inverse_peer: error: {message}")


class NullClassUNet(torch.nn.Module):
    """The UNet with its class input fixed to the null class (the unconditional prior); counts its calls."""

    def __init__(self, unet: UNet2DModel):
        super().__init__()
        self.unet, self.null_class, self.calls = unet, unet.config.num_class_embeds - 1, 0

    def forward(self, x, t):
        self.calls += 1
        labels = torch.full((x.shape[0],), self.null_class, device=x.device)
        # ScoreModelWrapper takes the first element of a tuple output
        return self.unet(x, t, class_labels=labels, return_dict=False)


def load_denoiser(model_dir: Path):
    """The ScoreModelWrapper that DiffusersDenoiserWrapper builds, without its DiffusionPipeline.from_pretrained
    (which cannot load diffkit's custom pipeline class)."""
    if not model_dir.is_dir():
        die(f"--model {model_dir} is not a directory")
    try:
        unet = UNet2DModel.from_pretrained(model_dir, subfolder="unet", low_cpu_mem_usage=False)
        # DiffusersDenoiserWrapper takes scale_t = sqrt(alphas_cumprod) from a DDPM/DDIM/PNDM scheduler; the model
        # ships a DPM-Solver config of its training schedule, which DDPMScheduler reads unchanged.
        scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    except (OSError, ValueError) as error:
        die(f"cannot load the UNet and scheduler from {model_dir}: {error}".splitlines()[0])
    if unet.config.num_class_embeds is None:
        die("the UNet is not class-conditional: it has no null class to sample unconditionally")
    counted = NullClassUNet(unet.eval().requires_grad_(False))
    denoiser = dinv.models.ScoreModelWrapper(
        score_model=counted,
        prediction_type=scheduler.config.prediction_type,
        clip_output=True,
        scale_t=scheduler.alphas_cumprod.sqrt(),
        sigma_t=None,
        variance_preserving=True,
        variance_exploding=False,
        takes_integer_time=True,
        n_timesteps=scheduler.config.num_train_timesteps,
    ).eval()
    return denoiser, counted, scheduler


@torch.no_grad()
def check_denoiser(denoiser, unet: UNet2DModel, scheduler: DDPMScheduler, x: torch.Tensor, seed: int) -> float:
    """Max |wrapper - diffusers| of the x0-estimate at three training noise levels.

    diffusers: x_t = sqrt(a) x0 + sqrt(1 - a) eps on [-1, 1], and the scheduler's own pred_original_sample from
    the UNet output (for v_prediction, sqrt(a) x_t - sqrt(1 - a) v); the wrapper sees x0 + sigma eps on [0, 1]
    with sigma = sqrt((1 - a) / a) / 2 and must return the same estimate, mapped to [0, 1].
    """
    generator = torch.Generator().manual_seed(seed)
    null = torch.full((x.shape[0],), unet.config.num_class_embeds - 1)
    worst = 0.0
    for t in (100, 400, 700):
        a = scheduler.alphas_cumprod[t]
        eps = torch.randn(x.shape, generator=generator)
        x_t = a.sqrt() * x + (1 - a).sqrt() * eps
        out = unet(x_t, torch.full((x.shape[0],), t), class_labels=null).sample
        x0 = scheduler.step(out, t, x_t).pred_original_sample.clamp(-1, 1)
        sigma = ((1 - a) / a).sqrt() / 2
        wrapped = denoiser((x + 1) / 2 + sigma * eps, sigma)
        worst = max(worst, (wrapped - (x0 + 1) / 2).abs().max().item())
    return worst


def box_filter(factor: int) -> torch.Tensor:
    """diffkit's SR (the mean over factor x factor blocks) as deepinv's Downsampling filter.

    deepinv convolves with the filter's middle tap as centre, then keeps pixels 0, f, 2f, ...: with 2f - 1 taps
    of which the first f are 1/f, output pixel i averages x[f i : f i + f] as diffkit's reshape-mean does. The
    odd length also puts the centre where the FFT-based prox (used by DiffPIR) puts it, at tap k // 2.
    """
    taps = torch.zeros(2 * factor - 1)
    taps[:factor] = 1 / factor
    return (taps[:, None] * taps[None, :])[None, None]


def build_physics(name: str, task: dict, tensors: dict, shape: torch.Size, sigma: float):
    """deepinv physics of diffkit's operator on [0, 1] images, with Gaussian noise of std ``sigma`` (on [0, 1])."""
    noise = dinv.physics.GaussianNoise(sigma=sigma)
    kind, image_shape, (h, w) = task.get("kind"), tuple(shape[1:]), shape[-2:]
    if kind == "inpainting":
        mask = need(tensors, f"mask_{name}")
        mask = mask[None, None] if mask.ndim == 2 else mask
        try:
            fits = mask.ndim == 4 and torch.broadcast_shapes(mask.shape, shape) == shape
        except RuntimeError:
            fits = False
        if not fits or not ((mask == 0) | (mask == 1)).all():
            die(f"mask_{name} must be a 0/1 tensor of shape (H, W) or broadcastable to {tuple(shape)}, "
                f"got {tuple(mask.shape)}")
        return dinv.physics.Inpainting(img_size=image_shape, mask=mask, noise_model=noise)
    if kind == "sr":
        factor = task.get("factor")
        if not isinstance(factor, int) or factor < 1 or h % factor or w % factor:
            die(f"task {name!r}: factor must be an integer >= 1 dividing the image size {h}x{w}, got {factor!r}")
        return dinv.physics.Downsampling(
            img_size=image_shape, filter=box_filter(factor), factor=factor, padding="circular", noise_model=noise
        )
    if kind == "blur":
        kernel = need(tensors, f"kernel_{name}")
        if kernel.ndim != 2 or kernel.shape[0] > h or kernel.shape[1] > w or not kernel.sum() > 0:
            die(f"kernel_{name} must be 2-D, no larger than {h}x{w}, with a positive sum, got {tuple(kernel.shape)}")
        # BlurFFT centres the kernel on pixel (k // 2, k // 2) and convolves circularly, as diffkit's Blur does;
        # diffkit normalises the kernel to sum 1
        kernel = (kernel / kernel.sum())[None, None]
        return dinv.physics.BlurFFT(img_size=image_shape, filter=kernel, noise_model=noise)
    die(f"task {name!r}: kind must be 'inpainting', 'sr' or 'blur', got {kind!r}")


def need(tensors: dict, key: str) -> torch.Tensor:
    if key not in tensors:
        die(f"the data file has no tensor {key!r}")
    value = tensors[key].float()
    if not torch.isfinite(value).all():
        die(f"{key} contains NaN or inf")
    return value


def integer(config: dict, *keys, minimum: int = 1) -> int:
    value = config
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        die(f"config {'.'.join(keys)} must be an integer >= {minimum}, got {value!r}")
    return value


def read_inputs(args):
    try:
        config = json.loads(Path(args.config).read_text())
        tensors = load_file(args.data)
    except (OSError, ValueError, SafetensorError) as error:
        die(f"cannot read the inputs: {error}".splitlines()[0])
    if not isinstance(config, dict) or not isinstance(config.get("tasks"), dict) or not config["tasks"]:
        die("config needs a non-empty 'tasks' object")
    sigma_y = config.get("sigma_y")
    # DiffPIR's data step weighs the prior by rho = lambda sigma_y^2 / sigma_t^2: it needs sigma_y > 0
    if not isinstance(sigma_y, (int, float)) or not math.isfinite(sigma_y) or sigma_y <= 0:
        die(f"config sigma_y must be a finite number > 0, got {sigma_y!r}")
    steps = {m: integer(config, "methods", m, "steps", minimum=2) for m in ("dps", "diffpir")}
    seed = integer(config, "seed", minimum=0)
    return config["tasks"], float(sigma_y), steps, seed, tensors


def atomic_write(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(temporary)
    os.replace(temporary, path)


def prepare_task(name: str, task, tensors: dict, channels: int, sigma: float):
    """(x, y on [0, 1], physics, operator check) for one task; stops unless deepinv's A is diffkit's."""
    x = need(tensors, f"x_{name}")
    if x.ndim != 4 or x.shape[1] != channels:
        die(f"x_{name} must be (B, {channels}, H, W), got {tuple(x.shape)}")
    y, ax = need(tensors, f"y_{name}"), need(tensors, f"ax_{name}")
    physics = build_physics(name, task if isinstance(task, dict) else {}, tensors, x.shape, sigma)
    # A is linear, so A((x + 1) / 2) = (A x + A 1) / 2: A 1 is 1 for SR and blur, the mask for inpainting
    a_one = physics.A(torch.ones_like(x[:1]))
    ax_deepinv = 2 * physics.A((x + 1) / 2) - a_one
    if ax_deepinv.shape != ax.shape or y.shape != ax.shape:
        die(f"task {name!r}: deepinv's A gives {tuple(ax_deepinv.shape)}, ax_{name} is {tuple(ax.shape)}, "
            f"y_{name} is {tuple(y.shape)}")
    error = (ax_deepinv - ax).abs().max().item()
    if not error <= OPERATOR_TOL:
        die(f"task {name!r}: deepinv's physics is not diffkit's operator (max |A(x) - ax| = {error:.3g})")
    return x, (y + a_one) / 2, physics, error


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag in ("--data", "--config", "--out", "--model"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))  # as many as diffkit's rows use
    tasks, sigma_y, steps, seed, tensors = read_inputs(args)
    denoiser, counted, scheduler = load_denoiser(Path(args.model))
    sigma = sigma_y / 2  # deepinv's diffusers denoiser works on [0, 1] images: half the [-1, 1] noise std
    channels = counted.unet.config.in_channels
    prepared = {name: prepare_task(name, task, tensors, channels, sigma) for name, task in tasks.items()}
    report = {"operator_check": {name: p[3] for name, p in prepared.items()}}
    first_x = next(iter(prepared.values()))[0]
    report["denoiser_check"] = check_denoiser(denoiser, counted.unet, scheduler, first_x, seed)
    if not report["denoiser_check"] <= DENOISER_TOL:
        die(f"the wrapped denoiser disagrees with diffusers' x0-estimate by {report['denoiser_check']:.3g}")

    # deepinv's defaults throughout, except the step counts and the data noise level DiffPIR is told
    dps = dinv.sampling.DPS(denoiser, num_steps=steps["dps"], rng=torch.Generator().manual_seed(seed))
    diffpir = dinv.sampling.DiffPIR(denoiser, dinv.optim.data_fidelity.L2(), sigma=sigma, max_iter=steps["diffpir"])
    runs = {"dps": lambda y, physics: dps(y, physics, seed=seed), "diffpir": diffpir}
    report["settings"] = {
        "dps": {"num_steps": steps["dps"], "sde": type(dps.sde).__name__, "solver": type(dps.solver).__name__,
                "alpha": float(dps.sde.alpha(0.5)), "weight": dps.data_fidelity.weight,
                "guidance": dps.data_fidelity.guidance, "clip": dps.data_fidelity.clip, "dtype": str(dps.dtype)},
        "diffpir": {"max_iter": diffpir.max_iter, "zeta": diffpir.zeta, "lambda_": diffpir.lambda_,
                    "sigma": diffpir.sigma, "data_fidelity": "L2"},
        "denoiser": "ScoreModelWrapper as DiffusersDenoiserWrapper builds it, UNet at the null class "
                    f"{counted.null_class}, {denoiser.prediction_type}, scale_t = sqrt(alphas_cumprod), clip_output",
        "sigma_y": sigma_y, "sigma_y_on_01": sigma, "seed": seed, "threads": torch.get_num_threads(),
        "network_evaluations": "batched UNet forward passes per task; DPS also backpropagates through each",
        "outputs": "deepinv's [0, 1] samples mapped to [-1, 1] and clamped there",
    }

    outputs = {}
    for key in ("seconds_per_image", "network_evaluations"):
        report[key] = {method: {} for method in runs}
    for name, (x, y, physics, _) in prepared.items():
        for method, run in runs.items():
            torch.manual_seed(seed)  # DiffPIR draws from the global generator
            counted.calls = 0
            start = time.perf_counter()
            restored = run(y, physics)
            report["seconds_per_image"][method][name] = (time.perf_counter() - start) / x.shape[0]
            report["network_evaluations"][method][name] = counted.calls
            if not torch.isfinite(restored).all():
                die(f"deepinv {method} returned NaN or inf on task {name!r}")
            outputs[f"{method}_{name}"] = (2 * restored.float() - 1).clamp(-1, 1).contiguous()
            print(f"{name} {method}: {report['seconds_per_image'][method][name]:.3f} s/image", file=sys.stderr)

    packages = ("torch", "torchvision", "deepinv", "diffusers", "safetensors", "numpy")
    report["versions"] = {"python": sys.version.split()[0]} | {package: version(package) for package in packages}
    out = Path(args.out)
    atomic_write(out, lambda path: save_file(outputs, path))
    atomic_write(out.with_suffix(".json"), lambda path: path.write_text(json.dumps(report, indent=1)))


if __name__ == "__main__":
    main()
