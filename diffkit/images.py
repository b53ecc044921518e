"""Image helpers shared by the CLI and the benchmarks: tensors to PIL, sample grids, atomic PNG writes."""

import math
import os
import tempfile
from pathlib import Path

import PIL.Image
import torch
from PIL.PngImagePlugin import PngInfo


def to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """[-1, 1] (N, C, H, W) tensors to 8-bit RGB PIL images."""
    array = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [PIL.Image.fromarray(a) for a in array]


def image_grid(images: list[PIL.Image.Image], ncols: int | None = None, tile: int = 64) -> PIL.Image.Image:
    """A near-square grid of equally sized images; small ones are upscaled with nearest neighbour (the longer side to
    ``tile``) so pixels stay visible, keeping their aspect ratio."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    if len({im.size for im in images}) != 1:
        raise ValueError(f"image_grid needs images of one size, got {sorted({im.size for im in images})}")
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    nrows = math.ceil(len(images) / ncols)
    w, h = images[0].size
    scale = max(tile, w, h) / max(w, h)
    cw, ch = round(w * scale), round(h * scale)
    grid = PIL.Image.new("RGB", (ncols * cw, nrows * ch))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB").resize((cw, ch), PIL.Image.NEAREST), ((i % ncols) * cw, (i // ncols) * ch))
    return grid


def _temporary_beside(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary files
    return tmp


def save_png_atomic(image: PIL.Image.Image, path: str | Path, text: dict[str, str] | None = None) -> None:
    """Write a PNG (with optional text chunks) to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    tmp = _temporary_beside(path)
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = _temporary_beside(path)
    try:
        Path(tmp).write_text(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure_atomic(fig, path: str | Path, dpi: int = 120) -> None:
    """Save a matplotlib figure as PNG through a temporary file."""
    path = Path(path)
    tmp = _temporary_beside(path)
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
