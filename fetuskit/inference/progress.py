"""Progress reporting of the predict loop."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

logger = logging.getLogger(__name__)


class _progress:
    """Context manager returning ``advance(n)``: a rich progress bar on a terminal, log lines otherwise."""

    # Seconds between plain progress lines when stderr is not a terminal.
    LOG_INTERVAL_S = 10.0

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.bar: Any = None
        self.task: Any = None
        self.start = time.perf_counter()
        self.last_log = self.start

    def __enter__(self) -> Any:
        self.start = time.perf_counter()
        if sys.stderr.isatty() and self.total:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("predicting"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.bar.start()
            self.task = self.bar.add_task("predicting", total=self.total, rate="")
        return self.advance

    def advance(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.bar is not None:
            self.bar.update(self.task, advance=count, rate=f"{rate:.1f} img/s")
            return
        if self.done == self.total or now - self.last_log >= self.LOG_INTERVAL_S:
            self.last_log = now
            remaining = (self.total - self.done) / rate if rate > 0 else float("nan")
            # Cases that fell back count as handled here; the closing summary separates them.
            logger.info("handled %d/%d cases (%.1f img/s, about %.0f s left)", self.done, self.total, rate, remaining)

    def __exit__(self, *exc_info: object) -> None:
        if self.bar is not None:
            self.bar.stop()
