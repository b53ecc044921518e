"""PTQ4DM on the embedded default model: FP32 vs W8A8 and W4A8, each calibrated by NDTC, uniform and naive.

Calibration: n network inputs from the FP32 pipeline's own DDIM run (50 steps, CFG 3, random classes);
ranges by PTQ4DM's Lp search (p = 2.4, 100 candidates). Evaluation: the same seeds and labels for every model,
deterministic DDIM (eta = 0), CFG 3. Columns:

- FD to the held-out digits and class accuracy (the shipped digits classifier);
- paired drift: PSNR of each model's images against FP32's from the same noise;
- SQNR (dB) of the network output (the default model predicts v, not epsilon)
  against FP32's on FP32's own trajectory, averaged over the steps (per step in the figure);
- serialized UNet bytes (safetensors);
- CPU latency per image: median over interleaved runs of one batch of 20 images, same threads for all.

Rows named "simulated" run integer weights and ranges on float kernels (what the quality columns measure
without backend effects). Two more rows run compiled by torch.compile (inductor, freezing): FP32, and W8A8
NDTC on oneDNN int8 kernels (``QuantizedModel.use_int8_kernels``; 7-bit inputs on CPUs without VNNI). The
quick mode leaves the compiled rows out (compiling takes minutes). Writes assets/bench_quant.md and .png.

    python scripts/bench_quant.py            # 300 images per model, ~25 minutes on 2 cores
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
from diffkit.quant import build_calibration_set, calibration_run, quantize_model
from diffkit.quant.calibration import record_network_inputs


BATCH = 20  # images per pipeline call everywhere (40 network rows with CFG): compiled models see one shape


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
        pred = unet(call["sample"], call["timestep"], **call["cond"], return_dict=False)[0]
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
    policies = ("ndtc", "uniform", "naive")
    unets, quantize_seconds, ndtc = {"FP32": fp32}, {}, None
    # one FP32 run, three selections from it: the policies differ only in which inputs they pick
    recorded = calibration_run(pipe, args.n, num_inference_steps=args.calib_steps, generator=torch.Generator().manual_seed(args.seed))
    for policy in policies:
        calib = build_calibration_set(pipe, args.n, policy, recorded=recorded, generator=torch.Generator().manual_seed(args.seed))
        ndtc = calib if policy == "ndtc" else ndtc
        for bits in ("w8a8", "w4a8"):
            name = f"{bits.upper()} {policy} (simulated)"
            start = time.perf_counter()
            unets[name] = quantize_model(fp32, calib, bits, "lp", samples_per_layer=samples_per_layer,
                                         generator=torch.Generator().manual_seed(args.seed))
            quantize_seconds[name] = time.perf_counter() - start

    if not args.quick:  # the same weights and ranges on real int8 kernels, against FP32 compiled the same way
        unets["FP32 (compiled)"] = torch.compile(fp32)
        int8 = quantize_model(fp32, ndtc, "w8a8", "lp", samples_per_layer=samples_per_layer,
                              generator=torch.Generator().manual_seed(args.seed))
        unets["W8A8 ndtc (int8 kernels)"] = int8.use_int8_kernels()

    # FP32's own trajectory for the per-step SQNR: one batch, every step
    pipe.register_modules(unet=fp32)
    calls = record_network_inputs(pipe, class_labels=labels[:BATCH].tolist(), num_inference_steps=args.steps, solver="ddim",
                                  output_type="latent", generator=torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        reference = [(call, fp32(call["sample"], call["timestep"], **call["cond"], return_dict=False)[0]) for call in calls]

    test = colored_digits("test", seed=1)[0]
    test_features = classifier_features(test)
    rows, sqnr, grids, images = [], {}, {}, {}
    for name, unet in unets.items():
        images[name] = sample(pipe, unet, labels, args.steps, args.seed)
        if name not in ("FP32", "FP32 (compiled)"):
            sqnr[name] = sqnr_per_step(reference, unet)
    latency = latency_per_image(pipe, unets, args.steps, BATCH, args.latency_runs)
    pipe.register_modules(unet=fp32)
    fp_bytes = serialized_bytes(fp32)
    for name, unet in unets.items():
        fd = frechet_distance(classifier_features(images[name]), test_features)
        drift = "-" if name == "FP32" else f"{psnr(images[name], images['FP32']).mean().item():.2f}"
        mean_sqnr = f"{statistics.mean(sqnr[name]):.1f}" if name in sqnr else "-"
        size = serialized_bytes(unet if name != "FP32 (compiled)" else fp32)
        rows.append(f"| {name} | {fd:.2f} | {class_accuracy(images[name], labels):.1%} | {drift} | {mean_sqnr} | "
                    f"{size / 1e6:.2f} MB ({size / fp_bytes:.0%}) | {latency[name] * 1e3:.1f} |")
        grids[name] = image_grid(to_pil(images[name][:20]), ncols=10, tile=16)

    lines = [
        f"Default model, {len(labels)} images per model ({args.per_class} per class), DDIM {args.steps} steps (eta 0), "
        f"CFG 3, the same noise for every model. Calibration: n = {args.n} inputs from the FP32 model's DDIM-"
        f"{args.calib_steps} run; Lp (p = 2.4) ranges; first and last layers' weights at 8 bits; decoder shortcuts "
        f"split; {torch.get_num_threads()} threads.",
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
