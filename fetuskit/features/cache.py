"""On-disk cache of extractor features, keyed by image content and extractor identity.

Keys never use file names, because basenames such as ``1.h5`` repeat across the training and
validation splits. An entry's key is the SHA-256 of the extractor's ``cache_identity()`` and
the image's dtype, shape and bytes, so the same frame under two names is one entry and two
different frames under one name are two.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fetuskit.features.base import FeatureExtractor, check_images

logger = logging.getLogger(__name__)

DEFAULT_FOLDER_NAME = "fetuskit-feature-cache"


def image_digest(image: torch.Tensor | np.ndarray) -> str:
    """Return the SHA-256 hex digest of an image's dtype, shape and C-order bytes."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256()
    digest.update(f"{array.dtype.str}{array.shape}".encode("utf-8"))
    digest.update(array.tobytes())
    return digest.hexdigest()


def entry_key(image: torch.Tensor | np.ndarray, identity: str) -> str:
    """Return the cache key of one image under an extractor's ``cache_identity()``."""
    digest = hashlib.sha256()
    digest.update(identity.encode("utf-8"))
    digest.update(b"\0")
    digest.update(image_digest(image).encode("ascii"))
    return digest.hexdigest()


@dataclass(frozen=True)
class FeatureCacheConfig:
    """Settings of the feature cache.

    Attributes:
        folder: cache folder, or None for ``fetuskit-feature-cache`` under the system temp dir.
        dtype: storage precision. ``"float16"`` halves the disk use, and features served from
            the cache, fresh or stored, are then rounded to float16.
    """

    folder: Path | None = None
    dtype: Literal["float16", "float32"] = "float16"


class FeatureCache:
    """Features of single images stored as ``<folder>/<key[:2]>/<key>.npy`` arrays of shape (D, h, w).

    Writes go to a temporary file in the same folder followed by ``os.replace``, so a reader
    never sees a partly written entry, even with several processes writing at once.

    Attributes:
        hits, misses: counts of images served from disk and computed since construction.
    """

    def __init__(self, config: FeatureCacheConfig | None = None) -> None:
        self.config = config or FeatureCacheConfig()
        if self.config.dtype not in ("float16", "float32"):
            raise ValueError(f"cache dtype must be 'float16' or 'float32', got {self.config.dtype!r}")
        self.folder = Path(self.config.folder) if self.config.folder else Path(tempfile.gettempdir()) / DEFAULT_FOLDER_NAME
        self.dtype = np.dtype(self.config.dtype)
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        """Return the path of the file for entry ``key``."""
        return self.folder / key[:2] / f"{key}.npy"

    def load(self, key: str) -> np.ndarray | None:
        """Return the stored (D, h, w) array of ``key``, or None when absent or unreadable."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            # numpy raises EOFError for an empty file, ValueError for a bad header or short data.
            logger.warning("Ignoring unreadable feature cache entry %s: %s", path, error)
            return None
        if array.ndim != 3:
            logger.warning("Ignoring feature cache entry %s with shape %s, expected (D, h, w)", path, array.shape)
            return None
        return array

    def store(self, key: str, features: np.ndarray) -> None:
        """Write one (D, h, w) array atomically under ``key`` in the cache dtype."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:8]}-", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                np.save(file, np.ascontiguousarray(features, dtype=self.dtype), allow_pickle=False)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def extract(self, extractor: FeatureExtractor, images: torch.Tensor) -> torch.Tensor:
        """Return the extractor's features of ``images``, computing only the images not cached.

        Args:
            extractor: any ``FeatureExtractor``. Its ``cache_identity()`` is part of every key.
            images: (N, 1, H, W) float in [0, 1], as ``extractor.extract`` takes them.

        Returns:
            (N, D, h, w) float32 on the device of ``images``, rounded to the cache dtype, so
            the first and later calls return the same values.
        """
        check_images(images)
        identity = extractor.cache_identity()
        keys = [entry_key(image, identity) for image in images]
        arrays: list[np.ndarray | None] = [self.load(key) for key in keys]
        missing = [index for index, array in enumerate(arrays) if array is None]

        if missing:
            computed = extractor.extract(images[missing]).detach().cpu().numpy()
            for position, index in enumerate(missing):
                array = computed[position].astype(self.dtype)
                self.store(keys[index], array)
                arrays[index] = array
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)

        shapes = {array.shape for array in arrays}
        if len(shapes) != 1:
            raise ValueError(
                f"cached features in {self.folder} have mixed shapes {sorted(shapes)} for one batch; "
                "delete the cache folder and rerun"
            )
        stacked = np.stack([array.astype(np.float32) for array in arrays])
        return torch.from_numpy(stacked).to(images.device)


class ImageFeatureStore:
    """Extractor features of a fixed stack of images, computed on first request and kept in memory.

    A trainer draws the same images again and again, so each image goes through the extractor
    once instead of at every step. Features are stored on the CPU in ``dtype``. Float16
    halves the memory (N * D * h * w * 2 bytes) and rounds the unit-length features to about
    three significant digits.

    Args:
        extractor: any ``FeatureExtractor``.
        images: (N, 1, H, W) float in [0, 1], the images that ``features`` indexes.
        batch_size: images per extractor call when several are missing at once.
        dtype: storage precision.

    Attributes:
        computed: (N,) bool, images whose features are stored.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        images: torch.Tensor,
        batch_size: int = 16,
        dtype: torch.dtype = torch.float16,
    ) -> None:
        check_images(images)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.extractor = extractor
        self.images = images
        self.batch_size = batch_size
        self.dtype = dtype
        self.computed = torch.zeros(images.shape[0], dtype=torch.bool)
        self._stored: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def features(self, indices: torch.Tensor) -> torch.Tensor:
        """Return (n, D, h, w) float32 CPU features of the images at (n,) int64 ``indices``.

        Indices may repeat. Images not yet stored go through the extractor first.

        Raises:
            IndexError: for an index outside [0, N).
        """
        indices = indices.long().cpu()
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= len(self)):
            raise IndexError(f"image indices must lie in [0, {len(self)}), got {indices.tolist()}")
        missing = torch.unique(indices[~self.computed[indices]])
        for start in range(0, missing.numel(), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            computed = self.extractor.extract(self.images[chunk]).detach().cpu()
            if self._stored is None:
                self._stored = torch.zeros((len(self), *computed.shape[1:]), dtype=self.dtype)
            self._stored[chunk] = computed.to(self.dtype)
            self.computed[chunk] = True
        if self._stored is None:
            raise ValueError("no features were requested yet, so their shape is unknown; pass at least one index")
        return self._stored[indices].float()
