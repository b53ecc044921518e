"""``diffkit harness run | report``: classifier-side methods trained and evaluated from experiment cards."""

import argparse
from pathlib import Path

from ..assets import cards_folder, shipped_card
from . import common
from .common import UsageError


RESULTS = "harness_results.jsonl"  # in the current folder unless --results says otherwise


def add_parser(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    har = sub.add_parser("harness", help="train and evaluate classifier-side methods from experiment cards")
    har_sub = har.add_subparsers(dest="harness_command", required=True, parser_class=common.Parser)
    hrun = har_sub.add_parser("run", help="run a card: one JSON line per (method, seed)", formatter_class=fmt)
    hrun.add_argument("card", help="experiment card: a .json / .toml file or the name of a shipped card, e.g. elr_label_noise")
    hrun.add_argument("--seeds", type=common.seeds, default=None, help="comma list, e.g. 0,1,2 (default: the card's)")
    hrun.add_argument("--methods", type=common.names, default=None, help="comma list (default: all of the card's)")
    hrun.add_argument("--results", default=RESULTS, help="results file to append to")
    hrun.add_argument("--no-progress", action="store_true")
    hrun.set_defaults(run=run)
    har_sub.add_parser("list", help="the shipped cards: name, task and paper").set_defaults(run=list_cards)
    hrep = har_sub.add_parser("report", help="aggregate a results file into markdown tables", formatter_class=fmt)
    hrep.add_argument("--results", default=RESULTS)
    hrep.add_argument("--out", default="harness_results.md")
    hrep.set_defaults(run=report)


def card_path(card: str) -> Path:
    """A card file, or the shipped card of that name."""
    path = Path(card).expanduser()
    if path.is_file():
        return path
    shipped = shipped_card(card)
    if shipped is not None:
        return shipped
    count = len(list(cards_folder().glob("*.json")))
    raise UsageError(f"no card file {card!r}, and no shipped card of that name (`diffkit harness list` shows the "
                     f"{count} shipped cards)")


def _check_results(path: str, option: str) -> Path:
    if not path.strip():
        raise UsageError(f"{option} is empty; give a file name")
    results = Path(path).expanduser()
    if results.is_dir():
        raise UsageError(f"{option} {path!r} is a folder; give a file name")
    return results


def run(args) -> None:
    from accelerate import Accelerator

    from ..harness import append_results, load_card, run_method
    from ..outputs import check_writable_parent

    results = _check_results(args.results, "--results")
    check_writable_parent(results, "--results")
    card = load_card(card_path(args.card))
    for method in args.methods or []:
        if method not in card["methods"]:
            raise UsageError(f"--methods: {method!r} is not a method of {card['name']}; allowed: {', '.join(card['methods'])}")
    accelerator = Accelerator()
    for seed in args.seeds or card["seeds"]:
        for method in args.methods or list(card["methods"]):
            record = run_method(card, method, seed, accelerator, progress=not args.no_progress)
            if accelerator.is_main_process:  # every process computed the same metrics; one writes them
                append_results(results, [record])
                metrics = ", ".join(f"{k} {v:.4g}" for k, v in record["metrics"].items())
                print(f"{card['name']} {method} seed {seed}: {metrics} ({record['wall_s']:.1f} s)")


def list_cards(args) -> None:
    import json

    for path in sorted(cards_folder().glob("*.json")):
        card = json.loads(path.read_text())
        print(f"{path.stem:28s} {card.get('task', '?'):12s} {card.get('paper', '')}")


def report(args) -> None:
    from ..harness import write_report
    from ..outputs import check_writable_parent

    results = _check_results(args.results, "--results")
    if not results.is_file():
        raise UsageError(f"--results {args.results!r}: no such file (run `diffkit harness run` first)")
    out = _check_results(args.out, "--out")
    check_writable_parent(out, "--out")
    write_report(results, out)
    print(f"wrote {out}")
