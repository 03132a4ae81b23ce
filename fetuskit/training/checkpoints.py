"""Training checkpoints: the model checkpoint format plus the state a resumed run needs.

``best.pt`` and ``latest.pt`` are written by ``fetuskit.models.checkpoint.save_checkpoint``, so
inference loads either one. The optimizer, scheduler, scaler, sampler and RNG states travel in
its ``extra`` mapping under ``"training_state"``, next to the resolved training config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fetuskit.labels import NUM_CHD

BEST_CHECKPOINT = "best.pt"
LATEST_CHECKPOINT = "latest.pt"

DEFAULT_THRESHOLDS = [0.5] * NUM_CHD


def save_training_checkpoint(
    path: Path,
    model: nn.Module,
    *,
    stage: str,
    teacher_state: dict[str, torch.Tensor],
    metrics: dict[str, float],
    config: dict[str, Any],
    training_state: dict[str, Any],
) -> None:
    """Write student, teacher, metrics, config and training state to ``path`` atomically."""
    from fetuskit.models.checkpoint import save_checkpoint

    save_checkpoint(
        path,
        model,
        stage=stage,
        teacher_state=teacher_state,
        thresholds=DEFAULT_THRESHOLDS,
        metrics=metrics,
        extra={"training_config": config, "training_state": training_state},
    )


def load_training_state(
    path: Path, map_location: torch.device | str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Read (student state dict, teacher state dict, training state) from a training checkpoint.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the checkpoint contains no teacher or no training state, because another
            tool or an inference-only export wrote it.
    """
    from fetuskit.models.checkpoint import read_checkpoint

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint to resume from not found: {path}; run without --resume to start fresh")
    payload = read_checkpoint(path, map_location=map_location)
    extra = payload.get("extra") or {}
    if payload.get("teacher") is None or "training_state" not in extra:
        raise ValueError(
            f"{path} contains no teacher or training state, so training cannot resume from it; "
            "resume from the run folder's latest.pt"
        )
    return payload["student"], payload["teacher"], extra["training_state"]
