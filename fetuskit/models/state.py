"""Strict state-dict loading: every key must match by name and shape, or nothing loads."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

# How many key names an error message shows per list before it summarises the rest.
_MAX_KEYS_LISTED = 20


class StateDictMismatchError(RuntimeError):
    """A state dict whose keys or shapes differ from the module it is loaded into.

    Attributes:
        missing: keys the module has and the state dict lacks.
        unexpected: keys the state dict has and the module lacks.
        shape_mismatches: ``(key, expected_shape, found_shape)`` for keys present on both sides.
    """

    def __init__(
        self,
        source: str,
        missing: list[str],
        unexpected: list[str],
        shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        self.source = source
        self.missing = missing
        self.unexpected = unexpected
        self.shape_mismatches = shape_mismatches
        lines = [f"state dict from {source} does not match the model:"]
        if missing:
            lines.append(f"  {len(missing)} missing keys: {_shorten(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys: {_shorten(unexpected)}")
        if shape_mismatches:
            shown = [f"{key} expected {list(want)} found {list(got)}" for key, want, got in shape_mismatches]
            lines.append(f"  {len(shape_mismatches)} shape mismatches: {_shorten(shown)}")
        lines.append("  Check that the file was written for this architecture and configuration.")
        super().__init__("\n".join(lines))


class UnreadableWeightsError(ValueError):
    """A file that ``torch.load(weights_only=True)`` cannot read.

    Attributes:
        path: the file.
        pickled_objects: True when the file is a readable torch file that pickles objects other
            than tensors and plain Python values (a custom class, for example); False when the
            file is truncated, empty or not a torch file at all.
    """

    def __init__(self, path: Path, message: str, pickled_objects: bool) -> None:
        super().__init__(message)
        self.path = path
        self.pickled_objects = pickled_objects


def load_weights_only(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Return the object stored in a ``torch.save`` file, read with ``weights_only=True``.

    Raises:
        FileNotFoundError: if ``path`` is not a file.
        UnreadableWeightsError: naming ``path`` when the file is truncated, empty, not a torch
            file, or pickles objects that a weights-only load rejects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnreadableWeightsError(
            path,
            f"{path} pickles objects other than tensors and plain Python values, so it cannot be "
            "loaded with weights_only=True; save a state_dict of tensors instead",
            pickled_objects=True,
        ) from error
    except (RuntimeError, EOFError, KeyError, ValueError) as error:
        # torch reports a truncated zip archive as RuntimeError, an empty file as EOFError and
        # a file that is neither a zip archive nor a pickle as KeyError or ValueError.
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UnreadableWeightsError(
            path,
            f"{path} is not a readable torch.save file ({reason}); it may be truncated or of "
            "another format, so copy or write it again",
            pickled_objects=False,
        ) from error


def _shorten(items: list[str]) -> str:
    if len(items) <= _MAX_KEYS_LISTED:
        return ", ".join(items)
    return ", ".join(items[:_MAX_KEYS_LISTED]) + f", ... and {len(items) - _MAX_KEYS_LISTED} more"


def compare_state_dict(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], source: str
) -> None:
    """Raise StateDictMismatchError unless ``found`` has exactly the keys and shapes of ``expected``.

    Both mappings are key -> tensor; only names and shapes are compared, never values or dtypes.
    """
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    shape_mismatches = [
        (key, tuple(expected[key].shape), tuple(found[key].shape))
        for key in expected
        if key in found and tuple(expected[key].shape) != tuple(found[key].shape)
    ]
    if missing or unexpected or shape_mismatches:
        raise StateDictMismatchError(source, missing, unexpected, shape_mismatches)


def load_state_dict_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module`` after checking that every key and shape matches.

    Raises:
        StateDictMismatchError: listing all missing, unexpected and mis-shaped keys at once;
            the module is left unchanged in that case.
    """
    compare_state_dict(module.state_dict(), state, source)
    module.load_state_dict(state, strict=True)
