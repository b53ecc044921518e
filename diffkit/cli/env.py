"""``diffkit env``: versions and devices, for bug reports."""

import platform

import torch

from . import common


def add_parser(sub) -> None:
    sub.add_parser("env", help="print versions and devices").set_defaults(run=run)


def run(args) -> None:
    import accelerate
    import transformers

    versions = {**common.versions(), "transformers": transformers.__version__, "accelerate": accelerate.__version__}
    for name, version in versions.items():
        print(f"{name}: {version}")
    print(f"python: {platform.python_version()}")
    print(f"cuda: {torch.cuda.is_available()} ({torch.cuda.device_count()} devices)")
    print(f"mps: {torch.backends.mps.is_available()}")
