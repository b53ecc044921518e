"""Draw the condensed sets of dataset-condensation cards: one panel per card, one row per method (random real
images, DC, DCC), the first image of each class, in pixel units (the standardisation undone).

    python scripts/show_condensation.py cards/dcc_ipc1.json cards/dcc_distractors_ipc1.json --out docs/condensation.png

Each set is rebuilt exactly as ``diffkit harness run`` builds it for the seed (same data split, networks and
iterations), so the pictures are the sets behind that seed's row of docs/harness_results.md.
"""

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from diffkit.harness.cards import load_card, method_config  # noqa: E402
from diffkit.harness.experiment import condensed_set  # noqa: E402
from diffkit.images import save_figure_atomic  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cards", nargs="+", help="condense cards (.json / .toml)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/condensation.png")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"error: {out} exists (pass --overwrite to replace it)", file=sys.stderr)
        return 1
    try:
        cards = [load_card(path) for path in args.cards]
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if any(card["task"] != "condense" for card in cards):
        print("error: every card must have task 'condense'", file=sys.stderr)
        return 1
    panels = []
    for card in cards:
        rows = []
        for method in card["methods"]:
            start = time.perf_counter()
            built = condensed_set(method_config(card, method), args.seed)
            images = built["x_syn"] * built["std"] + built["mean"]
            first = torch.stack([images[built["y_syn"] == c][0] for c in built["y_syn"].unique()])
            rows.append((method, first[:, 0].clamp(0, 1)))
            print(f"{card['name']} {method}: {time.perf_counter() - start:.1f} s", flush=True)
        panels.append((card["name"], rows))
    columns = max(len(rows[0][1]) for _, rows in panels)
    total_rows = sum(len(rows) for _, rows in panels)
    aspect = max(rows[0][1].shape[2] / rows[0][1].shape[1] for _, rows in panels)
    fig, axes = plt.subplots(total_rows, columns, figsize=(columns * 0.7 * aspect + 1.2, total_rows * 0.8),
                             squeeze=False)
    r = 0
    for name, rows in panels:
        for method, images in rows:
            for c in range(columns):
                ax = axes[r, c]
                ax.set_xticks([]), ax.set_yticks([])
                if c < len(images):
                    ax.imshow(images[c].numpy(), cmap="gray", vmin=0, vmax=1)
                if c == 0:
                    ax.set_ylabel(f"{name}\n{method}" if method == rows[0][0] else method, fontsize=7)
            r += 1
    fig.suptitle(f"condensed sets, first image per class (seed {args.seed})", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_figure_atomic(fig, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
