"""Prompts for the refiner, derived from a coarse label map.

Coordinates: boxes are (x1, y1, x2, y2) and points (x, y), where x is the column index and y
the row index of a pixel. Box corners are inclusive pixel indices, so a one-pixel structure at
row r, column c has the box (c, r, c, r). This is the convention SAM's predictor and the
LiteMedSAM training code use; the prompt encoder adds 0.5 to reach pixel centres.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

# 8-connectivity: pixels touching at a corner belong to one component.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class ClassPrompt:
    """Prompt for one class of one image.

    Attributes:
        class_id: label value in the coarse map.
        box: (4,) float32 (x1, y1, x2, y2), inclusive pixel indices of the largest connected
            component, widened by the margin and clipped to the image.
        point: (2,) float32 (x, y) of the component pixel farthest from its boundary, or None.
        component: (H, W) bool mask of the largest connected component.
    """

    class_id: int
    box: np.ndarray
    point: np.ndarray | None
    component: np.ndarray


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Return the largest 8-connected component of a (H, W) bool mask (all False if empty).

    Ties between components of equal size go to the one that comes first in raster order.
    """
    labels, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if count == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def box_with_margin(component: np.ndarray, margin: int) -> np.ndarray:
    """Return the (x1, y1, x2, y2) inclusive box of a non-empty (H, W) mask, widened by ``margin``
    pixels on every side and clipped to [0, W - 1] x [0, H - 1], as float32."""
    rows = np.flatnonzero(component.any(axis=1))
    cols = np.flatnonzero(component.any(axis=0))
    if rows.size == 0:
        raise ValueError("cannot take the box of an empty mask")
    height, width = component.shape
    x1 = max(int(cols[0]) - margin, 0)
    y1 = max(int(rows[0]) - margin, 0)
    x2 = min(int(cols[-1]) + margin, width - 1)
    y2 = min(int(rows[-1]) + margin, height - 1)
    return np.array([x1, y1, x2, y2], dtype=np.float32)


def interior_point(component: np.ndarray) -> np.ndarray:
    """Return the (x, y) pixel of a non-empty mask farthest (Euclidean) from its boundary.

    The image border counts as boundary, so the point also keeps away from a cut-off edge.
    Ties go to the first pixel in raster order.
    """
    distance = ndimage.distance_transform_edt(np.pad(component, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return np.array([col, row], dtype=np.float32)


def enclosed_region(labels: np.ndarray, class_id: int) -> np.ndarray:
    """Return the (H, W) bool region that ``class_id`` outlines in a label map, holes filled.

    The region is the foreground (every label > 0) with its holes filled, reduced to the
    8-connected components that contain a pixel of ``class_id``. For the thoracic cavity of a
    four-chamber view, a ring around the heart, this is the filled thorax: cavity, heart,
    chambers and descending aorta. An absent class gives an all-False region.
    """
    own = labels == class_id
    if not own.any():
        return np.zeros(labels.shape, dtype=bool)
    filled = ndimage.binary_fill_holes(labels > 0)
    components, _ = ndimage.label(filled, structure=_EIGHT_CONNECTED)
    touched = np.unique(components[own])
    return np.isin(components, touched[touched > 0])


def class_prompts(
    coarse: np.ndarray,
    classes: list[int],
    margin: int,
    min_area: int,
    use_point: bool,
    enclosing_classes: tuple[int, ...] = (),
) -> tuple[list[ClassPrompt], dict[int, str]]:
    """Build one prompt per requested class present in ``coarse``.

    Args:
        coarse: (H, W) integer label map.
        classes: class ids to prompt, in the order the prompts are returned.
        margin: pixels added to every side of the box before clipping to the image.
        min_area: a class whose largest component has fewer pixels is skipped.
        use_point: add the interior point of the largest component as a positive click.
        enclosing_classes: classes prompted with their ``enclosed_region`` instead of their
            own pixels, so the box, the point and ``component`` describe the filled region.

    Returns:
        The prompts, and a dict class id -> reason for each requested class that got none
        (``"absent"`` or ``"smaller than min_area"``).
    """
    prompts: list[ClassPrompt] = []
    skipped: dict[int, str] = {}
    for class_id in classes:
        if not (coarse == class_id).any():
            skipped[class_id] = "absent"
            continue
        region = enclosed_region(coarse, class_id) if class_id in enclosing_classes else coarse == class_id
        component = largest_component(region)
        area = int(component.sum())
        if area < min_area:
            skipped[class_id] = f"smaller than min_area ({area} < {min_area} pixels)"
            continue
        point = interior_point(component) if use_point else None
        prompts.append(ClassPrompt(class_id, box_with_margin(component, margin), point, component))
    return prompts, skipped


def probability_to_logits(probability: torch.Tensor, limit: float) -> torch.Tensor:
    """Map class probabilities in [0, 1] to mask-prompt logits log(p / (1 - p)), clipped to ±limit.

    SAM takes its own low-resolution logits as mask prompt, so each probability becomes the
    logit that the sigmoid turns back into it, and 0.5 maps to 0. The clip keeps saturated
    probabilities (0 or 1, as a one-hot coarse mask gives) at a finite ±limit.
    """
    epsilon = 1.0 / (1.0 + np.exp(limit))
    clipped = probability.clamp(epsilon, 1.0 - epsilon)
    return torch.logit(clipped).clamp(-limit, limit)
