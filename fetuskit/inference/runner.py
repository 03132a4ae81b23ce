"""Predict batches and write one file per case, with a fallback output for each failed case."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fetuskit.cases import Case
from fetuskit.errors import FetusError
from fetuskit.inference.cases import _check_inputs_outside, _is_existing_file, output_name, resolve_cases
from fetuskit.inference.config import InferenceConfig, InferenceSetupError
from fetuskit.inference.ensemble import Ensemble, _build_refiner, load_ensemble, resolve_device
from fetuskit.inference.progress import _progress
from fetuskit.inference.reading import _Prepared, _read_ahead, _Unreadable
from fetuskit.inference.report import (
    REPORT_NAME,
    SETTINGS_NAME,
    RunReport,
    _finish_report,
    _log_summary,
    _settings,
    _write_json,
)
from fetuskit.io import ensure_output_dir, write_prediction
from fetuskit.labels import CLASS_MASK, NUM_CHD, NUM_CLASSES, VIEW_NAMES
from fetuskit.predict import UNKNOWN_VIEW, chd_to_label, predict_batch, probabilities_to_mask
from fetuskit.transforms import resize_probabilities
from fetuskit.weights_manifest import load_manifest, verify_checksums

logger = logging.getLogger(__name__)


def run_inference(config: InferenceConfig) -> RunReport:
    """Predict every case of the configured input and write one ``.h5`` file per case.

    Returns:
        The run report, also written to ``<out_dir>/run_report.json``.

    Raises:
        InferenceSetupError: when the run cannot start, for example because the output folder
            contains the input images. The message explains what to do.
        ManifestError: when the weights manifest is missing or a checkpoint is missing or altered.
    """
    started_at = config.started_at if config.started_at is not None else time.perf_counter()
    if config.batch_size < 1:
        raise InferenceSetupError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.workers < 0:
        raise InferenceSetupError(f"--workers must be 0 or more, got {config.workers}")

    cases, source = resolve_cases(config)
    out_dir = _prepare_output_dir(config.out_dir)
    _check_inputs_outside(cases, out_dir)
    device = resolve_device(config.device)

    manifest = load_manifest(config.weights_dir)
    verify_checksums(manifest)
    load_start = time.perf_counter()
    ensemble = load_ensemble(manifest, device)
    refiner = _build_refiner(manifest, config.refine, device)
    report = RunReport(total_cases=len(cases), device=str(device))
    report.model_load_seconds = time.perf_counter() - load_start
    logger.info(
        "loaded %d ensemble member(s) on %s in %.2f s (input side %d px)",
        len(ensemble.models), device, report.model_load_seconds, ensemble.input_size,
    )

    _write_json(out_dir / SETTINGS_NAME, _settings(config, source, manifest, ensemble, refiner is not None))

    pending = []
    first_with_name: dict[str, Case] = {}
    for case in cases:
        first = first_with_name.setdefault(output_name(case), case)
        if first is not case:
            reason = (
                f"{case.image} has the same basename as {first.image}, so its prediction would overwrite "
                "that one; rename the file or predict it in a separate run"
            )
            logger.error("no output for %s: %s", case.image, reason)
            report.missing_outputs.append({"name": output_name(case), "reason": reason})
        elif not config.overwrite and _is_existing_file(out_dir / output_name(case)):
            report.skipped_existing += 1
        else:
            pending.append(case)
    if report.skipped_existing:
        logger.info(
            "skipping %d case(s) whose output already exists in %s (pass --overwrite to redo them)",
            report.skipped_existing, out_dir,
        )

    runner = _BatchRunner(ensemble, refiner, out_dir, report)
    with _progress(len(pending)) as advance:
        batch: list[_Prepared] = []
        for item in _read_ahead(pending, ensemble.input_size, config.workers, config.batch_size):
            if isinstance(item, _Unreadable):
                runner.write_fallback(item.case, item.size, item.reason)
                advance(1)
                continue
            batch.append(item)
            if len(batch) == config.batch_size:
                runner.run(batch)
                advance(len(batch))
                batch = []
        if batch:
            runner.run(batch)
            advance(len(batch))

    _finish_report(report, started_at)
    _write_json(out_dir / REPORT_NAME, asdict(report))
    _log_summary(report, out_dir)
    return report


def _prepare_output_dir(path: Path) -> Path:
    try:
        return Path(ensure_output_dir(path))
    except (FetusError, OSError) as error:
        raise InferenceSetupError(
            f"output folder {path} is not writable: {error}. Mount a writable folder at /ws/output "
            "or pass --out-dir DIR."
        ) from error


class _BatchRunner:
    """Predicts batches and writes their outputs, recording every outcome in the report."""

    def __init__(self, ensemble: Ensemble, refiner: Any | None, out_dir: Path, report: RunReport) -> None:
        self.ensemble = ensemble
        self.refiner = refiner
        self.out_dir = out_dir
        self.report = report

    def run(self, batch: list[_Prepared]) -> None:
        images = torch.stack([item.tensor for item in batch]).to(self.ensemble.device)
        views = torch.tensor([UNKNOWN_VIEW if item.view is None else item.view for item in batch], dtype=torch.long)
        try:
            prediction = predict_batch(self.ensemble.models, images, views.to(self.ensemble.device), self.ensemble.weights)
        # A batch can fail for reasons one image would not (CUDA out of memory) or because of
        # one bad image, so retry each image alone before falling back.
        except Exception as error:  # noqa: BLE001
            if len(batch) > 1:
                logger.warning("prediction failed for a batch of %d (%s); retrying one image at a time", len(batch), error)
                for item in batch:
                    self.run([item])
                return
            item = batch[0]
            logger.error("prediction failed for %s: %s", item.case.image, error)
            self.write_fallback(item.case, item.image.shape, f"prediction failed: {type(error).__name__}: {error}")
            return

        for index, item in enumerate(batch):
            view = int(prediction.views[index])
            if bool(prediction.view_from_head[index]):
                probability = float(prediction.view_probs[index, view])
                logger.info("%s: view unknown, view head predicts %s (p=%.3f)", item.case.image, VIEW_NAMES[view], probability)
                self.report.views_from_head.append(
                    {"name": output_name(item.case), "view": VIEW_NAMES[view], "probability": round(probability, 4)}
                )
            height, width = item.image.shape
            try:
                mask = self._mask(item, prediction.probs[index], view, height, width)
                label = chd_to_label(prediction.chd[index], view, self.ensemble.chd_thresholds)
            # Resizing to a very large input can run out of memory. One image must not stop the run.
            except Exception as error:  # noqa: BLE001
                logger.error("post-processing failed for %s: %s", item.case.image, error)
                reason = f"post-processing failed: {type(error).__name__}: {error}"
                self.write_fallback(item.case, item.image.shape, reason)
                continue
            if self._write(item.case, mask, label):
                self.report.predicted += 1

    def _mask(self, item: _Prepared, probs: torch.Tensor, view: int, height: int, width: int) -> np.ndarray:
        if self.refiner is None:
            return probabilities_to_mask(probs, height, width)
        probabilities = resize_probabilities(probs[None].float(), height, width)[0]
        coarse = probabilities.argmax(dim=0).to(torch.uint8).cpu().numpy()
        try:
            refined, _ = self.refiner.refine(item.image, coarse, probabilities.cpu().numpy(), view)
            refined = _checked_refined_mask(refined, (height, width), view)
        # The refiner is optional, so any failure in it keeps the network's own mask.
        except Exception as error:  # noqa: BLE001
            logger.warning("refiner failed for %s, keeping the network's mask: %s", item.case.image, error)
            self.report.refiner_failures.append({"name": output_name(item.case), "reason": f"{type(error).__name__}: {error}"})
            return coarse
        return refined

    def write_fallback(self, case: Case, size: tuple[int, int], reason: str) -> None:
        """Write an all-background mask of ``size`` (H, W) and a zero label for a case that failed."""
        mask = np.zeros(size, dtype=np.uint8)
        label = np.zeros(NUM_CHD, dtype=np.uint8)
        if self._write(case, mask, label):
            self.report.fallbacks.append({"name": output_name(case), "reason": reason})

    def _write(self, case: Case, mask: np.ndarray, label: np.ndarray) -> bool:
        try:
            write_prediction(self.out_dir, output_name(case), mask, label)
        # ValueError: a name that is no valid file name ("..", or with a NUL byte) or an invalid mask.
        except (FetusError, OSError, ValueError) as error:
            logger.error("cannot write the prediction for %s: %s", case.image, error)
            self.report.missing_outputs.append({"name": output_name(case), "reason": str(error)})
            return False
        return True


def _checked_refined_mask(refined: Any, shape: tuple[int, int], view: int) -> np.ndarray:
    """Check a refiner's mask and return it as (H, W) uint8.

    Raises:
        ValueError: the mask has another shape than ``shape``, is not integer, or contains a
            class that ``view`` does not allow.
    """
    mask = np.asarray(refined)
    if mask.shape != shape:
        raise ValueError(f"refined mask has shape {mask.shape}, expected the input's shape {shape}")
    if mask.dtype.kind not in "ui" or (mask.size and mask.max() >= NUM_CLASSES):
        raise ValueError(f"refined mask has dtype {mask.dtype} or values outside 0..{NUM_CLASSES - 1}")
    forbidden = sorted(set(np.unique(mask).tolist()) - set(np.flatnonzero(CLASS_MASK[view]).tolist()))
    if forbidden:
        classes = ", ".join(map(str, forbidden))
        raise ValueError(f"refined mask contains class {classes}, which view {VIEW_NAMES[view]} does not allow")
    return mask.astype(np.uint8)
