"""Exact-value tests for evaluation.metrics and evaluation.summary."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.metrics import (
    binary_f1,
    classification_f1,
    final_score,
    segmentation_scores,
    segmentation_scores_reference,
    time_score,
)
from evaluation.summary import CaseRecord, evaluate_cases

SCORERS = [
    pytest.param(segmentation_scores, id="fast"),
    pytest.param(segmentation_scores_reference, id="reference"),
]


def disk(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def square(shape: tuple[int, int], top: int, left: int, side: int, class_id: int = 1) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[top : top + side, left : left + side] = class_id
    return mask


@pytest.mark.parametrize("scorer", SCORERS)
def test_both_empty_class_skipped(scorer):
    pred = np.zeros((10, 10), np.uint8)
    gt = np.zeros((10, 10), np.uint8)
    gt[2:4, 2:4] = 3
    scores = scorer(pred, gt)
    assert not scores.counted[1]
    assert np.isnan(scores.dice[1])
    assert np.isnan(scores.nsd[1])
    assert scores.counted.tolist() == [False, False, False, True] + [False] * 11


@pytest.mark.parametrize("scorer", SCORERS)
def test_stray_blob_scores_zero(scorer):
    gt = np.zeros((10, 10), np.uint8)
    pred = np.zeros((10, 10), np.uint8)
    pred[4, 4:7] = 5
    scores = scorer(pred, gt)
    assert scores.counted[5]
    assert scores.dice[5] == 0.0
    assert scores.nsd[5] == 0.0


@pytest.mark.parametrize("scorer", SCORERS)
def test_disk_shift_two_pixels_nsd_one(scorer):
    gt = disk((48, 48), (24, 22), 10).astype(np.uint8)
    pred = disk((48, 48), (24, 24), 10).astype(np.uint8)
    scores = scorer(pred, gt)
    assert scores.nsd[1] == 1.0
    assert scores.dice[1] < 1.0


@pytest.mark.parametrize("scorer", SCORERS)
def test_disk_shift_three_pixels_below_one(scorer):
    gt = disk((48, 48), (24, 22), 10).astype(np.uint8)
    pred = disk((48, 48), (24, 25), 10).astype(np.uint8)
    assert scorer(pred, gt).nsd[1] < 1.0


@pytest.mark.parametrize("scorer", SCORERS)
def test_full_image_masks_perfect(scorer):
    full = np.full((9, 13), 7, np.uint8)
    scores = scorer(full, full.copy())
    assert scores.dice[7] == pytest.approx(1.0, abs=1e-9)
    assert scores.nsd[7] == 1.0


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize(
    ("gt_pixel", "expected_nsd"),
    [((5, 7), 1.0), ((5, 3), 1.0), ((7, 5), 1.0), ((6, 6), 1.0), ((6, 7), 0.0), ((5, 8), 0.0)],
)
def test_single_pixels_at_distance(scorer, gt_pixel, expected_nsd):
    # Distances from (5, 5): 2, 2, 2, sqrt(2), sqrt(5), 3.
    pred = np.zeros((12, 12), np.uint8)
    gt = np.zeros((12, 12), np.uint8)
    pred[5, 5] = 2
    gt[gt_pixel] = 2
    scores = scorer(pred, gt)
    assert scores.dice[2] == 0.0
    assert scores.nsd[2] == expected_nsd


@pytest.mark.parametrize("scorer", SCORERS)
def test_squares_hand_computed(scorer):
    # Two 5 x 5 squares, the prediction 3 columns right of the ground truth. Overlap is
    # 5 x 2 = 10 pixels, so Dice = 20 / 50. Each 16-pixel ring has 11 pixels within 2 px
    # of the other ring: 4 + 4 on the top and bottom rows and the 3 inner column pixels.
    gt = square((10, 12), 2, 2, 5)
    pred = square((10, 12), 2, 5, 5)
    scores = scorer(pred, gt)
    assert scores.dice[1] == 20 / (50 + 1e-8)
    assert scores.nsd[1] == 11 / 16


@pytest.mark.parametrize("scorer", SCORERS)
def test_mask_at_image_edge_is_surface(scorer):
    # A 3 x 3 square in the corner has all 8 edge pixels as surface; a one-pixel shift
    # keeps every surface pixel within the tolerance.
    gt = square((6, 6), 0, 0, 3)
    pred = square((6, 6), 0, 1, 3)
    scores = scorer(pred, gt)
    assert scores.dice[1] == 12 / (18 + 1e-8)
    assert scores.nsd[1] == 1.0


def random_label_map(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    for _ in range(rng.integers(0, 5)):
        class_id = rng.integers(1, 15)
        centre = (rng.integers(-2, shape[0] + 2), rng.integers(-2, shape[1] + 2))
        mask[disk(shape, centre, rng.uniform(0.5, max(shape) / 2))] = class_id
    if rng.random() < 0.3:
        noise = rng.random(shape) < 0.05
        mask[noise] = rng.integers(1, 15)
    return mask


def test_fast_equals_reference_random():
    rng = np.random.default_rng(2026)
    for _ in range(300):
        shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        gt = random_label_map(rng, shape)
        pred = gt.copy() if rng.random() < 0.2 else random_label_map(rng, shape)
        if rng.random() < 0.3:
            pred = np.roll(gt, rng.integers(-3, 4), axis=int(rng.integers(0, 2)))
        fast = segmentation_scores(pred, gt)
        reference = segmentation_scores_reference(pred, gt)
        np.testing.assert_array_equal(fast.counted, reference.counted)
        np.testing.assert_allclose(fast.dice, reference.dice, rtol=0, atol=1e-9)
        np.testing.assert_allclose(fast.nsd, reference.nsd, rtol=0, atol=1e-9)


def test_fast_equals_reference_border_masks():
    rng = np.random.default_rng(5)
    for _ in range(50):
        shape = (int(rng.integers(3, 30)), int(rng.integers(3, 30)))
        gt = np.zeros(shape, np.uint8)
        pred = np.zeros(shape, np.uint8)
        gt[: rng.integers(1, shape[0]), : rng.integers(1, shape[1])] = 4
        pred[rng.integers(0, shape[0] - 1) :, rng.integers(0, shape[1] - 1) :] = 4
        fast = segmentation_scores(pred, gt)
        reference = segmentation_scores_reference(pred, gt)
        np.testing.assert_allclose(fast.dice, reference.dice, rtol=0, atol=1e-9)
        np.testing.assert_allclose(fast.nsd, reference.nsd, rtol=0, atol=1e-9)


def test_scores_reject_bad_maps():
    with pytest.raises(ValueError, match="equal shape"):
        segmentation_scores(np.zeros((3, 4), np.uint8), np.zeros((4, 3), np.uint8))
    with pytest.raises(ValueError, match="class ids 0..14"):
        segmentation_scores(np.full((3, 3), 15, np.uint8), np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match="integer dtype"):
        segmentation_scores(np.zeros((3, 3)), np.zeros((3, 3), np.uint8))


def test_binary_f1_values():
    pred = np.array([True, True, False, False])
    gt = np.array([True, False, True, False])
    assert binary_f1(pred, gt) == 0.5
    assert binary_f1(np.zeros(3, bool), np.zeros(3, bool)) == 0.0
    assert binary_f1(np.zeros(0, bool), np.zeros(0, bool)) == 0.0


def test_label_without_allowed_images_scores_zero():
    # Only 4CH images (view index 0), which allow labels 0 and 1.
    gt = np.array([[1, 0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0]])
    f1, counts = classification_f1(gt.astype(float), gt, np.array([0, 0]))
    assert f1.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert counts.tolist() == [2, 2, 0, 0, 0, 0, 0]
    assert 100 * f1.mean() == pytest.approx(200 / 7, abs=1e-12)


def test_disallowed_positives_ignored():
    # Label 6 (RAA) is scored only in 3VT (view index 3); the 4CH false positive is ignored.
    pred = np.array([[0, 0, 0, 0, 0, 0, 0.9], [0, 0, 0, 0, 0, 0, 0.8]])
    gt = np.array([[0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1]])
    f1, counts = classification_f1(pred, gt, np.array([0, 3]))
    assert f1[6] == 1.0
    assert counts[6] == 1


def test_label_threshold_is_strict():
    gt = np.array([[1, 0, 0, 0, 0, 0, 0]] * 2)
    pred = np.array([[0.5, 0, 0, 0, 0, 0, 0], [0.5000001, 0, 0, 0, 0, 0, 0]])
    f1, _ = classification_f1(pred, gt, np.array([0, 0]))
    # One true positive and one false negative: 2 / (2 + 1).
    assert f1[0] == 2 / 3


def test_classification_rejects_bad_views():
    with pytest.raises(ValueError, match="view indices must be 0..3"):
        classification_f1(np.zeros((1, 7)), np.zeros((1, 7)), np.array([4]))


@pytest.mark.parametrize(
    ("ms", "expected"),
    [(0.0, 100.0), (79.4, 100.0), (119.4, 75.0), (159.4, 50.0), (239.4, 0.0), (1000.0, 0.0)],
)
def test_time_score_values(ms, expected):
    assert time_score(ms) == pytest.approx(expected, abs=1e-12)


def test_final_score_formula():
    assert final_score(80.0, 60.0, 40.0, 100.0) == pytest.approx(59.5, abs=1e-12)
    assert final_score(80.0, 60.0, 40.0) == pytest.approx(49.5, abs=1e-12)
    assert final_score(100.0, 100.0, 100.0, 100.0) == pytest.approx(100.0, abs=1e-12)


def record(name: str, pred: np.ndarray, gt: np.ndarray, view: int = 0, pred_label=None, gt_label=None) -> CaseRecord:
    zeros = np.zeros(7)
    return CaseRecord(
        name=name,
        pred_mask=pred,
        gt_mask=gt,
        pred_label=zeros if pred_label is None else np.asarray(pred_label, float),
        gt_label=zeros if gt_label is None else np.asarray(gt_label),
        view=view,
    )


def test_evaluate_cases_summary():
    shifted_gt = square((10, 12), 2, 2, 5)
    shifted_pred = square((10, 12), 2, 5, 5)
    same = square((10, 12), 1, 1, 4)
    stray = same.copy()
    stray[8, 8] = 2
    summary = evaluate_cases(
        [
            record("a.h5", shifted_pred, shifted_gt, pred_label=[1, 0, 0, 0, 0, 0, 0], gt_label=[1, 0, 0, 0, 0, 0, 0]),
            record("b.h5", stray, same),
        ],
        ms_per_image=159.4,
    )

    assert summary.num_cases == 2
    assert summary.count_per_class[:3] == [2, 1, 0]
    assert summary.dice_per_class[0] == pytest.approx(70.0, abs=1e-6)
    assert summary.nsd_per_class[0] == pytest.approx(100 * (11 / 16 + 1) / 2, abs=1e-12)
    assert summary.dice_per_class[1] == 0.0
    assert summary.dice_per_class[2] is None
    assert summary.mean_dice == pytest.approx(35.0, abs=1e-6)
    assert summary.mean_nsd == pytest.approx(42.1875, abs=1e-12)
    assert summary.f1_per_label[0] == 100.0
    assert summary.macro_f1 == pytest.approx(100 / 7, abs=1e-12)
    assert summary.time_score == pytest.approx(50.0, abs=1e-12)
    expected = 0.45 * (35.0 + 42.1875) / 2 + 0.45 * 100 / 7 + 0.10 * 50.0
    assert summary.score == pytest.approx(expected, abs=1e-6)
    assert summary.cases[1].name == "b.h5"
    assert summary.cases[1].dice[1] == 0.0
    assert summary.cases[1].mean_dice == pytest.approx(50.0, abs=1e-6)


def test_evaluate_cases_empty_input():
    summary = evaluate_cases([])
    assert summary.mean_dice == 0.0
    assert summary.mean_nsd == 0.0
    assert summary.macro_f1 == 0.0
    assert summary.score == 0.0
    assert summary.time_score is None
    assert summary.dice_per_class == [None] * 14


@pytest.mark.parametrize("view", [None, 4, -1])
def test_evaluate_cases_rejects_unknown_view(view):
    mask = np.zeros((4, 4), np.uint8)
    with pytest.raises(ValueError, match="case x.h5: view"):
        evaluate_cases([record("x.h5", mask, mask, view=view)])


def independent_scores(pred: np.ndarray, gt: np.ndarray) -> dict[int, tuple[float, float]]:
    """Score one image straight from the definition: {class: (Dice, NSD)} for counted classes.

    The surface is found from the four neighbours on a zero-padded copy, and distances come
    from ``scipy.ndimage.distance_transform_edt`` over the whole image.
    """
    from scipy.ndimage import distance_transform_edt

    def surface(mask: np.ndarray) -> np.ndarray:
        padded = np.pad(mask, 1)
        interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        return mask & ~interior

    scores = {}
    for class_id in range(1, 15):
        pred_mask, gt_mask = pred == class_id, gt == class_id
        if not pred_mask.any() and not gt_mask.any():
            continue
        dice = 2 * np.sum(pred_mask & gt_mask) / (pred_mask.sum() + gt_mask.sum() + 1e-8)
        if not pred_mask.any() or not gt_mask.any():
            scores[class_id] = (dice, 0.0)
            continue
        pred_surface, gt_surface = surface(pred_mask), surface(gt_mask)
        to_gt = distance_transform_edt(~gt_surface)[pred_surface]
        to_pred = distance_transform_edt(~pred_surface)[gt_surface]
        scores[class_id] = (dice, (np.mean(to_gt <= 2.0) + np.mean(to_pred <= 2.0)) / 2)
    return scores


def adversarial_pairs() -> list[tuple[str, np.ndarray, np.ndarray]]:
    shape = (17, 23)
    height, width = shape
    pairs = []
    # Single corner pixels 2 px apart (NSD 1, the tolerance is inclusive) and sqrt(5) px apart (NSD 0).
    for row, col in [(0, 0), (0, width - 1), (height - 1, 0), (height - 1, width - 1)]:
        for col_step in (0, 1):
            pred, gt = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
            pred[row, col] = 1
            gt[abs(row - 2), abs(col - col_step)] = 1
            pairs.append((f"corner pixel {row},{col} step {col_step}", pred, gt))
    pred, gt = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    pred[5, :] = 3
    gt[7, :] = 3
    gt[:, 10] = 3
    pairs.append(("one-pixel lines", pred, gt))
    checker = (np.indices(shape).sum(axis=0) % 2).astype(np.uint8) * 5
    pairs.append(("checkerboard shifted", checker, np.roll(checker, 1, axis=1)))
    pairs.append(("checkerboard equal", checker, checker.copy()))
    frame = np.full(shape, 6, np.uint8)
    frame[1:-1, 1:-1] = 7
    pairs.append(("all four borders", np.full(shape, 6, np.uint8), frame))
    blob = np.zeros(shape, np.uint8)
    blob[2:6, 3:9] = 9
    pairs.append(("prediction only", blob, np.zeros(shape, np.uint8)))
    pairs.append(("ground truth only", np.zeros(shape, np.uint8), blob))
    pairs.append(("one pixel image", np.array([[4]], np.uint8), np.array([[4]], np.uint8)))
    pairs.append(("one row image", np.array([[0, 2, 2, 0, 2]], np.uint8), np.array([[2, 2, 0, 0, 0]], np.uint8)))
    return pairs


@pytest.mark.parametrize(("name", "pred", "gt"), adversarial_pairs(), ids=[pair[0] for pair in adversarial_pairs()])
def test_fast_matches_independent_definition(name, pred, gt):
    expected = independent_scores(pred, gt)
    scores = segmentation_scores(pred, gt)
    assert sorted(np.flatnonzero(scores.counted).tolist()) == sorted(expected)
    for class_id, (dice, nsd) in expected.items():
        assert scores.dice[class_id] == pytest.approx(dice, abs=1e-12), class_id
        assert scores.nsd[class_id] == pytest.approx(nsd, abs=1e-12), class_id
