"""Exponential moving average (mean teacher) of a student network."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """Return the network inside a DistributedDataParallel wrapper, or ``model`` itself."""
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model


class MeanTeacher:
    """An EMA copy of a student: parameters AND floating-point buffers follow by EMA.

    BatchNorm running statistics are floating-point buffers, so they track the student too and
    an evaluated teacher is not stale. Integer buffers (``num_batches_tracked``) are copied.
    The teacher stays in eval mode with gradients off: its predictions for one image do not
    depend on the other images in the batch.

    Args:
        student: the network to follow; a deep copy is made.
        decay: EMA decay per update, in [0, 1).
        warmup: when True, update ``step`` uses min(decay, (1 + step) / (10 + step)).
    """

    def __init__(self, student: nn.Module, decay: float, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(unwrap(student))
        self.model.eval()
        self.model.requires_grad_(False)
        self.updates = 0

    def decay_at(self, step: int) -> float:
        """Decay used by the update with 0-based index ``step``."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, student: nn.Module) -> float:
        """Move the teacher towards ``student`` once; return the decay used."""
        decay = self.decay_at(self.updates)
        source = unwrap(student)
        for teacher_param, student_param in zip(self.model.parameters(), source.parameters(), strict=True):
            teacher_param.lerp_(student_param.detach().to(teacher_param.dtype), 1.0 - decay)
        for teacher_buffer, student_buffer in zip(self.model.buffers(), source.buffers(), strict=True):
            if teacher_buffer.is_floating_point():
                teacher_buffer.lerp_(student_buffer.to(teacher_buffer.dtype), 1.0 - decay)
            else:
                teacher_buffer.copy_(student_buffer)
        self.updates += 1
        return decay

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"], strict=True)
        self.updates = int(state["updates"])
