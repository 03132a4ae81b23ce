"""Refiner backends by name, strict weight loading and the slim weights file.

A slim weights file is ``torch.save`` of a dict with only plain types and tensors, so it loads
with ``torch.load(weights_only=True)``::

    {"format": WEIGHTS_FORMAT, "kind": "sam-med2d" | "litemedsam",
     "model_config": {...}, "source": str, "state_dict": {key: tensor}, "extra": {...}}

``convert_weights`` writes one from a published checkpoint; the refiner trainer writes one
after fine-tuning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fetuskit.models.state import UnreadableWeightsError, load_weights_only
from fetuskit.refine.litemedsam import build_litemedsam, packaged_weights_path
from fetuskit.refine.sam_med2d import SamMed2DConfig, build_sam_med2d
from fetuskit.refine.segmenter import PromptableSegmenter, ResizeMode

logger = logging.getLogger(__name__)

WEIGHTS_FORMAT = "fetuskit-refiner-weights/1"


class WeightsError(ValueError):
    """A weights file that is missing, of the wrong format, or whose keys do not fit the model."""


@dataclass(frozen=True)
class Backend:
    """One promptable segmenter: how to build it and how its input is prepared."""

    name: str
    build: Callable[[Mapping[str, Any]], PromptableSegmenter]
    resize_mode: ResizeMode
    normalisation: str
    default_weights: Callable[[], Path | None]


def _build_sam_med2d(model_config: Mapping[str, Any]) -> PromptableSegmenter:
    fields = dict(model_config)
    known = {field.name for field in dataclasses.fields(SamMed2DConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise WeightsError(f"unknown SAM-Med2D model_config keys {unknown}: expected some of {sorted(known)}")
    if "global_attn_indexes" in fields:
        fields["global_attn_indexes"] = tuple(fields["global_attn_indexes"])
    return build_sam_med2d(SamMed2DConfig(**fields))


def _build_litemedsam(model_config: Mapping[str, Any]) -> PromptableSegmenter:
    if model_config:
        raise WeightsError(f"LiteMedSAM has a fixed architecture, got model_config {dict(model_config)}")
    return build_litemedsam()


BACKENDS: dict[str, Backend] = {
    "sam-med2d": Backend("sam-med2d", _build_sam_med2d, "stretch", "sam", lambda: None),
    "litemedsam": Backend("litemedsam", _build_litemedsam, "longest-side", "min-max", packaged_weights_path),
}


def get_backend(kind: str) -> Backend:
    """Return the backend registered under ``kind``; raise ValueError listing the known names."""
    if kind not in BACKENDS:
        raise ValueError(f"unknown refiner backend {kind!r}: expected one of {sorted(BACKENDS)}")
    return BACKENDS[kind]


def default_model_config(kind: str) -> dict[str, Any]:
    """Return the architecture config of the published weights of ``kind`` as a plain dict."""
    if kind == "sam-med2d":
        return dataclasses.asdict(SamMed2DConfig())
    get_backend(kind)
    return {}


def load_state_dict_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load every entry of ``state_dict`` into ``model``; raise WeightsError listing all mismatches.

    Missing keys, unexpected keys and shape mismatches are collected first and reported in one
    message naming ``source``. Nothing is loaded when any of them exists.
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    wrong_shape = [
        f"{key}: file {tuple(state_dict[key].shape)}, model {tuple(expected[key].shape)}"
        for key in expected
        if key in state_dict and tuple(state_dict[key].shape) != tuple(expected[key].shape)
    ]
    if missing or unexpected or wrong_shape:
        raise WeightsError(
            f"weights from {source} do not fit the model: {len(missing)} missing keys {missing}, "
            f"{len(unexpected)} unexpected keys {unexpected}, {len(wrong_shape)} shape mismatches "
            f"{wrong_shape}. Check that the file is for this backend and architecture."
        )
    model.load_state_dict(state_dict, strict=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_weights(path: str | Path) -> dict[str, Any]:
    """Read a weights file with ``weights_only=True``.

    Accepts a slim file (see module docstring), a plain state_dict, or a dict holding the
    state_dict under ``"model"``. Returns a dict with keys ``kind`` (None unless slim),
    ``model_config`` (None unless slim), ``state_dict``, ``source`` and ``extra``.

    Raises:
        WeightsError: the file is missing, unreadable (truncated, empty, not a torch file), or
            needs full unpickling (convert it first).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        payload = load_weights_only(path)
    except UnreadableWeightsError as error:
        if not error.pickled_objects:
            raise WeightsError(str(error)) from error
        raise WeightsError(
            f"{path} contains more than tensors (for example optimizer state or custom objects), so "
            "it cannot be loaded with weights_only=True. Convert it once with "
            f"`python -m train convert-weights {path} OUT.pt --kind KIND` and use OUT.pt."
        ) from error
    if isinstance(payload, dict) and payload.get("format") == WEIGHTS_FORMAT:
        return {
            "kind": payload["kind"],
            "model_config": dict(payload["model_config"]),
            "state_dict": payload["state_dict"],
            "source": str(payload.get("source", path)),
            "extra": dict(payload.get("extra", {})),
        }
    state_dict = payload.get("model", payload) if isinstance(payload, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise WeightsError(f"{path} is neither a slim refiner weights file nor a state_dict of tensors")
    return {"kind": None, "model_config": None, "state_dict": state_dict, "source": str(path), "extra": {}}


def save_weights(
    path: str | Path,
    kind: str,
    model_config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a slim weights file (tensors made contiguous and moved to the CPU)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": WEIGHTS_FORMAT,
        "kind": kind,
        "model_config": dict(model_config),
        "source": source,
        "state_dict": {key: value.detach().cpu().contiguous() for key, value in state_dict.items()},
        "extra": dict(extra or {}),
    }
    torch.save(payload, path)
    return path


@dataclass(frozen=True)
class ResolvedWeights:
    """Weights read for one backend: the file, its architecture config and its state_dict."""

    path: Path
    model_config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    source: str


def resolve_weights(kind: str, path: str | Path | None = None) -> ResolvedWeights:
    """Read the weights for backend ``kind``; ``path`` None means its packaged weights.

    A slim file's own ``kind`` must equal ``kind``, and its ``model_config`` picks the
    architecture; other files get the published architecture of ``kind``.
    """
    backend = get_backend(kind)
    if path is None:
        path = backend.default_weights()
        if path is None:
            raise WeightsError(f"backend {kind!r} has no packaged weights: pass a weights file")
    weights = read_weights(path)
    if weights["kind"] is not None and weights["kind"] != kind:
        raise WeightsError(f"{path} contains {weights['kind']!r} weights, but backend {kind!r} was requested")
    model_config = weights["model_config"] if weights["model_config"] is not None else default_model_config(kind)
    return ResolvedWeights(Path(path), model_config, weights["state_dict"], weights["source"])


def load_segmenter(kind: str, path: str | Path | None = None, device: str = "cpu") -> PromptableSegmenter:
    """Build the backend ``kind`` and load its weights strictly; returns the model in eval mode.

    ``path`` None means the backend's packaged weights (LiteMedSAM only).
    """
    weights = resolve_weights(kind, path)
    model = get_backend(kind).build(weights.model_config)
    load_state_dict_strict(model, weights.state_dict, weights.source)
    logger.info("loaded %s refiner weights from %s (%d entries)", kind, weights.path, len(weights.state_dict))
    return model.to(device).eval()


def convert_weights(
    source: str | Path, destination: str | Path, kind: str, model_config: Mapping[str, Any] | None = None
) -> Path:
    """Convert a published checkpoint into a slim weights file that loads with weights_only=True.

    The source is unpickled in full (``weights_only=False``) because published files such as
    ``sam-med2d_b.pth`` may hold optimizer state and other objects, so only convert files from
    a trusted origin. The model entries (``ckpt["model"]`` when present, else the whole dict)
    must load strictly into the backend built with ``model_config``, which defaults to the
    published architecture. Everything else in the file is dropped.
    """
    source = Path(source)
    if not source.is_file():
        raise WeightsError(f"checkpoint to convert not found: {source}")
    try:
        checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise WeightsError(
            f"{source} is not a readable torch.save file ({reason}); it may be truncated or of another format"
        ) from error
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise WeightsError(f"{source} contains a {type(checkpoint).__name__}, expected a dict with a state_dict")
    not_tensors = sorted(str(key) for key, value in state_dict.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise WeightsError(f"{source}: model entries {not_tensors[:20]} are not tensors; expected a state_dict")
    dropped = sorted(key for key in checkpoint if key != "model") if "model" in checkpoint else []

    model_config = dict(model_config) if model_config is not None else default_model_config(kind)
    model = get_backend(kind).build(model_config)
    load_state_dict_strict(model, state_dict, str(source))
    header = {"source_sha256": _sha256(source), "dropped_entries": dropped}
    logger.info("converted %s (%d model entries, dropped %s) to %s", source, len(state_dict), dropped, destination)
    return save_weights(destination, kind, model_config, model.state_dict(), source.name, header)
