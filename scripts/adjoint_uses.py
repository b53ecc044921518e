"""The three uses of AdjointDPM (Pan et al., ICLR 2024) on the embedded default model, each a few minutes.

- ``embedding``: optimise the class embedding of one digit so its samples take on a visual effect (red ink),
  with the UNet frozen; the class must survive (checked by the digits classifier).
- ``finetune``: fine-tune a small parameter subset (the UNet's output layer) for a stylisation loss: bold
  strokes (ink coverage pulled to twice the model's ~14%) while the classifier still reads the class.
- ``audit``: optimise the initial noise so the digits classifier is fooled while the image stays close to
  the original (a security audit of the classifier against the generator).

Prints the loss before and after and saves before/after grids to <out>/adjoint_<use>.png (default out/; the README's
figures: --out assets).

    python scripts/adjoint_uses.py embedding|finetune|audit [--iterations N] [--steps N]
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import diffkit
from diffkit.classifier import load_classifier
from diffkit.images import image_grid, save_png_atomic, to_pil
from diffkit.pipelines import AdjointDPMPipeline


def redness(images):
    """Mean of R - (G + B)/2 over ink pixels (the brightest third of each image), images in [0, 1]."""
    value = images.amax(1)
    ink = (value >= value.flatten(1).quantile(2 / 3, dim=1)[:, None, None]).float()
    red = images[:, 0] - (images[:, 1] + images[:, 2]) / 2
    return (red * ink).sum((1, 2)) / ink.sum((1, 2))


def ink_coverage(images):
    """Soft fraction of bright pixels (value above 0.5), images in [0, 1]."""
    return torch.sigmoid((images.amax(1) - 0.5) * 20).mean((1, 2))


def run(use: str, pipe: AdjointDPMPipeline, iterations: int, steps: int, backend: str = "adjoint", seed: int = 0, lr_override=None):
    """Returns (losses, images before, images after, a dict of figures of merit before/after); ``lr_override`` replaces
    the use's Adam learning rate."""
    classifier = load_classifier()
    g = torch.Generator().manual_seed(seed)
    base = {"num_inference_steps": steps, "guidance_scale": 3.0, "gradient_backend": backend}
    if use == "embedding":
        labels = [7] * 8
        embeds = pipe.unet.class_embedding(torch.tensor(labels)).detach().clone().requires_grad_(True)
        call = {**base, "class_labels": labels, "class_embeds": embeds, "latents": torch.randn(8, 3, 16, 16, generator=g)}
        variables, lr = [embeds], 0.02
        loss_fn = lambda images: -redness(images).mean()  # noqa: E731
    elif use == "finetune":
        labels = list(range(8))
        params = list(pipe.unet.conv_out.parameters())
        call = {**base, "class_labels": labels, "params": params, "latents": torch.randn(8, 3, 16, 16, generator=g)}
        variables, lr = params, 2e-3
        target = torch.tensor(labels)

        def loss_fn(images):  # the style statistic to its target, the content kept by the classifier
            return 10 * (ink_coverage(images) - 0.28).square().mean() + 0.1 * F.cross_entropy(classifier(images * 2 - 1), target)
    elif use == "audit":
        labels = list(range(8))
        x_T = torch.randn(8, 3, 16, 16, generator=g)
        with torch.no_grad():
            original = pipe(**base, class_labels=labels, latents=x_T).images
        latents = x_T.clone().requires_grad_(True)
        call = {**base, "class_labels": labels, "latents": latents}
        variables, lr = [latents], 0.05
        target = torch.tensor(labels)

        def loss_fn(images):  # push the true class down, stay close to the original image
            logits = classifier(images * 2 - 1)
            return -F.cross_entropy(logits, target) + 20 * (images - original).square().mean()
    else:
        raise ValueError(f"use must be 'embedding', 'finetune' or 'audit', got {use!r}")

    for p in pipe.unet.parameters():
        p.requires_grad_(use == "finetune" and any(p is q for q in variables))
    with torch.no_grad():
        before = pipe(**call, output_type="pt").images
    losses = pipe.optimize(loss_fn, variables, iterations=iterations, lr=lr if lr_override is None else lr_override, **call)
    with torch.no_grad():
        after = pipe(**call, output_type="pt").images
        acc = lambda im: (classifier(im * 2 - 1).argmax(1) == torch.tensor(labels)).float().mean().item()  # noqa: E731
        merit = {
            "classifier agrees": (acc(before), acc(after)),
            "redness": (redness(before).mean().item(), redness(after).mean().item()),
            "ink coverage": (ink_coverage(before).mean().item(), ink_coverage(after).mean().item()),
            "mean |after - before|": (0.0, (after - before).abs().mean().item()),
        }
    return losses, before, after, merit


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("use", choices=["embedding", "finetune", "audit"])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--backend", default="adjoint")
    parser.add_argument("--out", default="out", help="folder for the grids (the README's figures: assets)")
    args = parser.parse_args()
    pipe = AdjointDPMPipeline.from_pipe(diffkit.load_pipeline())
    pipe.set_progress_bar_config(desc=f"adjoint {args.use}")
    losses, before, after, merit = run(args.use, pipe, args.iterations, args.steps, args.backend)
    print(f"{args.use}: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} iterations")
    for name, (b, a) in merit.items():
        print(f"  {name}: {b:.3f} -> {a:.3f}")
    grid = image_grid(to_pil(torch.cat([before, after]) * 2 - 1), ncols=8, tile=32)
    save_png_atomic(grid, Path(args.out) / f"adjoint_{args.use}.png")


if __name__ == "__main__":
    main()
