"""Peak memory, time and accuracy of one gradient through the sampler, per backend and step count.

On the embedded default model (8 images, CFG 3): the gradient of an image-space loss with respect to the
initial noise and the UNet's output layer, for diffkit's adjoint (order 2 = DPM-Solver++(2M) and its
transpose; order 1 = DDIM), torchdiffeq's odeint_adjoint (midpoint in rho), checkpointed backprop and plain
autograd (both through the 2M sampler) at 10, 25, 50 and 100 steps. Each measurement runs in a fresh process, so its
peak resident memory (above the loaded model) is its own. The error column compares each gradient with
checkpointed backprop at 400 steps. Writes assets/bench_adjoint.md and assets/bench_adjoint.png.

    python scripts/bench_adjoint.py           # ~10 minutes on 2 CPU cores
    python scripts/bench_adjoint.py --quick   # 10 and 25 steps, 2 images
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

import diffkit
from diffkit.adjoint import RhoODE, adjoint_timesteps
from diffkit.guidance import CFG
from diffkit.bench import write_results


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


METHODS = [("adjoint", 2), ("adjoint", 1), ("torchdiffeq", 2), ("checkpoint", 2), ("autograd", 2)]


def gradient(backend: str, order: int, steps: int, images: int) -> dict:
    """One gradient in this process: seconds, peak memory above the loaded model, the gradient itself."""
    pipe = diffkit.load_pipeline()
    unet = pipe.unet.requires_grad_(False)
    params = list(unet.conv_out.parameters())
    for p in params:
        p.requires_grad_(True)
    denoiser = diffkit.Denoiser.from_pipeline_components(unet, pipe.scheduler)
    labels = torch.arange(images) % 10
    ode = RhoODE(
        denoiser, adjoint_timesteps(denoiser, steps), cond={"class_labels": labels},
        uncond={"class_labels": torch.full_like(labels, 10)}, guidance=CFG(3.0), order=order,
    )
    x_T = torch.randn(images, 3, 16, 16, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    target = torch.zeros(images, 3, 16, 16)  # pull the samples towards a grey image
    baseline = _rss_mb()
    start = time.perf_counter()
    loss = (ode.sample(x_T, params, backend) - target).square().mean()
    loss.backward()
    seconds = time.perf_counter() - start
    grad = torch.cat([x_T.grad.flatten()] + [p.grad.flatten() for p in params])
    return {"seconds": seconds, "peak_mb": _rss_mb() - baseline, "grad": grad.tolist()}


def measure(backend, order, steps, images) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", backend, str(order), str(steps), str(images)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="assets")
    parser.add_argument("--worker", nargs=4, metavar=("BACKEND", "ORDER", "STEPS", "IMAGES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        backend, order, steps, images = args.worker
        print(json.dumps(gradient(backend, int(order), int(steps), int(images))))
        return

    step_counts, images, ref_steps = ([10, 25], 2, 100) if args.quick else ([10, 25, 50, 100], 8, 400)
    reference = torch.tensor(measure("checkpoint", 2, ref_steps, images)["grad"])
    rows = []
    for backend, order in METHODS:
        for steps in step_counts:
            r = measure(backend, order, steps, images)
            error = ((torch.tensor(r["grad"]) - reference).norm() / reference.norm()).item()
            name = backend if order == 2 else f"{backend} (order 1)"
            rows.append({"backend": name, "steps": steps, "seconds": r["seconds"], "peak_mb": r["peak_mb"], "error": error})
            print(f"{name} {steps}: {r['seconds']:.1f}s {r['peak_mb']:.0f} MB err {error:.2e}", flush=True)

    lines = [
        f"Default model, {images} images, CFG 3, gradient w.r.t. x_T and the UNet's conv_out; error relative to "
        f"checkpointed backprop through DPM-Solver++(2M) at {ref_steps} steps. Peak memory: resident memory above "
        f"the loaded model, each cell in a fresh process; time: one gradient, torch threads {torch.get_num_threads()}.",
        "",
        "| backend | steps | s / gradient | peak MB | rel. error |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['backend']} | {r['steps']} | {r['seconds']:.2f} | {r['peak_mb']:.0f} | {r['error']:.2e} |" for r in rows]
    by = {(r["backend"], r["steps"]): r for r in rows}
    lo, hi = step_counts[0], step_counts[-1]
    adj_growth = by["adjoint", hi]["peak_mb"] / max(by["adjoint", lo]["peak_mb"], 1.0)
    time_ratio = by["adjoint", hi]["seconds"] / by["checkpoint", hi]["seconds"]
    lines += ["", f"Adjoint peak memory {lo} -> {hi} steps: x{adj_growth:.2f}; adjoint time / checkpoint time at {hi} steps: x{time_ratio:.2f}."]
    write_results(args.out, "bench_adjoint", args.quick, "\n".join(lines) + "\n", figure=plot(rows))


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for backend in dict.fromkeys(r["backend"] for r in rows):
        rs = [r for r in rows if r["backend"] == backend]
        for ax, key in zip(axes, ("peak_mb", "seconds", "error")):
            ax.plot([r["steps"] for r in rs], [r[key] for r in rs], "o-", label=backend)
    for ax, label in zip(axes, ("peak memory above model (MB)", "seconds per gradient", "relative gradient error")):
        ax.set(xlabel="steps", ylabel=label)
    axes[2].set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
