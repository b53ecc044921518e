"""``diffkit generate``: images from a class- or text-conditional model, one seeded PNG each.

``--model`` takes a diffkit folder or any standard diffusers Stable Diffusion 1.x / 2.x, SDXL, SD3 or Flux folder or
Hub repo id (loaded as a GuidedPipeline over its components); the solver and guidance scale default to the model's
(its scheduler; its family's diffusers default scale).

Image i uses seed + i, so every image can be regenerated alone; under ``accelerate launch`` the images are split
across processes. Everything that can be refused is refused before the model runs or a file is written.
"""

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..guidance import GUIDANCES, make_guidance
from ..images import image_grid, save_png_atomic
from ..outputs import check_output_files, check_output_folder, output_folder
from ..solvers import SOLVERS
from . import common
from .common import UsageError


GRID_IMAGES = 64  # grid.png shows the first images only, so the last step's memory does not grow with -n


def add_parser(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    gen = sub.add_parser("generate", help="generate images", formatter_class=fmt)
    gen.add_argument("--model", default=None, help="pipeline folder or Hub repo id (default: the embedded model)")
    gen.add_argument("--revision", default=None, help="Hub revision")
    what = gen.add_mutually_exclusive_group()
    what.add_argument("--label", type=common.labels, default=None, help="class label(s), e.g. 7 or 3,7 (cycled)")
    what.add_argument("--prompt", default=None, help="text prompt (text-conditional models)")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("-n", "--num-images", type=common.num_images, default=16)
    gen.add_argument("--steps", type=common.positive_int, default=25)
    gen.add_argument("--solver", choices=sorted(SOLVERS), default=None,
                     help="default: the model's scheduler (its class and sigma options)")
    gen.add_argument("--guidance", choices=sorted(GUIDANCES) + ["none"], default="cfg")
    gen.add_argument("--guidance-scale", type=common.finite_float, default=None,
                     help="default: the model family's (3 pixel models, 7.5 SD, 5 SDXL, 7 SD3, 1 Flux: its true CFG off)")
    gen.add_argument("--guidance-rescale", type=common.finite_float, default=0.0, help="CFG-rescale phi")
    gen.add_argument("--apg-eta", type=common.finite_float, default=0.0, help="APG: weight of the parallel component")
    gen.add_argument("--apg-r", type=common.finite_float, default=0.0, help="APG: norm threshold r (0 = no clamp)")
    gen.add_argument("--apg-momentum", type=common.finite_float, default=0.0, help="APG: momentum beta (< 0 = reverse)")
    gen.add_argument("--eta", type=common.non_negative_float, default=0.0, help="DDIM stochasticity (--solver ddim)")
    gen.add_argument("--seed", type=common.seed, default=0, help="image i uses seed + i")
    gen.add_argument("--batch-size", type=common.positive_int, default=16)
    gen.add_argument("--height", type=common.positive_int, default=None)
    gen.add_argument("--width", type=common.positive_int, default=None)
    gen.add_argument("--device", default=None, help="default: this process's accelerator, else the CPU")
    gen.add_argument("--dtype", choices=sorted(common.DTYPES), default="fp32")
    gen.add_argument("--int8-kernels", action="store_true",
                     help="run a quantised model (diffkit quantize) on oneDNN int8 kernels; compiles first (minutes)")
    gen.add_argument("--out", default="out", help="output folder")
    gen.add_argument("--overwrite", action="store_true", help="replace images diffkit wrote there before")
    gen.add_argument("--no-progress", action="store_true")
    gen.set_defaults(run=run)


def _guidance_kwargs(args) -> dict:
    if args.guidance == "apg":
        return {"eta": args.apg_eta, "norm_threshold": args.apg_r, "momentum": args.apg_momentum}
    if (args.apg_eta, args.apg_r, args.apg_momentum) != (0.0, 0.0, 0.0):
        raise UsageError("--apg-eta/--apg-r/--apg-momentum need --guidance apg")
    return {}


def _check_args(args) -> None:
    """What can be refused before loading a model; flags that would be silently ignored count as errors."""
    if args.label is None and args.prompt is None:
        raise UsageError("give --label (class-conditional model) or --prompt (text model)")
    if args.negative_prompt is not None and args.prompt is None:
        raise UsageError("--negative-prompt needs --prompt")
    if args.eta != 0.0 and args.solver != "ddim":
        raise UsageError("--eta needs --solver ddim")
    common.check_seed_range(args.seed, args.num_images)
    if args.guidance != "none":
        scale = 3.0 if args.guidance_scale is None else args.guidance_scale  # the rule's own checks; the model's default comes later
        make_guidance(args.guidance, scale, args.guidance_rescale, **_guidance_kwargs(args))


def _job(args, i: int) -> dict:
    """Image i: its seed, its label or prompt index, its file name."""
    seed = args.seed + i
    if args.label is not None:
        label = args.label[i % len(args.label)]
        return {"seed": seed, "label": label, "file": f"label{label}-seed{seed:06d}.png"}
    return {"seed": seed, "prompt_index": 0, "file": f"prompt0-seed{seed:06d}.png"}  # --prompt takes one prompt


def _call_kwargs(args, batch: list[dict]) -> dict:
    if "label" in batch[0]:
        condition = {"class_labels": [job["label"] for job in batch]}
    else:
        condition = {"prompt": [args.prompt] * len(batch), "negative_prompt": args.negative_prompt}
    return dict(
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
    )


def _png_text(args, job, image) -> dict:
    """A1111-style 'parameters' plus diffkit's full JSON; the run's --label list and first seed stay in the
    record, "label" and "seed" are this image's."""
    parameters = (
        f"Steps: {args.steps}, Sampler: {args.sampler}, Guidance: {args.guidance}, CFG scale: {args.guidance_scale}, "
        f"Seed: {job['seed']}, Size: {image.width}x{image.height}, Model: {args.model or 'diffkit-default'}"
    )
    if "label" in job:
        parameters += f", Label: {job['label']}"
    else:  # A1111 puts the prompts on their own lines before the settings, so commas in them parse
        negative = f"\nNegative prompt: {args.negative_prompt}" if args.negative_prompt else ""
        parameters = f"{args.prompt}{negative}\n{parameters}"
    record = {k: v for k, v in vars(args).items() if k not in ("command", "overwrite", "no_progress", "run", "sampler")}
    record["solver"] = args.sampler
    record["labels"], record["first_seed"] = record.pop("label"), record.pop("seed")
    record.update(job, versions=common.versions())
    return {"parameters": parameters, "diffkit": json.dumps(record)}


def _check_model(pipe, args) -> None:
    """Refuse what the model cannot do before any file is written: the pipeline's own input checks on a call
    like the first batch's (labels, height / width, steps, guidance, ...)."""
    from ..pipelines import GuidedPipeline

    if not isinstance(pipe, GuidedPipeline):
        raise UsageError(f"diffkit generate needs a GuidedPipeline model, got {type(pipe).__name__}")
    if args.prompt is not None and pipe.num_classes is not None:
        raise UsageError("this model is class-conditional: use --label, not --prompt")
    if args.label is not None and pipe.num_classes is None:
        raise UsageError("this model is text-conditional: use --prompt, not --label")
    if args.label is not None:
        bad = [label for label in args.label if not 0 <= label < pipe.num_classes]
        if bad:
            raise UsageError(f"--label {bad[0]} is out of range for this model (0..{pipe.num_classes - 1})")
    if args.guidance_scale is None:
        args.guidance_scale = pipe.default_guidance_scale  # recorded with the images as the value used
    first = [_job(args, i) for i in range(min(args.num_images, args.batch_size))]
    kwargs = _call_kwargs(args, first)
    try:
        pipe.check_inputs(**kwargs)
        # the solver the model's scheduler resolves to, recorded with the images (the call itself passes None)
        args.sampler = pipe.solver_setup(args.solver, args.steps, *pipe.check_size(args.height, args.width)).solver
    except ValueError as err:
        raise UsageError(_option_message(str(err))) from None


def _option_message(message: str) -> str:
    """A pipeline's message in the CLI's words (its parameters are the CLI's options)."""
    for name, option in (("num_inference_steps", "--steps"), ("guidance_scale", "--guidance-scale"), ("height", "--height"),
                         ("width", "--width"), ("eta", "--eta"), ("class_labels", "--label")):
        message = message.replace(name, option)
    return message


def run(args) -> None:
    from accelerate import PartialState

    state = PartialState()
    _check_args(args)
    device = common.device(args.device, state)
    out = check_output_folder(args.out)
    pipe = common.load_model(args.model, revision=args.revision, dtype=common.DTYPES[args.dtype])
    _check_model(pipe, args)
    if args.int8_kernels:
        from ..quant import QuantizedModel

        if not isinstance(pipe.unet, QuantizedModel):
            raise UsageError("--int8-kernels needs a quantised model (make one with `diffkit quantize`)")
        if device.type != "cpu":
            raise UsageError(f"--int8-kernels runs on x86 CPUs only, not on {device}")
        pipe.unet.use_int8_kernels()
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    check_output_files(out, (_job(args, i)["file"] for i in range(args.num_images)), args.overwrite)
    if (out / "grid.png").exists():
        check_output_files(out, ["grid.png"], args.overwrite)
    # no process writes before all have checked, or a slow one would find the others' new files and fail alone
    state.wait_for_everyone()

    with output_folder(out):
        with state.split_between_processes(list(range(args.num_images))) as mine:
            with tqdm(total=len(mine), desc="images", disable=args.no_progress or not state.is_main_process) as bar:
                for start in range(0, len(mine), args.batch_size):
                    batch = [_job(args, i) for i in mine[start : start + args.batch_size]]
                    for job, image in zip(batch, pipe(**_call_kwargs(args, batch)).images):
                        save_png_atomic(image, out / job["file"], _png_text(args, job, image))
                    bar.update(len(batch))
        state.wait_for_everyone()
        if state.is_main_process:  # the other processes' images exist only on disk: read back a bounded sample
            shown = [out / _job(args, i)["file"] for i in range(min(args.num_images, GRID_IMAGES))]
            save_png_atomic(image_grid(_read_images(shown)), out / "grid.png", {"diffkit": "grid"})
            print(f"wrote {args.num_images} images and grid.png to {out}")


def _read_images(paths: list[Path]) -> list:
    import PIL.Image

    images = []
    for path in paths:
        with PIL.Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images
