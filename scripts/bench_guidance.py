"""CFG vs APG vs CFG-rescale across guidance scales on the embedded default model (one run).

Tests the APG paper's claim (Sadat et al., ICLR 2025): at high scales APG keeps saturation and FD near their
low-scale values while CFG's degrade, at comparable class accuracy, and at no extra model evaluations.
Every cell samples the same balanced classes from the same noise with DPM-Solver++(2M), 25 steps, and
reports FD to the 500 held-out digits, class accuracy, mean HSV saturation, clipped-pixel fraction (on the
raw output, before clamping), precision / recall (k-NN, k = 3) and time per image. Writes
assets/bench_guidance.md, assets/bench_guidance.png and sample grids CFG vs APG at w = 12.

    python scripts/bench_guidance.py            # 200 images per cell, ~10 minutes on 2 CPU cores
    python scripts/bench_guidance.py --quick    # ~1 minute
"""

import argparse
import time
from pathlib import Path

import torch

import diffkit
from diffkit import metrics
from diffkit.data import colored_digits
from diffkit.images import image_grid, save_figure_atomic, save_png_atomic, to_pil, write_text_atomic


SCALES = [1, 2, 4, 6, 8, 12, 16]
# APG settings for this model, chosen before the run and kept for all scales: eta = 0 and reverse momentum
# beta = -0.5 as the paper recommends; r bounds ||D_cond - D_uncond|| per image in x0 units. Our images are
# 3x16x16 in [-1, 1] (a whole digit's ink is ||x|| ~ 10); r = 4 limits one guidance step to a fraction of it.
APG_KWARGS = {"eta": 0.0, "norm_threshold": 4.0, "momentum": -0.5}
RESCALE_PHI = 0.7
METHODS = {
    "CFG": dict(guidance="cfg"),
    "APG": dict(guidance="apg", guidance_kwargs=APG_KWARGS),
    "CFG-rescale": dict(guidance="cfg", guidance_rescale=RESCALE_PHI),
}


def sample(pipe, labels, noise, scale, method, batch_size):
    images, seconds = [], 0.0
    for i in range(0, len(labels), batch_size):
        start = time.perf_counter()
        out = pipe(
            class_labels=labels[i : i + batch_size], latents=noise[i : i + batch_size], guidance_scale=float(scale),
            num_inference_steps=25, output_type="latent", **METHODS[method],
        ).images
        seconds += time.perf_counter() - start
        images.append(out)
    return torch.cat(images), seconds / len(labels)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="40 images, scales 1, 4, 12: about a minute")
    parser.add_argument("--images", type=int, default=200, help="images per cell, balanced over the classes")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default="assets")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n_images, scales = (40, [1, 4, 12]) if args.quick else (args.images, SCALES)

    pipe = diffkit.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    real = colored_digits("test", seed=1)[0]
    real_feats = metrics.classifier_features(real)
    labels = (torch.arange(n_images) % pipe.num_classes).tolist()
    noise = torch.randn(n_images, 3, 16, 16, generator=torch.Generator().manual_seed(args.seed))

    rows, grids = [], {}
    with torch.no_grad():
        for scale in scales:
            for method in METHODS:
                if scale == 1 and method != "CFG":
                    continue  # w = 1 is the conditional model alone for every method
                raw, sec = sample(pipe, labels, noise, scale, method, args.batch_size)
                images = raw.clamp(-1, 1)
                feats = metrics.classifier_features(images)
                precision, recall = metrics.precision_recall(real_feats, feats, k=3)
                rows.append({
                    "method": "none" if scale == 1 else method, "w": scale,
                    "FD": metrics.frechet_distance(feats, real_feats),
                    "accuracy": metrics.class_accuracy(images, torch.tensor(labels)),
                    "saturation": metrics.saturation(images),
                    "clipped": metrics.clipped_fraction(raw),
                    "precision": precision, "recall": recall, "ms/img": 1000 * sec,
                })
                if scale == 12 and method in ("CFG", "APG"):
                    grids[method] = images[:40]
                print(f"w={scale} {method}: FD {rows[-1]['FD']:.2f}", flush=True)

    real_row = {"method": "held-out data", "w": "-", "FD": 0.0, "accuracy": metrics.class_accuracy(real, colored_digits("test")[1]),
                "saturation": metrics.saturation(real), "clipped": metrics.clipped_fraction(real),
                "precision": float("nan"), "recall": float("nan"), "ms/img": float("nan")}
    table = format_table([real_row] + rows, n_images)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    write_text_atomic(out / f"bench_guidance{suffix}.md", table)
    plot(rows, out / f"bench_guidance{suffix}.png", real_row)
    for method, images in grids.items():
        save_png_atomic(image_grid(to_pil(images), ncols=10, tile=32), out / f"guidance_{method.lower()}_w12{suffix}.png")


def format_table(rows, n_images) -> str:
    cols = ["method", "w", "FD", "accuracy", "saturation", "clipped", "precision", "recall", "ms/img"]
    fmt = {"accuracy": "{:.1%}", "clipped": "{:.2%}", "saturation": "{:.3f}", "precision": "{:.2f}", "recall": "{:.2f}",
           "FD": "{:.2f}", "ms/img": "{:.1f}"}
    lines = [
        f"Default model, DPM-Solver++(2M) 25 steps, {n_images} images per cell; APG {APG_KWARGS}; "
        f"CFG-rescale phi = {RESCALE_PHI}. FD/precision/recall against 500 held-out digits (classifier features).",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in rows:
        lines.append("| " + " | ".join(fmt.get(c, "{}").format(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path, real_row) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = [r for r in rows if r["method"] == "none"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for method in METHODS:
        rs = base + [r for r in rows if r["method"] == method]
        for ax, key in zip(axes, ("saturation", "FD", "accuracy")):
            ax.plot([r["w"] for r in rs], [r[key] for r in rs], "o-", label=method)
    axes[0].axhline(real_row["saturation"], color="gray", ls=":", label="held-out data")
    for ax, key in zip(axes, ("mean HSV saturation", "FD to held-out digits", "class accuracy")):
        ax.set(xlabel="guidance scale w", ylabel=key)
    axes[0].legend()
    fig.tight_layout()
    save_figure_atomic(fig, path)


if __name__ == "__main__":
    main()
