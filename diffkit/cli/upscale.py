"""``diffkit upscale``: super-resolve an image with an UpscalePipeline (UPSR / ResShift; default: the shipped x2 model
for 8x8 coloured digits)."""

import argparse

import torch

from ..images import save_png_atomic
from ..outputs import check_output_file
from . import common
from .common import UsageError


def add_parser(sub) -> None:
    up = sub.add_parser("upscale", help="super-resolve an image (UPSR / ResShift)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    up.add_argument("image", help="the low-resolution image (or, with --simulate, the high-resolution one)")
    up.add_argument("--simulate", action="store_true",
                    help="downsample the given image first (antialiased bicubic, by the model's factor)")
    up.add_argument("--no-weighting", action="store_true",
                    help="w_u = 1 (the ResShift process) instead of UPSR's uncertainty-weighted noise")
    up.add_argument("--model", default=None, help="UpscalePipeline folder or Hub repo id (default: the shipped UPSR)")
    up.add_argument("--seed", type=common.seed, default=0)
    up.add_argument("--device", default=None, help="default: this process's accelerator, else the CPU")
    up.add_argument("--out", required=True, help="output PNG file")
    up.add_argument("--overwrite", action="store_true", help="replace an output file diffkit wrote before")
    up.set_defaults(run=run)


def run(args) -> None:
    from ..assets import UPSR_MODEL
    from ..inverse import make_operator
    from ..pipelines import UpscalePipeline

    out = check_output_file(args.out, args.overwrite)
    image = common.read_image(args.image)
    pipe = common.load_model(args.model or UPSR_MODEL)
    if not isinstance(pipe, UpscalePipeline):
        raise UsageError(f"--model: diffkit upscale needs an UpscalePipeline, got {type(pipe).__name__}")
    if args.simulate:
        factor = pipe.factor
        if image.shape[-1] % factor or image.shape[-2] % factor:
            raise UsageError(f"--simulate: the image sides must be multiples of {factor}, got "
                             f"{image.shape[-1]}x{image.shape[-2]}")
        image = make_operator(f"sr_bicubic:{factor}").forward(image)
    try:
        pipe.check_image(image)
    except ValueError as err:
        raise UsageError(f"IMAGE: {err}") from None
    pipe = pipe.to(common.device(args.device))
    pipe.set_progress_bar_config(disable=True)
    result = pipe(image, noise_weighting=not args.no_weighting, generator=torch.Generator().manual_seed(args.seed),
                  output_type="pil").images[0]
    parameters = (f"Upscale: x{pipe.factor}, Noise weighting: {'UPSR' if not args.no_weighting else 'none (ResShift)'}, "
                  f"Steps: {pipe.scheduler.schedule.num_steps}, Seed: {args.seed}, Model: {args.model or 'diffkit-upsr'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png_atomic(result, out, common.png_record(args, parameters))
    print(f"wrote {out} ({result.width}x{result.height})")
