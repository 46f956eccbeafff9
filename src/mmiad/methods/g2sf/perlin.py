"""Perlin-noise anomaly masks, as G2SF's ``Dataset/perlin.py`` and ``random_perlin_mask`` draw them.

On a 512×512 canvas: gradient noise at scales 2^a × 2^b (a, b ∈ 0..4), rotated by U(−90°, 90°), thresholded at
0.4, intersected with the allowed region; 4-connected components of 100..1600 px are kept and the draw is
accepted once they cover at least 300 px. The mask is resized (nearest) to the sample and dilated 3×3. The
official loop over components stops one short and drops the last component (``keep_last_component`` keeps it).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CANVAS = 512
MIN_COMPONENT, MAX_COMPONENT, MIN_TOTAL = 100, 1600, 300


def _fade(t: np.ndarray) -> np.ndarray:
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2D gradient (Perlin) noise of ``shape`` with ``res`` periods per axis (``shape`` divisible by ``res``)."""
    delta = (res[0] / shape[0], res[1] / shape[1])
    cells = (shape[0] // res[0], shape[1] // res[1])
    grid = np.mgrid[0 : res[0] : delta[0], 0 : res[1] : delta[1]].transpose(1, 2, 0) % 1
    angles = 2 * np.pi * rng.random((res[0] + 1, res[1] + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)

    def tiled(rows: slice, cols: slice) -> np.ndarray:
        return np.repeat(np.repeat(gradients[rows, cols], cells[0], axis=0), cells[1], axis=1)

    def dot(grad: np.ndarray, shift: tuple[int, int]) -> np.ndarray:
        offset = np.stack([grid[..., 0] + shift[0], grid[..., 1] + shift[1]], axis=-1)
        return (offset * grad[: shape[0], : shape[1]]).sum(axis=-1)

    n00 = dot(tiled(slice(0, -1), slice(0, -1)), (0, 0))
    n10 = dot(tiled(slice(1, None), slice(0, -1)), (-1, 0))
    n01 = dot(tiled(slice(0, -1), slice(1, None)), (0, -1))
    n11 = dot(tiled(slice(1, None), slice(1, None)), (-1, -1))
    t = _fade(grid[: shape[0], : shape[1]])
    top = n00 * (1 - t[..., 0]) + t[..., 0] * n10
    bottom = n01 * (1 - t[..., 0]) + t[..., 0] * n11
    return np.sqrt(2) * ((1 - t[..., 1]) * top + t[..., 1] * bottom)


def resize_nearest(mask: np.ndarray, size: int) -> np.ndarray:
    """Square nearest-neighbour resize (``cv2.INTER_NEAREST``'s pixel choice: floor(i·in/out))."""
    index = np.minimum((np.arange(size) * mask.shape[0] / size).astype(int), mask.shape[0] - 1)
    return mask[np.ix_(index, index)]


def keep_components(mask: np.ndarray, *, keep_last: bool = False) -> np.ndarray:
    """The union of 4-connected components of MIN..MAX px (the official loop skips the last label)."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros_like(mask, dtype=bool)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    last = count + 1 if keep_last else count
    chosen = [i for i in range(1, last) if MIN_COMPONENT <= areas[i] <= MAX_COMPONENT]
    return np.isin(labels, chosen)


def random_perlin_mask(
    region: np.ndarray,
    rng: np.random.Generator,
    *,
    threshold: float = 0.4,
    decay: bool = False,
    keep_last: bool = False,
    max_tries: int = 500,
) -> np.ndarray | None:
    """An S×S anomaly mask inside ``region`` (S×S bool), or None when no draw is accepted in ``max_tries``.

    ``decay`` is the Eyecandies loop: every 10 failed draws the threshold is multiplied by 0.9 (floor 0.2).
    """
    canvas = resize_nearest(region.astype(bool), CANVAS)
    for attempt in range(max_tries):
        if decay and attempt and attempt % 10 == 0:
            threshold = max(0.2, threshold * 0.9)
        scale = 2 ** rng.integers(0, 5, size=2)
        noise = perlin_noise((CANVAS, CANVAS), (int(scale[0]), int(scale[1])), rng)
        noise = ndimage.rotate(noise, rng.uniform(-90, 90), reshape=False, order=1, mode="constant", cval=0.0)
        kept = keep_components((noise > threshold) & canvas, keep_last=keep_last)
        if kept.sum() >= MIN_TOTAL:
            mask = resize_nearest(kept, region.shape[0])
            return ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool))
    return None
