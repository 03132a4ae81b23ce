"""The generic training loop: a task supplies losses, the trainer does everything else.

One optimiser step: the task samples and augments a batch and computes its losses, then the
trainer back-propagates (with a GradScaler only for fp16), clips gradients, steps AdamW and
the learning-rate schedule, and moves the EMA teacher. Every ``validation_interval`` steps
the main process validates the teacher and saves ``best.pt`` on a new best score. Every
``checkpoint_interval`` steps and at the end it saves ``latest.pt``, which contains all that
a resumed run needs to continue identically.

A teacher is always kept, also without unlabelled data: validation and ``best.pt`` use the
teacher in every mode, so supervised-only and semi-supervised runs are chosen the same way.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fetuskit.training import progress as progress_module
from fetuskit.training.checkpoints import BEST_CHECKPOINT, LATEST_CHECKPOINT, load_training_state, save_training_checkpoint
from fetuskit.training.config import PRECISIONS, TrainConfig
from fetuskit.training.data import CaseTensors
from fetuskit.training.distributed import DistContext, barrier
from fetuskit.training.ema import MeanTeacher, unwrap
from fetuskit.training.optim import build_optimizer, build_scheduler
from fetuskit.training.rng import capture_rng_state, restore_rng_state
from fetuskit.training.tasks import Task
from fetuskit.training.validation import summary_metrics, validate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    """Autocast settings resolved from ``run.precision`` and the device."""

    autocast_dtype: torch.dtype | None
    use_grad_scaler: bool

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """Map "auto", "bf16", "fp16" or "none" to autocast settings; CPU always trains in float32."""
    if name not in PRECISIONS:
        raise ValueError(f"run.precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if device.type != "cuda" or name == "none":
        return Precision(None, False)
    if name == "fp16":
        return Precision(torch.float16, True)
    return Precision(torch.bfloat16, False)


class Trainer:
    """Runs one training stage.

    Args:
        config: the resolved configuration.
        model: the student network, already on ``context.device``.
        task: the stage's task object (batches, trainable parameters, losses).
        validation_cases: labelled validation cases with full-resolution masks, or None.
        run_dir: the run folder; created if missing.
        context: this process's place in a distributed job.
    """

    def __init__(
        self,
        config: TrainConfig,
        model: nn.Module,
        task: Task,
        validation_cases: CaseTensors | None,
        run_dir: Path,
        context: DistContext | None = None,
    ) -> None:
        self.config = config
        self.context = context or DistContext()
        self.device = self.context.device
        self.task = task
        self.validation_cases = validation_cases
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.precision = resolve_precision(config.run.precision, self.device)

        self.model = model
        self.student = model
        if self.context.distributed:
            # The wrapper copies rank 0's weights to every process, so the teacher is made after.
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.student = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self.teacher = MeanTeacher(model, config.teacher.decay, config.teacher.warmup)
        self.optimizer = build_optimizer(task.trainable_parameters(model), config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.schedule)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.use_grad_scaler)

        self.iteration = 0
        self.best_score = -math.inf
        self.best_iteration = -1

    # Checkpoints

    def training_state(self) -> dict[str, Any]:
        """Everything besides the weights that a resumed run needs to continue identically."""
        return {
            "iteration": self.iteration,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "task": self.task.state_dict(),
            "rng": capture_rng_state(),
            "teacher_updates": self.teacher.updates,
            "best_score": self.best_score,
            "best_iteration": self.best_iteration,
        }

    def save(self, name: str, metrics: dict[str, float] | None = None) -> Path:
        """Save student, teacher and training state to ``run_dir/name`` (atomic)."""
        path = self.run_dir / name
        save_training_checkpoint(
            path,
            unwrap(self.student),
            stage=self.task.name,
            teacher_state=self.teacher.model.state_dict(),
            metrics=metrics or {},
            config=self.config.to_dict(),
            training_state=self.training_state(),
        )
        return path

    def resume(self, path: Path) -> None:
        """Restore weights, teacher and training state saved by :meth:`save`."""
        student_state, teacher_state, state = load_training_state(path, map_location=self.device)
        unwrap(self.student).load_state_dict(student_state, strict=True)
        self.teacher.load_state_dict({"model": teacher_state, "updates": state["teacher_updates"]})
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.task.load_state_dict(state["task"])
        restore_rng_state(state["rng"])
        self.iteration = int(state["iteration"])
        self.best_score = float(state["best_score"])
        self.best_iteration = int(state["best_iteration"])
        logger.info("resumed from %s at iteration %d (best score %.3f)", path, self.iteration, self.best_score)

    # Training

    def train_step(self) -> tuple[dict[str, float], dict[str, float]]:
        """Run one optimiser step; return its loss terms and statistics."""
        self.student.train()
        with self.precision.autocast(self.device):
            result = self.task.step(self.student, self.teacher, self.device)
        if not torch.isfinite(result.total):
            raise FloatingPointError(
                f"loss is {float(result.total)} at iteration {self.iteration} (terms {result.terms}); "
                "lower optim.lr or check the input data"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(result.total).backward()
        stats = dict(result.stats)
        if self.config.optim.grad_clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
            norm = torch.nn.utils.clip_grad_norm_(parameters, self.config.optim.grad_clip_norm)
            stats["grad_norm"] = float(norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self._sync_buffers()
        stats["teacher_decay"] = self.teacher.update(self.student)
        self.iteration += 1
        terms = dict(result.terms)
        terms["total"] = float(result.total.detach())
        return terms, stats

    def _sync_buffers(self) -> None:
        # DDP averages gradients, but each process updates BatchNorm statistics on its own
        # shard. Rank 0's statistics are copied to all, so student and teacher stay identical.
        if not self.context.distributed:
            return
        for buffer in unwrap(self.student).buffers():
            torch.distributed.broadcast(buffer, src=0)

    def run(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train until ``schedule.iterations`` (or ``stop_after``, for tests); return a summary.

        Returns:
            {"iteration", "best_score", "best_iteration"} at the end of the run.
        """
        run = self.config.run
        total = self.config.schedule.iterations
        end = total if stop_after is None else min(total, stop_after)
        is_main = self.context.is_main
        handler = progress_module.add_run_log_file(self.run_dir) if is_main else None
        reporter = progress_module.Progress(total, self.iteration, enabled=is_main)
        timer = progress_module.IntervalTimer()
        sums: dict[str, float] = defaultdict(float)
        steps_in_interval = 0
        try:
            if is_main:
                logger.info("training %s from iteration %d to %d on %s", self.task.name, self.iteration, end, self.device)
            while self.iteration < end:
                terms, stats = self.train_step()
                timer.tick()
                steps_in_interval += 1
                for key, value in {**terms, **stats}.items():
                    sums[key] += value
                if self.iteration % run.log_interval == 0 or self.iteration == end:
                    self._log_interval(sums, steps_in_interval, timer, reporter, total)
                    sums.clear()
                    steps_in_interval = 0
                if self.validation_cases is not None and (
                    self.iteration % run.validation_interval == 0 or self.iteration == total
                ):
                    self._validate_and_keep_best()
                if self.iteration % run.checkpoint_interval == 0 or self.iteration == end:
                    if is_main:
                        self.save(LATEST_CHECKPOINT)
                    barrier(self.context)
        finally:
            reporter.close()
            if handler is not None:
                progress_module.remove_run_log_file(handler)
        return {"iteration": self.iteration, "best_score": self.best_score, "best_iteration": self.best_iteration}

    def _log_interval(
        self,
        sums: dict[str, float],
        steps: int,
        timer: progress_module.IntervalTimer,
        reporter: progress_module.Progress,
        total: int,
    ) -> None:
        if not self.context.is_main:
            return
        seconds_per_iteration, eta = timer.lap(total - self.iteration)
        means = {key: value / steps for key, value in sums.items()}
        learning_rates = {f"lr/{group['name']}": group["lr"] for group in self.optimizer.param_groups}
        record = {
            "iteration": self.iteration,
            **{f"loss/{k}": v for k, v in means.items() if k not in _STAT_KEYS},
            **{k: v for k, v in means.items() if k in _STAT_KEYS},
            **learning_rates,
            "seconds_per_iteration": seconds_per_iteration,
            "eta_seconds": eta,
        }
        progress_module.append_metrics(self.run_dir, record)
        summary = " ".join(f"{k}={v:.4f}" for k, v in means.items() if k != "teacher_decay")
        lr = max(group["lr"] for group in self.optimizer.param_groups)
        reporter.report(
            self.iteration,
            f"{summary} lr={lr:.3g} {seconds_per_iteration:.3f}s/it eta {progress_module.format_seconds(eta)}",
        )

    def _validate_and_keep_best(self) -> None:
        if self.context.is_main:
            summary = validate(
                self.teacher.model, self.validation_cases, self.config.data.validation_batch_size, self.device
            )
            metrics = summary_metrics(summary)
            is_best = metrics["score"] > self.best_score
            if is_best:
                self.best_score = metrics["score"]
                self.best_iteration = self.iteration
            progress_module.append_metrics(
                self.run_dir, {"iteration": self.iteration, "validation": metrics, "best": is_best}
            )
            logger.info(
                "validation at iteration %d: Dice %.2f NSD %.2f F1 %.2f score %.3f",
                self.iteration, metrics["mean_dice"], metrics["mean_nsd"], metrics["macro_f1"], metrics["score"],
            )
            if is_best:
                path = self.save(BEST_CHECKPOINT, metrics)
                logger.info("new best score %.3f at iteration %d, saved %s", self.best_score, self.iteration, path)
        self._share_best()
        barrier(self.context)

    def _share_best(self) -> None:
        # Every process keeps the same best score, so a resumed run on any rank agrees.
        if not self.context.distributed:
            return
        values = torch.tensor([self.best_score, float(self.best_iteration)], dtype=torch.float64, device=self.device)
        torch.distributed.broadcast(values, src=0)
        self.best_score = float(values[0])
        self.best_iteration = int(values[1])


_STAT_KEYS = frozenset({
    "confident_share", "feature_dropped_share", "grad_norm", "teacher_decay",
    "positive_share", "chd_pseudo_kept_share", "chd_pseudo_positive_share",
})
