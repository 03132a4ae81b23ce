"""Feature cache keyed by image content and extractor identity, never by file name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fetuskit.features.cache import FeatureCache, FeatureCacheConfig, entry_key


class PoolingExtractor:
    """Extractor stand-in: 4x4 average pooling repeated over D channels, counting images."""

    name = "pooling"
    dim = 3
    stride = 4
    side = 8

    def __init__(self, identity: str = "pooling:v1") -> None:
        self.identity = identity
        self.images_seen = 0

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        self.images_seen += images.shape[0]
        pooled = F.adaptive_avg_pool2d(images.float(), (2, 2))
        return pooled.repeat(1, self.dim, 1, 1) / 3.0

    def cache_identity(self) -> str:
        return self.identity


def _save_case(folder: Path, image: np.ndarray) -> Path:
    """Store an image as ``<folder>/1.npy``, the same basename in every split."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "1.npy"
    np.save(path, image)
    return path


def _load(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.load(path))[None, None]


def test_same_content_other_name_hits(tmp_path: Path) -> None:
    image = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    train = _save_case(tmp_path / "train", image)
    validation = tmp_path / "validation" / "copy_of_1.npy"
    validation.parent.mkdir()
    np.save(validation, image)
    cache = FeatureCache(FeatureCacheConfig(folder=tmp_path / "cache"))
    extractor = PoolingExtractor()

    first = cache.extract(extractor, _load(train))
    second = cache.extract(extractor, _load(validation))
    assert extractor.images_seen == 1
    assert (cache.hits, cache.misses) == (1, 1)
    assert torch.equal(first, second)


def test_other_content_same_name_misses(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    train = _save_case(tmp_path / "train", rng.random((8, 8)).astype(np.float32))
    cache = FeatureCache(FeatureCacheConfig(folder=tmp_path / "cache"))
    extractor = PoolingExtractor()
    first = cache.extract(extractor, _load(train))
    validation = _save_case(tmp_path / "validation", rng.random((8, 8)).astype(np.float32))
    second = cache.extract(extractor, _load(validation))
    assert extractor.images_seen == 2
    assert (cache.hits, cache.misses) == (0, 2)
    assert not torch.equal(first, second)


def test_other_extractor_identity_misses(tmp_path: Path) -> None:
    images = torch.rand(2, 1, 8, 8)
    cache = FeatureCache(FeatureCacheConfig(folder=tmp_path))
    cache.extract(PoolingExtractor("pooling:v1"), images)
    other = PoolingExtractor("pooling:v2")
    cache.extract(other, images)
    assert other.images_seen == 2
    assert entry_key(images[0], "pooling:v1") != entry_key(images[0], "pooling:v2")


def test_batch_computes_only_misses(tmp_path: Path) -> None:
    images = torch.rand(3, 1, 8, 8)
    cache = FeatureCache(FeatureCacheConfig(folder=tmp_path, dtype="float32"))
    extractor = PoolingExtractor()
    cache.extract(extractor, images[1:2])
    features = cache.extract(extractor, images)
    assert extractor.images_seen == 3
    assert (cache.hits, cache.misses) == (1, 3)
    torch.testing.assert_close(features, PoolingExtractor().extract(images), rtol=0, atol=0)


def test_float16_storage_rounds_consistently(tmp_path: Path) -> None:
    images = torch.rand(2, 1, 8, 8)
    cache = FeatureCache(FeatureCacheConfig(folder=tmp_path, dtype="float16"))
    extractor = PoolingExtractor()
    fresh = cache.extract(extractor, images)
    stored = cache.extract(extractor, images)
    expected = extractor.extract(images).half().float()
    assert fresh.dtype == torch.float32
    assert torch.equal(fresh, expected)
    assert torch.equal(stored, expected)
    key = entry_key(images[0], extractor.cache_identity())
    assert np.load(cache.path(key)).dtype == np.float16


def test_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    cache = FeatureCache(FeatureCacheConfig(folder=tmp_path))
    cache.extract(PoolingExtractor(), torch.rand(4, 1, 8, 8))
    files = sorted(path.name for path in tmp_path.rglob("*") if path.is_file())
    assert len(files) == 4
    assert all(name.endswith(".npy") and len(name) == 64 + 4 for name in files)


def test_corrupt_entry_recomputed(tmp_path: Path) -> None:
    images = torch.rand(1, 1, 8, 8)
    cache = FeatureCache(FeatureCacheConfig(folder=tmp_path, dtype="float32"))
    extractor = PoolingExtractor()
    cache.extract(extractor, images)
    cache.path(entry_key(images[0], extractor.cache_identity())).write_bytes(b"truncated")
    features = cache.extract(extractor, images)
    assert extractor.images_seen == 2
    torch.testing.assert_close(features, PoolingExtractor().extract(images), rtol=0, atol=0)


def test_default_folder_under_temp_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    cache = FeatureCache()
    assert cache.folder == tmp_path / "fetuskit-feature-cache"


def test_empty_entry_recomputed(tmp_path: Path) -> None:
    images = torch.rand(1, 1, 8, 8)
    cache = FeatureCache(FeatureCacheConfig(folder=tmp_path, dtype="float32"))
    extractor = PoolingExtractor()
    cache.extract(extractor, images)
    cache.path(entry_key(images[0], extractor.cache_identity())).write_bytes(b"")
    features = cache.extract(extractor, images)
    assert extractor.images_seen == 2
    torch.testing.assert_close(features, PoolingExtractor().extract(images), rtol=0, atol=0)
