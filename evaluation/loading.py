"""Pair ground-truth files with prediction files and read them as scoring records.

Every case is checked. Problems are collected while the valid cases are scored, and
``load_records`` callers raise them together once the pass is over, so one run reports
every bad case.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evaluation.summary import CaseRecord
from fetuskit.cases import Case, find_label, load_cases
from fetuskit.errors import FetusError
from fetuskit.io import read_image, read_label, read_prediction
from fetuskit.labels import NUM_CHD

logger = logging.getLogger(__name__)


class ScoringInputError(FetusError, ValueError):
    """Ground-truth or prediction files that cannot be scored; the message lists every case."""


@dataclass
class LoadReport:
    """Problems and missing predictions that ``load_records`` records while its records are consumed.

    Attributes:
        problems: one message per bad case, naming the case and the file.
        missing_predictions: names of cases scored as empty predictions.
    """

    problems: list[str] = field(default_factory=list)
    missing_predictions: list[str] = field(default_factory=list)


def scoring_cases(images_dir: Path | None, labels_dir: Path | None, case_list: Path | None) -> list[Case]:
    """List the ground-truth cases from an images and a labels folder, or from a JSON list.

    Raises:
        ValueError: neither or both sources are given.
        CaseListError: the folder or list is invalid (see ``fetuskit.cases.load_cases``).
    """
    if case_list is not None and (images_dir is not None or labels_dir is not None):
        raise ValueError("pass either a JSON case list or an images and a labels folder, not both")
    if case_list is not None:
        return load_cases(case_list)
    if images_dir is None or labels_dir is None:
        raise ValueError("pass a JSON case list, or both an images folder and a labels folder")
    cases = load_cases(images_dir)
    return [
        Case(name=case.name, image=case.image, label=find_label(case.image, labels_dir), view_id=case.view_id)
        for case in cases
    ]


def load_records(
    cases: list[Case], pred_dir: Path, report: LoadReport, missing_as_empty: bool = False
) -> Iterator[CaseRecord]:
    """Yield a scoring record for each valid case and add each bad case to ``report.problems``.

    The view and the (H, W) shape come from the ground-truth image file, so a
    prediction must have the image's own size. A ground-truth image without a valid
    view is a problem, because the allowed CHD labels depend on it.

    Args:
        cases: ground-truth cases; each needs a label file.
        pred_dir: folder holding one prediction ``<case.name>`` per case.
        report: receives the problems and the cases scored as empty.
        missing_as_empty: score a missing prediction file as all background with a
            zero label instead of reporting it. An invalid prediction file is still a problem.
    """
    for case in cases:
        if case.label is None:
            report.problems.append(f"{case.name}: no label file found for image {case.image}")
            continue
        try:
            image = read_image(case.image)
        except FetusError as error:
            report.problems.append(f"{case.name}: {error}")
            continue
        if image.view is None:
            report.problems.append(f"{case.name}: ground-truth image {case.image} has no valid view ({image.view_reason})")
            continue
        try:
            gt_mask, gt_label = read_label(case.label, image.image.shape)
        except FetusError as error:
            report.problems.append(f"{case.name}: {error}")
            continue

        prediction_path = pred_dir / case.name
        if not prediction_path.exists() and missing_as_empty:
            report.missing_predictions.append(case.name)
            pred_mask = np.zeros_like(gt_mask)
            pred_label = np.zeros(NUM_CHD)
        elif not prediction_path.exists():
            report.problems.append(f"{case.name}: prediction file {prediction_path} not found")
            continue
        else:
            try:
                pred_mask, pred_label = read_prediction(prediction_path, image.image.shape)
            except FetusError as error:
                report.problems.append(f"{case.name}: {error}")
                continue

        yield CaseRecord(
            name=case.name,
            pred_mask=pred_mask,
            gt_mask=gt_mask,
            pred_label=pred_label,
            gt_label=gt_label,
            view=image.view,
        )
    if report.missing_predictions:
        logger.warning("scored %d missing predictions as empty", len(report.missing_predictions))
