"""Train one T2I-Adapter per modality for diffkit's default model (MaGIC's per-modality conditional networks).

Each modality (edges, low resolution, ink mask: ``diffkit.blend.MODALITIES``) is computed from the training
digits themselves; the adapter learns to steer the frozen default UNet toward the image its control image came
from, by the usual v-prediction loss with the adapter's features added to the UNet's encoder. Half the batch
keeps its class label, half gets the null class, so the adapters work with and without a class. Runs on diffkit's
training loop (``diffkit.training.fit``) under accelerate. At the end the held-out loss with and without the adapter
is recorded.

    python scripts/train_modalities.py --out assets/modalities
"""

import argparse
import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator

import diffkit
from diffkit.blend import adapter_for, extract, injected
from diffkit.data import NUM_CLASSES, colorize, gray_digits
from diffkit.denoiser import Denoiser
from diffkit.training import diffusion_loss, fit


def heldout_loss(unet, adapter, schedule, name, ink, labels, seed=0) -> dict:
    """v-prediction loss on held-out digits at fixed noise and t, with the adapter and without (null class)."""
    gen = torch.Generator().manual_seed(seed)
    x0 = colorize(ink, gen)
    cond = {"class_labels": torch.full_like(labels, NUM_CLASSES)}
    out = {}
    with torch.no_grad():
        for key, feats in (("plain", None), ("adapter", adapter(extract(name, x0)))):
            with injected(unet, feats):
                g = torch.Generator().manual_seed(seed + 1)
                out[key] = diffusion_loss(unet, schedule, "v_prediction", x0, cond, g).item()
    return out


def train_one(name, unet, schedule, ink, labels, args, accelerator):
    """One adapter on diffkit's training loop: the frozen UNet sees the adapter's features of the control image."""
    torch.manual_seed(args.seed)  # the adapter's initial weights
    adapter = adapter_for(unet)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup))

    def loss_fn(net, step, generator):
        idx = torch.randint(0, len(ink), (args.batch_size,), generator=generator)
        x0 = colorize(ink[idx], generator).to(accelerator.device)
        y = labels[idx].clone()
        y[torch.rand(args.batch_size, generator=generator) < args.p_uncond] = NUM_CLASSES
        with injected(unet, net(extract(name, x0))):
            return diffusion_loss(unet, schedule, "v_prediction", x0, {"class_labels": y.to(accelerator.device)}, generator)

    start = time.time()
    result = fit(adapter, loss_fn, optimizer=optimizer, steps=args.steps, lr_scheduler=warmup, seed=args.seed,
                 accelerator=accelerator, max_grad_norm=1.0, ema_decay=args.ema, desc=f"adapter {name}")
    return result.averaged_model(), result.log, time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/modalities")
    parser.add_argument("--modalities", nargs="+", default=["edges", "low_resolution", "ink_mask"])
    parser.add_argument("--model", default=None, help="pipeline folder or Hub id (default: the embedded model)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--p-uncond", type=float, default=0.5, help="share of the batch trained with the null class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()

    out = Path(args.out)
    for name in args.modalities:
        extract(name, torch.zeros(1, 3, 16, 16))  # unknown names fail here, before any training
        if (out / name / "config.json").exists() and not args.overwrite:
            raise SystemExit(f"error: {out / name} already holds an adapter; pass --overwrite to replace it")

    accelerator = Accelerator()
    pipe = diffkit.load_pipeline(args.model)
    unet = pipe.unet.to(accelerator.device).eval().requires_grad_(False)
    schedule = Denoiser.from_pipeline_components(pipe.unet, pipe.scheduler).schedule
    ink, labels = gray_digits("train")
    val_ink, val_labels = gray_digits("test")
    for name in args.modalities:
        adapter, log, seconds = train_one(name, unet, schedule, ink, labels, args, accelerator)
        if accelerator.is_main_process:
            adapter.save_pretrained(out / name)
            info = {"args": vars(args), "minutes": seconds / 60, "heldout_loss": heldout_loss(unet, adapter, schedule, name, val_ink, val_labels), "log": log}
            (out / name / "training_log.json").write_text(json.dumps(info, indent=1))
            print(f"{name}: held-out loss {info['heldout_loss']} after {info['minutes']:.1f} min")


if __name__ == "__main__":
    main()
