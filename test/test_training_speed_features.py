"""The feature check computes each image's features once and warps similarities per view."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fetuskit.features.cache import ImageFeatureStore
from fetuskit.features.prototypes import class_prototypes, prototype_keep_mask
from fetuskit.labels import NUM_CLASSES
from fetuskit.training import augment
from fetuskit.training.config import AugmentConfig, load_config
from fetuskit.training.data import CaseTensors
from fetuskit.training.tasks import FeatureCheck

SIZE = 64


class CountingExtractor:
    """Extractor stand-in: 8x8 average pooling repeated over D channels, counting images."""

    name = "counting"
    dim = 2
    stride = 8
    side = SIZE

    def __init__(self) -> None:
        self.images_seen = 0

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        self.images_seen += images.shape[0]
        pooled = F.avg_pool2d(images.float(), 8)
        return torch.cat([pooled, 1.0 - pooled], dim=1)


def _cases(count: int, seed: int) -> CaseTensors:
    generator = torch.Generator().manual_seed(seed)
    images = 0.2 * torch.rand(count, 1, SIZE, SIZE, generator=generator)
    masks = torch.zeros(count, SIZE, SIZE, dtype=torch.uint8)
    for index in range(count):
        top, left = torch.randint(4, SIZE - 28, (2,), generator=generator).tolist()
        images[index, 0, top : top + 24, left : left + 24] = 0.8
        masks[index, top : top + 24, left : left + 24] = 5
    return CaseTensors(
        names=[f"case{index}" for index in range(count)],
        paths=[Path(f"case{index}.h5") for index in range(count)],
        images=images,
        views=torch.zeros(count, dtype=torch.long),
        masks=masks,
        chd=torch.zeros(count, 7),
    )


def test_store_extracts_each_image_once() -> None:
    extractor = CountingExtractor()
    images = torch.rand(5, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    store = ImageFeatureStore(extractor, images, batch_size=2)

    first = store.features(torch.tensor([0, 2, 2]))
    assert extractor.images_seen == 2
    second = store.features(torch.tensor([2, 4, 0]))
    assert extractor.images_seen == 3
    assert store.computed.tolist() == [True, False, True, False, True]

    expected = extractor.extract(images[[0, 2, 2]]).half().float()
    assert first.dtype == torch.float32
    assert torch.equal(first, expected)
    assert torch.equal(second[0], expected[1])


def test_store_rejects_index_out_of_range() -> None:
    store = ImageFeatureStore(CountingExtractor(), torch.rand(3, 1, SIZE, SIZE))
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        store.features(torch.tensor([3]))


def test_warp_maps_shifts_without_clamping() -> None:
    values = torch.linspace(-1.0, 1.0, 2 * 3 * 8 * 8).view(2, 3, 8, 8)
    # A shift of 2k/S in normalised x makes output column j read input column j + k.
    theta = torch.tensor([[1.0, 0.0, 2.0 * 3 / 8], [0.0, 1.0, 0.0]]).repeat(2, 1, 1)
    warped = augment.warp_maps(values, theta)
    assert torch.allclose(warped[..., :5], values[..., 3:], atol=1e-6)
    assert torch.equal(warped[..., 5:], torch.zeros(2, 3, 8, 3))
    assert float(warped.min()) < 0.0


def test_weak_augment_with_affine_matches_weak_augment() -> None:
    images = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    masks = (images[:, 0] > 0.5).long()
    config = AugmentConfig()
    plain_images, plain_masks = augment.weak_augment(images, masks, config, torch.Generator().manual_seed(4))
    with_images, with_masks, theta = augment.weak_augment_with_affine(
        images, masks, config, torch.Generator().manual_seed(4)
    )
    assert torch.equal(plain_images, with_images)
    assert torch.equal(plain_masks, with_masks)
    assert torch.equal(theta, augment.random_affine(3, config, torch.Generator().manual_seed(4)))


def test_feature_check_matches_direct_extraction() -> None:
    # Without a geometric change, stored features give the same prototypes and keep mask as
    # running the extractor on the batch, up to the float16 rounding of the store.
    config = load_config(
        None,
        [
            "features.extractor=timm",
            f"features.options={{architecture: tf_efficientnet_lite0, weights: null, side: {SIZE}, stride: 16}}",
        ],
    )
    torch.manual_seed(0)
    check = FeatureCheck(config)
    labelled = _cases(4, seed=1)
    unlabelled = _cases(6, seed=2)
    check.attach(labelled, unlabelled)
    extract = check.extractor.extract

    picked = torch.tensor([0, 2, 3])
    check.update(picked)
    prototypes, present = class_prototypes(
        extract(labelled.images[picked]).half().float(), labelled.masks[picked].long(), None, NUM_CLASSES
    )
    assert present.tolist() == check.bank.present.tolist()
    assert torch.allclose(check.bank.prototypes, prototypes, atol=1e-6)

    indices = torch.tensor([5, 1, 5])
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).repeat(3, 1, 1)
    labels = torch.randint(0, 2, (3, SIZE, SIZE), generator=torch.Generator().manual_seed(3)) * 5
    confident = torch.ones(3, SIZE, SIZE, dtype=torch.bool)
    kept = check.keep(indices, identity, labels, confident)
    expected = prototype_keep_mask(
        extract(unlabelled.images[indices]).half().float(), labels, confident, check.bank.prototypes, check.bank.present
    ).keep
    assert 0 < int(expected.sum()) < expected.numel()
    assert torch.equal(kept, expected)
