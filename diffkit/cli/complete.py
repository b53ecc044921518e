"""``diffkit complete``: fill the masked part of an image, guided by modalities (MaGIC)."""

import argparse

import torch

from ..images import save_png_atomic
from ..outputs import check_output_file
from ..solvers import SOLVERS
from . import common
from .common import UsageError


def add_parser(sub) -> None:
    com = sub.add_parser("complete", help="fill the masked part of an image, guided by modalities (MaGIC)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    com.add_argument("image", help="the image to complete (its masked part is ignored)")
    where = com.add_mutually_exclusive_group(required=True)
    where.add_argument("--mask", default=None, help="mask image: white = fill, black = keep")
    where.add_argument("--mask-half", choices=["top", "bottom", "left", "right"], default=None, help="fill this half")
    com.add_argument("--control", action="append", default=[], metavar="MODALITY=FILE", help="a control image, e.g. edges=e.png")
    com.add_argument("--control-from-image", action="append", default=[], metavar="MODALITY",
                     help="compute this built-in modality (edges, low_resolution, ink_mask) from IMAGE itself (demos)")
    com.add_argument("--strength", action="append", default=[], metavar="MODALITY=VALUE", help="a modality's strength (default 1)")
    com.add_argument("--blend", choices=["cmb", "sum"], default="cmb", help="consistent modality blending or summed features")
    com.add_argument("--blend-steps", type=common.non_negative_int, default=None, help="P (default 60%% of the steps)")
    com.add_argument("--blend-iterations", type=common.positive_int, default=5, help="Q")
    com.add_argument("--blend-step-rule", choices=["line_search", "official"], default="line_search",
                     help="the step on the latent: a backtracking line search on the blending loss (default) or MaGIC's "
                          "sigma_t^2 / alpha_t^2")
    com.add_argument("--blend-step-cap", type=common.positive_float, default=None, metavar="ETA",
                     help="with --blend-step-rule official: cap its step size (the default model's cosine schedule needs "
                          "about 10; uncapped as MaGIC's code otherwise)")
    com.add_argument("--cond-tau", type=common.unit_float, default=1.0,
                     help="the modalities condition the first cond_tau of the steps only (MaGIC's cond_tau; default 1, "
                          "every step, as its released code runs)")
    com.add_argument("--steps", type=common.positive_int, default=50)
    com.add_argument("--solver", choices=sorted(SOLVERS), default="ddim")
    com.add_argument("--label", type=common.non_negative_int, default=None, help="condition on a class (default: unconditional)")
    com.add_argument("--adapters", default=None, help="adapter folder (default: those shipped for the default model)")
    com.add_argument("--model", default=None, help="pipeline folder or Hub repo id (default: the embedded model)")
    com.add_argument("--seed", type=common.seed, default=0)
    com.add_argument("--out", required=True, help="output PNG file")
    com.add_argument("--overwrite", action="store_true", help="replace an output file diffkit wrote before")
    com.set_defaults(run=run)


def run(args) -> None:
    from ..blend import MODALITIES, OfficialStep, extract
    from ..pipelines import ModalityBlendPipeline

    if args.blend_step_cap is not None and args.blend_step_rule != "official":
        raise UsageError("--blend-step-cap applies to --blend-step-rule official only")
    out = check_output_file(args.out, args.overwrite)
    strengths = common.float_pairs(args.strength, "--strength")
    image = common.read_image(args.image)
    controls = {name: common.read_image(path, option=f"--control {name}")
                for name, path in common.pairs(args.control, "--control").items()}
    for name in args.control_from_image:
        if name not in MODALITIES:
            raise UsageError(f"--control-from-image {name!r} is not a built-in modality; one of {', '.join(MODALITIES)}")
        controls[name] = extract(name, image)
    unused = sorted(set(strengths) - set(controls))
    if unused:
        raise UsageError(f"--strength {unused[0]}: no control image for that modality")
    if args.mask is not None:
        mask = common.read_image(args.mask, "L", option="--mask")
    else:
        mask = torch.zeros(1, 1, *image.shape[-2:])
        h, w = image.shape[-2] // 2, image.shape[-1] // 2
        region = {"top": (slice(None, h), slice(None)), "bottom": (slice(h, None), slice(None)),
                  "left": (slice(None), slice(None, w)), "right": (slice(None), slice(w, None))}[args.mask_half]
        mask[(..., *region)] = 1
    step_rule = OfficialStep(max_step_size=args.blend_step_cap) if args.blend_step_rule == "official" else "line_search"
    pipe = ModalityBlendPipeline.from_pipe(common.load_model(args.model))
    pipe.set_progress_bar_config(desc=f"complete ({args.blend})")
    if controls:
        pipe.load_adapters(args.adapters, names=sorted(controls))
    completed = pipe(
        image, mask, control_images=controls, adapter_conditioning_scale=strengths or 1.0, blend=args.blend,
        blend_steps=args.blend_steps, blend_iterations=args.blend_iterations, blend_step_rule=step_rule,
        blend_cond_tau=args.cond_tau, num_inference_steps=args.steps,
        solver=args.solver, class_labels=args.label, generator=torch.Generator().manual_seed(args.seed), output_type="pil",
    ).images[0]
    parameters = (f"Blend: {args.blend}, Modalities: {','.join(sorted(controls)) or 'none'}, Steps: {args.steps}, "
                  f"Step rule: {args.blend_step_rule}, cond_tau: {args.cond_tau}, "
                  f"Sampler: {args.solver}, Seed: {args.seed}")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png_atomic(completed, out, common.png_record(args, parameters))
    print(f"wrote {out}")
