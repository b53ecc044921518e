"""Benchmark: completing half-masked digits guided by modalities, alone, summed, and blended (MaGIC's CMB).

100 held-out digits (10 per class), bottom half masked; the modalities (edges, low resolution, ink mask) are
computed from the whole digit, so they tell what is missing. The default model completes the digits without a
class (null class), DDIM 50 steps; blending: P = 30 steps, Q = 5 gradient steps (MaGIC's defaults,
configs/example_config.yaml of yeates/MaGIC), branches fed at every step (cond_tau = 1.0, as its released entry
point runs) unless a row says otherwise. The blending rows differ in the step on the latent:

- official step: MaGIC's sigma_t^2 / alpha_t^2 (``OfficialStep``), capped at 10 (uncapped it reaches 4e8 at
  t = 999 on the default model's cosine schedule and the run diverges to NaN);
- line search: diffkit's default, a backtracking line search on the blending loss (``LineSearch``);
- Q = 20: four times MaGIC's iterations at the stable (capped) official step;
- cond_tau 0.4: the branch window of ``ddim_sampling``'s keyword default (branches fed for the first 20 of 50 steps).

Metrics: class accuracy of the completions (the shipped classifier), FD against all held-out digits, PSNR of the
completed region only (mean +- std over images), its paired difference to "sum: all three" with the 95% t-interval
and the smallest difference the images could detect (80% power, two-sided 5%), seconds per image, and for blending
rows the fraction of the blending loss the Q gradient steps removed per blended step (mean over steps, with the
first and the last blended step), the adapters' share of the loss at the start of a blended step (the loss each
modality's features keep against the plain UNet's at the modality's own branch latent, over the loss at the main
latent) and its floor share (the loss at the modalities' mean features, which no latent gets below, over the same;
diffkit.blend.Completion). Writes assets/bench_blend.md, bench_blend.png (those per blended step) and
bench_blend_images.png (completions).

    python scripts/train_modalities.py            # once: the adapters in assets/modalities
    OMP_NUM_THREADS=1 python scripts/bench_blend.py
    python scripts/bench_blend.py --quick         # 10 digits, 10 steps, a few minutes' fraction of the work
"""

import argparse
import time

import torch

import diffkit
from diffkit.bench import write_results
from diffkit.blend import LineSearch, OfficialStep, extract
from diffkit.data import colored_digits
from diffkit.harness.report import detectable_difference, mean_std, paired_interval
from diffkit.images import image_grid, to_pil
from diffkit.metrics import class_accuracy, fd
from diffkit.pipelines import ModalityBlendPipeline


PAIR = ("edges", "low_resolution")
ALL = ("edges", "low_resolution", "ink_mask")
SHORT = {"edges": "edges", "low_resolution": "low-res", "ink_mask": "ink mask"}
BASELINE = "sum: all three"
CAPPED = OfficialStep(max_step_size=10.0)


def methods(q: int) -> dict:
    """name -> (modalities, blend mode, extra pipeline arguments)"""
    rows = {"none": ((), "sum", {})}
    rows.update({SHORT[m]: ((m,), "sum", {}) for m in ALL})
    rows["sum: " + " + ".join(SHORT[m] for m in PAIR)] = (PAIR, "sum", {})
    rows[BASELINE] = (ALL, "sum", {})
    rows["CMB: all three, official step (cap 10)"] = (ALL, "cmb", {"blend_step_rule": CAPPED})
    rows["CMB: all three, line search"] = (ALL, "cmb", {"blend_step_rule": LineSearch()})
    rows[f"CMB: all three, official step (cap 10), Q = {4 * q}"] = (ALL, "cmb", {"blend_step_rule": CAPPED,
                                                                               "blend_iterations": 4 * q})
    rows["CMB: all three, line search, cond_tau 0.4"] = (ALL, "cmb", {"blend_step_rule": LineSearch(),
                                                                       "blend_cond_tau": 0.4})
    pair = " + ".join(SHORT[m] for m in PAIR)
    rows[f"CMB: {pair}, line search"] = (PAIR, "cmb", {"blend_step_rule": LineSearch()})
    return rows


def region_psnr(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PSNR (data range 2) over the completed pixels only, per image."""
    m = mask.expand_as(out)
    mse = ((out - ref) ** 2 * m).flatten(1).sum(1) / m.flatten(1).sum(1)
    return 10 * torch.log10(4 / mse)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--blend-steps", type=int, default=30, help="P")
    parser.add_argument("--blend-iterations", type=int, default=5, help="Q")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--adapters", default=None, help="adapter folder (default assets/modalities)")
    parser.add_argument("--out", default="assets")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    per_class, steps, p, q = ((1, 10, 6, 2) if args.quick else
                              (args.per_class, args.steps, args.blend_steps, args.blend_iterations))

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
    for name, (mods, mode, extra) in methods(q).items():
        outs, removed, share, floor, start = [], [], [], [], time.perf_counter()
        for lo in range(0, len(x), args.batch_size):
            sl = slice(lo, lo + args.batch_size)
            kwargs = {"blend_iterations": q, **extra}
            outs.append(pipe(x[sl], mask, control_images={m: controls[m][sl] for m in mods}, blend=mode,
                             num_inference_steps=steps, blend_steps=p, generator=torch.Generator().manual_seed(lo),
                             output_type="pt", **kwargs).images * 2 - 1)
            if mode == "cmb":  # per blended step, this batch
                removed.append(pipe.blend_loss_removed)
                share.append(pipe.blend_residual_losses / pipe.blend_losses[:, 0])
                floor.append(pipe.blend_floor_losses / pipe.blend_losses[:, 0])
        out = torch.cat(outs)
        loss = tuple(torch.stack(v).mean(0) for v in (removed, share, floor)) if removed else None
        results[name] = (out, (time.perf_counter() - start) / len(x), loss)
        print(f"{name}: {results[name][1]:.3f} s/img", flush=True)

    psnr = {name: region_psnr(out, x, mask) for name, (out, _, _) in results.items()}
    lines = [
        f"{len(x)} held-out digits ({per_class} per class), bottom half masked, no class given; DDIM {steps} steps; "
        f"blending P = {p}, Q = {q} unless the row says otherwise; torch threads {torch.get_num_threads()}. "
        f"PSNR over the completed half, mean ± std over images; Δ: paired difference to \"{BASELINE}\" [95% CI] "
        "and the smallest difference these images detect (80% power). Loss removed: the fraction of the blending loss "
        "the Q gradient steps removed, mean over the blended steps (first step / last step); adapter share: the loss "
        "the adapters' injected features make at the branches' own latents over the loss at the main latent; floor: "
        "the "
        "loss at the modalities' mean features (its minimum over any features) over the loss at the main latent; "
        "both mean over the blended steps.",
        "",
        "| method | accuracy | FD | PSNR (completed half) | Δ PSNR vs sum [95% CI] (detectable) | s / image | "
        "loss removed / blended step | adapter share of the loss | floor share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (out, seconds, loss) in results.items():
        mean, std = mean_std(psnr[name].tolist())
        if name == BASELINE:
            delta = "(baseline)"
        else:
            diffs = (psnr[name] - psnr[BASELINE]).tolist()
            d, lo, hi = paired_interval(diffs)
            detectable = detectable_difference(mean_std(diffs)[1], len(diffs))
            delta = f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}] ({detectable:.2f})"
        removed = share = low = "-"
        if loss is not None:
            r, a, f = loss
            removed = f"{r.mean():.1%} ({r[0]:.1%} / {r[-1]:.1%})"
            share, low = f"{a.mean():.1%}", f"{f.mean():.1%}"
        lines.append(f"| {name} | {class_accuracy(out, y):.1%} | {fd(out, images):.1f} | {mean:.2f} ± {std:.2f} | "
                     f"{delta} | {seconds:.3f} | {removed} | {share} | {low} |")
    # columns: one digit per class; rows: the masked input, the modalities, the truth, then each method
    cols = torch.arange(10) * per_class
    masked = x[cols] * (1 - mask) - mask
    rows = [masked] + [controls[m][cols] for m in ALL] + [x[cols]] + [out[cols] for out, _, _ in results.values()]
    grid = image_grid(to_pil(torch.cat(rows)), ncols=10, tile=32)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, (_, _, loss) in results.items():
        if loss is not None:
            left.plot(range(1, p + 1), 100 * loss[0], label=name.removeprefix("CMB: "))
            line, = right.plot(range(1, p + 1), 100 * loss[1])
            right.plot(range(1, p + 1), 100 * loss[2], linestyle=":", color=line.get_color())
    left.set(xlabel="blended step", ylabel="% of the blending loss removed", title="loss removed by the Q steps")
    right.set(xlabel="blended step", ylabel="% of the loss at the main latent",
              title="adapter share (solid) and floor (dotted)")
    left.legend(fontsize=7)
    figure.tight_layout()
    write_results(args.out, "bench_blend", args.quick, "\n".join(lines) + "\n", figure=figure,
                  images={"bench_blend_images": grid})


if __name__ == "__main__":
    main()
