"""Load the ensemble and the optional refiner that a weights manifest describes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fetuskit.inference.config import InferenceSetupError
from fetuskit.weights_manifest import WeightsManifest

logger = logging.getLogger(__name__)


@dataclass
class Ensemble:
    """Loaded members on one device, their averaging weights and the shared input side."""

    models: list[nn.Module]
    weights: list[float]
    input_size: int
    chd_thresholds: tuple[float, ...]
    device: torch.device


def resolve_device(requested: str) -> torch.device:
    """Turn ``auto``, ``cpu`` or ``cuda`` into a torch device, checking that CUDA exists when requested."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise InferenceSetupError(
            "--device cuda requested but CUDA is not available; run the container with --gpus all, "
            "or pass --device cpu."
        )
    if requested not in ("cpu", "cuda"):
        raise InferenceSetupError(f"--device must be auto, cpu or cuda, got {requested!r}")
    return torch.device(requested)


def load_ensemble(manifest: WeightsManifest, device: torch.device) -> Ensemble:
    """Load every member of a checked manifest onto ``device`` in eval mode.

    The shared input side is the largest member input size. Members with a smaller size get
    the batch resized again inside :func:`fetuskit.predict.predict_batch`.
    """
    from fetuskit.models.checkpoint import load_checkpoint

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    models = []
    for member in manifest.members:
        path = manifest.checkpoint_path(member)
        try:
            model, _ = load_checkpoint(path, map_location=device, use=member.use)
        # Any failure to load a checksum-verified file means the weights folder is unusable.
        except Exception as error:  # noqa: BLE001
            raise InferenceSetupError(
                f"cannot load checkpoint {path}: {type(error).__name__}: {error}. Check that the code "
                "version matches the one that wrote the checkpoint."
            ) from error
        models.append(model.to(device).eval())
    # NOTE: mixed input sizes resize the prepared batch twice for the smaller members.
    input_size = max(int(model.input_size) for model in models)
    return Ensemble(
        models=models,
        weights=[member.weight for member in manifest.members],
        input_size=input_size,
        chd_thresholds=manifest.chd_thresholds,
        device=device,
    )


def _build_refiner(manifest: WeightsManifest, enabled: bool, device: torch.device) -> Any | None:
    """Build the manifest's refiner on ``device``, or return None when none is configured or enabled.

    A relative ``weights`` path in the refiner settings is taken relative to the manifest's folder.
    """
    if manifest.refiner is None:
        return None
    if not enabled:
        logger.info("refiner disabled by --no-refine")
        return None
    try:
        from fetuskit.refine import build_refiner
    except ImportError:
        logger.warning("the manifest configures a refiner, but fetuskit.refine.build_refiner is missing; skipping refinement")
        return None

    settings = dict(manifest.refiner)
    settings.setdefault("device", str(device))
    if settings.get("weights") and not Path(settings["weights"]).is_absolute():
        settings["weights"] = str(manifest.folder / settings["weights"])
    # NOTE: the manifest checksums cover the ensemble members only, not the refiner's weights.
    try:
        return build_refiner(settings)
    # Invalid settings or unreadable refiner weights mean the shipped weights folder is broken.
    except Exception as error:  # noqa: BLE001
        raise InferenceSetupError(
            f"cannot build the refiner configured in {manifest.folder / 'manifest.json'}: "
            f"{type(error).__name__}: {error}. Fix its \"refiner\" settings, or pass --no-refine."
        ) from error
