"""``diffkit restore``: an image from a measurement (inpainting, super-resolution, deblurring, ...) with the model
as prior: RED-Diff, DPS or PiGDM."""

import argparse

import torch

from ..images import save_png_atomic
from ..outputs import check_output_file
from . import common
from .common import UsageError


def add_parser(sub) -> None:
    res = sub.add_parser("restore", help="restore an image from a measurement with a diffusion prior",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    res.add_argument("image", help="the measurement as an image file (or, with --simulate, the clean image)")
    res.add_argument("--operator", required=True, help='forward model spec, e.g. "inpaint_box", "sr:2", "blur_gauss:1.0"')
    res.add_argument("--sigma-y", type=common.non_negative_float, default=0.05,
                     help="measurement noise std on the [-1, 1] scale")
    res.add_argument("--simulate", action="store_true", help="measure the given clean image first (seeded noise)")
    res.add_argument("--method", choices=["red_diff", "dps", "pigdm"], default="red_diff")
    res.add_argument("--steps", type=common.positive_int, default=None, help="default: the method's own")
    res.add_argument("--label", type=common.non_negative_int, default=None,
                     help="condition the prior on a class (default: unconditional)")
    res.add_argument("--model", default=None, help="pipeline folder or Hub repo id (default: the embedded model)")
    res.add_argument("--seed", type=common.seed, default=0)
    res.add_argument("--out", required=True, help="output PNG file")
    res.add_argument("--overwrite", action="store_true", help="replace an output file diffkit wrote before")
    res.set_defaults(run=run)


def run(args) -> None:
    from ..inverse import make_operator
    from ..pipelines import InverseProblemPipeline

    out = check_output_file(args.out, args.overwrite)
    image = common.read_image(args.image)
    pipe = InverseProblemPipeline.from_pipe(common.load_model(args.model))
    pipe.set_progress_bar_config(desc=args.method)
    height, width = pipe.default_size()
    try:
        operator = make_operator(args.operator, sigma_y=args.sigma_y, image_size=(height, width), seed=args.seed)
        operator.output_shape((1, 3, height, width))  # does it take this model's images?
    except ValueError as err:
        raise UsageError(f"--operator {args.operator}: {err}") from None
    generator = torch.Generator().manual_seed(args.seed)
    if args.simulate:
        if image.shape[-2:] != (height, width):
            raise UsageError(f"--simulate needs a {width}x{height} image for this model, got {image.shape[-1]}x{image.shape[-2]}")
        measurement = operator.measure(image, generator=generator)
    else:
        measurement = image
    restored = pipe(
        measurement, operator, method=args.method, num_inference_steps=args.steps,
        class_labels=None if args.label is None else [args.label], generator=generator, output_type="pil",
    ).images[0]
    parameters = f"Operator: {args.operator}, Sigma_y: {args.sigma_y}, Method: {args.method}, Seed: {args.seed}"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png_atomic(restored, out, common.png_record(args, parameters))
    print(f"wrote {out}")
