"""``diffkit quantize``: post-training quantisation of a pipeline's network (PTQ4DM), saved as a new pipeline folder.

A text model (SD 1.x / 2.x, SDXL, SD3, Flux) is calibrated on its own sampling run over the prompts given with
``--prompt`` (repeatable) and ``--prompts-file`` (one prompt a line), cycled over the ``-n`` calibration images; a
class-conditional model on random class labels, so it takes no prompts. The folder is written beside its target
and renamed into place; ``--overwrite`` replaces only a folder diffkit wrote (its manifest lists every file), never
the current folder, a parent, the home folder or a checkout.
"""

import argparse

import torch

from ..outputs import check_replaceable_folder, write_folder_atomic
from ..quant import ACT_CALIBRATIONS, POLICIES
from . import common
from .common import UsageError


def add_parser(sub) -> None:
    qua = sub.add_parser("quantize", help="post-training quantisation of a pipeline's UNet or transformer (PTQ4DM)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    qua.add_argument("--model", default=None, help="pipeline folder or Hub repo id (default: the embedded model)")
    qua.add_argument("--bits", choices=["w8a8", "w4a8"], default="w8a8")
    qua.add_argument("--calibration", choices=POLICIES, default="ndtc",
                     help="ndtc: PTQ4DM's time-step draw (x and t of one call); ndtc_as_coded: paired as its released "
                          "code pairs them; uniform: Q-Diffusion's evenly spaced steps; naive: Gaussian noise")
    qua.add_argument("--act-calibration", choices=ACT_CALIBRATIONS, default="pooled",
                     help="activation ranges: pooled over the calibration set, or the released code's symmetric "
                          "search with an EMA over batches")
    qua.add_argument("-n", "--num-samples", type=common.num_images, default=1024, help="calibration set size")
    qua.add_argument("--method", choices=["lp", "absmax", "percentile"], default="lp", help="range rule")
    qua.add_argument("--steps", type=common.positive_int, default=50, help="DDIM steps of the calibration run")
    qua.add_argument("--batch-size", type=common.positive_int, default=32, help="images per calibration run batch")
    qua.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                     help="a calibration prompt (text models; repeat for more)")
    qua.add_argument("--prompts-file", default=None, metavar="FILE",
                     help="calibration prompts (text models): one a line, or .jsonl lines {\"prompt\": ...} as for generate")
    qua.add_argument("--seed", type=common.seed, default=0)
    qua.add_argument("--out", required=True, help="output pipeline folder")
    qua.add_argument("--overwrite", action="store_true", help="replace a model folder diffkit wrote before")
    qua.set_defaults(run=run)


def read_prompts(args) -> list[str]:
    """--prompt values, then --prompts-file's, read as ``diffkit generate`` reads it (one prompt a line, blank lines
    skipped, or .jsonl lines {"prompt": ...}); a file line with a label, a negative prompt or a seed is refused."""
    from .generate import _read_prompts_file

    prompts = list(args.prompt or [])
    if any(not p.strip() for p in prompts):
        raise UsageError("--prompt must not be empty")
    if args.prompts_file is not None:
        for entry in _read_prompts_file(args):
            extra = sorted(set(entry) - {"prompt", "line"})
            if extra:
                raise UsageError(f"--prompts-file {args.prompts_file} line {entry['line']}: calibration takes prompts "
                                 f"only, not {extra[0]!r}")
            prompts.append(entry["prompt"])
    return prompts


def _check_prompts(pipe, prompts: list[str]) -> None:
    """Prompts for a model that encodes them; none for one that cannot."""
    from ..pipelines.text import ENCODERS

    family = pipe.family
    if family not in ENCODERS:
        if prompts:
            raise UsageError("--prompt / --prompts-file: this model has no text encoder (a class-conditional or "
                             "unconditional UNet); quantize it without prompts")
        return
    missing = [name for name in ENCODERS[family] if getattr(pipe, name, None) is None]
    if missing:
        raise UsageError(f"this {family} model's folder has no {' / '.join(missing)}, so prompts cannot be encoded; "
                         f"calibrate it on prompt embeddings with diffkit.quant.quantize_pipeline(prompt_embeds=...)")
    if not prompts:
        raise UsageError(f"this is a text model ({family}): give calibration prompts with --prompt TEXT (repeatable) "
                         f"or --prompts-file FILE")


def run(args) -> None:
    from ..quant import quantize_pipeline

    out = check_replaceable_folder(args.out, args.overwrite)
    prompts = read_prompts(args)
    pipe = common.load_model(args.model)
    _check_prompts(pipe, prompts)
    pipe.set_progress_bar_config(desc=f"calibration ({args.calibration})")
    text = {"prompts": prompts} if prompts else {}
    quantize_pipeline(pipe, args.bits, args.calibration, n=args.num_samples, method=args.method,
                      act_calibration=args.act_calibration, num_inference_steps=args.steps, batch_size=args.batch_size,
                      generator=torch.Generator().manual_seed(args.seed), **text)
    write_folder_atomic(out, pipe.save_pretrained, "quantize")
    on = f", {len(prompts)} prompts" if prompts else ""
    print(f"wrote {args.bits} model ({args.calibration} calibration, n={args.num_samples}{on}) to {out}")
