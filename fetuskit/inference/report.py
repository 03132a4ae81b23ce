"""The run report and the JSON files that a run writes next to its predictions."""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import fetuskit
from evaluation.metrics import time_score
from fetuskit.inference.config import InferenceConfig
from fetuskit.inference.ensemble import Ensemble
from fetuskit.weights_manifest import WeightsManifest

logger = logging.getLogger(__name__)

SETTINGS_NAME = "run_settings.json"
REPORT_NAME = "run_report.json"


@dataclass
class RunReport:
    """Outcome of a run, written as ``run_report.json``.

    ``mean_ms_per_image`` is the run's wall time from ``started_at`` (model loading included)
    divided by the cases handled in this run (predicted plus fallbacks). Skipped cases, whose
    outputs already existed, do not count.
    """

    total_cases: int = 0
    predicted: int = 0
    skipped_existing: int = 0
    fallbacks: list[dict[str, str]] = field(default_factory=list)
    missing_outputs: list[dict[str, str]] = field(default_factory=list)
    views_from_head: list[dict[str, Any]] = field(default_factory=list)
    refiner_failures: list[dict[str, str]] = field(default_factory=list)
    device: str = ""
    model_load_seconds: float = 0.0
    wall_seconds: float = 0.0
    mean_ms_per_image: float | None = None
    time_score: float | None = None

    @property
    def exit_code(self) -> int:
        """0 when every case has an output file, else 1."""
        return 1 if self.missing_outputs else 0


def _finish_report(report: RunReport, started_at: float) -> None:
    report.wall_seconds = time.perf_counter() - started_at
    handled = report.predicted + len(report.fallbacks) + len(report.missing_outputs)
    if handled:
        report.mean_ms_per_image = 1000.0 * report.wall_seconds / handled
        report.time_score = time_score(report.mean_ms_per_image)


def _log_summary(report: RunReport, out_dir: Path) -> None:
    logger.info(
        "done: %d predicted, %d fallback(s), %d skipped (existing), %d without output, of %d case(s); "
        "%.1f s wall, model loading %.2f s",
        report.predicted, len(report.fallbacks), report.skipped_existing, len(report.missing_outputs),
        report.total_cases, report.wall_seconds, report.model_load_seconds,
    )
    if report.mean_ms_per_image is not None:
        logger.info(
            "mean wall time %.1f ms per image including model loading (TimeScore %.1f)",
            report.mean_ms_per_image, report.time_score,
        )
    for entry in report.fallbacks:
        logger.warning("fallback output for %s: %s", entry["name"], entry["reason"])
    for entry in report.missing_outputs:
        logger.error("no output for %s: %s", entry["name"], entry["reason"])
    logger.info("report written to %s", out_dir / REPORT_NAME)


def _settings(
    config: InferenceConfig, source: str, manifest: WeightsManifest, ensemble: Ensemble, refiner_active: bool
) -> dict[str, Any]:
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in asdict(config).items()}
    settings.pop("started_at", None)
    return {
        "config": settings,
        "case_source": source,
        "device": str(ensemble.device),
        "input_size": ensemble.input_size,
        "member_input_sizes": [int(model.input_size) for model in ensemble.models],
        "refiner_active": refiner_active,
        "manifest": manifest.to_json(),
        "versions": {
            "fetuskit": fetuskit.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cuda": torch.version.cuda,
        },
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    temporary.replace(path)
