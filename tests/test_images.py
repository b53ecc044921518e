"""Image helpers: grids keep each image's pixels and aspect ratio."""

import numpy as np
import PIL.Image
import pytest

from diffkit.images import image_grid


def test_image_grid_upscales_by_nearest_neighbour_and_keeps_the_aspect_ratio():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (8, 16, 3), dtype=np.uint8) for _ in range(3)]  # 8 high, 16 wide
    grid = np.asarray(image_grid([PIL.Image.fromarray(a) for a in arrays], ncols=2, tile=32))
    assert grid.shape == (2 * 16, 2 * 32, 3)  # longer side 16 -> 32: each cell 32 wide, 16 high
    for i, a in enumerate(arrays):
        r, c = divmod(i, 2)
        cell = grid[r * 16 : (r + 1) * 16, c * 32 : (c + 1) * 32]
        np.testing.assert_array_equal(cell, a.repeat(2, axis=0).repeat(2, axis=1))
    assert not grid[16:, 32:].any()  # the empty fourth cell stays black


def test_image_grid_refuses_mixed_sizes_and_no_images():
    with pytest.raises(ValueError, match="one size"):
        image_grid([PIL.Image.new("RGB", (8, 8)), PIL.Image.new("RGB", (8, 16))])
    with pytest.raises(ValueError, match="at least one"):
        image_grid([])
