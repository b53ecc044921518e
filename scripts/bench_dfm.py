"""Diffusion with forward models, measured: a 1-D Gaussian-process world with an exact posterior, and digits
learnt from crops only.

GP world (research note Sec. 3.5): signals of 32 points (RBF, length scale 4; "bimodal" adds +-2 x a bump on
the last 10 points with a fair random sign), seen through windows of 12; 20,000 signals x 5 windows as the
only data, each step drawing which of a signal's windows are context and target at random (as the official loaders
pick frames). Three SignalMLP generators trained the same way: DFM, the deterministic regressor (same multi-view
loss, no noisy target) and diffusion on observations (loss on the target view only). Given a window at the
start, 500 samples per context for 8 contexts, against the closed-form posterior: coverage (coordinates a
method produces), mean RMSE / prior std, per-coordinate std ratio off the context window (sample / exact,
median), std on the context window / prior std, and for the bimodal world the share of samples in the + mode
(exact: 0.5). DFM samples the target windows 12-23 and 20-31 in turn; "1 view" samples only the first.

Digits: a UNet generator trained on 10x10 crops of the 4,500 training digits (4 crops each; no loss term
ever sees a whole image), then whole digits sampled given the top-left crop of 100 held-out digits (10 per class): class
accuracy, FD against the held-out digits, seconds per image; against the regressor and against the default
model (trained on full images) completing the same crop by DPS. Writes assets/bench_dfm.md and .png.

    python scripts/bench_dfm.py                  # both halves, about an hour on 2 cores
    python scripts/bench_dfm.py --part gp        # one half: assets/bench_dfm_gp.md (about 40 minutes on one thread)
    python scripts/bench_dfm.py --part images    # the other: assets/bench_dfm_images.md and .png
    python scripts/bench_dfm.py --quick          # about a minute
"""

import argparse
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler

import diffkit
from diffkit import NoiseSchedule, make_timesteps
from diffkit.data import colored_digits
from diffkit.dfm import (
    CropView, GaussianProcessSignals, SignalMLP, WindowView, image_generator, observe, regress_signal, sample_signal,
    train_dfm,
)
from diffkit.images import image_grid, save_png_atomic, to_pil, write_text_atomic
from diffkit.inverse import Inpainting, dps
from diffkit.metrics import class_accuracy, fd


LENGTH, WIDTH = 32, 12


def dfm_scheduler() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                         clip_sample=False)


def train_all(make_model, forward_model, schedule, observations, views, steps, batch_size, max_context):
    return {
        mode: train_dfm(make_model(), forward_model, schedule, observations, views, steps=steps,
                        batch_size=batch_size, max_context=max_context, mode=mode, seed=0)[0]
        for mode in ("dfm", "regression", "observation")
    }


def gp_rows(world: str, bump: float, steps: int, signals: int, samples: int, contexts: int, width: int = 256,
            depth: int = 3) -> list[str]:
    gp = GaussianProcessSignals(LENGTH, 4.0, bump=bump, bump_width=10)
    fm = WindowView(LENGTH, WIDTH)
    scheduler = dfm_scheduler()
    schedule = NoiseSchedule.from_config(scheduler.config)
    g = torch.Generator().manual_seed(0)
    observations, views = observe(fm, gp.sample(signals, g)[0], 5, g)
    models = train_all(lambda: SignalMLP(1, LENGTH, width, depth), fm, schedule, observations, views, steps, 256, 2)
    timesteps = make_timesteps(schedule, "ddim", 50, scheduler.config)
    context_view = torch.zeros(samples, dtype=torch.long)
    targets = [torch.full((samples,), 10), torch.full((samples,), 20)]
    prior_std = gp.prior_std()
    stats = {}
    for c, truth in enumerate(gp.sample(contexts, torch.Generator().manual_seed(100))[0]):
        context = [(fm(truth[None].expand(samples, -1, -1), context_view), context_view)]
        weights, means, cov = gp.posterior(truth[0, :WIDTH], torch.arange(WIDTH))
        mean = (weights[:, None] * means).sum(0)
        std = (cov.diagonal() + (weights[:, None] * (means - mean) ** 2).sum(0)).sqrt()
        rng = torch.Generator().manual_seed(c)
        with torch.no_grad():
            regressed = regress_signal(models["regression"], fm, schedule, context, targets[0])[:, 0].double()
            exact_sign = torch.multinomial(weights.float(), samples, replacement=True, generator=rng)
            exact = means[exact_sign] + torch.randn(samples, LENGTH, generator=rng, dtype=torch.float64) @ torch.linalg.cholesky(
                cov + 1e-9 * torch.eye(LENGTH)).T
            outputs = {
                "exact posterior": (exact, torch.ones(LENGTH, dtype=torch.bool)),
                "DFM": (sample_signal(models["dfm"], fm, schedule, context, targets, timesteps, generator=rng)[0][:, 0],
                        torch.ones(LENGTH, dtype=torch.bool)),
                "DFM, 1 view": (sample_signal(models["dfm"], fm, schedule, context, targets[:1], timesteps, generator=rng)[0][:, 0],
                                torch.ones(LENGTH, dtype=torch.bool)),
                "regressor": (regressed, torch.ones(LENGTH, dtype=torch.bool)),
            }
            # diffusion on observations: the signal is what its observations show, context and one sampled window
            _, sampled = sample_signal(models["observation"], fm, schedule, context, targets[:1], timesteps, generator=rng)
            canvas, mask = fm.lift(sampled[0], targets[0])
            canvas[:, :, :WIDTH], mask[:, :, :WIDTH] = context[0][0], 1
            outputs["observation diffusion"] = (canvas[:, 0], mask[0, 0] > 0)
        off = torch.arange(LENGTH) >= WIDTH
        for name, (s, covered) in outputs.items():
            s = s.double()
            row = stats.setdefault(name, {"coverage": [], "rmse": [], "to_regressor": [], "ratio": [], "on": [], "plus": []})
            row["coverage"].append(covered.double().mean())
            row["rmse"].append(((s.mean(0) - mean)[covered] ** 2).mean().sqrt() / prior_std.mean())
            # the regressor's minimiser is the posterior mean: the distance to it is the method's error beyond the
            # regressor's (for the exact posterior row, the regressor's own error)
            row["to_regressor"].append(((s.mean(0) - regressed[0])[covered] ** 2).mean().sqrt() / prior_std.mean())
            row["ratio"].append((s.std(0) / std)[off & covered].median())
            row["on"].append((s.std(0)[:WIDTH] / prior_std[:WIDTH]).mean())
            if covered[gp.bump != 0].all():  # the sign shows only where the bump is
                row["plus"].append((((s - (means[0] + means[1]) / 2) @ gp.bump) > 0).double().mean())
    rows = []
    for name, row in stats.items():
        mean_of = {k: torch.stack(v).mean().item() for k, v in row.items() if v}
        plus = f"{mean_of['plus']:.2f}" if bump and "plus" in mean_of else "-"
        rows.append(f"| {world} | {name} | {mean_of['coverage']:.0%} | {mean_of['rmse']:.3f} | {mean_of['to_regressor']:.3f} | "
                    f"{mean_of['ratio']:.2f} | {mean_of['on']:.3f} | {plus} |")
    return rows


def image_rows(steps: int, images: int, quick: bool):
    fm = CropView(16, 10, 3)
    scheduler = dfm_scheduler()
    schedule = NoiseSchedule.from_config(scheduler.config)
    train, _ = colored_digits("train")
    g = torch.Generator().manual_seed(0)
    observations, views = observe(fm, train, 4, g)
    channels = (16, 32) if quick else (32, 64, 64)
    models = {
        mode: train_dfm(image_generator(16, 3, channels), fm, schedule, observations, views, steps=steps,
                        batch_size=64, lr=5e-4, max_context=2, mode=mode, seed=0)[0]
        for mode in ("dfm", "regression")
    }
    test, labels = colored_digits("test")
    # the same number of each class (the held-out set is ordered by class)
    pick = torch.cat([torch.nonzero(labels == c)[: max(1, images // 10), 0] for c in range(10)])[:images]
    x, labels, images = test[pick], labels[pick], len(pick)
    view = torch.zeros(images, 2, dtype=torch.long)
    context = [(fm(x, view), view)]
    timesteps = make_timesteps(schedule, "ddim", 10 if quick else 50, scheduler.config)
    results = {}
    with torch.no_grad():
        start = time.perf_counter()
        signal, _ = sample_signal(models["dfm"], fm, schedule, context, fm.covering_views(images)[1:], timesteps,
                                  generator=torch.Generator().manual_seed(0))
        results["DFM (crops only)"] = (signal, time.perf_counter() - start)
        start = time.perf_counter()
        signal = regress_signal(models["regression"], fm, schedule, context, view)
        results["regressor (crops only)"] = (signal, time.perf_counter() - start)
        pipe = diffkit.load_pipeline()
        denoiser = diffkit.Denoiser.from_pipeline_components(pipe.unet, pipe.scheduler)
        mask = fm.lift(context[0][0], view)[1][:1]
        start = time.perf_counter()
        with torch.enable_grad():
            signal = dps(denoiser, x * mask, Inpainting(mask, sigma_y=0.0), num_inference_steps=50 if quick else 250,
                         cond={"class_labels": torch.full((images,), pipe.num_classes)},
                         generator=torch.Generator().manual_seed(0))
        results["default model + DPS (full images)"] = (signal, time.perf_counter() - start)
    rows = []
    for name, (out, seconds) in results.items():
        out = out.clamp(-1, 1)
        rows.append(f"| {name} | {class_accuracy(out, labels):.1%} | {fd(out, test):.1f} | {seconds / images:.3f} |")
    show = torch.arange(0, images, max(1, images // 10))[:10]  # one digit per class (x is ordered by class)
    grid = [x[show], fm.lift(context[0][0], view)[0][show]] + [out.clamp(-1, 1)[show] for out, _ in results.values()]
    return rows, image_grid(to_pil(torch.cat(grid)), ncols=len(show), tile=32)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gp-steps", type=int, default=20000)
    parser.add_argument("--gp-width", type=int, default=256, help="SignalMLP width of the GP world's generators")
    parser.add_argument("--gp-depth", type=int, default=3, help="SignalMLP depth (linear layers) of the GP world's generators")
    parser.add_argument("--image-steps", type=int, default=3000)
    parser.add_argument("--part", choices=["all", "gp", "images"], default="all",
                        help="run one half alone (writes bench_dfm_gp.md or bench_dfm_images.md and .png)")
    parser.add_argument("--out", default="assets")
    args = parser.parse_args()
    torch.manual_seed(0)
    gp_steps, image_steps = (300, 30) if args.quick else (args.gp_steps, args.image_steps)
    signals, samples, contexts, images = (2000, 100, 2, 20) if args.quick else (20000, 500, 8, 100)

    lines = []
    if args.part in ("all", "gp"):
        lines += [
            f"GP world: {contexts} contexts x {samples} samples, SignalMLP generators (width {args.gp_width}, depth "
            f"{args.gp_depth}) trained {gp_steps} steps; exact posterior sampled as the reference (its own Monte Carlo "
            "error). RMSE to regressor: from each method's sample mean to the regressor's output (whose minimiser is the "
            "posterior mean); in the exact posterior's row, the regressor's own error.",
            "",
            "| world | method | coverage | mean RMSE / prior std | RMSE to regressor / prior std | std ratio off context | "
            "std on context / prior | + mode share |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for world, bump in (("GP", 0.0), ("bimodal", 2.0)):
            lines += gp_rows(world, bump, gp_steps, signals, samples, contexts, args.gp_width, args.gp_depth)
            print("\n".join(lines), flush=True)
    figure = None
    if args.part in ("all", "images"):
        rows, figure = image_rows(image_steps, images, args.quick)
        lines += [
            "",
            f"Digits: {images} held-out digits completed from their top-left 10x10 crop; generators trained "
            f"{image_steps} steps on crops.",
            "",
            "| method | accuracy | FD | s / image |",
            "|---|---|---|---|",
            *rows,
        ]
    table = "\n".join(lines).strip() + "\n"
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "bench_dfm" + {"all": "", "gp": "_gp", "images": "_images"}[args.part] + ("_quick" if args.quick else "")
    write_text_atomic(out / f"{name}.md", table)
    if figure is not None:  # rows: clean digits, the context crop, DFM, regressor, default model + DPS
        save_png_atomic(figure, out / f"{name}.png")


if __name__ == "__main__":
    main()
