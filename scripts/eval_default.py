"""Quality bar of the embedded default model: the digits classifier's agreement with the requested class.

Samples 100 images per class with CFG scale 3 and 25 DPM-Solver++(2M) steps, classifies them with the
shipped digits classifier, and prints per-class accuracy, FD to the held-out digits and saturation.
Writes default_eval.md and the sample grid default_grid.png (10 per class, one row per class) to --out (default
out/; the README's copies are made with --out assets).

    python scripts/eval_default.py           # 1,000 images, ~3 minutes on 2 CPU cores
    python scripts/eval_default.py --quick   # 20 per class
"""

import argparse
from pathlib import Path

import torch

import diffkit
from diffkit import metrics
from diffkit.classifier import load_classifier
from diffkit.data import colored_digits
from diffkit.images import image_grid, save_png_atomic, to_pil, write_text_atomic


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default="out", help="folder for default_eval.md and default_grid.png (the README's: assets)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    per_class = 20 if args.quick else args.per_class

    pipe = diffkit.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(pipe.num_classes).repeat_interleave(per_class)
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.cat([
        pipe(class_labels=chunk.tolist(), guidance_scale=args.guidance_scale, num_inference_steps=args.steps,
             generator=generator, output_type="latent").images.clamp(-1, 1)
        for chunk in labels.split(200)
    ])
    with torch.no_grad():
        predicted = load_classifier()(images).argmax(1)
    per_class_acc = [(predicted[labels == c] == c).float().mean().item() for c in range(pipe.num_classes)]
    overall = (predicted == labels).float().mean().item()
    fd = metrics.frechet_distance(metrics.classifier_features(images), metrics.classifier_features(colored_digits("test", seed=1)[0]))

    lines = [
        f"Default model, CFG scale {args.guidance_scale}, {args.steps} DPM-Solver++(2M) steps, {per_class} samples per class.",
        "",
        "| class | " + " | ".join(str(c) for c in range(pipe.num_classes)) + " | all |",
        "|---|" + "---|" * (pipe.num_classes + 1),
        "| classifier agrees | " + " | ".join(f"{a:.0%}" for a in per_class_acc) + f" | **{overall:.1%}** |",
        "",
        f"FD to held-out digits: {fd:.2f}; mean saturation {metrics.saturation(images):.3f} "
        f"(held-out data {metrics.saturation(colored_digits('test', seed=1)[0]):.3f}).",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if not args.quick:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "default_eval.md", table)
        grid = torch.cat([images[labels == c][:10] for c in range(pipe.num_classes)])
        save_png_atomic(image_grid(to_pil(grid), ncols=10, tile=32), out / "default_grid.png")


if __name__ == "__main__":
    main()
