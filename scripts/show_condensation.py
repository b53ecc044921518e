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


def draw(panels: list, seed: int):
    """panels: [(card name, [(method, images (classes, H, W) in [0, 1]), ...]), ...] -> the figure."""
    # one block per method: the classes side by side with white lines between them, wrapped onto two lines for
    # wide images, every block as wide as the figure and as tall as its aspect asks
    strips = []
    for name, rows in panels:
        for method, images in rows:
            height, width = images.shape[1:]
            lines = 2 if width >= 2 * height else 1
            per_line = -(-len(images) // lines)
            padded = torch.cat([images, torch.ones(lines * per_line - len(images), height, width)])
            framed = torch.nn.functional.pad(padded, (0, 1, 0, 1), value=1.0)  # a white line right and below
            block = framed.reshape(lines, per_line, height + 1, width + 1).permute(0, 2, 1, 3)
            block = block.reshape(lines * (height + 1), per_line * (width + 1))[:-1, :-1]
            strips.append((name if method == rows[0][0] else None, method, block))
    heights = [strip.shape[0] / strip.shape[1] for _, _, strip in strips]
    width = 10.0
    fig, axes = plt.subplots(len(strips), 1, figsize=(width + 1.2, width * sum(heights) * 1.15 + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (card, method, strip) in zip(axes[:, 0], strips):
        ax.imshow(strip.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(method, fontsize=8, rotation=0, ha="right", va="center")
        if card is not None:
            ax.set_title(card, fontsize=8, loc="left")
    fig.suptitle(f"condensed sets, first image per class (seed {seed})", fontsize=9)
    fig.tight_layout()
    return fig


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
    fig = draw(panels, args.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_figure_atomic(fig, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
