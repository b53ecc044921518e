"""Solvers on the embedded default model: diffkit's loop side by side with diffusers' scheduler loop.

For each solver at 10, 25 and 50 steps, and DPM-Solver++ and Euler with Karras sigmas, both loops sample the
same classes from the same noise with CFG (scale 3) and report the Frechet distance (FD, digits-classifier
features) to the held-out digits, class accuracy and the max-abs difference between the two loops' outputs
(100 images) beside the float32 floor: how far diffusers' own output moves when each initial noise value moves by
one float32 ulp (where that floor is above 1e-4, as for Euler's linspace grid on this cosine-schedule model, no
float32 implementation can agree with diffusers more closely than rounding lets diffusers agree with itself),
and each loop's distance to diffkit's loop run in float64 (the exact arithmetic of the same grid), and time per
image: the best of 5 interleaved repeats on 25 images, since a single run on a
shared CPU varies by +-10%. diffkit walks the step grid ``solver_for`` builds from the same scheduler config.
Writes the table to assets/bench_solvers.md and a figure to assets/bench_solvers.png.

    python scripts/bench_solvers.py            # 100 images per cell: about 1.5 hours on one core (Euler alone took 20 minutes)
    python scripts/bench_solvers.py --quick    # the four solvers at 10 steps, default sigmas: ~1 minute
    python scripts/bench_solvers.py --solvers euler   # a subset: assets/bench_solvers_euler.md
"""

import argparse
import copy
import time

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler

import diffkit
from diffkit import metrics
from diffkit.data import colored_digits
from diffkit.guidance import CFG
from diffkit.bench import markdown_table, write_results
from diffkit.solvers import SOLVERS, solver_for


SCHEDULERS = {
    "ddim": DDIMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
}
GUIDANCE_SCALE = 3.0
SIGMAS = {"default": {}, "karras": {"use_karras_sigmas": True}}


def scheduler_config(pipe, solver: str, sigmas: str = "default") -> dict:
    config = {**pipe.scheduler.config, **SIGMAS[sigmas]}
    if solver == "ddim":
        # the default model's pixels are not clipped by its DPM-Solver config; DDIM's default would clip them
        config.update(timestep_spacing="trailing", clip_sample=False)
    return config


def diffusers_loop(pipe, solver, steps, noise, labels, sigmas="default"):
    """The loop a diffusers pipeline runs: scale_model_input, a batched CFG pass on the raw output, step()."""
    scheduler = SCHEDULERS[solver].from_config(scheduler_config(pipe, solver, sigmas))
    scheduler.set_timesteps(steps)
    null = torch.full_like(labels, pipe.num_classes)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        out_c, out_u = pipe.unet(torch.cat([inp, inp]), t, class_labels=torch.cat([labels, null])).sample.chunk(2)
        x = scheduler.step(out_u + GUIDANCE_SCALE * (out_c - out_u), t, x).prev_sample
    return x


def diffkit_loop(pipe, solver, steps, noise, labels, sigmas="default"):
    """diffkit's solver on the grid its diffusers counterpart walks for the same config (solver_for)."""
    config = scheduler_config(pipe, solver, sigmas)
    setup = solver_for(config, steps, class_name=SCHEDULERS[solver].__name__)
    denoiser = diffkit.Denoiser(pipe.unet, diffkit.NoiseSchedule.from_config(config), config["prediction_type"])
    null = torch.full_like(labels, pipe.num_classes)
    return setup.fn(
        denoiser, noise * setup.grid.init_noise_scale, setup.grid, cond={"class_labels": labels},
        uncond={"class_labels": null}, guidance=CFG(GUIDANCE_SCALE), **setup.options,
    )


def nudged(noise: torch.Tensor, seed: int) -> torch.Tensor:
    """Each value moved by one float32 ulp, up or down at random."""
    direction = torch.randn(noise.shape, generator=torch.Generator().manual_seed(seed)).sign()
    return torch.nextafter(noise, noise + direction)


def timed(fn, *args):
    """The output and the seconds taken, without autograd."""
    start = time.perf_counter()
    with torch.no_grad():
        out = fn(*args)
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 images, 10 steps, 2 timing repeats: about a minute")
    parser.add_argument("--images", type=int, default=100, help="images per cell (balanced over the 10 classes)")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats (the best counts)")
    parser.add_argument("--model", default=None, help="pipeline folder or Hub id (default: the embedded model)")
    parser.add_argument("--out", default="assets", help="folder for bench_solvers.md / .png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--solvers", nargs="+", choices=sorted(SOLVERS), default=None,
                        help="run these solvers only (the table is written as bench_solvers_<names>.md)")
    args = parser.parse_args()
    n_images, step_counts, repeats = (20, [10], 2) if args.quick else (args.images, [10, 25, 50], args.repeats)
    solvers = args.solvers or list(SOLVERS)
    cells = [(solver, "default", steps) for solver in solvers for steps in step_counts]
    if not args.quick:
        cells += [(solver, "karras", steps) for solver in ("dpmpp_2m", "euler") if solver in solvers for steps in step_counts]

    pipe = diffkit.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    pipe64 = copy.copy(pipe)  # the same weights in float64, for the exact-arithmetic reference
    pipe64.unet = copy.deepcopy(pipe.unet).double()
    real_feats = metrics.classifier_features(colored_digits("test", seed=1)[0])
    labels = torch.arange(n_images) % pipe.num_classes
    noise = torch.randn(n_images, 3, 16, 16, generator=torch.Generator().manual_seed(args.seed))

    rows = []
    for solver, sigmas, steps in cells:
        loops = {"diffusers": diffusers_loop, "diffkit": diffkit_loop}
        results, failed = {}, {}
        for name, fn in loops.items():
            try:
                results[name] = timed(fn, pipe, solver, steps, noise, labels, sigmas)[0]
            except (IndexError, ValueError, RuntimeError) as err:  # a loop that cannot run this cell says so
                failed[name] = f"{name} fails: {type(err).__name__}: {err}"
        loops = {name: fn for name, fn in loops.items() if name in results}
        row = {"solver": solver, "sigmas": sigmas, "steps": steps}
        diff = None if failed else (results["diffkit"] - results["diffusers"]).abs().max().item()
        row["max |diffkit - diffusers|"] = "; ".join(failed.values()) if failed else f"{diff:.1e}"
        if "diffusers" in results:
            floor = timed(diffusers_loop, pipe, solver, steps, nudged(noise, args.seed + 1), labels, sigmas)[0]
            row["float32 floor"] = f"{(floor - results['diffusers']).abs().max().item():.1e}"
        else:
            row["float32 floor"] = None
        exact = timed(diffkit_loop, pipe64, solver, steps, noise.double(), labels, sigmas)[0].float()
        for name in ("diffusers", "diffkit"):
            gap = (results[name] - exact).abs().max().item() if name in results else None
            row[f"{name} vs float64"] = None if gap is None else f"{gap:.1e}"
        best = {name: float("inf") for name in loops}
        n_time = min(25, n_images)
        for r in range(repeats):  # interleaved, alternating which loop goes first
            for name in (list(loops) if r % 2 == 0 else list(loops)[::-1]):
                seconds = timed(loops[name], pipe, solver, steps, noise[:n_time], labels[:n_time], sigmas)[1]
                best[name] = min(best[name], seconds)
        for name in ("diffusers", "diffkit"):
            if name not in results:
                row.update({f"{name} ms/img": None, f"{name} FD": None, f"{name} acc": None})
                continue
            images = results[name].clamp(-1, 1)
            row[f"{name} ms/img"] = 1000 * best[name] / n_time
            row[f"{name} FD"] = metrics.frechet_distance(metrics.classifier_features(images), real_feats)
            row[f"{name} acc"] = metrics.class_accuracy(images, labels)
        row["slowdown"] = None if failed else row["diffkit ms/img"] / row["diffusers ms/img"] - 1
        rows.append(row)
        print(f"{solver} ({sigmas} sigmas) {steps}: done", flush=True)

    name = "bench_solvers" + ("_" + "_".join(args.solvers) if args.solvers else "")
    write_results(args.out, name, args.quick, format_table(rows, n_images), figure=plot(rows))


def format_table(rows, n_images) -> str:
    cols = ["solver", "sigmas", "steps", "diffusers ms/img", "diffkit ms/img", "slowdown", "diffusers FD", "diffkit FD",
            "diffusers acc", "diffkit acc", "max |diffkit - diffusers|", "float32 floor", "diffusers vs float64",
            "diffkit vs float64"]
    fmt = {"slowdown": "{:+.1%}", "diffusers acc": "{:.1%}", "diffkit acc": "{:.1%}"}
    note = (
        f"Default model, CFG scale {GUIDANCE_SCALE}, {n_images} images per cell for FD / accuracy, time = best of "
        f"interleaved repeats on 25 images, torch threads {torch.get_num_threads()}; FD to 500 held-out digits on "
        "digits-classifier features. float32 floor: max |diffusers(noise nudged by one ulp) - diffusers(noise)|, how "
        "much rounding alone moves diffusers' own output on this cell; vs float64: max distance to diffkit's loop run "
        "in float64 (the same grid in exact arithmetic)."
    )
    def cell(value, column):
        return "-" if value is None else fmt.get(column, "{:.2f}" if isinstance(value, float) else "{}").format(value)

    cells = [[cell(r[c], c) for c in cols] for r in rows]
    return markdown_table(cols, cells, note)


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key in dict.fromkeys((r["solver"], r["sigmas"]) for r in rows):
        rs = [r for r in rows if (r["solver"], r["sigmas"]) == key]
        label = key[0] + ("" if key[1] == "default" else f" {key[1]}")

        def curve(column):  # (steps, values) where the loop ran
            return [r["steps"] for r in rs if r[column] is not None], [r[column] for r in rs if r[column] is not None]

        (line,) = axes[0].plot(*curve("diffkit FD"), "o-", label=f"{label} (diffkit)")
        axes[0].plot(*curve("diffusers FD"), "x--", color=line.get_color(), label=f"{label} (diffusers)")
        axes[1].plot(*curve("diffkit ms/img"), "o-", color=line.get_color(), label=f"{label} (diffkit)")
        axes[1].plot(*curve("diffusers ms/img"), "x--", color=line.get_color(), label=f"{label} (diffusers)")
    axes[0].set(xlabel="steps", ylabel="FD to held-out digits (log)", title="quality", yscale="log")
    axes[1].set(xlabel="steps", ylabel="ms per image", title="time")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
