"""Dataset scale (issue 23): memory and speed of generate + eval as the number of images grows, the blocked k-NN
precision / recall against the N x N computation, and training steps per second on 1 vs 2 processes.

Every measurement runs in its own process with one thread (OMP_NUM_THREADS=1), so its peak resident memory
(``ru_maxrss``) is its own:

- generate: ``diffkit generate`` on the embedded default model, n images of the 10 classes in turn, DPM-Solver++(2M)
  with ``--steps`` steps and no guidance (one network call per step; the point is memory, not quality), batches of
  250; then ``diffkit eval`` of the folder against the 500 held-out digits (digits features, FD, precision / recall
  with k = 3, class accuracy), batches of 250. The goal: peak memory flat in n. The first row, ``import only``, is
  the process baseline (``diffkit env``: torch, diffusers, transformers, accelerate imported).
- precision / recall: N real and N fake 128-dim Gaussian features (the digits features' dimension), k = 3;
  ``diffkit.metrics.precision_recall`` (blocks of 1,024) against ``precision_recall_dense`` (full N x N matrices).
  Memory is the peak above the process's own after the features exist.
- training: ``diffkit train`` of the default model's recipe (its UNet and optimizer, batch 64 per process) for a
  few steps, on 1 process and on 2 (accelerate's launcher, DDP on gloo); steps per second from the training log
  after the first logged step (start-up excluded).

Writes assets/bench_scale.md and assets/bench_scale.png (``--quick``: ``*_quick``, small sizes, for the test).

    python scripts/bench_scale.py           # n = 1k, 5k, 20k; about an hour on 2 busy cores
    python scripts/bench_scale.py --quick   # a few minutes
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from diffkit.bench import markdown_table, write_results


ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
CLI = """
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from diffkit.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
print(json.dumps({"code": code, "seconds": time.perf_counter() - start,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
PR = """
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from diffkit import metrics
n, method = int(sys.argv[1]), sys.argv[2]
g = torch.Generator().manual_seed(0)
real = torch.randn(n, 128, generator=g)
fake = 0.9 * torch.randn(n, 128, generator=g) + 0.1
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
fn = metrics.precision_recall if method == "knn" else metrics.precision_recall_dense
precision, recall = fn(real, fake, k=3)
print(json.dumps({"seconds": time.perf_counter() - start, "precision": precision, "recall": recall,
                  "extra_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def run_cli(argv: list[str], cwd: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CLI, *argv], capture_output=True, text=True, env=ENV, cwd=cwd)
    result = _last_json(done.stdout) if done.stdout.strip() else {"code": done.returncode}
    if result["code"] != 0:
        raise RuntimeError(f"diffkit {' '.join(argv[:2])} failed: {done.stderr[-2000:]}")
    return result


def run_pr(n: int, method: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PR, str(n), method], capture_output=True, text=True, env=ENV)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return _last_json(done.stdout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_training(processes: int, steps: int, batch_size: int, log_every: int, work: Path) -> dict:
    recipe = json.loads((ROOT / "diffkit" / "recipes" / "default.json").read_text())
    recipe["name"] = f"bench-{processes}"
    recipe["training"].update(steps=steps, batch_size=batch_size, checkpoint_every=0, log_every=log_every)
    recipe["sampling"]["every"] = 0
    path = work / f"recipe{processes}.json"
    path.write_text(json.dumps(recipe))
    args = ["-m", "diffkit", "train", str(path), "--out", str(work / f"train{processes}"), "--no-progress"]
    if processes == 1:
        command = [sys.executable, *args]
    else:
        command = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *args]
    done = subprocess.run(command, capture_output=True, text=True, env={**ENV, "ACCELERATE_USE_CPU": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"training on {processes} processes failed: {done.stderr[-2000:]}")
    log = json.loads((work / f"train{processes}" / "training_log.json").read_text())["log"]
    first, last = log[0], log[-1]
    rate = (last["step"] - first["step"]) / (last["seconds"] - first["seconds"])
    return {"processes": processes, "steps_per_s": rate, "images_per_s": rate * batch_size * processes,
            "batch": batch_size * processes}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "assets"))
    parser.add_argument("--steps", type=int, default=10, help="solver steps per image for generate")
    args = parser.parse_args()
    sizes = [40, 120] if args.quick else [1000, 5000, 20000]
    pr_sizes = [400] if args.quick else [1000, 5000, 10000, 20000]
    steps = 2 if args.quick else args.steps
    train_steps, train_batch, log_every = (6, 8, 2) if args.quick else (40, 64, 5)
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="bench_scale."))
    load_before = os.getloadavg()[0]
    try:
        baseline = run_cli(["env"], work)
        scale = []
        for n in sizes:
            folder = work / f"gen{n}"
            gen = run_cli(["generate", "--label", "0,1,2,3,4,5,6,7,8,9", "-n", str(n), "--steps", str(steps),
                           "--guidance", "none", "--batch-size", "250", "--out", str(folder), "--no-progress"], work)
            ev = run_cli(["eval", str(folder), "--batch-size", "250", "--no-progress", "--json", str(work / f"e{n}.json")], work)
            scores = json.loads((work / f"e{n}.json").read_text())
            scale.append({"n": n, "gen": gen, "eval": ev, "scores": scores})
            shutil.rmtree(folder)
            print(f"n = {n}: generate {gen['seconds']:.0f} s, {gen['peak_mb']:.0f} MB; eval {ev['seconds']:.0f} s, "
                  f"{ev['peak_mb']:.0f} MB", file=sys.stderr)
        pr = []
        for n in pr_sizes:
            row = {"n": n, "knn": run_pr(n, "knn"), "dense": run_pr(n, "dense")}
            pr.append(row)
            print(f"precision/recall N = {n}: {row}", file=sys.stderr)
        training = [run_training(p, train_steps, train_batch, log_every, work) for p in (1, 2)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()[0]

    note = (f"Machine: {os.cpu_count()} CPU cores shared with other jobs (load average {load_before:.1f} at the start, "
            f"{load_after:.1f} at the end): the speeds are this machine's under that load, the memory is not affected.\n\n"
            f"Generate + eval on the default model ({steps} DPM-Solver++(2M) steps, no guidance, batches of 250; eval "
            "against the 500 held-out digits with FD, precision / recall (k = 3) and class accuracy). One thread per "
            "process; peak = peak resident memory of the whole process.")
    rows = [["import only", "", "", f"{baseline['peak_mb']:.0f}", "", "", "", "", "", "", ""]]
    for row in scale:
        g, e, s = row["gen"], row["eval"], row["scores"]
        rows.append([f"{row['n']:,}", f"{g['seconds']:.1f}", f"{row['n'] / g['seconds']:.1f}", f"{g['peak_mb']:.0f}",
                     f"{e['seconds']:.1f}", f"{row['n'] / e['seconds']:.1f}", f"{e['peak_mb']:.0f}", f"{s['fd']:.2f}",
                     f"{s['precision']:.3f}", f"{s['recall']:.3f}", f"{s['class_accuracy']:.1%}"])
    table = markdown_table(["n", "generate s", "generate img/s", "generate peak MB", "eval s", "eval img/s", "eval peak MB",
                            "FD", "precision", "recall", "accuracy"], rows, note)
    rows = []
    for row in pr:
        k, d = row["knn"], row["dense"]
        dense = [f"{d['seconds']:.1f}", f"{d['extra_mb']:.0f}"] if "error" not in d else [f"failed ({d['error'][:60]})", ""]
        same = ("n/a" if "error" in d else "yes" if (k["precision"], k["recall"]) == (d["precision"], d["recall"])
                else "NO")
        rows.append([f"{row['n']:,}", f"{k['seconds']:.1f}", f"{k['extra_mb']:.0f}", *dense, same])
    table += "\n" + markdown_table(["N", "k-NN s", "k-NN extra MB", "N x N s", "N x N extra MB", "same result"], rows,
                                   "Precision / recall on N real and N fake 128-dim features (k = 3): memory above the "
                                   "process's own once the features exist.")
    rows = [[str(row["processes"]), str(row["batch"]), f"{row['steps_per_s']:.2f}", f"{row['images_per_s']:.1f}"]
            for row in training]
    table += "\n" + markdown_table(["processes", "global batch", "steps/s", "images/s"], rows,
                                   f"Training the default model's recipe ({train_steps} steps, batch {train_batch} per "
                                   "process, one thread per process, CPU):")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ns = [row["n"] for row in scale]
    axes[0].plot(ns, [row["gen"]["peak_mb"] for row in scale], "o-", label="generate")
    axes[0].plot(ns, [row["eval"]["peak_mb"] for row in scale], "s-", label="eval")
    axes[0].axhline(baseline["peak_mb"], color="gray", ls=":", label="imports only")
    axes[0].set(xscale="log", xlabel="images n", ylabel="peak resident MB", title="generate + eval: memory vs n")
    axes[0].set_ylim(bottom=0)
    axes[0].legend()
    for method, marker in (("knn", "o-"), ("dense", "s--")):
        rows = [row for row in pr if "error" not in row[method]]
        axes[1].plot([row["n"] for row in rows], [max(row[method]["extra_mb"], 1) for row in rows], marker,
                     label="blocked k-NN" if method == "knn" else "N x N")
    axes[1].set(xscale="log", yscale="log", xlabel="features per set N", ylabel="extra peak MB",
                title="precision / recall memory")
    axes[1].legend()
    axes[2].bar([str(row["processes"]) for row in training], [row["images_per_s"] for row in training])
    axes[2].set(xlabel="processes", ylabel="training images / s", title="default recipe, CPU, 1 thread each")
    fig.tight_layout()
    write_results(out, "bench_scale", args.quick, table, fig)


if __name__ == "__main__":
    main()
