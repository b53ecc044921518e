"""``diffkit quantize``: post-training quantisation of a pipeline's network (PTQ4DM), saved as a new pipeline folder.

The folder is written beside its target and renamed into place; ``--overwrite`` replaces only a folder diffkit
wrote (its manifest lists every file), never the current folder, a parent, the home folder or a checkout.
"""

import argparse

import torch

from ..outputs import check_replaceable_folder, write_folder_atomic
from . import common


def add_parser(sub) -> None:
    qua = sub.add_parser("quantize", help="post-training quantisation of a pipeline's UNet (PTQ4DM)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    qua.add_argument("--model", default=None, help="pipeline folder or Hub repo id (default: the embedded model)")
    qua.add_argument("--bits", choices=["w8a8", "w4a8"], default="w8a8")
    qua.add_argument("--calibration", choices=["ndtc", "uniform", "naive"], default="ndtc")
    qua.add_argument("-n", "--num-samples", type=common.num_images, default=1024, help="calibration set size")
    qua.add_argument("--method", choices=["lp", "absmax", "percentile"], default="lp", help="range rule")
    qua.add_argument("--steps", type=common.positive_int, default=50, help="DDIM steps of the calibration run")
    qua.add_argument("--seed", type=common.seed, default=0)
    qua.add_argument("--out", required=True, help="output pipeline folder")
    qua.add_argument("--overwrite", action="store_true", help="replace a model folder diffkit wrote before")
    qua.set_defaults(run=run)


def run(args) -> None:
    from ..quant import quantize_pipeline

    out = check_replaceable_folder(args.out, args.overwrite)
    pipe = common.load_model(args.model)
    pipe.set_progress_bar_config(desc=f"calibration ({args.calibration})")
    quantize_pipeline(pipe, args.bits, args.calibration, n=args.num_samples, method=args.method,
                      num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed))
    write_folder_atomic(out, pipe.save_pretrained, "quantize")
    print(f"wrote {args.bits} model ({args.calibration} calibration, n={args.num_samples}) to {out}")
