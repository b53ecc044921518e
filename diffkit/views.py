"""Views for visual anagrams: invertible, noise-preserving transforms of a sample (Geng et al., CVPR 2024,
dangeng/visual_anagrams ``views/``).

A view P must map N(0, I) noise to N(0, I) noise, or a denoiser run on P x_t sees a sample it was never trained on;
for a linear map that means P is orthogonal (a permutation of pixels or channels, a sign flip, a rotation by
multiples of 90 degrees). ``check_view`` refuses anything else (a blur, a resize, a colour-balance scaling).

Named views (``make_view``): identity, rot90 / rot180 / rot270 (counter-clockwise), hflip / vflip, transpose, negate,
jigsaw (a fixed permutation of a 4 x 4 grid of square blocks; Geng's jigsaw moves puzzle-shaped pieces, these are
plain blocks) and ``channels:ijk``, a channel permutation (``channels:201`` shows channel 2 as channel 0, ...).
Every view acts on batched tensors (..., C, H, W).
"""

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class View:
    """A named transform and its inverse, both on (..., C, H, W) tensors."""

    name: str
    apply: Callable[[torch.Tensor], torch.Tensor]
    inverse: Callable[[torch.Tensor], torch.Tensor]

    def __repr__(self) -> str:
        return f"View({self.name!r})"


def _rotation(k: int) -> View:
    return View(f"rot{90 * k}", lambda x: torch.rot90(x, k, dims=(-2, -1)), lambda x: torch.rot90(x, -k, dims=(-2, -1)))


def _flip(name: str, dim: int) -> View:
    return View(name, lambda x: torch.flip(x, (dim,)), lambda x: torch.flip(x, (dim,)))


def _jigsaw(grid: int = 4, seed: int = 4522) -> View:
    """Blocks of an image cut into grid x grid squares, moved by a fixed random permutation (seed as Geng's
    JigsawView default) that leaves no block in place."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(grid * grid, generator=generator)
        if not torch.any(perm == torch.arange(grid * grid)):
            break
    inverse_perm = torch.argsort(perm)

    def move(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        *lead, c, h, w = x.shape
        if h % grid or w % grid:
            raise ValueError(f"the jigsaw view needs height and width divisible by {grid}, got {h} x {w}")
        bh, bw = h // grid, w // grid
        blocks = x.reshape(*lead, c, grid, bh, grid, bw).movedim(-3, -2).reshape(*lead, c, grid * grid, bh, bw)
        blocks = blocks[..., order, :, :]  # output block i is input block order[i]
        return blocks.reshape(*lead, c, grid, grid, bh, bw).movedim(-2, -3).reshape(*lead, c, h, w)

    return View("jigsaw", lambda x: move(x, perm), lambda x: move(x, inverse_perm))


def _channels(spec: str) -> View:
    digits = spec.split(":", 1)[1]
    if not (digits.isdigit() and sorted(int(d) for d in digits) == list(range(len(digits))) and len(digits) > 1):
        raise ValueError(f"a channel view is 'channels:' and a permutation of 0..C-1 such as 'channels:201', got {spec!r}")
    perm = torch.tensor([int(d) for d in digits])
    inverse_perm = torch.argsort(perm)

    def permute(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        if x.shape[-3] != len(order):
            raise ValueError(f"view {spec!r} permutes {len(order)} channels, got a tensor with {x.shape[-3]}")
        return x[..., order, :, :]

    return View(spec, lambda x: permute(x, perm), lambda x: permute(x, inverse_perm))


VIEWS = {
    "identity": lambda: View("identity", lambda x: x, lambda x: x),
    "rot90": lambda: _rotation(1),
    "rot180": lambda: _rotation(2),
    "rot270": lambda: _rotation(3),
    "hflip": lambda: _flip("hflip", -1),
    "vflip": lambda: _flip("vflip", -2),  # Geng's "flip" (upside down)
    "transpose": lambda: View("transpose", lambda x: x.transpose(-2, -1), lambda x: x.transpose(-2, -1)),
    "negate": lambda: View("negate", lambda x: -x, lambda x: -x),
    "jigsaw": _jigsaw,
}


def make_view(view: str | View) -> View:
    """A view from its name (see the module docstring) or a ``View`` as is."""
    if isinstance(view, View):
        return view
    if not isinstance(view, str):
        raise TypeError(f"a view must be a name or a View, got {type(view).__name__}")
    if view.startswith("channels:"):
        return _channels(view)
    if view not in VIEWS:
        raise ValueError(
            f"unknown view {view!r}; allowed: {', '.join(VIEWS)}, channels:<permutation> (non-orthogonal transforms "
            "such as a blur are not views: they do not keep noise Gaussian with unit variance)"
        )
    return VIEWS[view]()


def check_view(view: View, shape: tuple[int, ...], atol: float = 1e-10) -> None:
    """Refuse a view that is not an orthogonal linear map with the given inverse on samples of ``shape``
    (C, H, W): it would not keep the noise of x_t N(0, I). Checked on random float64 probes."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn((1, *shape), generator=generator, dtype=torch.float64) for _ in range(2))
    try:
        pa, pb, pab = view.apply(a), view.apply(b), view.apply(a + 2 * b)
        back = view.inverse(pa)
    except (RuntimeError, IndexError) as err:  # a shape the view cannot take
        raise ValueError(f"view {view.name!r} cannot act on samples of shape {tuple(shape)}: {err}") from None
    if pa.shape != a.shape or back.shape != a.shape:
        raise ValueError(f"view {view.name!r} must keep the sample shape {tuple(shape)}, got {tuple(pa.shape[1:])}")
    problems = []
    if not torch.allclose(pab, pa + 2 * pb, atol=atol):
        problems.append("it is not linear")
    same_products = torch.allclose((pa * pb).sum(), (a * b).sum(), atol=atol)
    if not (same_products and torch.allclose(pa.square().sum(), a.square().sum(), atol=atol)):
        problems.append("it does not preserve inner products (not orthogonal, so it changes the noise's covariance)")
    if not torch.allclose(back, a, atol=atol):
        problems.append("its inverse does not undo it")
    if problems:
        raise ValueError(f"view {view.name!r} is not a noise-preserving view: {'; '.join(problems)}")
