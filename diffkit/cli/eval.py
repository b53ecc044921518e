"""``diffkit eval GEN_DIR [--ref DIR | --ref held-out]``: FD, precision / recall and class accuracy of a folder of
images against a reference set, in batches (memory does not grow with the number of images, but for the k-NN
features of precision / recall); under ``accelerate launch`` each process reads its share of the files.

Features come from the digits classifier by default; ``--features inception`` uses torch-fidelity's FID Inception
from weights already on disk (never downloaded), ``--features package.module:name`` any network you name.
"""

import argparse
import json
from pathlib import Path

from ..images import write_text_atomic
from . import common


def add_parser(sub) -> None:
    eva = sub.add_parser("eval", help="score generated images against a reference set",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    eva.add_argument("generated", metavar="GEN_DIR", help="folder of images (a diffkit generate folder, or any)")
    eva.add_argument("--ref", default="held-out",
                     help="reference folder (class sub-folders are labels), or held-out: the 500 held-out digits")
    eva.add_argument("--features", default="digits",
                     help="digits, inception[:WEIGHTS.pth] (weights on disk only) or package.module:name")
    eva.add_argument("-k", type=common.positive_int, default=3, help="neighbours of precision / recall's k-NN balls")
    eva.add_argument("--batch-size", type=common.positive_int, default=250)
    eva.add_argument("--no-precision-recall", action="store_true", help="FD and accuracy only (memory flat in N)")
    eva.add_argument("--no-accuracy", action="store_true", help="skip the digits classifier's class accuracy")
    eva.add_argument("--device", default=None, help="default: this process's accelerator, else the CPU")
    eva.add_argument("--json", default=None, metavar="FILE", help="also write the results to this JSON file")
    eva.add_argument("--overwrite", action="store_true", help="replace a --json file diffkit wrote before")
    eva.add_argument("--no-progress", action="store_true")
    eva.set_defaults(run=run)


def _check_json_target(path: str | None, overwrite: bool) -> Path | None:
    if path is None:
        return None
    target = Path(path).expanduser()
    if target.suffix.lower() != ".json":
        raise common.UsageError(f"--json must name a .json file, got {path!r}")
    if target.exists():
        if not overwrite:
            raise common.UsageError(f"{target} exists; pass --overwrite to replace it")
        try:
            ours = str(json.loads(target.read_text()).get("written_by", "")).startswith("diffkit")
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise common.UsageError(f"{target} was not written by diffkit; --overwrite only replaces diffkit's own files")
    return target


def run(args) -> None:
    from ..distributed import process_state

    from .. import __version__
    from ..evaluate import evaluate

    state = process_state()
    target = _check_json_target(args.json, args.overwrite)
    device = common.device(args.device, state)
    result = evaluate(args.generated, args.ref, features=args.features, k=args.k, batch_size=args.batch_size,
                      precision_recall=not args.no_precision_recall, class_accuracy=not args.no_accuracy,
                      device=device, progress=not args.no_progress)
    if not state.is_main_process:
        return
    rows = [("FD", result["fd"], ".3f"), ("precision", result["precision"], ".4f"), ("recall", result["recall"], ".4f"),
            ("class accuracy", result["class_accuracy"], ".2%"),
            ("class accuracy (reference)", result["reference_class_accuracy"], ".2%")]
    print(f"{result['n_generated']} generated vs {result['n_reference']} reference images, {result['features']} features, "
          f"k = {result['k']}\n\n| metric | value |\n|---|---|")
    for name, value, fmt in rows:
        if value is not None:
            print(f"| {name} | {format(value, fmt)} |")
    if target is not None:
        record = {"written_by": f"diffkit {__version__}", "generated": str(args.generated), "reference": str(args.ref),
                  **result}
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target, json.dumps(record, indent=1) + "\n")
