"""Inverse problems on held-out digits: RED-Diff vs DPS (each tuned on a validation split), PiGDM and the
pseudo-inverse, noisy (sigma_y = 0.05 on the [-1, 1] scale) and noiseless (the RED-Diff paper's headline setting).

Tasks: the bottom half of the image missing, SR x2 (average pooling), Gaussian deblurring (std 1 px, circular).
Prior: the embedded default model's unconditional (null-class) branch, through ``InverseProblemPipeline`` as a
user calls it. Splits of the 500 held-out digits, class-balanced: validation = the first ``--val-per-class`` of
each class, test = the next ``--test-per-class``.

For each task the sweep (RED-Diff: lr x steps at lam 1.0 with the paper's noise levels; DPS: zeta x steps) is
scored on the validation split with noisy measurements; each method's configuration of best mean PSNR there is
reported on the test split at both noise levels, beside the official RED-Diff benchmark run (``sample_batch.sh``:
1,000 steps, lr 0.1, lam 1.0, itself one of the sweep's candidates), PiGDM (100 steps) and the pseudo-inverse.
None of the three methods reads sigma_y, so each configuration runs once on one batch holding the validation
measurements and the test measurements at both noise levels (a sample's updates do not depend on its batch
neighbours, its noise draws on its place in the batch; only the choice reads the validation part). Metrics
against the clean digits: PSNR, SSIM, the digits classifier's accuracy, and seconds per image (the batch's time
over its size; one torch thread unless ``--threads``; a shared machine makes them indicative). Paired PSNR differences come with a 95% t-interval and the smallest
difference the test split could detect (80% power, two-sided 5%).

The sweep is sized for a one-thread CPU run of about 75 minutes (``--cache-dir`` keeps every finished run, so an
interrupted benchmark resumes): RED-Diff lr 0.05 / 0.1 / 0.25 at 100 steps, the official lr 0.1 and lr 0.05 / 0.025 at 1,000;
DPS zeta 0.3 / 1 / 3 at 100 steps and zeta 1 at 250 (the paper runs 1,000 DDPM steps: a budget deviation).

deepinv needs torch 2.14 + torchvision, which cannot live beside diffkit's torch: with ``--peer-python`` its DPS
and DiffPIR run on the test split in their own environment through ``scripts/inverse_peer.py``; without it the
table quotes the rows measured before (another digit set), marked as such. Writes assets/bench_inverse.md and
.png through ``diffkit.bench``.

    python scripts/bench_inverse.py --cache-dir /tmp/inverse_cache      # 10 validation, 20 test digits
    python scripts/bench_inverse.py --quick                              # a few digits, few steps
"""

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import diffkit
from diffkit.assets import DEFAULT_MODEL
from diffkit.bench import markdown_table, write_results
from diffkit.data import colored_digits
from diffkit.harness.report import detectable_difference, mean_std, paired_interval
from diffkit.images import image_grid, to_pil
from diffkit.inverse import Blur, Inpainting, SuperResolution
from diffkit.metrics import class_accuracy, psnr, ssim
from diffkit.pipelines import InverseProblemPipeline


SIGMA_Y = 0.05
HELD_OUT_PER_CLASS = 50
# deepinv 0.5.0 on the first 100 held-out digits (classes 0 and 1 only), sigma_y 0.05, one thread: the rows of the
# previous run of this benchmark, kept because deepinv needs its own environment (see the module docstring).
DEEPINV_BEFORE = {
    ("inpaint half", "deepinv DPS"): (15.62, 0.135, 0.13, 5.692),
    ("inpaint half", "deepinv DiffPIR"): (22.21, 0.690, 0.57, 0.254),
    ("SR x2", "deepinv DPS"): (15.37, 0.120, 0.13, 5.747),
    ("SR x2", "deepinv DiffPIR"): (27.69, 0.864, 0.90, 0.284),
    ("deblur", "deepinv DPS"): (15.99, 0.148, 0.12, 5.831),
    ("deblur", "deepinv DiffPIR"): (30.54, 0.925, 0.99, 0.291),
}


def tasks(sigma_y: float) -> dict:
    bottom_half = torch.ones(1, 1, 16, 16)
    bottom_half[..., 8:, :] = 0
    return {
        "inpaint half": Inpainting(bottom_half, sigma_y=sigma_y),
        "SR x2": SuperResolution(2, sigma_y=sigma_y),
        "deblur": Blur.gaussian(1.0, sigma_y=sigma_y),
    }


def splits(val_per_class: int, test_per_class: int):
    """(images, labels) of the validation and test splits: per class, consecutive held-out digits."""
    images, labels = colored_digits("test")
    index = {"val": [], "test": []}
    for c in range(10):
        first = c * HELD_OUT_PER_CLASS  # the held-out set is ordered by class, 50 each
        index["val"] += range(first, first + val_per_class)
        index["test"] += range(first + val_per_class, first + val_per_class + test_per_class)
    return {name: (images[idx], labels[idx]) for name, idx in index.items()}


def sweep(quick: bool) -> dict:
    """method -> list of (label, pipeline method, steps, method_kwargs); the first RED-Diff entry is the official run."""
    official = 15 if quick else 1000
    more = ((0.25, 15), (0.1, 5)) if quick else ((0.05, official), (0.025, official), (0.05, 100), (0.1, 100), (0.25, 100))
    red = ((0.1, official),) + more
    dps = ((1.0, 15), (2.0, 15)) if quick else ((0.3, 100), (1.0, 100), (3.0, 100), (1.0, 250))
    return {
        "RED-Diff": [(f"lr {lr}, {n} steps", "red_diff", n, {"lr": lr, "lam": 1.0}) for lr, n in red],
        "DPS": [(f"zeta {z}, {n} steps", "dps", n, {"zeta": z}) for z, n in dps],
    }


class Runner:
    """Runs (and caches) one configuration on one split / task / noise level through the pipeline."""

    def __init__(self, pipe, cache_dir: Path | None):
        self.pipe, self.cache_dir = pipe, cache_dir
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, key: str, y, op, method: str, steps: int, kwargs: dict) -> tuple[torch.Tensor, float]:
        """(restorations in [-1, 1], seconds per image)."""
        path = None if self.cache_dir is None else self.cache_dir / (key.replace(" ", "_").replace("/", "-") + ".safetensors")
        if path is not None and path.exists():
            stored = load_file(path)
            return stored["out"], stored["seconds"].item()
        start = time.perf_counter()
        images = self.pipe(y, op, method=method, num_inference_steps=steps, method_kwargs=kwargs,
                           generator=torch.Generator().manual_seed(0), output_type="pt").images
        seconds = (time.perf_counter() - start) / len(y)
        out = images * 2 - 1
        if path is not None:
            tmp = path.with_suffix(".tmp")
            save_file({"out": out.contiguous(), "seconds": torch.tensor(seconds)}, tmp)
            tmp.rename(path)
        print(f"{key}: {seconds:.3f} s/img", flush=True)
        return out, seconds


def paired(a: torch.Tensor, b: torch.Tensor) -> str:
    """mean(a - b) [95% t-interval]; the smallest mean difference detectable at 80% power (two-sided 5%)."""
    diffs = (a - b).double().tolist()
    mean, lo, hi = paired_interval(diffs)
    return f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}] ({detectable_difference(mean_std(diffs)[1], len(diffs)):.2f})"


def run_peer(peer_python: str, ops: dict, x: torch.Tensor, ys: dict, quick: bool) -> tuple[dict, dict]:
    """deepinv's DPS and DiffPIR in the peer environment; returns (restorations, the worker's JSON)."""
    keys = {name: name.split()[0].lower() for name in ops}
    config = {
        "tasks": {},
        "sigma_y": SIGMA_Y,
        "methods": {"dps": {"steps": 50 if quick else 1000}, "diffpir": {"steps": 20 if quick else 100}},
        "seed": 0,
    }
    tensors = {}
    for name, op in ops.items():
        key = keys[name]
        tensors[f"x_{key}"], tensors[f"y_{key}"], tensors[f"ax_{key}"] = x, ys[name], op.forward(x)
        if isinstance(op, Inpainting):
            config["tasks"][key] = {"kind": "inpainting"}
            tensors[f"mask_{key}"] = op.mask
        elif isinstance(op, SuperResolution):
            config["tasks"][key] = {"kind": "sr", "factor": op.factor}
        else:
            config["tasks"][key] = {"kind": "blur"}
            tensors[f"kernel_{key}"] = op.kernel.float()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_file({k: v.float().clone().contiguous() for k, v in tensors.items()}, tmp / "in.safetensors")
        (tmp / "in.json").write_text(json.dumps(config))
        script = Path(__file__).with_name("inverse_peer.py")
        subprocess.run(
            [peer_python, str(script), "--data", str(tmp / "in.safetensors"), "--config", str(tmp / "in.json"),
             "--out", str(tmp / "out.safetensors"), "--model", str(DEFAULT_MODEL)],
            check=True,
        )
        out = load_file(tmp / "out.safetensors")
        info = json.loads((tmp / "out.json").read_text())
    results = {}
    for name, key in keys.items():
        for method, label in (("dps", "deepinv DPS"), ("diffpir", "deepinv DiffPIR")):
            results[name, label] = (out[f"{method}_{key}"], info["seconds_per_image"][method][key])
    return results, info


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--val-per-class", type=int, default=1)
    parser.add_argument("--test-per-class", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--peer-python", default=None, help="python of an environment with deepinv (see docstring)")
    parser.add_argument("--cache-dir", default=None, help="keep finished runs here and reuse them")
    parser.add_argument("--out", default="assets")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.val_per_class, args.test_per_class = 1, 1  # 10 + 10 digits... at a few steps
    data = splits(args.val_per_class, args.test_per_class)
    if args.quick:
        data = {name: (x[::3], labels[::3]) for name, (x, labels) in data.items()}  # 4 digits each

    pipe = InverseProblemPipeline.from_pipe(diffkit.load_pipeline())
    pipe.set_progress_bar_config(disable=True)
    run = Runner(pipe, Path(args.cache_dir) if args.cache_dir else None)
    configs = sweep(args.quick)
    official = configs["RED-Diff"][0]
    pigdm_steps = 10 if args.quick else 100
    settings = {"sigma_y = 0.05": SIGMA_Y, "sigma_y = 0 (noiseless)": 0.0}
    (x_val, _), (x, labels) = data["val"], data["test"]
    n_val, n_test = len(x_val), len(x)
    # one batch per task: validation (noisy), then the test split at each noise level
    parts = {"val": slice(0, n_val)}
    parts.update({setting: slice(n_val + i * n_test, n_val + (i + 1) * n_test) for i, setting in enumerate(settings)})

    val_rows, test, figure_rows = [], {}, []
    for name, op in tasks(SIGMA_Y).items():
        y = torch.cat([op.measure(x_val, generator=torch.Generator().manual_seed(0)),
                       op.measure(x, generator=torch.Generator().manual_seed(0)), op.forward(x)])
        outputs, chosen = {}, {}
        for method, grid in configs.items():
            scores = {}
            for config in grid:
                label, kind, steps, kwargs = config
                outputs[method, label] = run(f"{name} {method} {label}", y, op, kind, steps, kwargs)
                scores[label] = psnr(outputs[method, label][0][parts["val"]].clamp(-1, 1), x_val).mean().item()
            best = max(scores, key=scores.get)
            chosen[method] = best
            val_rows.append([name, method, ", ".join(f"{label}: " + (f"**{score:.2f}**" if label == best else f"{score:.2f}")
                                                    for label, score in scores.items())])
        pigdm = run(f"{name} PiGDM {pigdm_steps}", y, op, "pigdm", pigdm_steps, {})
        for setting in settings:
            part = parts[setting]
            rows = {"pseudo-inverse": ("A^+ y", op.pinv(y[part]).clamp(-1, 1), 0.0)}
            for method in configs:
                out, seconds = outputs[method, chosen[method]]
                rows[f"{method}, tuned"] = (chosen[method], out[part], seconds)
            out, seconds = outputs["RED-Diff", official[0]]
            rows["RED-Diff, official script"] = (official[0], out[part], seconds)
            rows["PiGDM"] = (f"{pigdm_steps} steps", pigdm[0][part], pigdm[1])
            test[setting, name] = rows
            figure_rows += [out[:8] for _, out, _ in rows.values()]

    peer_note = ("deepinv rows: measured before on the first 100 held-out digits (classes 0 and 1 only), not this "
                 "test split; deepinv needs its own Python (run with --peer-python to measure them here).")
    if args.peer_python:
        name0 = next(iter(settings))
        ops = tasks(SIGMA_Y)
        ys = {name: op.measure(x, generator=torch.Generator().manual_seed(0)) for name, op in ops.items()}
        peer, info = run_peer(args.peer_python, ops, x, ys, args.quick)
        peer_note = f"deepinv {info['versions'].get('deepinv')} on this test split: settings {json.dumps(info['settings'])}."
        for (name, label), (out, seconds) in peer.items():
            test[name0, name][label] = ("its defaults", out.clamp(-1, 1), seconds)

    rows = []
    for (setting, name), methods in test.items():
        for method, (label, out, seconds) in methods.items():
            rows.append([setting, name, method, label, f"{psnr(out, x).mean():.2f} ± {psnr(out, x).std():.2f}",
                         f"{ssim(out, x).mean():.3f}", f"{class_accuracy(out, labels):.1%}", f"{seconds:.3f}"])
    if not args.peer_python:
        for (name, method), (p, s, acc, seconds) in DEEPINV_BEFORE.items():
            rows.append(["sigma_y = 0.05", name, method, "its defaults (earlier digit set)", f"{p:.2f}", f"{s:.3f}",
                         f"{acc:.1%}", f"{seconds:.3f}"])
    note = (f"Test split: {n_test} held-out digits ({args.test_per_class} per class); hyperparameters chosen by mean "
            f"PSNR on a separate validation split of {n_val} ({args.val_per_class} per class) with sigma_y = {SIGMA_Y}, "
            f"and used at both noise levels. Prior: the default model's unconditional branch through "
            f"InverseProblemPipeline. RED-Diff: lam 1.0, the paper's noise levels (noise_levels=\"adm\"); official "
            f"script = sample_batch.sh's {official[0]} (lam 1.0). DPS: eta 1 (ancestral). PSNR: mean ± std over the "
            f"digits. Seconds per image: a batch of {n_val + 2 * n_test} (validation and both test sets) over its size, "
            f"torch threads {torch.get_num_threads()}, on a shared machine (indicative).")
    table = markdown_table(["setting", "task", "method", "settings", "PSNR", "SSIM", "accuracy", "s / image"], rows, note)
    differences = []
    for (setting, name), methods in test.items():
        p = {method: psnr(out, x) for method, (_, out, _) in methods.items()}
        differences.append([setting, name, paired(p["RED-Diff, tuned"], p["DPS, tuned"]),
                            paired(p["RED-Diff, official script"], p["DPS, tuned"]),
                            paired(p["RED-Diff, tuned"], p["RED-Diff, official script"])])
    table += "\n" + peer_note + "\n\n" + markdown_table(
        ["setting", "task", "RED-Diff tuned - DPS tuned", "RED-Diff official - DPS tuned", "RED-Diff tuned - official"],
        differences, "Paired PSNR differences on the test split (dB): mean [95% interval] (the smallest difference "
        "these digits detect with 80% power, two-sided 5%).")
    table += "\n" + markdown_table(
        ["task", "method", "configurations"], val_rows,
        f"Validation sweep (sigma_y = {SIGMA_Y}): mean PSNR on the {n_val} validation digits (best in bold); RED-Diff "
        f"at lam 1.0 with the paper's noise levels, DPS with eta 1.")
    # the clean test digits on top, then per task and setting one row per method (table order)
    grid = image_grid(to_pil(torch.cat([x[:8]] + [r.clamp(-1, 1) for r in figure_rows])), ncols=min(8, n_test), tile=32)
    write_results(args.out, "bench_inverse", args.quick, table, images={"bench_inverse": grid})


if __name__ == "__main__":
    main()
