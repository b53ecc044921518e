"""PTQ4DM on the embedded default model: FP32 vs W8A8 and W4A8, each calibrated by NDTC (as the paper describes it
and as its code pairs x and t), uniform (Q-Diffusion) and naive, with diffkit's pooled range search and with the
released code's symmetric search averaged over batches.

Calibration: n network inputs from one FP32 run of the pipeline (DDIM 50 steps, CFG 3, random classes, in
batches of 64 images), every policy selecting from the same trajectories; weight ranges by PTQ4DM's Lp search
(p = 2.4, 100 candidates). Input ranges: "pooled" (diffkit's default: one asymmetric Lp search per layer over
values pooled from the whole set, float inputs) or "symmetric EMA" (the released code's: per batch of 256, a
symmetric 1-D search with the layers already quantising, range averaged over batches with momentum 0.9).
4-bit weights are rounded to nearest after the range search: there is no AdaRound / BRECQ block reconstruction
(Q-Diffusion's W4 results rely on it), so W4A8 rows are a lower bound for the method. Evaluation: the same seeds
and labels for every model, deterministic DDIM (eta = 0), CFG 3. Columns:

- FD to the held-out digits and class accuracy (the shipped digits classifier);
- paired drift: PSNR of each model's images against FP32's from the same noise (mean +- 95% interval);
- SQNR (dB) of the network output (the default model predicts v, not epsilon)
  against FP32's on FP32's own trajectory, averaged over the steps (per step in the figure);
- serialized UNet bytes (safetensors);
- CPU latency per image: median over interleaved runs of one batch of 20 images, same threads for all (FP32,
  the NDTC rows and the compiled rows; the other simulated rows run the same operations).

Rows named "simulated" run integer weights and ranges on float kernels (what the quality columns measure
without backend effects). Two more rows run compiled by torch.compile (inductor, freezing): FP32, and W8A8
NDTC on oneDNN int8 kernels (``QuantizedModel.use_int8_kernels``; 7-bit inputs on CPUs without VNNI). The
quick mode leaves the compiled rows out (compiling takes minutes). Writes assets/bench_quant.md and .png.

    python scripts/bench_quant.py            # 300 images per model, about an hour on 2 cores
    python scripts/bench_quant.py --quick    # about a minute
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import diffkit
from diffkit.data import colored_digits
from diffkit.images import image_grid, save_figure_atomic, to_pil, write_text_atomic
from diffkit.metrics import class_accuracy, classifier_features, frechet_distance, psnr
from diffkit.quant import build_calibration_sets, quantize_model, record_network_inputs


BATCH = 20  # images per pipeline call everywhere (40 network rows with CFG): compiled models see one shape


def interval(values: torch.Tensor) -> str:
    """mean +- the half-width of its 95% t-interval."""
    from scipy import stats

    half = stats.t.ppf(0.975, len(values) - 1) * values.std().item() / len(values) ** 0.5
    return f"{values.mean().item():.2f} +- {half:.2f}"


def serialized_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())


def sample(pipe, unet, labels, steps, seed):
    pipe.register_modules(unet=unet)
    images = []
    generator = torch.Generator().manual_seed(seed)
    for chunk in labels.split(BATCH):  # one batch shape, so compiled models compile once
        images.append(pipe(class_labels=chunk.tolist(), num_inference_steps=steps, solver="ddim", generator=generator,
                           output_type="latent").images.clamp(-1, 1))
    return torch.cat(images)


@torch.no_grad()
def sqnr_per_step(reference_calls, unet) -> list[float]:
    """10 log10(|out_fp|^2 / |out_q - out_fp|^2) of the network output at every step of FP32's recorded trajectory
    (the default model predicts v, so this is v's SQNR, not epsilon's)."""
    out = []
    for call, reference in reference_calls:
        pred = unet(**call, return_dict=False)[0]
        out.append(10 * torch.log10(reference.pow(2).sum() / (pred - reference).pow(2).sum()).item())
    return out


def latency_per_image(pipe, unets: dict, steps: int, batch: int, runs: int) -> dict:
    """Median seconds per image over ``runs`` interleaved rounds (every model once per round, after a warm-up)."""
    labels = [i % 10 for i in range(batch)]
    times = {name: [] for name in unets}
    for round_ in range(runs + 1):
        for name, unet in unets.items():
            pipe.register_modules(unet=unet)
            start = time.perf_counter()
            pipe(class_labels=labels, num_inference_steps=steps, solver="ddim", output_type="latent",
                 generator=torch.Generator().manual_seed(0))
            if round_:  # the first round warms up
                times[name].append((time.perf_counter() - start) / batch)
    return {name: statistics.median(t) for name, t in times.items()}


def figure(sqnr: dict, grids: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(grids), figsize=(5 + 3 * len(grids), 4), gridspec_kw={"width_ratios": [1.6] + [1] * len(grids)})
    for name, values in sqnr.items():
        axes[0].plot(range(len(values)), values, label=name, ls="-" if name.startswith("W8") else "--")
    axes[0].set(xlabel="DDIM step (from noise)", ylabel="network-output SQNR vs FP32 (dB)", title="per-step SQNR")
    axes[0].legend(fontsize=7)
    for ax, (name, grid) in zip(axes[1:], grids.items()):
        ax.imshow(grid)
        ax.set(title=name, xticks=[], yticks=[])
    fig.tight_layout()
    save_figure_atomic(fig, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--n", type=int, default=1024, help="calibration set size")
    parser.add_argument("--calib-steps", type=int, default=50)
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps of the evaluation")
    parser.add_argument("--latency-runs", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="assets")
    args = parser.parse_args()
    if args.quick:
        args.per_class, args.n, args.calib_steps, args.steps, args.latency_runs = 2, 64, 10, 10, 2
    samples_per_layer = 2**12 if args.quick else 2**16
    torch.manual_seed(args.seed)

    pipe = diffkit.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    fp32 = pipe.unet
    labels = torch.arange(10).repeat(args.per_class)
    policies = {"ndtc": "ndtc", "ndtc_as_coded": "ndtc as coded", "uniform": "uniform", "naive": "naive"}
    # one FP32 run, every policy selecting from it
    sets = build_calibration_sets(pipe, args.n, tuple(policies), num_inference_steps=args.calib_steps, batch_size=64,
                                  generator=torch.Generator().manual_seed(args.seed))
    variants = [(policy, "pooled") for policy in policies] + [("ndtc", "symmetric_ema")]
    unets, quantize_seconds = {"FP32": fp32}, {}
    for policy, act in variants:
        for bits in ("w8a8", "w4a8"):
            name = f"{bits.upper()} {policies[policy]}{', symmetric EMA' if act == 'symmetric_ema' else ''} (simulated)"
            start = time.perf_counter()
            unets[name] = quantize_model(fp32, sets[policy], bits, "lp", act_calibration=act, samples_per_layer=samples_per_layer,
                                         generator=torch.Generator().manual_seed(args.seed))
            quantize_seconds[name] = time.perf_counter() - start

    if not args.quick:  # the same weights and ranges on real int8 kernels, against FP32 compiled the same way
        unets["FP32 (compiled)"] = torch.compile(fp32)
        int8 = quantize_model(fp32, sets["ndtc"], "w8a8", "lp", samples_per_layer=samples_per_layer,
                              generator=torch.Generator().manual_seed(args.seed))
        unets["W8A8 ndtc (int8 kernels)"] = int8.use_int8_kernels()

    # FP32's own trajectory for the per-step SQNR: one batch, every step
    pipe.register_modules(unet=fp32)
    calls = record_network_inputs(pipe, class_labels=labels[:BATCH].tolist(), num_inference_steps=args.steps, solver="ddim",
                                  output_type="latent", generator=torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        reference = [(call, fp32(**call, return_dict=False)[0]) for call in calls]

    test = colored_digits("test", seed=1)[0]
    test_features = classifier_features(test)
    rows, sqnr, grids, images = [], {}, {}, {}
    for name, unet in unets.items():
        images[name] = sample(pipe, unet, labels, args.steps, args.seed)
        if name not in ("FP32", "FP32 (compiled)"):
            sqnr[name] = sqnr_per_step(reference, unet)
    # latency of one row per kind of kernel: the other simulated rows run the same operations as the ndtc ones
    timed = [k for k in unets if k in ("FP32", "FP32 (compiled)", "W8A8 ndtc (int8 kernels)") or k.endswith("ndtc (simulated)")]
    latency = latency_per_image(pipe, {k: unets[k] for k in timed}, args.steps, BATCH, args.latency_runs)
    pipe.register_modules(unet=fp32)
    fp_bytes = serialized_bytes(fp32)
    for name, unet in unets.items():
        fd = frechet_distance(classifier_features(images[name]), test_features)
        drift = "-" if name == "FP32" else interval(psnr(images[name], images["FP32"]))
        mean_sqnr = f"{statistics.mean(sqnr[name]):.1f}" if name in sqnr else "-"
        size = serialized_bytes(unet if name != "FP32 (compiled)" else fp32)
        rows.append(f"| {name} | {fd:.2f} | {class_accuracy(images[name], labels):.1%} | {drift} | {mean_sqnr} | "
                    f"{size / 1e6:.2f} MB ({size / fp_bytes:.0%}) | {f'{latency[name] * 1e3:.1f}' if name in latency else '-'} |")
        grids[name] = image_grid(to_pil(images[name][:20]), ncols=10, tile=16)

    lines = [
        f"Default model, {len(labels)} images per model ({args.per_class} per class), DDIM {args.steps} steps (eta 0), "
        f"CFG 3, the same noise for every model. Calibration: n = {args.n} inputs from the FP32 model's DDIM-"
        f"{args.calib_steps} run (every policy from the same trajectories); Lp (p = 2.4) weight ranges; input ranges "
        f"pooled (default) or symmetric EMA (the released code's); first and last layers' weights at 8 bits; decoder "
        f"shortcuts split; {torch.get_num_threads()} threads. No AdaRound / BRECQ reconstruction: W4A8 rows are "
        f"round-to-nearest 4-bit weights.",
        "",
        "| model | FD | accuracy | PSNR vs FP32 | SQNR (dB) | UNet bytes | ms / image |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Quantisation time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in quantize_seconds.items()) + ".",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    write_text_atomic(out / f"bench_quant{suffix}.md", table)
    shown = {k: grids[k] for k in ("FP32", "W8A8 ndtc (simulated)", "W4A8 ndtc (simulated)", "W4A8 naive (simulated)")}
    figure(sqnr, shown, out / f"bench_quant{suffix}.png")


if __name__ == "__main__":
    main()
