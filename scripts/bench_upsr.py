"""Super-resolution x2 on coloured digits (8x8 -> 16x16): UPSR vs ResShift with the same UNet, steps and seeds.

Data: the MNIST-5k training digits (fresh random colours every batch) for training, the 500 held-out digits (colours
of seed 0) for testing; the low-resolution image is the antialiased bicubic downsampling (``sr_bicubic:2``), no
noise. For each of 3 seeds: g (``SRNet``, MSE) is trained, then two x0-predictors of the same architecture from the
same initial weights, data order and noise: ResShift (w_u = 1) and UPSR (w_u from g, a = 0.1, b = 0.4); both see
[x_t, g(y0), y], so the only difference is the noise weighting. Official settings otherwise (5 steps, kappa 2.5,
exponential schedule p = 0.2, etas_end 0.99, AdamW, EMA 0.999; MSE loss -- the LPIPS term needs VGG weights that are
not available offline). Sampling: the same noise for both, per seed.

Metrics against the ground truth: PSNR, SSIM, FD (digits-classifier features, against the 500 ground-truth images),
class accuracy, and PSNR over the low-u pixels (u <= 0.5, flat regions, where UPSR's mechanism predicts its gain) and
the high-u pixels. Reference rows: bicubic, g alone, RED-Diff and DPS with the default model's unconditional prior on
the same operator (one run, noise seed 0). Writes assets/bench_upsr.md and .png.

    python scripts/bench_upsr.py --device cuda --jobs 3        # the full run
    python scripts/bench_upsr.py --quick                       # tiny budget, CPU
"""

import argparse
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffkit.data import colored_digits, colorize, gray_digits
from diffkit.harness.report import detectable_difference, mean_std, paired_interval
from diffkit.bench import write_results
from diffkit.images import image_grid, to_pil, write_text_atomic
from diffkit.inverse import dps, make_operator, red_diff
from diffkit.metrics import class_accuracy, fd, psnr, ssim
from diffkit.resshift import (ResShiftDenoiser, ResShiftSchedule, ResShiftScheduler, SRNet, bicubic_upsample, resshift_unet,
                              sample_resshift, train_resshift, train_sr_net, uncertainty_weight, upsr_inputs)


FACTOR, A, B = 2, 0.1, 0.4
ARMS = {"ResShift": False, "UPSR": True}  # name -> uncertainty-weighted noise


def budget(args) -> dict:
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([0] if args.quick else [0, 1, 2])
    if args.quick:
        return {"g_steps": 30, "steps": 30, "batch": 16, "width": 8, "seeds": seeds, "test": 32, "ref_steps": 10}
    return {"g_steps": args.g_steps, "steps": args.steps, "batch": args.batch, "width": args.width, "seeds": seeds,
            "test": 500, "ref_steps": 250}


def train_seed(seed: int, cfg: dict, device: str, threads: int) -> dict:
    """g, then ResShift and UPSR from the same initial weights, data order and noise; state dicts and losses."""
    torch.set_num_threads(threads)
    degrade = make_operator(f"sr_bicubic:{FACTOR}")
    ink, _ = gray_digits("train")

    def data_for(run_seed):
        generator = torch.Generator().manual_seed(run_seed)

        def data(step):
            idx = torch.randint(0, len(ink), (cfg["batch"],), generator=generator)
            x0 = colorize(ink[idx], generator).to(device)
            return x0, degrade.forward(x0)

        return data

    start = time.perf_counter()
    torch.manual_seed(seed)
    g = SRNet(factor=FACTOR).to(device)
    g_losses = train_sr_net(g, data_for(10_000 + seed), cfg["g_steps"])
    out = {"g": g.state_dict(), "losses": {"g": g_losses[-50:]}, "seconds": {"g": time.perf_counter() - start}}
    schedule = ResShiftSchedule.exponential()
    for arm, weighted in ARMS.items():
        start = time.perf_counter()
        torch.manual_seed(seed)  # the same initial weights for both arms
        unet = resshift_unet(width=cfg["width"]).to(device)
        ema, losses = train_resshift(ResShiftDenoiser(unet, schedule), g, data_for(20_000 + seed), cfg["steps"],
                                     factor=FACTOR, weighted=weighted, a=A, b=B,
                                     generator=torch.Generator().manual_seed(30_000 + seed))
        out[arm] = ema.state_dict()
        out["losses"][arm] = losses[-50:]
        out["seconds"][arm] = time.perf_counter() - start
    return {k: ({n: t.cpu() for n, t in v.items()} if k in ("g", *ARMS) else v) for k, v in out.items()}


def pixel_psnr(estimate, truth, mask):
    """Per-image PSNR over the masked channel values (data range 2); NaN where an image has none."""
    err = ((estimate - truth).square() * mask).flatten(1).sum(1)
    count = mask.flatten(1).sum(1)
    return torch.where(count > 0, 10 * torch.log10(4 / (err / count.clamp(min=1))), torch.full_like(err, math.nan))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1, help="seeds trained in parallel processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--steps", type=int, default=6000, help="x0-predictor training steps")
    parser.add_argument("--g-steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=24, help="UNet width (block channels width, 2 width)")
    parser.add_argument("--seeds", default=None, help="comma-separated training seeds (default 0,1,2; quick: 0)")
    parser.add_argument("--models", default=None, help="folder to save (or reuse) the trained networks")
    parser.add_argument("--save-pipeline", default=None, help="write seed 0's UPSR as an UpscalePipeline folder")
    parser.add_argument("--out", default="assets")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg, device = budget(args), args.device

    # -- training (or reuse) --------------------------------------------------------------------------
    models = Path(args.models) if args.models else None
    trained, todo = {}, []
    for seed in cfg["seeds"]:
        path = models / f"seed{seed}.safetensors" if models else None
        if path is not None and path.is_file():
            tensors = load_file(path)
            info = json.loads(path.with_suffix(".json").read_text())
            trained[seed] = {**info, **{k: {n[len(k) + 1:]: t for n, t in tensors.items() if n.startswith(k + ".")}
                                        for k in ("g", *ARMS)}}
        else:
            todo.append(seed)
    start = time.perf_counter()
    if args.jobs > 1 and len(todo) > 1:
        import multiprocessing

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for seed, result in zip(todo, pool.map(train_seed, todo, [cfg] * len(todo), [device] * len(todo),
                                                   [args.threads] * len(todo))):
                trained[seed] = result
    else:
        for seed in todo:
            trained[seed] = train_seed(seed, cfg, device, args.threads)
    train_minutes = (time.perf_counter() - start) / 60
    if models is not None:
        models.mkdir(parents=True, exist_ok=True)
        for seed in todo:
            r = trained[seed]
            save_file({f"{k}.{n}": t.contiguous() for k in ("g", *ARMS) for n, t in r[k].items()},
                      models / f"seed{seed}.safetensors")
            write_text_atomic(models / f"seed{seed}.json", json.dumps({"losses": r["losses"], "seconds": r["seconds"]}))

    # -- evaluation ------------------------------------------------------------------------------------
    x, labels = colored_digits("test")
    x, labels = x[: cfg["test"]].to(device), labels[: cfg["test"]]
    degrade = make_operator(f"sr_bicubic:{FACTOR}")
    y0 = degrade.forward(x)
    schedule = ResShiftSchedule.exponential()
    outputs = {"bicubic": {0: bicubic_upsample(y0, FACTOR)}}  # method -> seed -> images
    weights = {}
    for seed in cfg["seeds"]:
        g = SRNet(factor=FACTOR).to(device)
        g.load_state_dict(trained[seed]["g"])
        y, g_y = upsr_inputs(g.eval(), y0, FACTOR)
        weights[seed] = uncertainty_weight(g_y, y, A, B)
        outputs.setdefault("g alone", {})[seed] = g_y
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(40_000 + seed)).to(device)
        for arm, weighted in ARMS.items():
            unet = resshift_unet(width=cfg["width"]).to(device)
            unet.load_state_dict(trained[seed][arm])
            weight = weights[seed] if weighted else None
            with torch.no_grad():
                x_T = schedule.prior_sample(y, noise, weight)
                outputs.setdefault(arm, {})[seed] = sample_resshift(ResShiftDenoiser(unet.eval(), schedule), x_T, y,
                                                                    cond=[g_y, y])
            if arm == "UPSR" and seed == 0 and args.save_pipeline:
                from diffkit.pipelines import UpscalePipeline

                UpscalePipeline(unet=unet.cpu(), sr_net=g.cpu(), scheduler=ResShiftScheduler(a=A, b=B)).save_pretrained(
                    args.save_pipeline)
                unet.to(device), g.to(device)

    import diffkit

    prior = diffkit.load_pipeline()
    denoiser = diffkit.Denoiser.from_pipeline_components(prior.unet.to(device), prior.scheduler)
    null = {"class_labels": torch.full((len(x),), prior.num_classes, device=device)}
    reference_seconds = {}
    for name, fn, kwargs in (("RED-Diff", red_diff, {"num_steps": cfg["ref_steps"]}),
                             ("DPS", dps, {"num_inference_steps": cfg["ref_steps"]})):
        start = time.perf_counter()
        with torch.no_grad():
            out = fn(denoiser, y0, degrade, cond=null, generator=torch.Generator().manual_seed(0), **kwargs)
        outputs[name] = {0: out}
        reference_seconds[name] = (time.perf_counter() - start) / len(x)

    # -- tables ----------------------------------------------------------------------------------------
    low = {s: (w <= B + (1 - B) * 0.5).float() for s, w in weights.items()}  # u <= 0.5
    x_cpu = x.cpu()

    def metrics(images, seed):
        images = images.clamp(-1, 1).cpu()
        mask = low.get(seed, low[0]).cpu()
        return {"psnr": psnr(images, x_cpu), "ssim": ssim(images, x_cpu), "low": pixel_psnr(images, x_cpu, mask),
                "high": pixel_psnr(images, x_cpu, 1 - mask), "fd": fd(images, x_cpu),
                "acc": class_accuracy(images, labels)}

    scored = {m: {s: metrics(im, s) for s, im in per_seed.items()} for m, per_seed in outputs.items()}
    low_share = torch.stack([m.mean() for m in low.values()]).mean().item()
    n = len(x)
    lines = [
        f"x{FACTOR} on {n} held-out coloured digits ({16 // FACTOR}x{16 // FACTOR} -> 16x16), {len(cfg['seeds'])} "
        f"seed(s) of training and sampling noise; x0-predictor: UNet width {cfg['width']}, {cfg['steps']} steps of "
        f"batch {cfg['batch']}; g: {cfg['g_steps']} steps; 5 sampling steps; device {device}; training took "
        f"{train_minutes:.1f} min ({args.jobs} process(es), {args.threads} thread(s) each). low-u / high-u: PSNR over "
        f"the pixels with u <= 0.5 (flat; {low_share:.1%} of all) / u > 0.5. Mean +- std over seeds; reference rows: "
        f"RED-Diff and DPS {cfg['ref_steps']} steps with the default model's unconditional prior, noise seed 0.",
        "",
        "| method | PSNR | SSIM | PSNR low-u | PSNR high-u | FD | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(method, key):
        values = [(r[key].nanmean().item() if torch.is_tensor(r[key]) else r[key]) for r in scored[method].values()]
        scale, fmt = (100, "{:.1f}%") if key == "acc" else (1, "{:.3f}" if key == "ssim" else "{:.2f}")
        if len(values) == 1:
            return fmt.format(values[0] * scale)
        mean, std = mean_std(values)
        return f"{fmt.format(mean * scale)} +- {fmt.format(std * scale)}"

    for method in ("bicubic", "g alone", *ARMS, "RED-Diff", "DPS"):
        lines.append(f"| {method} | " + " | ".join(cell(method, k) for k in ("psnr", "ssim", "low", "high", "fd", "acc"))
                     + " |")
    lines += ["", f"UPSR - ResShift, paired by (image, seed) over {n * len(cfg['seeds'])} images: mean [95% t-interval]; "
              "MDE = the difference detectable with 80% power at 5%.", "",
              "| metric | difference | MDE |", "|---|---|---|"]
    for key, name in (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("low", "PSNR low-u (dB)"), ("high", "PSNR high-u (dB)")):
        diffs = torch.cat([scored["UPSR"][s][key] - scored["ResShift"][s][key] for s in cfg["seeds"]])
        diffs = diffs[torch.isfinite(diffs)].tolist()
        mean, lo, hi = paired_interval(diffs)
        detectable = detectable_difference(mean_std(diffs)[1], len(diffs))
        lines.append(f"| {name} | {mean:+.3f} [{lo:+.3f}, {hi:+.3f}] | {detectable:.3f} |")
    seconds = {arm: sum(trained[s]["seconds"][arm] for s in cfg["seeds"]) / len(cfg["seeds"]) for arm in ("g", *ARMS)}
    lines += ["", "Training minutes per seed: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in seconds.items())
              + "; reference rows s / image: " + ", ".join(f"{k} {v:.3f}" for k, v in reference_seconds.items()) + "."]

    write_results(args.out, "bench_upsr", args.quick, "\n".join(lines) + "\n", figure(x_cpu, outputs, weights[0]))


def figure(x, outputs, weight):
    """Rows: ground truth, each method on the first 8 test digits (seed 0), and UPSR's u (white: u = 1, w_u = 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    columns = min(8, len(x))
    rows = [("ground truth", x[:columns])] + [(m, per_seed[0][:columns].cpu()) for m, per_seed in outputs.items()]
    u = (weight[:columns].cpu() - B) / (1 - B)
    rows.append(("UPSR u", u * 2 - 1))
    grid = image_grid(to_pil(torch.cat([r[1] for r in rows]).clamp(-1, 1)), ncols=columns, tile=32)
    fig, ax = plt.subplots(figsize=(0.6 * columns + 1.6, 0.6 * len(rows)))
    ax.imshow(np.asarray(grid))
    ax.set_yticks([32 * (i + 0.5) for i in range(len(rows))], [r[0] for r in rows], fontsize=7)
    ax.set_xticks([])
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
