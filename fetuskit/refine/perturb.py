"""Perturbations of ground-truth masks that imitate a backbone's coarse output for training.

All functions take and return (H, W) bool masks and draw from the given numpy Generator, so
a seed fixes the result.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def erode_or_dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Dilate by ``pixels`` (> 0) or erode by ``-pixels`` (< 0) with a 3 x 3 cross, repeated."""
    if pixels > 0:
        return ndimage.binary_dilation(mask, iterations=pixels)
    if pixels < 0:
        return ndimage.binary_erosion(mask, iterations=-pixels)
    return mask.copy()


def elastic_warp(mask: np.ndarray, rng: np.random.Generator, amplitude: float, smoothness: float) -> np.ndarray:
    """Warp a mask by a smooth random displacement field.

    ``amplitude`` is the typical displacement in pixels and ``smoothness`` the Gaussian sigma,
    in pixels, of the field; nearest-neighbour sampling keeps the mask binary.
    """
    if amplitude <= 0:
        return mask.copy()
    fields = []
    for _ in range(2):
        field = ndimage.gaussian_filter(rng.standard_normal(mask.shape), smoothness)
        field *= amplitude / max(float(np.abs(field).max()), 1e-8)
        fields.append(field)
    rows, cols = np.meshgrid(np.arange(mask.shape[0]), np.arange(mask.shape[1]), indexing="ij")
    coordinates = np.stack([rows + fields[0], cols + fields[1]])
    return ndimage.map_coordinates(mask.astype(np.uint8), coordinates, order=0, mode="nearest").astype(bool)


def blob_noise(mask: np.ndarray, rng: np.random.Generator, count: int, max_radius: int) -> np.ndarray:
    """Add or cut up to ``count`` discs centred on random boundary pixels of the mask."""
    boundary = mask & ~ndimage.binary_erosion(mask)
    rows, cols = np.nonzero(boundary)
    result = mask.copy()
    if rows.size == 0:
        return result
    grid_rows, grid_cols = np.ogrid[: mask.shape[0], : mask.shape[1]]
    for _ in range(int(rng.integers(0, count + 1))):
        index = int(rng.integers(rows.size))
        radius = int(rng.integers(1, max_radius + 1))
        disc = (grid_rows - rows[index]) ** 2 + (grid_cols - cols[index]) ** 2 <= radius**2
        result = result | disc if rng.random() < 0.5 else result & ~disc
    return result


def perturb_mask(mask: np.ndarray, rng: np.random.Generator, max_shift: int = 3) -> np.ndarray:
    """Return a coarse version of a non-empty mask: erosion or dilation, elastic warp, blobs.

    Each step moves the boundary by about ``max_shift`` pixels at most. If the steps would
    erase the mask, the unperturbed mask is returned, so a prompt can always be made from it.
    """
    result = erode_or_dilate(mask, int(rng.integers(-max_shift, max_shift + 1)))
    result = elastic_warp(result, rng, amplitude=float(max_shift), smoothness=8.0)
    result = blob_noise(result, rng, count=3, max_radius=max(max_shift, 1) * 2)
    return result if result.any() else mask.copy()


def jitter_box(box: np.ndarray, rng: np.random.Generator, fraction: float, shape: tuple[int, int]) -> np.ndarray:
    """Move each side of an (x1, y1, x2, y2) box by up to ``fraction`` of its width or height.

    The result is clipped to the (H, W) image and keeps x1 <= x2 and y1 <= y2.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    dx = fraction * (x2 - x1 + 1)
    dy = fraction * (y2 - y1 + 1)
    shifts = rng.uniform(-1.0, 1.0, size=4) * np.array([dx, dy, dx, dy])
    height, width = shape
    x1 = float(np.clip(round(x1 + shifts[0]), 0, width - 1))
    y1 = float(np.clip(round(y1 + shifts[1]), 0, height - 1))
    x2 = float(np.clip(round(x2 + shifts[2]), x1, width - 1))
    y2 = float(np.clip(round(y2 + shifts[3]), y1, height - 1))
    return np.array([x1, y1, x2, y2], dtype=np.float32)
