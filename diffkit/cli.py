"""The ``diffkit`` command: ``diffkit generate`` and ``diffkit env``.

Errors in what the user asked for print one line (``error: ...``) on stderr and exit with status 2.
Under ``accelerate launch`` the images are split across processes.
"""

import argparse
import json
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
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
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
    gen.add_argument("--out", default="out", help="output folder")
    gen.add_argument("--overwrite", action="store_true", help="replace existing files")
    gen.add_argument("--no-progress", action="store_true")

    sub.add_parser("env", help="print versions and devices")
    return parser


def _image_jobs(args, num_classes: int | None) -> list[dict]:
    """One job per image: its seed, its label or prompt, its file name."""
    jobs = []
    for i in range(args.num_images):
        seed = args.seed + i
        if args.label is not None:
            label = args.label[i % len(args.label)]
            if num_classes is None or not 0 <= label < num_classes:
                allowed = f"0..{num_classes - 1}" if num_classes else "none: this model takes --prompt"
                raise UsageError(f"--label {label} is out of range (allowed: {allowed})")
            jobs.append({"seed": seed, "label": label, "file": f"label{label}-seed{seed:06d}.png"})
        else:
            jobs.append({"seed": seed, "prompt": args.prompt, "file": f"prompt-seed{seed:06d}.png"})
    return jobs


def _guidance_kwargs(args) -> dict:
    if args.guidance == "apg":
        return {"eta": args.apg_eta, "norm_threshold": args.apg_r, "momentum": args.apg_momentum}
    if (args.apg_eta, args.apg_r, args.apg_momentum) != (0.0, 0.0, 0.0):
        raise UsageError("--apg-eta/--apg-r/--apg-momentum need --guidance apg")
    return {}


def _png_text(args, job, image) -> dict:
    """A1111-style 'parameters' (what image sites parse) plus diffkit's full JSON."""
    what = f"Label: {job['label']}" if "label" in job else f"Prompt: {job['prompt']}"
    parameters = (
        f"Steps: {args.steps}, Sampler: {args.solver}, Guidance: {args.guidance}, CFG scale: {args.guidance_scale}, "
        f"Seed: {job['seed']}, Size: {image.width}x{image.height}, Model: {args.model or 'diffkit-default'}, {what}"
    )
    record = {k: v for k, v in vars(args).items() if k not in ("command", "overwrite", "no_progress")}
    record.update(job, versions=_versions())
    return {"parameters": parameters, "diffkit": json.dumps(record)}


def _versions() -> dict:
    import diffusers

    return {"diffkit": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


def generate(args) -> None:
    from accelerate import PartialState

    from .hub import load_pipeline

    state = PartialState()
    out = Path(args.out)
    if args.label is None and args.prompt is None:
        raise UsageError("give --label (class-conditional model) or --prompt (text model)")
    guidance_kwargs = _guidance_kwargs(args)
    if args.guidance != "none":  # validate before loading anything
        make_guidance(args.guidance, args.guidance_scale, args.guidance_rescale, **guidance_kwargs)
    diffusers_logging.disable_progress_bar()  # one bar (ours) and one-line errors
    pipe = load_pipeline(args.model, revision=args.revision, dtype=DTYPES[args.dtype]).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    jobs = _image_jobs(args, pipe.num_classes)
    targets = [out / job["file"] for job in jobs] + [out / "grid.png"]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not args.overwrite:
        raise UsageError(f"{existing[0]} exists ({len(existing)} files would be replaced); pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)

    with state.split_between_processes(jobs) as my_jobs:
        bar = tqdm(total=len(my_jobs), desc="images", disable=args.no_progress or not state.is_main_process)
        for start in range(0, len(my_jobs), args.batch_size):
            batch = my_jobs[start : start + args.batch_size]
            condition = (
                {"class_labels": [j["label"] for j in batch]}
                if "label" in batch[0]
                else {"prompt": [j["prompt"] for j in batch], "negative_prompt": args.negative_prompt}
            )
            images = pipe(
                **condition,
                num_inference_steps=args.steps,
                guidance=None if args.guidance == "none" else args.guidance,
                guidance_scale=args.guidance_scale,
                guidance_kwargs=guidance_kwargs,
                guidance_rescale=args.guidance_rescale,
                solver=args.solver,
                eta=args.eta,
                height=args.height,
                width=args.width,
                # CPU generators: the same seed gives the same image on every device
                generator=[torch.Generator().manual_seed(j["seed"]) for j in batch],
                output_type="pil",
            ).images
            for job, image in zip(batch, images):
                save_png_atomic(image, out / job["file"], _png_text(args, job, image))
            bar.update(len(batch))
        bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        import PIL.Image

        tiles = [PIL.Image.open(out / job["file"]) for job in jobs]
        save_png_atomic(image_grid(tiles), out / "grid.png")
        print(f"wrote {len(jobs)} images and grid.png to {out}")


def env() -> None:
    import accelerate
    import transformers

    for name, version in {**_versions(), "transformers": transformers.__version__, "accelerate": accelerate.__version__}.items():
        print(f"{name}: {version}")
    print(f"python: {platform.python_version()}")
    print(f"cuda: {torch.cuda.is_available()} ({torch.cuda.device_count()} devices)")


def main(argv: list[str] | None = None) -> int:
    from safetensors import SafetensorError

    try:
        args = build_parser().parse_args(argv)
        if args.command == "env":
            env()
        else:
            generate(args)
    except (ValueError, TypeError, OSError, RuntimeError, SafetensorError, json.JSONDecodeError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
