"""Per-label CHD decision thresholds from out-of-fold predictions, with guards against overfitting.

The inputs are CHD probabilities of a model on labelled cases it did NOT train on (the
validation split). Each label is scored only on the images whose view allows it, exactly as
the challenge scorer does (``evaluation.metrics.binary_f1``). A label is tuned only when:

1. it has at least ``min_positives`` positives among those images;
2. thresholds lie on a grid inside [``low``, ``high``];
3. nested K-fold check: for each fold, the threshold with the best F1 on the other K-1
   folds is applied to the held-out fold. The held-out predictions of all folds are pooled
   into one F1, and the tuned threshold is kept only if that F1 is strictly above the F1 at
   0.5 on the same images.

A kept label gets the threshold that is best on all its images. Every other label keeps 0.5.
Ties in F1 go to the threshold closest to 0.5.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from evaluation.metrics import binary_f1
from fetuskit.labels import CHD_MASK, CHD_NAMES, NUM_CHD

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5


class CalibrationError(ValueError):
    """Calibration inputs or settings that cannot be used."""


@dataclass(frozen=True)
class CalibrationConfig:
    """Settings of :func:`calibrate_thresholds`.

    Attributes:
        folds: K of the nested check (at least 2); folds are stratified by label.
        min_positives: minimum number of positives (among images whose view allows the label) to tune it.
        low, high: bounds of the threshold grid, inside (0, 1).
        step: grid spacing; 0.5 is always on the grid.
        seed: seed of the fold assignment.
    """

    folds: int = 5
    min_positives: int = 5
    low: float = 0.2
    high: float = 0.8
    step: float = 0.01
    seed: int = 0

    def grid(self) -> np.ndarray:
        """Return the sorted float64 candidate thresholds."""
        if not 0.0 < self.low <= DEFAULT_THRESHOLD <= self.high < 1.0:
            raise CalibrationError(f"need 0 < low <= 0.5 <= high < 1, got low={self.low} high={self.high}")
        if self.step <= 0:
            raise CalibrationError(f"the threshold step must be positive, got {self.step}")
        if self.folds < 2:
            raise CalibrationError(f"the nested check needs at least 2 folds, got {self.folds}")
        count = int(np.floor((self.high - self.low) / self.step + 1e-9)) + 1
        points = np.round(self.low + self.step * np.arange(count), 6)
        return np.unique(np.append(points, DEFAULT_THRESHOLD))


@dataclass(frozen=True)
class LabelCalibration:
    """The outcome for one CHD label; F1 values are on the 0..1 scale.

    Attributes:
        label: CHD label name (``fetuskit.labels.CHD_NAMES``).
        images: images whose view allows the label.
        positives: positives among them.
        threshold: the threshold to use (0.5 unless ``kept``).
        candidate: the best threshold on all images, or None when the label was not tuned.
        f1_default: F1 at 0.5 on all images.
        f1_held_out: F1 of the pooled held-out predictions with thresholds chosen on the
            other folds, or None when the label was not tuned.
        kept: the tuned threshold replaced 0.5.
        reason: why it was kept or not, in words.
    """

    label: str
    images: int
    positives: int
    threshold: float
    candidate: float | None
    f1_default: float
    f1_held_out: float | None
    kept: bool
    reason: str


def _f1_at(probabilities: np.ndarray, targets: np.ndarray, threshold: float) -> float:
    # Strictly above, as fetuskit.predict.chd_to_label decides.
    return binary_f1(probabilities > threshold, targets)


def best_threshold(probabilities: np.ndarray, targets: np.ndarray, grid: np.ndarray) -> float:
    """Return the grid threshold with the highest F1; ties go to the one closest to 0.5, then the lower.

    Args:
        probabilities: (M,) float probabilities of one label.
        targets: (M,) bool ground truth.
        grid: sorted candidate thresholds.
    """
    scores = np.array([_f1_at(probabilities, targets, t) for t in grid])
    best = scores.max()
    tied = grid[np.isclose(scores, best, rtol=0.0, atol=1e-12)]
    return float(tied[np.argmin(np.abs(tied - DEFAULT_THRESHOLD))])


def stratified_folds(targets: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Return (M,) int64 fold ids 0..folds-1; positives and negatives are each spread evenly.

    Positives are shuffled and dealt round-robin, then negatives continue the count, so fold
    sizes differ by at most one.
    """
    generator = np.random.default_rng(seed)
    assignment = np.empty(len(targets), dtype=np.int64)
    positive_rows = generator.permutation(np.flatnonzero(targets))
    negative_rows = generator.permutation(np.flatnonzero(~targets))
    ordered = np.concatenate([positive_rows, negative_rows])
    assignment[ordered] = np.arange(len(ordered)) % folds
    return assignment


def calibrate_label(
    probabilities: np.ndarray, targets: np.ndarray, config: CalibrationConfig, label: str = ""
) -> LabelCalibration:
    """Calibrate one label on the (M,) probabilities and bool targets of the images that allow it."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    grid = config.grid()
    positives = int(targets.sum())
    f1_default = _f1_at(probabilities, targets, DEFAULT_THRESHOLD)
    if positives < config.min_positives:
        return LabelCalibration(
            label, len(targets), positives, DEFAULT_THRESHOLD, None, f1_default, None, False,
            f"{positives} positives, fewer than {config.min_positives}",
        )

    folds = stratified_folds(targets, config.folds, config.seed)
    held_out = np.zeros(len(targets), dtype=bool)
    for fold in range(config.folds):
        test = folds == fold
        if not test.any():
            continue
        threshold = best_threshold(probabilities[~test], targets[~test], grid)
        held_out[test] = probabilities[test] > threshold
    f1_held_out = binary_f1(held_out, targets)
    candidate = best_threshold(probabilities, targets, grid)
    kept = f1_held_out > f1_default and candidate != DEFAULT_THRESHOLD
    if kept:
        reason = "held-out F1 above F1 at 0.5"
    elif candidate == DEFAULT_THRESHOLD:
        reason = "0.5 is already the best threshold"
    else:
        reason = "held-out F1 not above F1 at 0.5"
    return LabelCalibration(
        label, len(targets), positives, candidate if kept else DEFAULT_THRESHOLD, candidate,
        f1_default, f1_held_out, kept, reason,
    )


def calibrate_thresholds(
    probabilities: np.ndarray, targets: np.ndarray, views: np.ndarray, config: CalibrationConfig
) -> list[LabelCalibration]:
    """Calibrate all 7 labels, each on the images whose view allows it.

    Args:
        probabilities: (N, 7) float CHD probabilities in [0, 1].
        targets: (N, 7) ground truth 0/1.
        views: (N,) int 0-based view indices 0..3.

    Returns:
        One :class:`LabelCalibration` per label, in ``CHD_NAMES`` order. N = 0 gives 0.5 everywhere.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1, NUM_CHD)
    targets = np.asarray(targets).reshape(-1, NUM_CHD) == 1
    views = np.asarray(views, dtype=np.int64).reshape(-1)
    if not len(probabilities) == len(targets) == len(views):
        raise CalibrationError(
            f"got {len(probabilities)} probability rows, {len(targets)} target rows and {len(views)} views; "
            "expected one of each per image"
        )
    if views.size and (views.min() < 0 or views.max() >= CHD_MASK.shape[0]):
        raise CalibrationError(f"views must be 0-based indices 0..{CHD_MASK.shape[0] - 1}, got {sorted(set(views.tolist()))}")
    allowed = CHD_MASK[views]
    return [
        calibrate_label(probabilities[allowed[:, k], k], targets[allowed[:, k], k], config, CHD_NAMES[k])
        for k in range(NUM_CHD)
    ]


def thresholds_of(rows: Sequence[LabelCalibration]) -> list[float]:
    """Return the 7 thresholds of a calibration, in label order."""
    return [row.threshold for row in rows]


def format_report(rows: Sequence[LabelCalibration]) -> str:
    """Return a Markdown table: label, images, positives, thresholds, F1 at 0.5 and held out, kept."""
    lines = [
        "| label | images | positives | candidate | threshold | F1 at 0.5 | held-out F1 tuned | kept | reason |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        candidate = "-" if row.candidate is None else f"{row.candidate:.2f}"
        held_out = "-" if row.f1_held_out is None else f"{100 * row.f1_held_out:.1f}"
        lines.append(
            f"| {row.label} | {row.images} | {row.positives} | {candidate} | {row.threshold:.2f} | "
            f"{100 * row.f1_default:.1f} | {held_out} | {'yes' if row.kept else 'no'} | {row.reason} |"
        )
    return "\n".join(lines)


# Predictions and where thresholds are stored


def predict_chd(model: nn.Module, cases, batch_size: int, device: torch.device) -> np.ndarray:
    """Return (N, 7) float32 CHD probabilities of ``cases`` (``CaseTensors``), predicted as inference does."""
    from fetuskit.predict import predict_batch

    chunks = []
    for start in range(0, len(cases), batch_size):
        images = cases.images[start : start + batch_size].to(device)
        views = cases.views[start : start + batch_size].to(device)
        chunks.append(predict_batch([model], images, views).chd.float().cpu().numpy())
    if not chunks:
        return np.zeros((0, NUM_CHD), dtype=np.float32)
    return np.concatenate(chunks)


def _check_thresholds(thresholds: Sequence[float]) -> list[float]:
    values = [float(value) for value in thresholds]
    if len(values) != NUM_CHD or not all(0.0 < value < 1.0 for value in values):
        raise CalibrationError(f"expected {NUM_CHD} thresholds in (0, 1), got {values}")
    return values


def write_checkpoint_thresholds(path: Path, thresholds: Sequence[float]) -> None:
    """Store ``thresholds`` in the checkpoint at ``path``; everything else is kept as it was.

    The file is rewritten atomically (temporary file in the same folder, then renamed).
    """
    from fetuskit.models.checkpoint import read_checkpoint, write_payload

    path = Path(path)
    content = read_checkpoint(path)
    content["thresholds"] = _check_thresholds(thresholds)
    write_payload(path, content)
    logger.info("wrote CHD thresholds %s into %s", content["thresholds"], path)


def write_manifest_thresholds(folder: Path, thresholds: Sequence[float], changed_checkpoint: Path | None = None) -> Path:
    """Set ``chd_thresholds`` in ``folder/manifest.json``; returns the manifest path.

    ``changed_checkpoint`` is a checkpoint file that calibration rewrote: a member pointing to
    it gets its new SHA-256. Every other member keeps its digest, so a damaged file is still
    caught by ``verify_checksums``.

    Raises:
        ManifestError: no valid manifest in ``folder``.
    """
    from fetuskit.weights_manifest import MANIFEST_NAME, load_manifest, sha256_file

    folder = Path(folder)
    manifest = load_manifest(folder)
    changed = Path(changed_checkpoint).resolve() if changed_checkpoint is not None else None
    members = []
    for member in manifest.members:
        path = manifest.checkpoint_path(member)
        if changed is not None and path.resolve() == changed:
            member = dataclasses.replace(member, sha256=sha256_file(path))
            logger.info("updated the SHA-256 of manifest member %s", member.checkpoint)
        members.append(member)
    updated = dataclasses.replace(manifest, members=tuple(members), chd_thresholds=tuple(_check_thresholds(thresholds)))
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(updated.to_json(), indent=2) + "\n", encoding="utf-8")
    load_manifest(folder)
    logger.info("wrote CHD thresholds %s into %s", list(updated.chd_thresholds), path)
    return path


def _calibration_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise CalibrationError(f"invalid device {name!r}: expected cpu, cuda or cuda:K ({error})") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CalibrationError(f"device {name!r} was requested but CUDA is not available; use --device cpu")
    return device


def calibrate_checkpoint(
    checkpoint: Path,
    cases_source: Path,
    config: CalibrationConfig,
    manifest_folder: Path | None = None,
    batch_size: int = 8,
    device: str = "cpu",
) -> list[LabelCalibration]:
    """Calibrate a checkpoint on labelled cases it did not train on and store the thresholds.

    The checkpoint's weights (teacher where stored) predict ``cases_source`` (a folder or JSON
    case list) at its input size, as inference does. The chosen thresholds go into the
    checkpoint and, when ``manifest_folder`` is given, into its ``manifest.json``.

    Raises:
        CalibrationError: invalid settings, batch size or device; nothing is written then.
        ManifestError: ``manifest_folder`` has no valid manifest, or a member's file is missing
            or differs from its digest; nothing is written then.
    """
    from fetuskit.models.checkpoint import load_checkpoint
    from fetuskit.training.data import load_labelled
    from fetuskit.training.run import load_case_list

    config.grid()
    if batch_size < 1:
        raise CalibrationError(f"the batch size must be at least 1, got {batch_size}")
    torch_device = _calibration_device(device)
    if manifest_folder is not None:
        # Checked before anything is written: a manifest error must leave the checkpoint as it
        # was, and a member already out of date must not get a fresh digest that hides it.
        from fetuskit.weights_manifest import load_manifest, verify_checksums

        verify_checksums(load_manifest(Path(manifest_folder)))
    model, _ = load_checkpoint(checkpoint, map_location=torch_device)
    cases = load_labelled(load_case_list(cases_source), int(model.input_size))
    if len(cases) == 0:
        raise CalibrationError(f"no labelled cases in {cases_source}; calibration needs held-out labelled cases")
    probabilities = predict_chd(model, cases, batch_size, torch_device)
    rows = calibrate_thresholds(probabilities, cases.chd.numpy(), cases.views.numpy(), config)
    thresholds = thresholds_of(rows)
    write_checkpoint_thresholds(checkpoint, thresholds)
    if manifest_folder is not None:
        write_manifest_thresholds(manifest_folder, thresholds, changed_checkpoint=checkpoint)
    return rows
