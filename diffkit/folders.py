"""Image folders on disk, as ``diffkit train`` reads training data and ``diffkit eval`` reads image sets.

A folder is one of:
- the output of ``diffkit generate``: its ``manifest.jsonl`` (one JSON record per image written, with ``file`` and
  ``label`` or ``prompt``) says which files belong to the set and their labels;
- class sub-folders (``digits/0/*.png``, ``digits/1/*.png``, ...): the sub-folders are the labels, numbered by
  their sorted names, or by the names themselves when every name is an integer (so ``3/`` holds class 3);
- images directly in the folder: an unlabelled set.
Images are read as 8-bit RGB, the form every feature network and file format shares.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MANIFEST = "manifest.jsonl"


@dataclass
class ImageSet:
    """The files of an image set, in a fixed order, and their labels (``None`` for an unlabelled set)."""

    paths: list[Path]
    labels: list[int] | None = None
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.paths)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))  # hidden files: temporary files of atomic writes


def read_manifest(path: str | Path) -> list[dict]:
    """The records of a ``manifest.jsonl`` (a torn last line, from a killed run, is ignored)."""
    records = []
    lines = Path(path).read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a run killed mid-line; the image it named is redone on --resume
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON") from None
        if not (isinstance(record, dict) and isinstance(record.get("file"), str)):
            raise ValueError(f"{path}: line {i + 1} is not a record with a 'file'")
        records.append(record)
    return records


def scan_folder(folder: str | Path) -> ImageSet:
    """The image set a folder holds (see the module docstring for the three layouts)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    if (folder / MANIFEST).is_file():
        latest = {}  # a resumed run may record a file twice; its last record holds
        for record in read_manifest(folder / MANIFEST):
            latest[record["file"]] = record
        records = list(latest.values())
        missing = [r["file"] for r in records if not (folder / r["file"]).is_file()]
        if missing:
            raise ValueError(f"{folder / MANIFEST} lists {len(missing)} images that are missing, e.g. {missing[0]} (a "
                             "run that was stopped? finish it with diffkit generate --resume)")
        if not records:
            raise ValueError(f"{folder / MANIFEST} lists no images")
        labels = [r.get("label") for r in records]
        return ImageSet([folder / r["file"] for r in records],
                        labels if all(isinstance(v, int) for v in labels) else None)
    top = _images_in(folder)
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and _images_in(p))
    if top and subfolders:
        raise ValueError(f"{folder} holds images both at its top and in sub-folders ({subfolders[0].name}/); put them "
                         "all in class sub-folders or all at the top")
    if top:
        return ImageSet(top)
    if not subfolders:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    names = [p.name for p in subfolders]
    numbered = all(n.isdigit() for n in names)
    paths, labels = [], []
    for index, sub in enumerate(subfolders):
        files = _images_in(sub)
        paths += files
        labels += [int(sub.name) if numbered else index] * len(files)
    return ImageSet(paths, labels, names)


def read_images(paths: list[Path], resolution: int | None = None) -> torch.Tensor:
    """Images as a uint8 (N, 3, H, W) tensor. Without ``resolution`` all must have one size; with it each is resized
    (shorter side to ``resolution``, bilinear with antialiasing) and centre-cropped to a square."""
    arrays = []
    for path in paths:
        try:
            with PIL.Image.open(path) as file:
                image = file.convert("RGB")
        except (OSError, PIL.UnidentifiedImageError) as err:
            raise ValueError(f"cannot read image {str(path)!r}: {err}") from None
        if resolution is not None:
            image = _resize_crop(image, resolution)
        elif arrays and image.size != (arrays[0].shape[1], arrays[0].shape[0]):
            raise ValueError(f"{path} is {image.size[0]}x{image.size[1]} but {paths[0]} is "
                             f"{arrays[0].shape[1]}x{arrays[0].shape[0]}: an image set needs one size")
        arrays.append(np.asarray(image))
    if not arrays:
        return torch.zeros(0, 3, resolution or 0, resolution or 0, dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _resize_crop(image: PIL.Image.Image, resolution: int) -> PIL.Image.Image:
    w, h = image.size
    scale = resolution / min(w, h)
    if (w, h) != (resolution, resolution):
        image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), PIL.Image.BILINEAR)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images to uint8, rounded as ``diffkit.images.to_pil`` writes them to PNG."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to floats in [-1, 1]."""
    return images.float() / 127.5 - 1
