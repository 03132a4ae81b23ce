"""Read and prepare input images ahead of the network in a thread pool."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from fetuskit.arrays import to_pixels_hwc
from fetuskit.cases import Case
from fetuskit.io import read_image
from fetuskit.transforms import image_to_tensor

logger = logging.getLogger(__name__)

# Size of the fallback mask when an input's own size cannot be read (the FETUS frame size).
FALLBACK_SIZE = (512, 512)


@dataclass
class _Prepared:
    case: Case
    image: np.ndarray  # (H, W) float32 in [0, 1]
    tensor: torch.Tensor  # (1, S, S) float32 in [0, 1]
    view: int | None  # 0-based view index


@dataclass
class _Unreadable:
    case: Case
    reason: str
    size: tuple[int, int]


def _prepare(case: Case, size: int) -> _Prepared | _Unreadable:
    """Read and preprocess one case, turning every failure into an :class:`_Unreadable`."""
    try:
        loaded = read_image(case.image)
        tensor = image_to_tensor(loaded.image, size)
    # A corrupt file can fail in h5py, NumPy or torch with many exception types. Each of them
    # must become a fallback output instead of stopping the run.
    except Exception as error:  # noqa: BLE001
        reason = f"{type(error).__name__}: {error}"
        logger.error("cannot read %s: %s", case.image, reason)
        return _Unreadable(case, reason, _readable_size(Path(case.image)))

    view = loaded.view
    if view is None and getattr(case, "view_id", None) is not None:
        view = int(case.view_id) - 1
    return _Prepared(case, loaded.image, tensor, view)


def _readable_size(path: Path) -> tuple[int, int]:
    """Return (H, W) of a file's ``image`` dataset from its shape alone, else :data:`FALLBACK_SIZE`."""
    try:
        with h5py.File(path, "r") as handle:
            shape = tuple(handle["image"].shape)
    # Any failure here only means that the size is unknown.
    except Exception:  # noqa: BLE001
        return FALLBACK_SIZE
    # A zero-stride array of that shape lets the reader's own layout rules decide, without
    # reading any pixels.
    pixels, problem = to_pixels_hwc(np.broadcast_to(np.uint8(0), shape))
    if problem is not None:
        return FALLBACK_SIZE
    return int(pixels.shape[0]), int(pixels.shape[1])


def _read_ahead(
    cases: Sequence[Case], size: int, workers: int, batch_size: int
) -> Iterator[_Prepared | _Unreadable]:
    """Yield prepared cases in input order, reading up to two batches ahead in a thread pool."""
    if workers == 0:
        for case in cases:
            yield _prepare(case, size)
        return

    window = max(2 * batch_size, workers)
    remaining = iter(cases)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="read-ahead") as pool:
        # range comes first: zip stops on it without taking, and losing, one more case.
        queue: deque[Future] = deque(pool.submit(_prepare, case, size) for _, case in zip(range(window), remaining))
        while queue:
            result = queue.popleft().result()
            following = next(remaining, None)
            if following is not None:
                queue.append(pool.submit(_prepare, following, size))
            yield result
