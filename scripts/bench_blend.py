"""Benchmark: completing half-masked digits guided by modalities, alone, summed, and blended (MaGIC's CMB).

100 held-out digits (10 per class), bottom half masked; the modalities (edges, low resolution, ink mask) are
computed from the whole digit, so they tell what is missing. The default model completes the digits without a
class (null class), DDIM 50 steps; blending: P = 30 steps, Q = 5 gradient steps (MaGIC's defaults). Metrics:
class accuracy of the completions (the shipped classifier), FD against all held-out digits, PSNR of the
completed region only, and seconds per image. Writes assets/bench_blend.md and .png.

    python scripts/train_modalities.py            # once: the adapters in assets/modalities
    python scripts/bench_blend.py
    python scripts/bench_blend.py --quick         # 10 digits, 10 steps, a few minutes' fraction of the work
"""

import argparse
import time

import torch

import diffkit
from diffkit.blend import extract
from diffkit.data import colored_digits
from diffkit.bench import write_results
from diffkit.images import image_grid, to_pil
from diffkit.metrics import class_accuracy, fd
from diffkit.pipelines import ModalityBlendPipeline


PAIR = ("edges", "low_resolution")
ALL = ("edges", "low_resolution", "ink_mask")
SHORT = {"edges": "edges", "low_resolution": "low-res", "ink_mask": "ink mask"}


def methods() -> dict:
    """name -> (modalities, blend mode)"""
    rows = {"none": ((), "sum")}
    rows.update({SHORT[m]: ((m,), "sum") for m in ALL})
    rows["sum: " + " + ".join(SHORT[m] for m in PAIR)] = (PAIR, "sum")
    rows["sum: all three"] = (ALL, "sum")
    rows["blend: " + " + ".join(SHORT[m] for m in PAIR)] = (PAIR, "cmb")
    rows["blend: all three"] = (ALL, "cmb")
    return rows


def region_psnr(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    """PSNR (data range 2) over the completed pixels only, averaged over images."""
    m = mask.expand_as(out)
    mse = ((out - ref) ** 2 * m).flatten(1).sum(1) / m.flatten(1).sum(1)
    return (10 * torch.log10(4 / mse)).mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--blend-steps", type=int, default=30, help="P")
    parser.add_argument("--blend-iterations", type=int, default=5, help="Q")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--adapters", default=None, help="adapter folder (default assets/modalities)")
    parser.add_argument("--out", default="assets")
    args = parser.parse_args()
    per_class, steps, p, q = (1, 10, 6, 2) if args.quick else (args.per_class, args.steps, args.blend_steps, args.blend_iterations)

    pipe = ModalityBlendPipeline.from_pipe(diffkit.load_pipeline())
    pipe.set_progress_bar_config(disable=True)
    pipe.load_adapters(args.adapters)
    images, labels = colored_digits("test")
    pick = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(10)])
    x, y = images[pick], labels[pick]
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 8:] = 1
    controls = {m: extract(m, x) for m in ALL}

    results = {}
    for name, (mods, mode) in methods().items():
        outs, start = [], time.perf_counter()
        for lo in range(0, len(x), args.batch_size):
            sl = slice(lo, lo + args.batch_size)
            outs.append(pipe(x[sl], mask, control_images={m: controls[m][sl] for m in mods}, blend=mode,
                             num_inference_steps=steps, blend_steps=p, blend_iterations=q,
                             generator=torch.Generator().manual_seed(lo), output_type="pt").images * 2 - 1)
        out = torch.cat(outs)
        results[name] = (out, (time.perf_counter() - start) / len(x))
        print(f"{name}: {results[name][1]:.3f} s/img", flush=True)

    lines = [
        f"{len(x)} held-out digits ({per_class} per class), bottom half masked, no class given; DDIM {steps} steps; "
        f"blending P = {p}, Q = {q}, step sigma_t^2 / alpha_t^2 capped at 10; torch threads {torch.get_num_threads()}.",
        "",
        "| method | accuracy | FD | PSNR (completed half) | s / image |",
        "|---|---|---|---|---|",
    ]
    for name, (out, seconds) in results.items():
        lines.append(f"| {name} | {class_accuracy(out, y):.1%} | {fd(out, images):.1f} | {region_psnr(out, x, mask):.2f} | {seconds:.3f} |")
    # columns: one digit per class; rows: the masked input, the modalities, the truth, then each method
    cols = torch.arange(10) * per_class
    masked = x[cols] * (1 - mask) - mask
    rows = [masked] + [controls[m][cols] for m in ALL] + [x[cols]] + [out[cols] for out, _ in results.values()]
    grid = image_grid(to_pil(torch.cat(rows)), ncols=10, tile=32)
    write_results(args.out, "bench_blend", args.quick, "\n".join(lines) + "\n", images={"bench_blend": grid})


if __name__ == "__main__":
    main()
