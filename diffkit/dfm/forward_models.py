"""Forward models for diffusion with forward models: how an unobserved signal S yields an observation O.

A forward model maps a batch of signals and view parameters phi to observations, O = forward(S, phi), and
must be differentiable in S: the training loss reaches the generator only through it. ``lift`` places an
observation back on the signal's coordinates, with a mask of where it says anything; that is how the
generator reads context and noisy target observations of any forward model (the transpose, for the linear
ones built in). Views are tensors with the batch first, so a batch can mix views.

Built in: ``WindowView`` (a window of a 1-D signal), ``CropView`` (a square crop of an image) and
``MaskView`` (the signal multiplied by a binary mask, any shape). A user-defined forward model needs the
four members of ``ForwardModel``.
"""

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ForwardModel(Protocol):
    signal_shape: tuple[int, ...]  # one signal, without the batch: (C, L) or (C, H, W)

    def __call__(self, signal: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """Observations (B, *observation_shape) of signals (B, *signal_shape) from views (B, ...)."""

    def lift(self, observation: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(canvas (B, *signal_shape), mask (B, 1, *signal_shape[1:])): the observation on signal coordinates."""

    def random_views(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n views drawn from the training distribution of views."""


def check_signal(forward_model, signal: torch.Tensor, name: str = "signal") -> None:
    if not torch.is_tensor(signal) or tuple(signal.shape[1:]) != tuple(forward_model.signal_shape):
        shape = tuple(signal.shape) if torch.is_tensor(signal) else type(signal).__name__
        raise ValueError(f"{name} must have shape (B, {', '.join(map(str, forward_model.signal_shape))}), got {shape}")


def merge_lifted(lifted: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Several lifted views of the same signal as one: values averaged where views overlap, masks united."""
    if not lifted:
        raise ValueError("need at least one view to merge")
    total = sum(canvas * mask for canvas, mask in lifted)
    count = sum(mask for _, mask in lifted)
    return total / count.clamp(min=1), (count > 0).to(total.dtype)


class WindowView:
    """O = S[..., start : start + width] of a 1-D signal (C, L); the view is the start index, shape (B,)."""

    def __init__(self, signal_length: int, width: int, channels: int = 1):
        if not 1 <= width <= signal_length:
            raise ValueError(f"width must lie in [1, signal_length={signal_length}], got {width}")
        self.signal_shape, self.width = (channels, signal_length), width

    def _starts(self, view: torch.Tensor, batch: int) -> torch.Tensor:
        view = torch.as_tensor(view).long().flatten()
        if len(view) != batch or view.min() < 0 or view.max() > self.signal_shape[1] - self.width:
            raise ValueError(
                f"view must hold {batch} start indices in [0, {self.signal_shape[1] - self.width}], got {view.tolist()}"
            )
        return view

    def _index(self, starts: torch.Tensor) -> torch.Tensor:
        return starts[:, None] + torch.arange(self.width, device=starts.device)  # (B, width)

    def __call__(self, signal, view):
        check_signal(self, signal)
        index = self._index(self._starts(view, len(signal)).to(signal.device))
        return signal.gather(2, index[:, None, :].expand(-1, signal.shape[1], -1))

    def lift(self, observation, view):
        b, c = observation.shape[:2]
        index = self._index(self._starts(view, b).to(observation.device))[:, None, :]
        canvas = observation.new_zeros(b, c, self.signal_shape[1]).scatter(2, index.expand(-1, c, -1), observation)
        mask = observation.new_zeros(b, 1, self.signal_shape[1]).scatter(2, index, 1.0)
        return canvas, mask

    def random_views(self, n, generator=None):
        return torch.randint(0, self.signal_shape[1] - self.width + 1, (n,), generator=generator)

    def covering_views(self, n: int) -> list[torch.Tensor]:
        """The fewest windows, evenly spread, whose union is the whole signal (each for a batch of n)."""
        last = self.signal_shape[1] - self.width
        count = -(-self.signal_shape[1] // self.width)
        return [torch.full((n,), round(k * last / max(count - 1, 1))) for k in range(count)]


class CropView:
    """O = S[..., top : top + size, left : left + size] of an image (C, H, W); the view is (top, left), (B, 2)."""

    def __init__(self, image_size: int, crop_size: int, channels: int = 3):
        if not 1 <= crop_size <= image_size:
            raise ValueError(f"crop_size must lie in [1, image_size={image_size}], got {crop_size}")
        self.signal_shape, self.crop_size = (channels, image_size, image_size), crop_size

    def _corners(self, view: torch.Tensor, batch: int) -> torch.Tensor:
        view = torch.as_tensor(view).long()
        limit = self.signal_shape[1] - self.crop_size
        if view.shape != (batch, 2) or view.min() < 0 or view.max() > limit:
            raise ValueError(f"view must be ({batch}, 2) (top, left) corners in [0, {limit}], got {view.tolist()}")
        return view

    def _masks(self, corners: torch.Tensor, device) -> torch.Tensor:
        """(B, 1, H, W) masks of the crops."""
        grid = torch.arange(self.signal_shape[1], device=device)
        top, left = corners[:, 0, None].to(device), corners[:, 1, None].to(device)
        rows = (grid >= top) & (grid < top + self.crop_size)
        cols = (grid >= left) & (grid < left + self.crop_size)
        return (rows[:, :, None] & cols[:, None, :])[:, None]

    def __call__(self, signal, view):
        check_signal(self, signal)
        corners, k = self._corners(view, len(signal)).tolist(), self.crop_size
        return torch.stack([s[:, top : top + k, left : left + k] for s, (top, left) in zip(signal, corners)])

    def lift(self, observation, view):
        b, c, k = observation.shape[0], observation.shape[1], self.crop_size
        mask = self._masks(self._corners(view, b), observation.device).to(observation.dtype)
        canvas = observation.new_zeros(b, c, *self.signal_shape[1:])
        for i, (top, left) in enumerate(torch.as_tensor(view).tolist()):
            canvas[i, :, top : top + k, left : left + k] = observation[i]
        return canvas, mask

    def random_views(self, n, generator=None):
        return torch.randint(0, self.signal_shape[1] - self.crop_size + 1, (n, 2), generator=generator)

    def covering_views(self, n: int) -> list[torch.Tensor]:
        """The fewest crops on an even grid whose union is the whole image (each for a batch of n)."""
        last = self.signal_shape[1] - self.crop_size
        count = -(-self.signal_shape[1] // self.crop_size)
        offsets = [round(k * last / max(count - 1, 1)) for k in range(count)]
        return [torch.tensor([[top, left]] * n) for top in offsets for left in offsets]


class MaskView:
    """O = S * mask, masks of the signal's spatial shape; views are binary masks (B, 1, *spatial).

    ``mask_sampler(n, generator)`` draws the training views.
    """

    def __init__(self, signal_shape: tuple[int, ...], mask_sampler):
        self.signal_shape, self.mask_sampler = tuple(signal_shape), mask_sampler

    def _mask(self, view: torch.Tensor, batch: int) -> torch.Tensor:
        expected = (batch, 1, *self.signal_shape[1:])
        if tuple(view.shape) != expected or not torch.all((view == 0) | (view == 1)):
            raise ValueError(f"view must be a binary mask of shape {expected}, got {tuple(view.shape)}")
        return view

    def __call__(self, signal, view):
        check_signal(self, signal)
        return signal * self._mask(view, len(signal)).to(signal)

    def lift(self, observation, view):
        mask = self._mask(view, len(observation)).to(observation)
        return observation * mask, mask

    def random_views(self, n, generator=None):
        return self.mask_sampler(n, generator)
