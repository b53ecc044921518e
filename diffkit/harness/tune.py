"""``python -m diffkit.harness.tune CARD --method M --grid optimizer.lr=0.01,0.1 [--grid ...] [--seeds 0 1]``: run one
method of a card over every combination of the grid on a 9:1 validation split of its training set
(``validation.tune``) and print the validation metric of each setting and the best one."""

import argparse
import json
import math
from pathlib import Path

import torch

from .validation import tune


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None) -> None:
    from ..assets import shipped_card
    from .cards import load_card

    parser = argparse.ArgumentParser(description="tune one method of a harness card on a validation split")
    parser.add_argument("card", help="a card file, or the name of a shipped card")
    parser.add_argument("--method", required=True)
    parser.add_argument("--grid", action="append", required=True,
                        help="dotted.path=v1,v2,... (JSON values), repeatable; every combination is run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--metric", default=None, help="the metric to choose by (default: the card's)")
    parser.add_argument("--minimise", action="store_true", help="lower is better (default: higher)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    grid = {}
    for item in args.grid:
        path, _, values = item.partition("=")
        grid[path] = [_parse_value(v) for v in values.split(",")]
    path = Path(args.card)
    card = load_card(path if path.is_file() else shipped_card(args.card) or path)
    metric = args.metric or card["metric"]
    print(f"{card['name']} / {args.method}: validation {metric}, mean over seeds {args.seeds}")
    print(f"| {' | '.join(grid)} | validation {metric} |")
    print("|" + "---|" * (len(grid) + 1), flush=True)

    def show(row):  # each row as it completes: a long grid can be watched
        failed = f" ({'; '.join(row['errors'])})" if row["errors"] else ""
        print(f"| {' | '.join(str(v) for v in row['overrides'].values())} | {row['mean']:.4f}{failed} |", flush=True)

    rows = tune(card, args.method, grid, args.seeds, args.fraction, metric, on_row=show)

    def key(row):
        return math.inf if not math.isfinite(row["mean"]) else row["mean"] if args.minimise else -row["mean"]

    best = min(rows, key=key)
    print(f"best: {json.dumps(best['overrides'])} -> {best['mean']:.4f}")


if __name__ == "__main__":
    main()
