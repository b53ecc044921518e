"""``diffkit train RECIPE --out RUN``: train a diffusion model from a recipe (JSON / TOML, or a bundled name such as
``default``), on accelerate: ``accelerate launch -m diffkit train ...`` spreads it over processes and devices.

The run folder holds ``model/`` (the EMA weights, a diffusers folder; a UNet model is a pipeline ``diffkit generate --model
RUN/model`` runs), ``checkpoints/step-N``, ``samples/step-N.png``, ``recipe.json`` and
``training_log.json``. Running the same command again resumes from the newest checkpoint, bit for bit;
``--overwrite`` starts afresh, deleting only what a diffkit run wrote there.
"""

import argparse

from ..outputs import check_output_folder
from . import common


def add_parser(sub) -> None:
    tra = sub.add_parser("train", help="train a diffusion model from a recipe", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tra.add_argument("recipe", help="recipe file (.json or .toml) or a bundled recipe name, e.g. default")
    tra.add_argument("--out", required=True, help="run folder (model/, checkpoints/, samples/)")
    tra.add_argument("--overwrite", action="store_true", help="start afresh, deleting what an earlier diffkit run wrote there")
    tra.add_argument("--no-resume", action="store_true", help="refuse to continue a run folder that holds checkpoints")
    tra.add_argument("--stop-after", type=common.positive_int, default=None,
                     help="end this session after this many steps in all (with a checkpoint); run again to go on")
    tra.add_argument("--no-progress", action="store_true")
    tra.set_defaults(run=run)


def run(args) -> None:
    from ..recipe import load_recipe, train

    if args.overwrite and args.no_resume:
        raise common.UsageError("--overwrite already starts afresh; --no-resume adds nothing to it")
    recipe = load_recipe(args.recipe)  # refused with its key named before anything is written
    out = check_output_folder(args.out)
    common.quiet_libraries()
    result = train(recipe, out, resume=not args.no_resume, overwrite=args.overwrite, stop_after=args.stop_after,
                   progress=not args.no_progress)
    from ..distributed import process_state

    if process_state().is_main_process:
        where = f"model in {out / 'model'}" if result.step == recipe["training"]["steps"] else "run it again to go on"
        resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from is not None else ""
        print(f"trained {recipe['name']} to step {result.step} of {recipe['training']['steps']}{resumed}; {where}")
