"""Class prototypes and the pseudo-label check on hand-made features with exact expected values."""

from __future__ import annotations

import math

import pytest
import torch

from fetuskit.features.prototypes import (
    PrototypeEMA,
    class_fractions,
    class_prototypes,
    prototype_keep_mask,
)

# Three classes in a 2-D feature space: class 0 has no prototype, 1 points along x, 2 along y.
PROTOTYPES = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
PRESENT = torch.tensor([False, True, True])
X_AXIS = [1.0, 0.0]
Y_AXIS = [0.0, 1.0]


def _features(rows: list[list[list[float]]]) -> torch.Tensor:
    """Turn rows of D-vectors into (1, D, h, w) features."""
    return torch.tensor(rows).permute(2, 0, 1)[None]


def test_pixel_on_other_prototype_dropped() -> None:
    features = _features([[X_AXIS, X_AXIS], [Y_AXIS, X_AXIS]])
    pseudo = torch.tensor([[[1, 1], [2, 2]]])
    confident = torch.ones(1, 2, 2, dtype=torch.bool)
    keep, dropped = prototype_keep_mask(features, pseudo, confident, PROTOTYPES, PRESENT)
    assert keep.tolist() == [[[True, True], [True, False]]]
    assert dropped == 0.25


def test_consistent_pixels_all_kept() -> None:
    features = _features([[X_AXIS, X_AXIS], [Y_AXIS, X_AXIS]])
    pseudo = torch.tensor([[[1, 1], [2, 1]]])
    confident = torch.ones(1, 2, 2, dtype=torch.bool)
    keep, dropped = prototype_keep_mask(features, pseudo, confident, PROTOTYPES, PRESENT)
    assert bool(keep.all())
    assert dropped == 0.0


def test_missing_prototype_policy() -> None:
    features = _features([[X_AXIS, Y_AXIS]])
    pseudo = torch.tensor([[[0, 2]]])
    confident = torch.ones(1, 1, 2, dtype=torch.bool)
    kept = prototype_keep_mask(features, pseudo, confident, PROTOTYPES, PRESENT, keep_missing=True)
    dropped = prototype_keep_mask(features, pseudo, confident, PROTOTYPES, PRESENT, keep_missing=False)
    assert kept.keep.tolist() == [[[True, True]]]
    assert kept.dropped_fraction == 0.0
    assert dropped.keep.tolist() == [[[False, True]]]
    assert dropped.dropped_fraction == 0.5


def test_unconfident_pixels_not_counted() -> None:
    features = _features([[X_AXIS, X_AXIS, Y_AXIS]])
    pseudo = torch.tensor([[[2, 2, 2]]])
    confident = torch.tensor([[[True, False, True]]])
    keep, dropped = prototype_keep_mask(features, pseudo, confident, PROTOTYPES, PRESENT)
    assert keep.tolist() == [[[False, False, True]]]
    assert dropped == 0.5


def test_no_confident_pixel_drops_nothing() -> None:
    features = _features([[X_AXIS]])
    keep, dropped = prototype_keep_mask(
        features, torch.tensor([[[2]]]), torch.zeros(1, 1, 1, dtype=torch.bool), PROTOTYPES, PRESENT
    )
    assert keep.tolist() == [[[False]]]
    assert dropped == 0.0


def test_only_own_class_present_kept() -> None:
    features = _features([[Y_AXIS]])
    present = torch.tensor([False, True, False])
    keep, dropped = prototype_keep_mask(
        features, torch.tensor([[[1]]]), torch.ones(1, 1, 1, dtype=torch.bool), PROTOTYPES, present
    )
    assert keep.tolist() == [[[True]]]
    assert dropped == 0.0


def test_margin_tolerates_or_tightens() -> None:
    # Cosine 0.6 to class 1 and 0.8 to class 2, then the reverse.
    features = _features([[[0.6, 0.8], [0.8, 0.6]]])
    pseudo = torch.tensor([[[1, 1]]])
    confident = torch.ones(1, 1, 2, dtype=torch.bool)
    plain = prototype_keep_mask(features, pseudo, confident, PROTOTYPES, PRESENT)
    tolerant = prototype_keep_mask(features, pseudo, confident, PROTOTYPES, PRESENT, margin=0.25)
    strict = prototype_keep_mask(features, pseudo, confident, PROTOTYPES, PRESENT, margin=-0.25)
    assert plain.keep.tolist() == [[[False, True]]]
    assert tolerant.keep.tolist() == [[[True, True]]]
    assert strict.keep.tolist() == [[[False, False]]]


def test_similarity_upsampled_to_non_square_labels() -> None:
    # A (1, 2) feature grid resized bilinearly to 4 columns weights the left cell
    # 1, 0.75, 0.25, 0 across the columns, so column 1 is closer to class 1.
    features = _features([[X_AXIS, Y_AXIS]])
    confident = torch.ones(1, 2, 4, dtype=torch.bool)
    consistent = torch.tensor([[[1, 1, 2, 2], [1, 1, 2, 2]]])
    shifted = torch.tensor([[[1, 2, 2, 2], [1, 1, 2, 2]]])
    keep, dropped = prototype_keep_mask(features, consistent, confident, PROTOTYPES, PRESENT)
    assert keep.shape == (1, 2, 4)
    assert bool(keep.all())
    assert dropped == 0.0
    keep, dropped = prototype_keep_mask(features, shifted, confident, PROTOTYPES, PRESENT)
    assert keep.tolist() == [[[True, False, True, True], [True, True, True, True]]]
    assert dropped == 0.125


def test_fractions_average_one_hot() -> None:
    labels = torch.tensor([[[1, 1, 1, 2], [1, 1, 1, 2]]])
    fractions = class_fractions(labels, torch.ones(1, 2, 4), num_classes=3, grid=(1, 2))
    assert fractions.shape == (1, 3, 1, 2)
    assert fractions[0, :, 0, 0].tolist() == [0.0, 1.0, 0.0]
    assert fractions[0, :, 0, 1].tolist() == [0.0, 0.5, 0.5]


def test_prototypes_weighted_mean_exact() -> None:
    # 2x2 feature cells over a 4x4 label map, 2x2 pixels per cell.
    features = _features([[X_AXIS, Y_AXIS], [Y_AXIS, [3.0, 4.0]]])
    labels = torch.tensor(
        [[[1, 1, 1, 2], [1, 1, 1, 2], [2, 2, 255, 255], [2, 2, 255, 255]]]
    )
    weights = (labels != 255).float()
    prototypes, present = class_prototypes(features, labels, weights, num_classes=3)
    assert present.tolist() == [False, True, True]
    # Class 1: cell (0, 0) counts fully and cell (0, 1) half, so the mean is along (2, 1).
    torch.testing.assert_close(prototypes[1], torch.tensor([2.0, 1.0]) / math.sqrt(5.0))
    torch.testing.assert_close(prototypes[2], torch.tensor([0.0, 1.0]))
    assert prototypes[0].tolist() == [0.0, 0.0]


def test_prototypes_on_non_square_grid() -> None:
    features = torch.zeros(2, 3, 2, 3)
    features[:, 0] = 1.0
    labels = torch.randint(0, 4, (2, 5, 7))
    prototypes, present = class_prototypes(features, labels, None, num_classes=5)
    assert prototypes.shape == (5, 3)
    assert present[4].item() is False
    for index in torch.nonzero(present).flatten().tolist():
        torch.testing.assert_close(prototypes[index], torch.tensor([1.0, 0.0, 0.0]))


def test_prototypes_without_weighted_pixels() -> None:
    prototypes, present = class_prototypes(
        torch.rand(1, 2, 2, 2), torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4), num_classes=3
    )
    assert not bool(present.any())
    assert bool((prototypes == 0).all())


def test_out_of_range_label_rejected() -> None:
    with pytest.raises(ValueError, match=r"\[255\] outside \[0, 3\)"):
        class_prototypes(torch.rand(1, 2, 1, 1), torch.full((1, 2, 2), 255), None, num_classes=3)


def test_mismatched_shapes_rejected() -> None:
    with pytest.raises(ValueError, match="pseudo must be"):
        prototype_keep_mask(
            torch.rand(2, 2, 1, 1), torch.zeros(1, 2, 2, dtype=torch.long), torch.ones(1, 2, 2, dtype=torch.bool),
            PROTOTYPES, PRESENT,
        )
    with pytest.raises(ValueError, match="confident must"):
        prototype_keep_mask(
            torch.rand(1, 2, 1, 1), torch.zeros(1, 2, 2, dtype=torch.long), torch.ones(1, 2, 3, dtype=torch.bool),
            PROTOTYPES, PRESENT,
        )


def test_ema_blends_present_classes_only() -> None:
    ema = PrototypeEMA(num_classes=3, dim=2, momentum=0.5)
    ema.update(PROTOTYPES, PRESENT)
    assert ema.present.tolist() == [False, True, True]
    torch.testing.assert_close(ema.prototypes, PROTOTYPES)

    batch = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    ema.update(batch, torch.tensor([True, True, False]))
    assert ema.present.tolist() == [True, True, True]
    torch.testing.assert_close(ema.prototypes[0], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(ema.prototypes[1], torch.tensor([1.0, 1.0]) / math.sqrt(2.0))
    torch.testing.assert_close(ema.prototypes[2], torch.tensor([0.0, 1.0]))


def test_ema_state_round_trip() -> None:
    ema = PrototypeEMA(num_classes=3, dim=2)
    ema.update(PROTOTYPES, PRESENT)
    restored = PrototypeEMA(num_classes=3, dim=2)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.prototypes, ema.prototypes)
    assert torch.equal(restored.present, ema.present)
    with pytest.raises(ValueError, match="expected"):
        PrototypeEMA(num_classes=4, dim=2).load_state_dict(ema.state_dict())
