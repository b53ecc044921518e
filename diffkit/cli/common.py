"""What every ``diffkit`` command shares: one-line usage errors, argument types that refuse bad values by name,
quiet libraries, versions for PNG metadata, devices and image files."""

import argparse
import json
import math
import os

import torch

from .. import __version__


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds; image i of a run uses seed + i
MAX_IMAGES = 1_000_000  # one folder of PNGs; split larger sets over runs with --seed offsets


class UsageError(ValueError):
    """Bad command-line input, reported as one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other bad input
        raise UsageError(message)


def positive_int(text: str, upper: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    if upper is not None and value > upper:
        raise argparse.ArgumentTypeError(f"must be at most {upper:,}, got {text!r}")
    return value


def num_images(text: str) -> int:
    return positive_int(text, MAX_IMAGES)


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def unit_float(text: str) -> float:
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


def seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2^63 - 1], got {text!r}")
    return value


def labels(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer or a comma list like 3,7, got {text!r}") from None


def seeds(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = None
    if not values or any(not 0 <= s <= MAX_SEED for s in values):
        raise argparse.ArgumentTypeError(f"must be a comma list of integers >= 0 like 0,1,2, got {text!r}")
    return values


def names(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",")]
    if not all(values):
        raise argparse.ArgumentTypeError(f"must be a comma list of names like ce,elr, got {text!r}")
    return values


def pairs(items: list[str], option: str) -> dict[str, str]:
    """``NAME=VALUE`` options (``--control edges=e.png``) as a dict."""
    found = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise UsageError(f"{option} takes MODALITY=VALUE, got {item!r}")
        found[name] = value
    return found


def float_pairs(items: list[str], option: str) -> dict[str, float]:
    values = {}
    for name, text in pairs(items, option).items():
        try:
            values[name] = finite_float(text)
        except argparse.ArgumentTypeError as err:
            raise UsageError(f"{option} {name}={text}: the value {err}") from None
    return values


def check_seed_range(first: int, count: int, option: str = "--seed") -> None:
    if first + count - 1 > MAX_SEED:
        raise UsageError(f"{option} {first} with {count} images runs past the largest seed 2^63 - 1")


def device(requested: str | None, state=None) -> torch.device:
    """A torch device by name; ``None`` takes the accelerate state's device (the GPU of this process, when there
    is one). Under ``accelerate launch`` a bare "cuda" means this process's GPU, not cuda:0 for all."""
    if requested is None:
        return state.device if state is not None else torch.device("cpu")
    try:
        chosen = torch.device(requested)
    except RuntimeError:
        raise UsageError(f"--device {requested!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    backend = getattr(torch, chosen.type, None)
    if hasattr(backend, "is_available") and not backend.is_available():
        raise UsageError(f"--device {requested}: no {chosen.type} device is available")
    if state is not None and state.num_processes > 1 and chosen.index is None and chosen.type == state.device.type:
        return state.device
    return chosen


def quiet_libraries() -> None:
    """One progress bar (ours) and one-line errors: the libraries' loading bars and their warnings before
    re-raising (diffusers logs "An error occurred while trying to fetch ...") would add lines."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    if "DIFFUSERS_VERBOSITY" not in os.environ:  # the user's explicit choice wins
        diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # errors it logs are raised too


def versions() -> dict:
    import diffusers

    return {"diffkit": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


def png_record(args, parameters: str, skip=("command", "overwrite", "no_progress", "run")) -> dict:
    """PNG text chunks: A1111-style ``parameters`` (what image sites parse) and diffkit's full JSON."""
    record = {k: v for k, v in vars(args).items() if k not in skip and not callable(v)}
    return {"parameters": parameters, "diffkit": json.dumps({**record, "versions": versions()})}


def read_image(path: str, mode: str = "RGB", option: str = "IMAGE") -> torch.Tensor:
    """An image file as a (1, C, H, W) tensor in [-1, 1] (masks: mode "L", rounded to {0, 1})."""
    import numpy as np
    import PIL.Image

    try:
        with PIL.Image.open(path) as file:
            pixels = np.asarray(file.convert(mode), dtype=np.float32) / 255
    except (OSError, PIL.UnidentifiedImageError, ValueError) as err:
        raise UsageError(f"{option}: cannot read image {path!r}: {err}") from None
    tensor = torch.from_numpy(pixels).reshape(*pixels.shape[:2], -1).permute(2, 0, 1)[None]
    return tensor.round() if mode == "L" else tensor * 2 - 1


def load_model(model: str | None, **kwargs):
    """The pipeline behind ``--model`` (default: the embedded model), libraries quietened first; a model that
    cannot be loaded is reported as a bad ``--model``."""
    from safetensors import SafetensorError

    from ..pipelines import load_pipeline

    quiet_libraries()
    try:
        return load_pipeline(model, **kwargs)
    except (ValueError, TypeError, OSError, RuntimeError, SafetensorError, ImportError, AttributeError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        raise UsageError(f"--model {model or 'default'}: {message}") from None
