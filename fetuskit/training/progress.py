"""Run-folder logging: a log file, a metrics JSONL and progress with ETA.

On a terminal progress is a rich progress bar; otherwise (CI, ``nohup``, torchrun workers)
each log interval becomes one plain log line.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("fetuskit.training")

LOG_FILE = "train.log"
METRICS_FILE = "metrics.jsonl"


def add_run_log_file(run_dir: Path) -> logging.Handler:
    """Copy every ``fetuskit`` log record into ``run_dir/train.log`` (appending on resume)."""
    handler = logging.FileHandler(run_dir / LOG_FILE, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    package_logger = logging.getLogger("fetuskit")
    package_logger.addHandler(handler)
    if package_logger.getEffectiveLevel() > logging.INFO:
        package_logger.setLevel(logging.INFO)
    return handler


def remove_run_log_file(handler: logging.Handler) -> None:
    logging.getLogger("fetuskit").removeHandler(handler)
    handler.close()


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to ``run_dir/metrics.jsonl``."""
    with open(run_dir / METRICS_FILE, "a") as stream:
        stream.write(json.dumps(record, sort_keys=True) + "\n")


def format_seconds(seconds: float) -> str:
    """Format a duration as H:MM:SS; an unknown (non-finite) duration as ``?``."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Reports training progress: a rich bar on a terminal, log lines elsewhere.

    Args:
        total: the last iteration number.
        start: the iteration the run starts (or resumes) from.
        enabled: False on every process but the main one.
    """

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self._bar = None
        self._task = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress
            from rich.progress import TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = RichProgress(
                TextColumn("training"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[summary]}"),
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, completed=start, summary="")

    def report(self, iteration: int, summary: str) -> None:
        """Show one interval's summary line (the bar also advances to ``iteration``)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=iteration, summary=summary)
        logger.info("iteration %d/%d %s", iteration, self.total, summary)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class IntervalTimer:
    """Seconds per iteration over the last interval and the estimated time left."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._steps = 0

    def tick(self) -> None:
        self._steps += 1

    def lap(self, remaining_iterations: int) -> tuple[float, float]:
        """Return (seconds per iteration, estimated seconds left) and start a new interval."""
        now = time.perf_counter()
        per_iteration = (now - self._start) / self._steps if self._steps else float("nan")
        self._start = now
        self._steps = 0
        return per_iteration, per_iteration * remaining_iterations
