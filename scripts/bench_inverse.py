"""Inverse problems on held-out digits: RED-Diff vs DPS vs PiGDM in diffkit, and deepinv's DPS and DiffPIR
on the same network as peers.

Tasks (sigma_y = 0.05 on the [-1, 1] scale): the bottom half of the image missing, SR x2 (average pooling),
Gaussian deblurring (std 1 px, circular). Prior: the embedded default model's unconditional (null-class)
branch. Metrics against the clean digits: PSNR, SSIM, the digits classifier's accuracy on the restoration, and
seconds per image (the whole batch in one run, torch threads as set). deepinv needs torch 2.14 + torchvision,
which cannot live beside diffkit's torch: it runs in its own environment through ``scripts/inverse_peer.py``
(``--peer-python``); without one its rows are left out. Writes assets/bench_inverse.md and .png.

    python scripts/bench_inverse.py --peer-python /path/to/peer/bin/python     # 100 digits
    python scripts/bench_inverse.py --quick                                    # 8 digits, few steps
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import diffkit
from diffkit.data import colored_digits
from diffkit.assets import DEFAULT_MODEL
from diffkit.images import image_grid, save_png_atomic, to_pil, write_text_atomic
from diffkit.inverse import Blur, Inpainting, SuperResolution, dps, pigdm, red_diff
from diffkit.metrics import class_accuracy, psnr, ssim


SIGMA_Y = 0.05


def tasks() -> dict:
    bottom_half = torch.ones(1, 1, 16, 16)
    bottom_half[..., 8:, :] = 0
    return {
        "inpaint half": Inpainting(bottom_half, sigma_y=SIGMA_Y),
        "SR x2": SuperResolution(2, sigma_y=SIGMA_Y),
        "deblur": Blur.gaussian(1.0, sigma_y=SIGMA_Y),
    }


def diffkit_methods(quick: bool) -> dict:
    """name -> (solver, keyword arguments); RED-Diff at the official lr for each task family."""
    red_steps, dps_steps, pigdm_steps = (50, 50, 25) if quick else (250, 250, 100)
    return {
        "RED-Diff": (red_diff, {"num_steps": red_steps}),
        "DPS": (dps, {"num_inference_steps": dps_steps}),
        "PiGDM": (pigdm, {"num_inference_steps": pigdm_steps}),
    }


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
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--peer-python", default=None, help="python of an environment with deepinv (see docstring)")
    parser.add_argument("--out", default="assets")
    args = parser.parse_args()
    n = 8 if args.quick else args.images

    pipe = diffkit.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    denoiser = diffkit.Denoiser.from_pipeline_components(pipe.unet, pipe.scheduler)
    images, labels = colored_digits("test")
    x, labels = images[:n], labels[:n]
    cond = {"class_labels": torch.full((n,), pipe.num_classes)}
    ops = tasks()
    ys = {name: op.measure(x, generator=torch.Generator().manual_seed(0)) for name, op in ops.items()}

    results = {}  # (task, method) -> (restoration in [-1, 1], seconds per image)
    for name, op in ops.items():
        results[name, "pseudo-inverse"] = (op.pinv(ys[name]).clamp(-1, 1), 0.0)
        for method, (fn, kwargs) in diffkit_methods(args.quick).items():
            start = time.perf_counter()
            with torch.no_grad():
                out = fn(denoiser, ys[name], op, cond=cond, generator=torch.Generator().manual_seed(0), **kwargs)
            results[name, method] = (out.clamp(-1, 1), (time.perf_counter() - start) / n)
            print(f"{name} {method}: {results[name, method][1]:.3f} s/img", flush=True)
    peer_note = "deepinv rows: not run (no --peer-python)."
    if args.peer_python:
        peer, info = run_peer(args.peer_python, ops, x, ys, args.quick)
        results.update(peer)
        peer_note = f"deepinv {info['versions'].get('deepinv')}: settings {json.dumps(info['settings'])}."

    steps = {m: next(iter(kw.values())) for m, (_, kw) in diffkit_methods(args.quick).items()}
    lines = [
        f"{n} held-out digits, sigma_y = {SIGMA_Y}, unconditional prior of the default model; steps: RED-Diff "
        f"{steps['RED-Diff']}, DPS {steps['DPS']}, PiGDM {steps['PiGDM']}; torch threads {torch.get_num_threads()}. "
        + peer_note,
        "",
        "| task | method | PSNR | SSIM | accuracy | s / image |",
        "|---|---|---|---|---|---|",
    ]
    for (name, method), (out, seconds) in results.items():
        lines.append(
            f"| {name} | {method} | {psnr(out, x).mean():.2f} | {ssim(out, x).mean():.3f} | "
            f"{class_accuracy(out, labels):.1%} | {seconds:.3f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    write_text_atomic(out_dir / f"bench_inverse{suffix}.md", table)
    # one row per (task, method): the first 8 digits; the clean digits on top
    methods = list(dict.fromkeys(m for _, m in results))
    rows = [x[:8]] + [results[name, m][0][:8] for name in ops for m in methods]
    save_png_atomic(image_grid(to_pil(torch.cat(rows)), ncols=min(8, n), tile=32), out_dir / f"bench_inverse{suffix}.png")


if __name__ == "__main__":
    main()
