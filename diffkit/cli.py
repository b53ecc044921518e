"""The ``diffkit`` command: ``diffkit generate``, ``restore``, ``quantize``, ``complete``, ``harness`` and ``env``.

Errors in what the user asked for print one line (``error: ...``) on stderr and exit with status 2.
Under ``accelerate launch`` the images are split across processes.
"""

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from tqdm.auto import tqdm

from . import __version__
from .guidance import GUIDANCES, make_guidance
from .images import image_grid, save_png_atomic
from .solvers import SOLVERS


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UsageError(ValueError):
    """Bad command-line input, reported as one line."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _labels(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer or a comma list like 3,7, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other bad input
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = _Parser(prog="diffkit", description="Diffusion sampling with diffkit's solvers and guidance.")
    parser.add_argument("--version", action="version", version=f"diffkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate images", formatter_class=fmt)
    gen.add_argument("--model", default=None, help="pipeline folder or Hub repo id (default: the embedded model)")
    gen.add_argument("--revision", default=None, help="Hub revision")
    what = gen.add_mutually_exclusive_group()
    what.add_argument("--label", type=_labels, default=None, help="class label(s), e.g. 7 or 3,7 (cycled)")
    what.add_argument("--prompt", default=None, help="text prompt (text-conditional models)")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("-n", "--num-images", type=_positive_int, default=16)
    gen.add_argument("--steps", type=_positive_int, default=25)
    gen.add_argument("--solver", choices=sorted(SOLVERS), default="dpmpp_2m")
    gen.add_argument("--guidance", choices=sorted(GUIDANCES) + ["none"], default="cfg")
    gen.add_argument("--guidance-scale", type=float, default=3.0)
    gen.add_argument("--guidance-rescale", type=float, default=0.0, help="CFG-rescale phi")
    gen.add_argument("--apg-eta", type=float, default=0.0, help="APG: weight of the parallel component")
    gen.add_argument("--apg-r", type=float, default=0.0, help="APG: norm threshold r (0 = no clamp)")
    gen.add_argument("--apg-momentum", type=float, default=0.0, help="APG: momentum beta (< 0 = reverse)")
    gen.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity")
    gen.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    gen.add_argument("--batch-size", type=_positive_int, default=16)
    gen.add_argument("--height", type=_positive_int, default=None)
    gen.add_argument("--width", type=_positive_int, default=None)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    gen.add_argument("--int8-kernels", action="store_true",
                     help="run a quantised model (diffkit quantize) on oneDNN int8 kernels; compiles first (minutes)")
    gen.add_argument("--out", default="out", help="output folder")
    gen.add_argument("--overwrite", action="store_true", help="replace existing files")
    gen.add_argument("--no-progress", action="store_true")

    res = sub.add_parser("restore", help="restore an image from a measurement with a diffusion prior", formatter_class=fmt)
    res.add_argument("image", help="the measurement as an image file (or, with --simulate, the clean image)")
    res.add_argument("--operator", required=True, help='forward model spec, e.g. "inpaint_box", "sr:2", "blur_gauss:1.0"')
    res.add_argument("--sigma-y", type=float, default=0.05, help="measurement noise std on the [-1, 1] scale")
    res.add_argument("--simulate", action="store_true", help="measure the given clean image first (seeded noise)")
    res.add_argument("--method", choices=["red_diff", "dps", "pigdm"], default="red_diff")
    res.add_argument("--steps", type=_positive_int, default=None, help="default: red_diff 100, dps 1000, pigdm 100")
    res.add_argument("--label", type=int, default=None, help="condition the prior on a class (default: unconditional)")
    res.add_argument("--model", default=None, help="pipeline folder or Hub repo id (default: the embedded model)")
    res.add_argument("--seed", type=int, default=0)
    res.add_argument("--out", required=True, help="output PNG file")
    res.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    qua = sub.add_parser("quantize", help="post-training quantisation of a pipeline's UNet (PTQ4DM)", formatter_class=fmt)
    qua.add_argument("--model", default=None, help="pipeline folder or Hub repo id (default: the embedded model)")
    qua.add_argument("--bits", choices=["w8a8", "w4a8"], default="w8a8")
    qua.add_argument("--calibration", choices=["ndtc", "uniform", "naive"], default="ndtc")
    qua.add_argument("-n", "--num-samples", type=_positive_int, default=1024, help="calibration set size")
    qua.add_argument("--method", choices=["lp", "absmax", "percentile"], default="lp", help="range rule")
    qua.add_argument("--steps", type=_positive_int, default=50, help="DDIM steps of the calibration run")
    qua.add_argument("--seed", type=int, default=0)
    qua.add_argument("--out", required=True, help="output pipeline folder")
    qua.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    com = sub.add_parser("complete", help="fill the masked part of an image, guided by modalities (MaGIC)", formatter_class=fmt)
    com.add_argument("image", help="the image to complete (its masked part is ignored)")
    where = com.add_mutually_exclusive_group(required=True)
    where.add_argument("--mask", default=None, help="mask image: white = fill, black = keep")
    where.add_argument("--mask-half", choices=["top", "bottom", "left", "right"], default=None, help="fill this half")
    com.add_argument("--control", action="append", default=[], metavar="MODALITY=FILE", help="a control image, e.g. edges=e.png")
    com.add_argument("--control-from-image", action="append", default=[], metavar="MODALITY",
                     help="compute this built-in modality (edges, low_resolution, ink_mask) from IMAGE itself (demos)")
    com.add_argument("--strength", action="append", default=[], metavar="MODALITY=VALUE", help="a modality's strength (default 1)")
    com.add_argument("--blend", choices=["cmb", "sum"], default="cmb", help="consistent modality blending or summed features")
    com.add_argument("--blend-steps", type=int, default=None, help="P (default 60%% of the steps)")
    com.add_argument("--blend-iterations", type=int, default=5, help="Q")
    com.add_argument("--steps", type=_positive_int, default=50)
    com.add_argument("--solver", choices=sorted(SOLVERS), default="ddim")
    com.add_argument("--label", type=int, default=None, help="condition on a class (default: unconditional)")
    com.add_argument("--adapters", default=None, help="adapter folder (default: those shipped for the default model)")
    com.add_argument("--model", default=None, help="pipeline folder or Hub repo id (default: the embedded model)")
    com.add_argument("--seed", type=int, default=0)
    com.add_argument("--out", required=True, help="output PNG file")
    com.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    har = sub.add_parser("harness", help="train and evaluate classifier-side methods from experiment cards")
    har_sub = har.add_subparsers(dest="harness_command", required=True, parser_class=_Parser)
    hrun = har_sub.add_parser("run", help="run a card: one JSON line per (method, seed)", formatter_class=fmt)
    hrun.add_argument("card", help="experiment card (.json or .toml), e.g. cards/elr.json")
    hrun.add_argument("--seeds", type=_seeds, default=None, help="comma list, e.g. 0,1,2 (default: the card's)")
    hrun.add_argument("--methods", type=_names, default=None, help="comma list (default: all of the card's)")
    hrun.add_argument("--results", default="docs/harness_results.jsonl", help="results file to append to")
    hrun.add_argument("--no-progress", action="store_true")
    hrep = har_sub.add_parser("report", help="aggregate a results file into markdown tables", formatter_class=fmt)
    hrep.add_argument("--results", default="docs/harness_results.jsonl")
    hrep.add_argument("--out", default="docs/harness_results.md")

    sub.add_parser("env", help="print versions and devices")
    return parser


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(v) for v in text.split(",")]
    except ValueError:
        seeds = None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"must be a comma list of integers >= 0 like 0,1,2, got {text!r}")
    return seeds


def _names(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"must be a comma list of names like ce,elr, got {text!r}")
    return names


def _check_args(args) -> None:
    """What can be refused before loading a model; flags that would be silently ignored count as errors."""
    if args.label is None and args.prompt is None:
        raise UsageError("give --label (class-conditional model) or --prompt (text model)")
    if args.negative_prompt is not None and args.prompt is None:
        raise UsageError("--negative-prompt needs --prompt")
    if args.eta != 0.0 and args.solver != "ddim":
        raise UsageError("--eta needs --solver ddim")
    if args.guidance != "none":
        make_guidance(args.guidance, args.guidance_scale, args.guidance_rescale, **_guidance_kwargs(args))


def _device(requested: str, state) -> torch.device:
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UsageError(f"--device {requested!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    backend = getattr(torch, device.type, None)
    if hasattr(backend, "is_available") and not backend.is_available():
        raise UsageError(f"--device {requested}: no {device.type} device is available")
    # under accelerate launch each process owns one accelerator; a bare "cuda" would put them all on cuda:0
    if state.num_processes > 1 and device.index is None and device.type == state.device.type:
        return state.device
    return device


def _check_model(pipe, args) -> None:
    """Refuse what the model cannot do before any file is written."""
    from .pipelines import GuidedPipeline

    if not isinstance(pipe, GuidedPipeline):
        raise UsageError(f"diffkit generate needs a GuidedPipeline model, got {type(pipe).__name__}")
    if args.prompt is not None and pipe.text_encoder is None:
        raise UsageError("this model is class-conditional: use --label, not --prompt")
    if args.label is not None and pipe.num_classes is None:
        raise UsageError("this model is text-conditional: use --prompt, not --label")
    # every down block of the UNet (and the VAE) halves the size
    multiple = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value % multiple:
            raise UsageError(f"--{name} must be a multiple of {multiple} for this model, got {value}")


def _image_jobs(args, num_classes: int) -> list[dict]:
    """One job per image: its seed, its label or prompt index, its file name."""
    jobs = []
    for i in range(args.num_images):
        seed = args.seed + i
        if args.label is not None:
            label = args.label[i % len(args.label)]
            if not 0 <= label < num_classes:
                raise UsageError(f"--label {label} is out of range for this model (0..{num_classes - 1})")
            jobs.append({"seed": seed, "label": label, "file": f"label{label}-seed{seed:06d}.png"})
        else:  # --prompt takes one prompt: index 0
            jobs.append({"seed": seed, "prompt_index": 0, "file": f"prompt0-seed{seed:06d}.png"})
    return jobs


def _guidance_kwargs(args) -> dict:
    if args.guidance == "apg":
        return {"eta": args.apg_eta, "norm_threshold": args.apg_r, "momentum": args.apg_momentum}
    if (args.apg_eta, args.apg_r, args.apg_momentum) != (0.0, 0.0, 0.0):
        raise UsageError("--apg-eta/--apg-r/--apg-momentum need --guidance apg")
    return {}


def _png_text(args, job, image) -> dict:
    """A1111-style 'parameters' (what image sites parse) plus diffkit's full JSON."""
    parameters = (
        f"Steps: {args.steps}, Sampler: {args.solver}, Guidance: {args.guidance}, CFG scale: {args.guidance_scale}, "
        f"Seed: {job['seed']}, Size: {image.width}x{image.height}, Model: {args.model or 'diffkit-default'}"
    )
    if "label" in job:
        parameters += f", Label: {job['label']}"
    else:  # A1111 puts the prompts on their own lines before the settings, so commas in them parse
        negative = f"\nNegative prompt: {args.negative_prompt}" if args.negative_prompt else ""
        parameters = f"{args.prompt}{negative}\n{parameters}"
    record = {k: v for k, v in vars(args).items() if k not in ("command", "overwrite", "no_progress")}
    # the run's --label list and first seed stay; "label" and "seed" are this image's
    record["labels"], record["first_seed"] = record.pop("label"), record.pop("seed")
    record.update(job, versions=_versions())
    return {"parameters": parameters, "diffkit": json.dumps(record)}


def _read_images(paths: list[Path]) -> list:
    import PIL.Image

    images = []
    for path in paths:
        with PIL.Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def _versions() -> dict:
    import diffusers

    return {"diffkit": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


def _sample(pipe, args, batch: list[dict]) -> list:
    if "label" in batch[0]:
        condition = {"class_labels": [job["label"] for job in batch]}
    else:
        condition = {"prompt": [args.prompt] * len(batch), "negative_prompt": args.negative_prompt}
    return pipe(
        **condition,
        num_inference_steps=args.steps,
        guidance=None if args.guidance == "none" else args.guidance,
        guidance_scale=args.guidance_scale,
        guidance_kwargs=_guidance_kwargs(args),
        guidance_rescale=args.guidance_rescale,
        solver=args.solver,
        eta=args.eta,
        height=args.height,
        width=args.width,
        # one CPU generator per image: its noise depends on its seed alone, not on the batch or the device
        generator=[torch.Generator().manual_seed(job["seed"]) for job in batch],
        output_type="pil",
    ).images


def _refuse_existing(out: Path, jobs: list[dict], overwrite: bool) -> None:
    targets = [out / job["file"] for job in jobs] + [out / "grid.png"]
    existing = [str(path) for path in targets if path.exists()]
    if existing and not overwrite:
        raise UsageError(f"{existing[0]} exists ({len(existing)} files would be replaced); pass --overwrite")


def _quiet_libraries() -> None:
    """One progress bar (ours) and one-line errors: the libraries' loading bars and their warnings before
    re-raising (diffusers logs "An error occurred while trying to fetch ...") would add lines."""
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    if "DIFFUSERS_VERBOSITY" not in os.environ:  # the user's explicit choice wins
        diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # errors it logs are raised too


def generate(args) -> None:
    from accelerate import PartialState

    from .hub import load_pipeline

    state = PartialState()
    _check_args(args)
    device = _device(args.device, state)
    _quiet_libraries()
    pipe = load_pipeline(args.model, revision=args.revision, dtype=DTYPES[args.dtype])
    _check_model(pipe, args)
    if args.int8_kernels:
        from .quant import QuantizedModel

        if not isinstance(pipe.unet, QuantizedModel):
            raise UsageError("--int8-kernels needs a quantised model (make one with `diffkit quantize`)")
        if device.type != "cpu":
            raise UsageError(f"--int8-kernels runs on x86 CPUs only, not on {device}")
        pipe.unet.use_int8_kernels()
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    jobs = _image_jobs(args, pipe.num_classes)
    out = Path(args.out)
    _refuse_existing(out, jobs, args.overwrite)
    # no process writes before all have checked, or a slow one would find the others' new files and fail alone
    state.wait_for_everyone()
    out.mkdir(parents=True, exist_ok=True)

    with state.split_between_processes(jobs) as my_jobs:
        bar = tqdm(total=len(my_jobs), desc="images", disable=args.no_progress or not state.is_main_process)
        for start in range(0, len(my_jobs), args.batch_size):
            batch = my_jobs[start : start + args.batch_size]
            for job, image in zip(batch, _sample(pipe, args, batch)):
                save_png_atomic(image, out / job["file"], _png_text(args, job, image))
            bar.update(len(batch))
        bar.close()
    state.wait_for_everyone()
    if state.is_main_process:  # the other processes' images exist only on disk
        save_png_atomic(image_grid(_read_images([out / job["file"] for job in jobs])), out / "grid.png")
        print(f"wrote {len(jobs)} images and grid.png to {out}")


def restore(args) -> None:
    import numpy as np
    import PIL.Image

    from .hub import load_pipeline
    from .inverse import make_operator
    from .pipelines import RedDiffPipeline

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got {args.out!r}")
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; pass --overwrite")
    try:
        with PIL.Image.open(args.image) as file:
            pixels = np.asarray(file.convert("RGB"), dtype=np.float32)
    except (OSError, PIL.UnidentifiedImageError) as err:
        raise UsageError(f"cannot read image {args.image!r}: {err}") from None
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None] / 127.5 - 1
    _quiet_libraries()
    pipe = RedDiffPipeline.from_pipe(load_pipeline(args.model))
    pipe.set_progress_bar_config(desc=args.method)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    operator = make_operator(args.operator, sigma_y=args.sigma_y, image_size=size, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    if args.simulate:
        if image.shape[-2:] != (size, size):
            raise UsageError(f"--simulate needs a {size}x{size} image for this model, got {image.shape[-1]}x{image.shape[-2]}")
        measurement = operator.measure(image, generator=generator)
    else:
        measurement = image
    restored = pipe(
        measurement, operator, method=args.method, num_inference_steps=args.steps,
        class_labels=None if args.label is None else [args.label], generator=generator, output_type="pil",
    ).images[0]
    record = {k: v for k, v in vars(args).items() if k not in ("command", "overwrite")}
    parameters = f"Operator: {args.operator}, Sigma_y: {args.sigma_y}, Method: {args.method}, Seed: {args.seed}"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png_atomic(restored, out, {"parameters": parameters, "diffkit": json.dumps({**record, "versions": _versions()})})
    print(f"wrote {out}")


def quantize(args) -> None:
    import shutil
    import tempfile

    from .hub import load_pipeline
    from .quant import quantize_pipeline

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; pass --overwrite")
    _quiet_libraries()
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(desc=f"calibration ({args.calibration})")
    quantize_pipeline(pipe, args.bits, args.calibration, n=args.num_samples, method=args.method,
                      num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed))
    # written beside the target, then renamed: an interrupted run never leaves a half-written model
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {args.bits} model ({args.calibration} calibration, n={args.num_samples}) to {out}")


def env() -> None:
    import accelerate
    import transformers

    versions = {**_versions(), "transformers": transformers.__version__, "accelerate": accelerate.__version__}
    for name, version in versions.items():
        print(f"{name}: {version}")
    print(f"python: {platform.python_version()}")
    print(f"cuda: {torch.cuda.is_available()} ({torch.cuda.device_count()} devices)")
    print(f"mps: {torch.backends.mps.is_available()}")


def _pairs(items: list[str], option: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise UsageError(f"{option} takes MODALITY=VALUE, got {item!r}")
        pairs[name] = value
    return pairs


def _read_tensor(path: str, mode: str = "RGB") -> torch.Tensor:
    """An image file as a (1, C, H, W) tensor in [-1, 1] (masks: mode "L", in [0, 1])."""
    import numpy as np
    import PIL.Image

    try:
        with PIL.Image.open(path) as file:
            pixels = np.asarray(file.convert(mode), dtype=np.float32) / 255
    except (OSError, PIL.UnidentifiedImageError) as err:
        raise UsageError(f"cannot read image {path!r}: {err}") from None
    tensor = torch.from_numpy(pixels).reshape(*pixels.shape[:2], -1).permute(2, 0, 1)[None]
    return tensor.round() if mode == "L" else tensor * 2 - 1


def complete(args) -> None:
    from .blend import extract
    from .hub import load_pipeline
    from .pipelines import ModalityBlendPipeline

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got {args.out!r}")
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; pass --overwrite")
    image = _read_tensor(args.image)
    controls = {name: _read_tensor(path) for name, path in _pairs(args.control, "--control").items()}
    controls.update({name: extract(name, image) for name in args.control_from_image})
    strengths = {name: float(value) for name, value in _pairs(args.strength, "--strength").items()}
    if args.mask is not None:
        mask = _read_tensor(args.mask, "L")
    else:
        mask = torch.zeros(1, 1, *image.shape[-2:])
        h, w = image.shape[-2] // 2, image.shape[-1] // 2
        region = {"top": (slice(None, h), slice(None)), "bottom": (slice(h, None), slice(None)),
                  "left": (slice(None), slice(None, w)), "right": (slice(None), slice(w, None))}[args.mask_half]
        mask[(..., *region)] = 1
    _quiet_libraries()
    pipe = ModalityBlendPipeline.from_pipe(load_pipeline(args.model))
    pipe.set_progress_bar_config(desc=f"complete ({args.blend})")
    if controls:
        pipe.load_adapters(args.adapters, names=sorted(controls))
    completed = pipe(
        image, mask, control_images=controls, adapter_conditioning_scale=strengths or 1.0, blend=args.blend,
        blend_steps=args.blend_steps, blend_iterations=args.blend_iterations, num_inference_steps=args.steps,
        solver=args.solver, class_labels=args.label, generator=torch.Generator().manual_seed(args.seed), output_type="pil",
    ).images[0]
    record = {k: v for k, v in vars(args).items() if k not in ("command", "overwrite")}
    parameters = (f"Blend: {args.blend}, Modalities: {','.join(sorted(controls)) or 'none'}, Steps: {args.steps}, "
                  f"Sampler: {args.solver}, Seed: {args.seed}")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png_atomic(completed, out, {"parameters": parameters, "diffkit": json.dumps({**record, "versions": _versions()})})
    print(f"wrote {out}")


def harness(args) -> None:
    from .harness import append_results, load_card, run_method, write_report

    if args.harness_command == "report":
        write_report(args.results, args.out)
        print(f"wrote {args.out}")
        return
    from accelerate import Accelerator

    card = load_card(args.card)
    for method in args.methods or []:
        if method not in card["methods"]:
            raise UsageError(f"--methods: {method!r} is not a method of {card['name']}; allowed: {', '.join(card['methods'])}")
    accelerator = Accelerator()
    for seed in args.seeds or card["seeds"]:
        for method in args.methods or list(card["methods"]):
            record = run_method(card, method, seed, accelerator, progress=not args.no_progress)
            if accelerator.is_main_process:  # every process computed the same metrics; one writes them
                append_results(args.results, [record])
                metrics = ", ".join(f"{k} {v:.4g}" for k, v in record["metrics"].items())
                print(f"{card['name']} {method} seed {seed}: {metrics} ({record['wall_s']:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    from safetensors import SafetensorError

    try:
        args = build_parser().parse_args(argv)
        if args.command == "env":
            env()
        elif args.command == "restore":
            restore(args)
        elif args.command == "quantize":
            quantize(args)
        elif args.command == "complete":
            complete(args)
        elif args.command == "harness":
            harness(args)
        else:
            generate(args)
    except (ValueError, TypeError, OSError, RuntimeError, SafetensorError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
