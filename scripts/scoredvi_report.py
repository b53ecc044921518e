"""Per-image paired comparison of the ScoreDVI card's methods, from its harness results.

The harness report pairs methods by seed (3 pairs); the denoise task also stores each test image's PSNR, so here every
method is paired with ScoreDVI image by image over all seeds (50 patches x 3 seeds): mean difference with its 95%
t-interval and the smallest difference those pairs detect with 80% power (MDE). Writes docs/scoredvi_report.md and
docs/scoredvi_report.png (per-image PSNR of each method against ScoreDVI's).

    diffkit harness run cards/scoredvi.json --results docs/scoredvi_results.jsonl
    python scripts/scoredvi_report.py --results docs/scoredvi_results.jsonl
"""

import argparse
from pathlib import Path

from diffkit.harness.report import detectable_difference, mean_std, paired_interval, read_results
from diffkit.images import save_figure_atomic, write_text_atomic


def per_image(records: list[dict], card: str) -> dict:
    """method -> seed -> the list of per-image PSNRs."""
    out = {}
    for r in records:
        if r["card"] == card and "psnr_per_image" in r.get("curves", {}):
            out.setdefault(r["method"], {})[r["seed"]] = r["curves"]["psnr_per_image"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="docs/scoredvi_results.jsonl")
    parser.add_argument("--card", default="scoredvi")
    parser.add_argument("--baseline", default="scoredvi")
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()
    records = read_results(args.results)
    values = per_image(records, args.card)
    if args.baseline not in values:
        raise SystemExit(f"error: no per-image results of {args.card}/{args.baseline} in {args.results}")
    noisy = {r["method"]: r["metrics"].get("psnr_noisy") for r in records if r["card"] == args.card}
    base = values[args.baseline]
    lines = [f"Card {args.card}: per-image PSNR (dB) paired with {args.baseline} over every (seed, test image) both ran; "
             "mean [95% t-interval]; MDE = the difference detectable with 80% power at 5%. Noisy input: "
             f"{next(v for v in noisy.values() if v is not None):.2f} dB (seed {min(base)}).", "",
             "| method | PSNR (mean +- std over seeds) | pairs | difference to " + args.baseline + " | MDE |",
             "|---|---|---|---|---|"]
    for method, seeds in values.items():
        seed_means = [sum(v) / len(v) for v in seeds.values()]
        mean, std = mean_std(seed_means)
        cell = f"{mean:.2f} +- {std:.2f}" if len(seed_means) > 1 else f"{mean:.2f}"
        if method == args.baseline:
            lines.append(f"| {method} | {cell} | - | - | - |")
            continue
        diffs = [a - b for s in sorted(set(seeds) & set(base)) for a, b in zip(seeds[s], base[s])]
        d, lo, hi = paired_interval(diffs)
        n = len(diffs)
        mde = detectable_difference(mean_std(diffs)[1], n)
        lines.append(f"| {method} | {cell} | {n} | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] | {mde:.3f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "scoredvi_report.md", table)
    save_figure_atomic(figure(values, args.baseline), out / "scoredvi_report.png")


def figure(values: dict, baseline: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [m for m in values if m != baseline]
    fig, axes = plt.subplots(1, len(others), figsize=(3.2 * len(others), 3.2), squeeze=False)
    base = values[baseline]
    for ax, method in zip(axes[0], others):
        xs, ys = [], []
        for seed in sorted(set(values[method]) & set(base)):
            xs += base[seed]
            ys += values[method][seed]
        ax.scatter(xs, ys, s=6, alpha=0.6)
        lo, hi = min(xs + ys), max(xs + ys)
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        ax.set_xlabel(f"{baseline} PSNR (dB)", fontsize=8)
        ax.set_ylabel(f"{method} PSNR (dB)", fontsize=8)
        ax.set_title(f"{method}: {sum(y > x for x, y in zip(xs, ys))}/{len(xs)} images above", fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
