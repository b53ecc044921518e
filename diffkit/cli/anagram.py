"""``diffkit anagram``: visual anagrams, one image that shows a different class (or prompt) under each view.

Views and conditions pair in order: ``--label 6 --view rot90 --label 9`` asks for a 6 as generated (the first
condition's view is the identity unless a ``--view`` precedes it) and a 9 when turned by 90 degrees. For each anagram
one PNG per view is written (the image as that view shows it) and grid.png puts the views of each anagram side by side.
Anagram i uses seed + i.
"""

import argparse

import torch
from tqdm.auto import tqdm

from ..images import image_grid, save_png_atomic
from ..outputs import check_output_files, check_output_folder, output_folder
from ..solvers import SOLVERS
from ..views import make_view
from . import common
from .common import UsageError


class _Condition(argparse.Action):
    """--label / --prompt append (view, condition) with the view named by the last --view (identity if none)."""

    def __call__(self, parser, namespace, value, option_string=None):
        kind = "label" if option_string == "--label" else "prompt"
        pending = getattr(namespace, "pending_view", None)
        conditions = list(getattr(namespace, "conditions", None) or [])
        conditions.append((pending or "identity", kind, value))
        namespace.conditions, namespace.pending_view = conditions, None


class _View(argparse.Action):
    def __call__(self, parser, namespace, value, option_string=None):
        if getattr(namespace, "pending_view", None) is not None:
            raise UsageError(f"--view {namespace.pending_view} is followed by another --view; each --view names the "
                             "view of the --label or --prompt after it")
        namespace.pending_view = value


def add_parser(sub) -> None:
    ana = sub.add_parser("anagram", help="generate visual anagrams (a different class under each view)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ana.add_argument("--label", action=_Condition, type=common.non_negative_int, dest="conditions", default=None,
                     help="a class for the current view (repeat: one per view)")
    ana.add_argument("--prompt", action=_Condition, dest="conditions", help="a prompt for the current view (text models)")
    ana.add_argument("--view", action=_View, dest="pending_view", default=None,
                     help="the view of the next --label / --prompt: identity, rot90, rot180, rot270, hflip, vflip, "
                          "transpose, negate, jigsaw, channels:<permutation>")
    ana.add_argument("--negative-prompt", default=None)
    ana.add_argument("--rectify", action="store_true", help="noise-variance rectification (Xu et al., WACV 2025)")
    ana.add_argument("--balance", action="store_true",
                     help="noise-vector balancing, scored by the digits classifier (class-conditional pixel models)")
    ana.add_argument("-n", "--num-images", type=common.num_images, default=4, help="anagrams to generate")
    ana.add_argument("--steps", type=common.positive_int, default=30)
    ana.add_argument("--solver", choices=sorted(SOLVERS), default="dpmpp_2m")
    ana.add_argument("--guidance-scale", type=common.finite_float, default=8.0, help="CFG scale, per view")
    ana.add_argument("--seed", type=common.seed, default=0, help="anagram i uses seed + i")
    ana.add_argument("--batch-size", type=common.positive_int, default=16)
    ana.add_argument("--model", default=None, help="pipeline folder or Hub repo id (default: the embedded model)")
    ana.add_argument("--device", default=None, help="default: this process's accelerator, else the CPU")
    ana.add_argument("--out", default="out", help="output folder")
    ana.add_argument("--overwrite", action="store_true", help="replace images diffkit wrote there before")
    ana.add_argument("--no-progress", action="store_true")
    ana.set_defaults(run=run)


def _check_args(args) -> tuple[list[str], str, list]:
    """(views, kind, conditions): refused before any model is loaded."""
    if args.pending_view is not None:
        raise UsageError(f"--view {args.pending_view} names no condition: put a --label or --prompt after it")
    conditions = args.conditions or []
    if len(conditions) < 2:
        raise UsageError("give at least two conditions, e.g. --label 6 --view rot90 --label 9")
    kinds = {kind for _, kind, _ in conditions}
    if len(kinds) > 1:
        raise UsageError("use --label or --prompt for every view, not both")
    kind = kinds.pop()
    if args.negative_prompt is not None and kind != "prompt":
        raise UsageError("--negative-prompt needs --prompt")
    if args.balance and kind != "label":
        raise UsageError("--balance scores the views with the digits classifier: it needs --label")
    views = [view for view, _, _ in conditions]
    for view in views:
        try:
            make_view(view)
        except ValueError as err:
            raise UsageError(f"--view {view}: {err}") from None
    common.check_seed_range(args.seed, args.num_images)
    return views, kind, [value for _, _, value in conditions]


def _files(i: int, seed: int, views: list[str]) -> list[str]:
    return [f"anagram{i:04d}-seed{seed:06d}-view{v}-{name.replace(':', '')}.png" for v, name in enumerate(views)]


def run(args) -> None:
    from ..pipelines import AnagramPipeline

    views, kind, values = _check_args(args)
    device = common.device(args.device)
    out = check_output_folder(args.out)
    pipe = AnagramPipeline.from_pipe(common.load_model(args.model))
    if kind == "label" and pipe.num_classes is None:
        raise UsageError("this model is text-conditional: use --prompt, not --label")
    if kind == "prompt" and pipe.num_classes is not None:
        raise UsageError("this model is class-conditional: use --label, not --prompt")
    condition = {"class_labels": values} if kind == "label" else {"prompt": values, "negative_prompt": args.negative_prompt}
    options = dict(**condition, views=views, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                   rectify=args.rectify, balance=args.balance, solver=args.solver)
    try:  # the pipeline's own checks, before anything is written
        pipe.check_inputs(**condition, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                          solver=args.solver)
        pipe.check_views(views, condition.get("class_labels"), condition.get("prompt"), args.balance, "cosine")
    except ValueError as err:
        raise UsageError(str(err).replace("num_inference_steps", "--steps").replace("class_labels", "--label")
                         .replace("guidance_scale", "--guidance-scale")) from None
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    names = [name for i in range(args.num_images) for name in _files(i, args.seed + i, views)]
    check_output_files(out, names, args.overwrite)
    if (out / "grid.png").exists():
        check_output_files(out, ["grid.png"], args.overwrite)

    shown = []
    with output_folder(out), tqdm(total=args.num_images, desc="anagrams", disable=args.no_progress) as bar:
        for start in range(0, args.num_images, args.batch_size):
            batch = list(range(start, min(start + args.batch_size, args.num_images)))
            # one generator per anagram: its noise depends on its seed alone; the pipeline takes the batch's noise
            latents = torch.cat([pipe.prepare_latents(1, *pipe.default_size(), torch.Generator().manual_seed(args.seed + i),
                                                      device=torch.device("cpu")) for i in batch]).to(device)
            result = pipe(**options, num_images_per_prompt=len(batch), latents=latents, output_type="pil")
            for j, i in enumerate(batch):
                for v, name in enumerate(_files(i, args.seed + i, views)):
                    image = result.view_images[v][j]
                    parameters = (f"Anagram: {', '.join(f'{view}={value}' for view, value in zip(views, values))}, "
                                  f"View: {views[v]}, Steps: {args.steps}, Sampler: {args.solver}, CFG scale: "
                                  f"{args.guidance_scale}, Rectify: {args.rectify}, Balance: {args.balance}, "
                                  f"Seed: {args.seed + i}, Model: {args.model or 'diffkit-default'}")
                    save_png_atomic(image, out / name, common.png_record(args, parameters,
                                                                         skip=("command", "overwrite", "no_progress",
                                                                               "run", "pending_view")))
                    if i < 16:
                        shown.append(image)
            bar.update(len(batch))
        save_png_atomic(image_grid(shown, ncols=len(views) * min(4, args.num_images)), out / "grid.png",
                        {"diffkit": "grid"})
    print(f"wrote {args.num_images} anagrams ({len(views)} views each) and grid.png to {out}")
