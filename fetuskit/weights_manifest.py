"""The weights manifest: which checkpoints form the shipped ensemble, and how to use them.

``model_weights/manifest.json`` sits next to the checkpoint files. Its keys:

``format``
    Manifest format version, currently 1.
``members``
    Non-empty list of ensemble members. Each member is an object with these keys:

    - ``checkpoint``: file name relative to the manifest's folder.
    - ``sha256``: hex digest of that file, checked before anything is loaded.
    - ``weight``: optional, default 1.0, the member's share in the averaged probabilities.
    - ``use``: optional, default ``"auto"``, which weights of the checkpoint to load. It is
      passed to ``fetuskit.models.checkpoint.load_checkpoint``.

    A member's architecture and input size come from the checkpoint's own config.
``chd_thresholds``
    Optional list of 7 floats in (0, 1), one per CHD label in ``fetuskit.labels.CHD_NAMES``
    order, default 0.5 each. A label is predicted where its probability is above its threshold.
``refiner``
    Optional object passed to ``fetuskit.refine.build_refiner``, or null for no refinement.
``provenance``
    Optional free-form object (for example ``source``, ``licence``, ``training_command``,
    ``metrics``) that records where the weights come from. Inference copies it into the run
    settings and otherwise ignores it.

Any other top-level or member key is rejected, so a misspelt key cannot silently fall back
to a default.

Example::

    {
      "format": 1,
      "members": [{"checkpoint": "unet_fold0.pt", "sha256": "9f2c...", "weight": 1.0}],
      "chd_thresholds": [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
      "refiner": null,
      "provenance": {"source": "trained on FETUS 2026 training data", "licence": "CC-BY-NC-4.0"}
    }
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fetuskit.labels import NUM_CHD

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
DEFAULT_CHD_THRESHOLD = 0.5

_TOP_LEVEL_KEYS = frozenset({"format", "members", "chd_thresholds", "refiner", "provenance"})
_MEMBER_KEYS = frozenset({"checkpoint", "sha256", "weight", "use"})


class ManifestError(ValueError):
    """The weights manifest is missing, malformed, or does not match the files next to it."""


@dataclass(frozen=True)
class MemberSpec:
    """One ensemble member: a checkpoint file, its expected SHA-256 and its averaging weight."""

    checkpoint: str
    sha256: str
    weight: float = 1.0
    use: str = "auto"


@dataclass(frozen=True)
class WeightsManifest:
    """A parsed manifest; ``folder`` is the directory the checkpoint names are relative to."""

    folder: Path
    members: tuple[MemberSpec, ...]
    chd_thresholds: tuple[float, ...] = (DEFAULT_CHD_THRESHOLD,) * NUM_CHD
    refiner: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def checkpoint_path(self, member: MemberSpec) -> Path:
        return self.folder / member.checkpoint

    def to_json(self) -> dict[str, Any]:
        """Return the manifest as a JSON-ready dict in the on-disk format (without ``folder``)."""
        return {
            "format": MANIFEST_FORMAT,
            "members": [
                {"checkpoint": m.checkpoint, "sha256": m.sha256, "weight": m.weight, "use": m.use}
                for m in self.members
            ],
            "chd_thresholds": list(self.chd_thresholds),
            "refiner": self.refiner,
            "provenance": self.provenance,
        }


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Return the lowercase hex SHA-256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(folder: Path) -> WeightsManifest:
    """Read and validate ``folder/manifest.json``; checksums are checked by :func:`verify_checksums`.

    Raises:
        ManifestError: when the file is missing, is not valid JSON, or has a missing, unknown
            or invalid key. The message names the file and the key.
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"weights manifest not found: {path}. Pass --weights with the folder that contains "
            f"{MANIFEST_NAME} and the checkpoints it lists."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"cannot read weights manifest {path}: {error}") from error
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")

    unknown = sorted(set(data) - _TOP_LEVEL_KEYS)
    if unknown:
        raise ManifestError(f"{path}: unknown keys {unknown}; expected only {sorted(_TOP_LEVEL_KEYS)}")
    if data.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path}: expected \"format\": {MANIFEST_FORMAT}, got {data.get('format')!r}")

    members = _parse_members(data.get("members"), path)
    thresholds = _parse_thresholds(data.get("chd_thresholds"), path)
    refiner = data.get("refiner")
    if refiner is not None and not isinstance(refiner, dict):
        raise ManifestError(f"{path}: \"refiner\" must be an object or null, got {refiner!r}")
    provenance = data.get("provenance") or {}
    if not isinstance(provenance, dict):
        raise ManifestError(f"{path}: \"provenance\" must be an object, got {provenance!r}")
    return WeightsManifest(folder, members, thresholds, refiner, provenance)


def _parse_members(raw: Any, path: Path) -> tuple[MemberSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise ManifestError(f"{path}: \"members\" must be a non-empty list of checkpoint entries, got {raw!r}")
    members = []
    for index, entry in enumerate(raw):
        where = f"{path}: members[{index}]"
        if not isinstance(entry, dict):
            raise ManifestError(f"{where} must be an object, got {entry!r}")
        unknown = sorted(set(entry) - _MEMBER_KEYS)
        if unknown:
            raise ManifestError(f"{where}: unknown keys {unknown}; expected only {sorted(_MEMBER_KEYS)}")
        checkpoint, digest = entry.get("checkpoint"), entry.get("sha256")
        if not isinstance(checkpoint, str) or not checkpoint or Path(checkpoint).is_absolute():
            raise ManifestError(f"{where}: \"checkpoint\" must be a file name relative to the manifest, got {checkpoint!r}")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
            raise ManifestError(f"{where}: \"sha256\" must be 64 hex digits, got {digest!r}")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ManifestError(f"{where}: \"weight\" must be a positive number, got {weight!r}")
        use = entry.get("use", "auto")
        if not isinstance(use, str):
            raise ManifestError(f"{where}: \"use\" must be a string, got {use!r}")
        members.append(MemberSpec(checkpoint, digest.lower(), float(weight), use))
    return tuple(members)


def _parse_thresholds(raw: Any, path: Path) -> tuple[float, ...]:
    if raw is None:
        return (DEFAULT_CHD_THRESHOLD,) * NUM_CHD
    valid = (
        isinstance(raw, list)
        and len(raw) == NUM_CHD
        and all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0.0 < t < 1.0 for t in raw)
    )
    if not valid:
        raise ManifestError(f"{path}: \"chd_thresholds\" must be {NUM_CHD} numbers in (0, 1), got {raw!r}")
    return tuple(float(t) for t in raw)


def verify_checksums(manifest: WeightsManifest) -> None:
    """Check that every member's checkpoint exists and matches its SHA-256.

    All members are checked before raising, so one error lists every bad file.

    Raises:
        ManifestError: naming each missing file and each file whose digest differs.
    """
    problems = []
    for member in manifest.members:
        path = manifest.checkpoint_path(member)
        if not path.is_file():
            problems.append(f"{path}: file not found")
            continue
        actual = sha256_file(path)
        if actual != member.sha256:
            problems.append(f"{path}: sha256 is {actual}, manifest expects {member.sha256}")
    if problems:
        raise ManifestError(
            "model weights do not match the manifest "
            f"{manifest.folder / MANIFEST_NAME}:\n  " + "\n  ".join(problems)
            + "\nRestore the files, or update the manifest with the new digests if the change is intended."
        )


def write_manifest(
    folder: Path,
    checkpoints: list[str],
    *,
    weights: list[float] | None = None,
    chd_thresholds: list[float] | None = None,
    refiner: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> WeightsManifest:
    """Write ``folder/manifest.json`` for checkpoint files already in ``folder``, computing their digests."""
    folder = Path(folder)
    weights = weights or [1.0] * len(checkpoints)
    members = tuple(
        MemberSpec(name, sha256_file(folder / name), float(weight)) for name, weight in zip(checkpoints, weights, strict=True)
    )
    manifest = WeightsManifest(
        folder=folder,
        members=members,
        chd_thresholds=tuple(chd_thresholds or (DEFAULT_CHD_THRESHOLD,) * NUM_CHD),
        refiner=refiner,
        provenance=provenance or {},
    )
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
    return load_manifest(folder)
