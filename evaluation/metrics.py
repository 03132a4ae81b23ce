"""FETUS 2026 metrics as the official evaluator computes them, as pure functions.

Segmentation, per image and foreground class c in 1..14 on full-resolution label maps:

- c absent from both prediction and ground truth: the image is skipped for c.
- Dice = 2|P∩G| / (|P| + |G| + 1e-8).
- NSD: the surface of a binary mask is the mask XOR its binary erosion (SciPy's default
  cross, one iteration, outside the image is background, so edge pixels are surface).
  p is the share of predicted-surface pixels whose Euclidean distance in pixels to the
  nearest ground-truth surface pixel is <= 2.0, g likewise the other way, NSD = (p + g) / 2.
- c present on one side only: Dice 0 and NSD 0, and the image still counts for c.

Classification: predictions are binarised with ``> 0.5``. Label k is scored only on the
images whose view allows it (``fetuskit.labels.CHD_MASK``), with binary F1 and
zero_division = 0.

``segmentation_scores`` is the fast implementation used everywhere.
``segmentation_scores_reference`` is the plain full-image definition, kept to test the
fast one against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from fetuskit.labels import CHD_MASK, NUM_CHD, NUM_CLASSES, NUM_VIEWS

DICE_EPSILON = 1e-8
NSD_TOLERANCE_PX = 2.0
LABEL_THRESHOLD = 0.5

# TimeScore is 100 at or below TIME_FULL_MS per image and 0 at or above TIME_ZERO_MS,
# linear in between (0.625 points per ms).
TIME_FULL_MS = 79.4
TIME_ZERO_MS = 239.4

SEGMENTATION_WEIGHT = 0.45
CLASSIFICATION_WEIGHT = 0.45
TIME_WEIGHT = 0.10

# Offsets (dy, dx) with dy² + dx² <= NSD_TOLERANCE_PX²: a surface pixel is within the
# tolerance of another surface exactly when that surface has a pixel at one of these offsets.
_TOLERANCE_OFFSETS = tuple(
    (dy, dx)
    for dy in range(-2, 3)
    for dx in range(-2, 3)
    if dy * dy + dx * dx <= NSD_TOLERANCE_PX**2
)
_TOLERANCE_RADIUS = 2


@dataclass(frozen=True, eq=False)
class SegmentationScores:
    """Per-class scores of one image, each a (15,) array indexed by class id.

    Attributes:
        dice: Dice in [0, 1]; NaN where the class is not counted.
        nsd: NSD in [0, 1]; NaN where the class is not counted.
        counted: bool, True where the class occurs in the prediction or the ground
            truth. Class 0 (background) is never counted.
    """

    dice: np.ndarray
    nsd: np.ndarray
    counted: np.ndarray


def _check_mask_pair(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"expected two (H, W) label maps of equal shape, got {pred.shape} and {gt.shape}")
    for name, mask in (("prediction", pred), ("ground truth", gt)):
        if mask.dtype.kind not in "ui":
            raise ValueError(f"{name} label map has dtype {mask.dtype}, expected an integer dtype such as uint8")


def _empty_scores() -> SegmentationScores:
    return SegmentationScores(
        dice=np.full(NUM_CLASSES, np.nan),
        nsd=np.full(NUM_CLASSES, np.nan),
        counted=np.zeros(NUM_CLASSES, dtype=bool),
    )


def surface_reference(mask: np.ndarray) -> np.ndarray:
    """Return the surface of a (H, W) bool mask: the mask XOR its erosion, outside is background."""
    return mask ^ ndimage.binary_erosion(mask, border_value=0)


def _surface_nsd_reference(pred: np.ndarray, gt: np.ndarray) -> float:
    pred_surface = surface_reference(pred)
    gt_surface = surface_reference(gt)
    # distance_transform_edt gives each pixel's distance to the nearest zero, so the
    # surface pixels are set to zero.
    distance_to_gt = ndimage.distance_transform_edt(~gt_surface)
    distance_to_pred = ndimage.distance_transform_edt(~pred_surface)
    p = np.mean(distance_to_gt[pred_surface] <= NSD_TOLERANCE_PX)
    g = np.mean(distance_to_pred[gt_surface] <= NSD_TOLERANCE_PX)
    return float((p + g) / 2)


def segmentation_scores_reference(pred: np.ndarray, gt: np.ndarray) -> SegmentationScores:
    """Score one image with the plain full-image definition (slow; for tests and benchmarks).

    Args:
        pred, gt: (H, W) integer label maps of equal shape, class ids 0..14.
    """
    _check_mask_pair(pred, gt)
    scores = _empty_scores()
    for class_id in range(1, NUM_CLASSES):
        pred_mask = pred == class_id
        gt_mask = gt == class_id
        pred_area = int(pred_mask.sum())
        gt_area = int(gt_mask.sum())
        if pred_area == 0 and gt_area == 0:
            continue
        scores.counted[class_id] = True
        overlap = int((pred_mask & gt_mask).sum())
        scores.dice[class_id] = 2 * overlap / (pred_area + gt_area + DICE_EPSILON)
        if pred_area == 0 or gt_area == 0:
            scores.nsd[class_id] = 0.0
        else:
            scores.nsd[class_id] = _surface_nsd_reference(pred_mask, gt_mask)
    return scores


def _surface_in_crop(mask: np.ndarray) -> np.ndarray:
    # Same as surface_reference, valid because everything outside the crop is background:
    # a pixel stays in the erosion only if its four neighbours are in the mask too.
    padded = np.pad(mask, 1)
    eroded = (
        mask
        & padded[:-2, 1:-1]
        & padded[2:, 1:-1]
        & padded[1:-1, :-2]
        & padded[1:-1, 2:]
    )
    return mask & ~eroded


def _within_tolerance(surface: np.ndarray) -> np.ndarray:
    # Dilation by the disk of radius NSD_TOLERANCE_PX: True where a surface pixel lies
    # within the tolerance.
    radius = _TOLERANCE_RADIUS
    height, width = surface.shape
    padded = np.pad(surface, radius)
    near = np.zeros_like(surface)
    for dy, dx in _TOLERANCE_OFFSETS:
        near |= padded[radius + dy : radius + dy + height, radius + dx : radius + dx + width]
    return near


def _surface_nsd_in_crop(pred: np.ndarray, gt: np.ndarray) -> float:
    pred_surface = _surface_in_crop(pred)
    gt_surface = _surface_in_crop(gt)
    p = np.count_nonzero(pred_surface & _within_tolerance(gt_surface)) / np.count_nonzero(pred_surface)
    g = np.count_nonzero(gt_surface & _within_tolerance(pred_surface)) / np.count_nonzero(gt_surface)
    return float((p + g) / 2)


def _union_box(first: tuple[slice, slice] | None, second: tuple[slice, slice] | None) -> tuple[slice, slice]:
    boxes = [box for box in (first, second) if box is not None]
    return tuple(
        slice(min(box[axis].start for box in boxes), max(box[axis].stop for box in boxes)) for axis in range(2)
    )


def segmentation_scores(pred: np.ndarray, gt: np.ndarray) -> SegmentationScores:
    """Score one image; equal to ``segmentation_scores_reference`` but fast.

    Areas and overlaps of all classes come from one joint ``bincount`` and the bounding
    boxes from one ``find_objects`` per map. Surfaces and tolerance checks run only
    inside the box around both masks of a class, so the cost follows the size of the
    structures. The box needs no margin: outside it both masks are background, which is
    what the erosion assumes beyond the image edge, and every surface pixel lies inside.
    Distances need no transform either: a pixel is within 2.0 px of a surface exactly
    when the surface has a pixel at one of the 13 offsets with dy² + dx² <= 4.

    Args:
        pred, gt: (H, W) integer label maps of equal shape, class ids 0..14.

    Raises:
        ValueError: shapes differ, a map is not 2-D or not integer, or a value is outside 0..14.
    """
    _check_mask_pair(pred, gt)
    pred_flat = pred.ravel()
    gt_flat = gt.ravel()
    for name, values in (("prediction", pred_flat), ("ground truth", gt_flat)):
        if values.size and (values.min() < 0 or values.max() >= NUM_CLASSES):
            raise ValueError(
                f"{name} label map has values {values.min()}..{values.max()}, expected class ids 0..{NUM_CLASSES - 1}"
            )
    # One joint histogram of (prediction, ground truth) pairs gives every area and overlap.
    pairs = pred_flat.astype(np.uint16) * NUM_CLASSES + gt_flat
    joint = np.bincount(pairs, minlength=NUM_CLASSES * NUM_CLASSES).reshape(NUM_CLASSES, NUM_CLASSES)
    pred_area = joint.sum(axis=1)
    gt_area = joint.sum(axis=0)
    overlap = np.diagonal(joint)
    pred_boxes = ndimage.find_objects(pred, max_label=NUM_CLASSES - 1)
    gt_boxes = ndimage.find_objects(gt, max_label=NUM_CLASSES - 1)

    scores = _empty_scores()
    for class_id in range(1, NUM_CLASSES):
        if pred_area[class_id] == 0 and gt_area[class_id] == 0:
            continue
        scores.counted[class_id] = True
        area_sum = int(pred_area[class_id]) + int(gt_area[class_id])
        scores.dice[class_id] = 2 * int(overlap[class_id]) / (area_sum + DICE_EPSILON)
        if pred_area[class_id] == 0 or gt_area[class_id] == 0:
            scores.nsd[class_id] = 0.0
            continue
        box = _union_box(pred_boxes[class_id - 1], gt_boxes[class_id - 1])
        scores.nsd[class_id] = _surface_nsd_in_crop(pred[box] == class_id, gt[box] == class_id)
    return scores


def binary_f1(pred: np.ndarray, gt: np.ndarray) -> float:
    """Return the binary F1 of two bool vectors, 0.0 when there are no true positives.

    Equals scikit-learn's ``f1_score(gt, pred, zero_division=0)``: 2TP / (2TP + FP + FN),
    and 0 for empty input or when neither side has a positive.
    """
    true_positives = int(np.count_nonzero(pred & gt))
    if true_positives == 0:
        return 0.0
    false_positives = int(np.count_nonzero(pred & ~gt))
    false_negatives = int(np.count_nonzero(~pred & gt))
    return 2 * true_positives / (2 * true_positives + false_positives + false_negatives)


def classification_f1(
    pred_labels: np.ndarray, gt_labels: np.ndarray, views: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Compute the per-label F1 over the images whose view allows each label.

    Args:
        pred_labels: (N, 7) predicted scores or 0/1, binarised with ``> 0.5``.
        gt_labels: (N, 7) ground truth 0/1.
        views: (N,) 0-based view indices 0..3.

    Returns:
        (7,) F1 in [0, 1] (0 for a label that no image allows), and (7,) int counts of
        the images each label was scored on.

    Raises:
        ValueError: shapes disagree or a view index is outside 0..3.
    """
    pred_labels = np.asarray(pred_labels, dtype=np.float64).reshape(-1, NUM_CHD)
    gt_labels = np.asarray(gt_labels).reshape(-1, NUM_CHD)
    views = np.asarray(views).reshape(-1)
    if not (len(pred_labels) == len(gt_labels) == len(views)):
        raise ValueError(
            f"got {len(pred_labels)} predicted label vectors, {len(gt_labels)} ground-truth "
            f"vectors and {len(views)} views; expected one of each per image"
        )
    if views.size and (views.min() < 0 or views.max() >= NUM_VIEWS):
        raise ValueError(f"view indices must be 0..{NUM_VIEWS - 1}, got {sorted(set(views.tolist()))}")

    allowed = CHD_MASK[views.astype(np.int64)]
    pred_positive = pred_labels > LABEL_THRESHOLD
    gt_positive = gt_labels == 1
    f1 = np.zeros(NUM_CHD)
    counts = allowed.sum(axis=0).astype(np.int64)
    for label in range(NUM_CHD):
        rows = allowed[:, label]
        f1[label] = binary_f1(pred_positive[rows, label], gt_positive[rows, label])
    return f1, counts


def time_score(ms_per_image: float) -> float:
    """Return TimeScore on 0..100: 100 at <= 79.4 ms per image, 0 at >= 239.4 ms, linear between."""
    fraction = (TIME_ZERO_MS - ms_per_image) / (TIME_ZERO_MS - TIME_FULL_MS)
    return 100.0 * min(1.0, max(0.0, fraction))


def final_score(mean_dice: float, mean_nsd: float, macro_f1: float, time_score_value: float | None = None) -> float:
    """Combine the metrics (all on 0..100) into the challenge score.

    Test phase, with a TimeScore: 0.45 * (MeanDice + MeanNSD) / 2 + 0.45 * MacroF1 + 0.10 * TimeScore.
    Without a TimeScore the time term is left out (the validation form, at most 90).

    NOTE: the organisers report a maximum of 80 for the validation phase, which this
    form does not reproduce; compare validation figures only with each other.
    """
    score = SEGMENTATION_WEIGHT * (mean_dice + mean_nsd) / 2 + CLASSIFICATION_WEIGHT * macro_f1
    if time_score_value is not None:
        score += TIME_WEIGHT * time_score_value
    return score
