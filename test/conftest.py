"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest


def _write_h5(path: Path, attrs: dict | None = None, **datasets: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        for key, value in datasets.items():
            handle.create_dataset(key, data=value)
        for key, value in (attrs or {}).items():
            handle.attrs[key] = value
    return path


@pytest.fixture
def write_h5() -> Callable[..., Path]:
    """Return a function ``write_h5(path, attrs=None, **datasets)`` that writes an HDF5 file."""
    return _write_h5


@pytest.fixture
def write_case(tmp_path: Path) -> Callable[..., tuple[Path, Path]]:
    """Return a function that writes a case in the challenge layout under ``tmp_path``.

    ``write_case(stem, mask, label, view_id=1)`` writes ``images/<stem>.h5`` with a
    (H, W, 3) uint8 image and ``labels/<stem>_label.h5``, and returns both paths.
    """

    def write(stem: str, mask: np.ndarray, label: list[int] | np.ndarray, view_id: object = 1) -> tuple[Path, Path]:
        height, width = mask.shape
        image = np.full((height, width, 3), 100, dtype=np.uint8)
        image_datasets = {"image": image} if view_id is None else {"image": image, "view": np.array([view_id])}
        image_path = _write_h5(tmp_path / "images" / f"{stem}.h5", **image_datasets)
        label_path = _write_h5(
            tmp_path / "labels" / f"{stem}_label.h5",
            mask=mask.astype(np.uint8),
            label=np.asarray(label, dtype=np.uint8),
        )
        return image_path, label_path

    return write
