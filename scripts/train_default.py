"""Retrain diffkit's embedded default model from its recipe, ``diffkit/recipes/default.json``.

The recipe holds everything this script used to: a class-conditional UNet2DModel for 16x16 RGB digits (10 classes
plus the null class 10 for classifier-free guidance), v-prediction on the cosine schedule, 4,000 AdamW steps of 64
training digits recoloured every batch, with checkpoints every 500 steps (a killed run resumes where it stopped)
and a sample grid every 1,000. About 30 minutes on 2 CPU cores; ``accelerate launch`` spreads it over devices.
The same as ``diffkit train default --out RUN``; the model lands in ``RUN/model`` (the shipped weights in
assets/default came from this recipe's settings and are not overwritten).

    python scripts/train_default.py --out runs/default
"""

import argparse

from diffkit.recipe import train


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/default", help="run folder: model/, checkpoints/, samples/")
    parser.add_argument("--overwrite", action="store_true", help="start afresh, deleting what an earlier run wrote there")
    args = parser.parse_args()
    result = train("default", args.out, overwrite=args.overwrite)
    print(f"trained {result.step} steps; model in {args.out}/model")


if __name__ == "__main__":
    main()
