"""Self-describing checkpoints: architecture, config, stage, student and EMA-teacher weights.

A checkpoint is a ``torch.save`` dict readable with ``weights_only=True``:

    {"format": "fetuskit-checkpoint", "version": 1, "arch": name, "config": asdict(config),
     "stage": str, "student": state_dict, "teacher": state_dict or None,
     "thresholds": 7 floats or None, "metrics": dict, "extra": dict}

Loading rebuilds the model through the registry (without pretrained weights, because the
checkpoint supplies all of them) and loads the chosen weights strictly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fetuskit.labels import NUM_CHD
from fetuskit.models.registry import ModelConfigError, UnknownModelError, build_from_config
from fetuskit.models.state import UnreadableWeightsError, load_state_dict_strict, load_weights_only

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "fetuskit-checkpoint"
CHECKPOINT_VERSION = 1

WeightsChoice = Literal["teacher", "student", "auto"]


class CheckpointError(ValueError):
    """A checkpoint file that is missing fields, has another format or lacks the requested weights."""


def _cpu_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().clone() for key, value in state.items()}


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    stage: str,
    teacher_state: Mapping[str, torch.Tensor] | None = None,
    thresholds: Sequence[float] | None = None,
    metrics: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (the student) and optional EMA-teacher weights to ``path`` atomically.

    ``model`` must come from the registry (it has ``.name`` and a dataclass ``.config``).
    ``thresholds`` are the 7 CHD decision thresholds on probabilities in [0, 1]. ``metrics`` and
    ``extra`` must contain only plain Python values (str, int, float, bool, None, lists,
    dicts) so that the file loads with ``weights_only=True``. The file is written to a
    temporary name in the same folder and renamed, so a crash never leaves a partial file.

    Returns the path written.
    """
    path = Path(path)
    if not hasattr(model, "name") or not dataclasses.is_dataclass(getattr(model, "config", None)):
        raise TypeError("save_checkpoint needs a model built by fetuskit.models.build_model")
    if thresholds is not None:
        thresholds = [float(value) for value in thresholds]
        if len(thresholds) != NUM_CHD:
            raise ValueError(f"thresholds needs {NUM_CHD} values, one per CHD label, got {len(thresholds)}")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": model.name,
        "config": dataclasses.asdict(model.config),
        "stage": stage,
        "student": _cpu_state(model.state_dict()),
        "teacher": _cpu_state(teacher_state) if teacher_state is not None else None,
        "thresholds": thresholds,
        "metrics": dict(metrics or {}),
        "extra": dict(extra or {}),
    }
    write_payload(path, payload)
    logger.info("Saved %s checkpoint of %s (stage %s) to %s", "student+teacher" if teacher_state else "student", model.name, stage, path)
    return path


def write_payload(path: Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint dict with ``torch.save`` to a temporary name in the same folder, then rename.

    A crash therefore never leaves a partial file at ``path``. The dict is written through an
    open file, not the temporary path, because ``torch.save`` names its archive after a path
    and the random temporary name would make equal checkpoints differ in their bytes and
    checksums.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint dict with ``weights_only=True``; see the module docstring for its fields.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CheckpointError: if the file is unreadable or not a version-1 fetuskit checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        content = load_weights_only(path, map_location)
    except UnreadableWeightsError as error:
        raise CheckpointError(str(error)) from error
    if not isinstance(content, dict) or content.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a {CHECKPOINT_FORMAT} file; convert foreign weights with the loaders in "
            "fetuskit.models.foreign"
        )
    if content.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {content.get('version')}, expected {CHECKPOINT_VERSION}")
    missing = [field for field in ("arch", "config", "stage", "student") if field not in content]
    if missing:
        raise CheckpointError(f"{path} lacks the fields {missing}")
    return content


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", use: WeightsChoice = "auto"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint and load its teacher or student weights strictly.

    ``use="auto"`` takes the teacher when the checkpoint has one, else the student.

    Returns:
        (model, info): the model in eval mode on ``map_location``, and a dict with ``arch``,
        ``config``, ``stage``, ``thresholds``, ``metrics``, ``extra``, ``path`` and ``weights``
        (which of ``"teacher"``/``"student"`` was loaded).

    Raises:
        CheckpointError: on a foreign file, an unknown architecture or config key, weights
            that are not a state_dict of tensors, or when ``use="teacher"`` but none is stored.
        StateDictMismatchError: listing every missing, unexpected or mis-shaped key.
    """
    if use not in ("teacher", "student", "auto"):
        raise ValueError(f"use must be 'teacher', 'student' or 'auto', got {use!r}")
    content = read_checkpoint(path, map_location)
    weights = use
    if use == "auto":
        weights = "teacher" if content.get("teacher") is not None else "student"
    state = content.get(weights)
    if state is None:
        raise CheckpointError(f"{path} stores no {weights} weights; pass use='student' or use='auto'")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: the {weights} weights are a {type(state).__name__}, expected a state_dict")
    not_tensors = [str(key) for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: {weights} entries {not_tensors[:20]} are not tensors; expected a state_dict")

    try:
        model = build_from_config(content["arch"], content["config"], load_weights=False)
    except (UnknownModelError, ModelConfigError) as error:
        raise CheckpointError(f"{path} describes a model that cannot be built: {error}") from error
    load_state_dict_strict(model, state, f"{path} ({weights})")
    model.to(map_location).eval()
    info = {field: content.get(field) for field in ("arch", "config", "stage", "thresholds", "metrics", "extra")}
    info["path"] = str(path)
    info["weights"] = weights
    exported = (content.get("extra") or {}).get("exported_weights")
    described = f"{weights} weights (exported from the {exported})" if exported else f"{weights} weights"
    logger.info("Loaded %s of %s (stage %s) from %s", described, content["arch"], content["stage"], path)
    return model, info


def export_checkpoint(source: str | Path, destination: str | Path, use: WeightsChoice = "auto") -> Path:
    """Write a slim copy of a training checkpoint with one set of weights, for inference.

    The chosen weights (``use``, as in :func:`load_checkpoint`) become the copy's student; the
    teacher and the training state in ``extra`` are dropped, which roughly halves the file. The
    stage, thresholds and metrics are kept, and ``extra`` records the source file name and which
    weights were taken.
    """
    model, info = load_checkpoint(source, use=use)
    extra = {"exported_from": Path(source).name, "exported_weights": info["weights"]}
    return save_checkpoint(
        destination,
        model,
        stage=info["stage"],
        thresholds=info["thresholds"],
        metrics=info["metrics"],
        extra=extra,
    )
