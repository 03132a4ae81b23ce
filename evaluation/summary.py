"""Aggregate per-image metrics into the challenge summary, in memory.

Training validation and the ``python -m evaluation`` command both call ``evaluate_cases``.
All reported values are on the 0..100 scale.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from evaluation.metrics import (
    LABEL_THRESHOLD,
    classification_f1,
    final_score,
    segmentation_scores,
    time_score,
)
from fetuskit.labels import NUM_CHD, NUM_CLASSES, NUM_VIEWS


@dataclass(frozen=True, eq=False)
class CaseRecord:
    """One scored case.

    Attributes:
        name: case name for the per-case rows, for example the file basename.
        pred_mask, gt_mask: (H, W) integer label maps of equal shape, class ids 0..14.
        pred_label: (7,) scores or 0/1, binarised with ``> 0.5``.
        gt_label: (7,) 0/1.
        view: 0-based view index 0..3 of the ground-truth image.
    """

    name: str
    pred_mask: np.ndarray
    gt_mask: np.ndarray
    pred_label: np.ndarray
    gt_label: np.ndarray
    view: int


@dataclass(frozen=True)
class CaseRow:
    """Scores of one case on the 0..100 scale.

    ``dice`` and ``nsd`` have one entry per class id 1..14 (position 0..13), None where
    the class is not counted. ``mean_dice`` and ``mean_nsd`` average the counted classes
    and are None when no class is counted.
    """

    name: str
    view: int
    dice: list[float | None]
    nsd: list[float | None]
    mean_dice: float | None
    mean_nsd: float | None
    pred_label: list[int]
    gt_label: list[int]


@dataclass(frozen=True)
class Summary:
    """Challenge metrics over a set of cases, on the 0..100 scale.

    Per-class lists have 14 entries for classes 1..14 and hold None for a class no image
    counted; per-label lists have 7 entries. ``time_score`` and ``ms_per_image`` are None
    when no timing was given, and ``score`` is then the form without the time term.
    """

    mean_dice: float
    mean_nsd: float
    macro_f1: float
    score: float
    time_score: float | None
    ms_per_image: float | None
    dice_per_class: list[float | None]
    nsd_per_class: list[float | None]
    count_per_class: list[int]
    f1_per_label: list[float]
    count_per_label: list[int]
    num_cases: int
    cases: list[CaseRow] = field(repr=False)


def _optional(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def evaluate_cases(records: Iterable[CaseRecord], ms_per_image: float | None = None) -> Summary:
    """Score a set of cases; records are consumed one at a time, so a generator keeps memory flat.

    Args:
        records: the cases, each with prediction and ground truth.
        ms_per_image: mean wall time per image in milliseconds, or None for the form of
            the score without the time term.

    Empty input gives 0 for every mean and F1.

    Raises:
        ValueError: a record's view is not 0..3, or its masks or labels are invalid.
    """
    foreground = slice(1, NUM_CLASSES)
    dice_sum = np.zeros(NUM_CLASSES)
    nsd_sum = np.zeros(NUM_CLASSES)
    counts = np.zeros(NUM_CLASSES, dtype=np.int64)
    pred_labels: list[np.ndarray] = []
    gt_labels: list[np.ndarray] = []
    views: list[int] = []
    rows: list[CaseRow] = []

    for record in records:
        if not isinstance(record.view, (int, np.integer)) or not 0 <= record.view < NUM_VIEWS:
            raise ValueError(
                f"case {record.name}: view {record.view!r} is not a 0-based view index 0..{NUM_VIEWS - 1}; "
                "cases without a known view cannot be scored"
            )
        scores = segmentation_scores(np.asarray(record.pred_mask), np.asarray(record.gt_mask))
        counted = scores.counted
        dice_sum[counted] += scores.dice[counted]
        nsd_sum[counted] += scores.nsd[counted]
        counts += counted

        pred_label = np.asarray(record.pred_label, dtype=np.float64).reshape(NUM_CHD)
        gt_label = np.asarray(record.gt_label).reshape(NUM_CHD)
        pred_labels.append(pred_label)
        gt_labels.append(gt_label)
        views.append(int(record.view))
        any_counted = bool(counted.any())
        rows.append(
            CaseRow(
                name=record.name,
                view=int(record.view),
                dice=[_optional(100 * value) for value in scores.dice[foreground]],
                nsd=[_optional(100 * value) for value in scores.nsd[foreground]],
                mean_dice=float(100 * scores.dice[counted].mean()) if any_counted else None,
                mean_nsd=float(100 * scores.nsd[counted].mean()) if any_counted else None,
                pred_label=(pred_label > LABEL_THRESHOLD).astype(int).tolist(),
                gt_label=gt_label.astype(int).tolist(),
            )
        )

    seen = counts > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        dice_per_class = np.where(seen, 100 * dice_sum / counts, np.nan)
        nsd_per_class = np.where(seen, 100 * nsd_sum / counts, np.nan)
    mean_dice = float(dice_per_class[seen].mean()) if seen.any() else 0.0
    mean_nsd = float(nsd_per_class[seen].mean()) if seen.any() else 0.0

    if rows:
        f1, label_counts = classification_f1(np.stack(pred_labels), np.stack(gt_labels), np.array(views))
    else:
        f1, label_counts = np.zeros(NUM_CHD), np.zeros(NUM_CHD, dtype=np.int64)
    macro_f1 = float(100 * f1.mean())

    time_value = time_score(ms_per_image) if ms_per_image is not None else None
    return Summary(
        mean_dice=mean_dice,
        mean_nsd=mean_nsd,
        macro_f1=macro_f1,
        score=final_score(mean_dice, mean_nsd, macro_f1, time_value),
        time_score=time_value,
        ms_per_image=ms_per_image,
        dice_per_class=[_optional(value) for value in dice_per_class[foreground]],
        nsd_per_class=[_optional(value) for value in nsd_per_class[foreground]],
        count_per_class=counts[foreground].tolist(),
        f1_per_label=(100 * f1).tolist(),
        count_per_label=label_counts.tolist(),
        num_cases=len(rows),
        cases=rows,
    )
