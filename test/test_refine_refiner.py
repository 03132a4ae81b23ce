"""Refiner logic on a tiny random SAM-Med2D whose decoder is replaced by a box painter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fetuskit.labels import CLASS_MASK
from fetuskit.refine import Refiner, RefinerConfig, compose_label_map, refine_batch
from fetuskit.refine.sam_med2d import SamMed2DConfig, build_sam_med2d


class BoxPainter:
    """Stand-in for ``PromptableSegmenter.decode`` that returns each box, grown by ``grow`` pixels
    of the network input, as the mask, and records every call."""

    def __init__(self, segmenter, predicted_iou: float = 0.9, grow: float = 0.0):
        self.segmenter = segmenter
        self.predicted_iou = predicted_iou
        self.grow = grow
        self.calls: list[dict] = []

    def __call__(self, embedding, boxes, points=None, mask_logits=None):
        self.calls.append({"boxes": boxes.clone(), "points": points, "mask_logits": mask_logits})
        height, width = self.segmenter.mask_input_size
        stride = self.segmenter.input_size / width
        # Centres of low-resolution pixels in network-input coordinates.
        ys = (torch.arange(height) + 0.5) * stride - 0.5
        xs = (torch.arange(width) + 0.5) * stride - 0.5
        logits = torch.full((boxes.shape[0], 1, height, width), -10.0)
        for index, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
            # Inclusive pixel indices cover half a pixel beyond each corner.
            inside_y = (ys >= y1 - 0.5 - self.grow) & (ys <= y2 + 0.5 + self.grow)
            inside_x = (xs >= x1 - 0.5 - self.grow) & (xs <= x2 + 0.5 + self.grow)
            logits[index, 0][inside_y[:, None] & inside_x[None, :]] = 10.0
        iou = torch.full((boxes.shape[0], 1), self.predicted_iou)
        return logits, iou


def _refiner(painter_iou: float = 0.9, grow: float = 0.0, **config) -> tuple[Refiner, BoxPainter]:
    torch.manual_seed(0)
    segmenter = build_sam_med2d(SamMed2DConfig.tiny())
    config = {"backend": "sam-med2d", "min_area": 1, "margin": 2, **config}
    refiner = Refiner(RefinerConfig(**config), segmenter)
    painter = BoxPainter(refiner.segmenter, painter_iou, grow)
    refiner.segmenter.decode = painter
    return refiner, painter


def _scene() -> tuple[np.ndarray, np.ndarray]:
    # Non-square image; three classes allowed in the four-chamber view, off the diagonal.
    rng = np.random.default_rng(3)
    image = rng.random((48, 80)).astype(np.float32)
    coarse = np.zeros((48, 80), np.uint8)
    coarse[4:12, 50:70] = 1
    coarse[20:40, 5:25] = 2
    coarse[30:44, 40:60] = 4
    return image, coarse


def test_all_classes_go_through_one_decoder_call():
    refiner, painter = _refiner()
    image, coarse = _scene()
    refiner.refine(image, coarse)
    assert len(painter.calls) == 1
    assert painter.calls[0]["boxes"].shape == (3, 4)


def test_box_scaling_non_square_input():
    refiner, painter = _refiner(margin=0)
    image, coarse = _scene()
    refiner.refine(image, coarse)
    # SAM-Med2D stretches 48 x 80 to 64 x 64: x scales by 64 / 80, y by 64 / 48.
    expected = torch.tensor([[50 * 0.8, 4 * 4 / 3, 69 * 0.8, 11 * 4 / 3]])
    torch.testing.assert_close(painter.calls[0]["boxes"][:1], expected)


def test_refined_masks_return_to_image_coordinates():
    refiner, _ = _refiner(margin=0)
    image, coarse = _scene()
    refined, report = refiner.refine(image, coarse)
    assert refined.shape == coarse.shape
    assert refined.dtype == np.uint8
    assert all(entry["accepted"] for entry in report["classes"].values())
    # The painter returns each box, so after the round trip every rectangle lands on itself,
    # up to the 16 x 16 low-resolution grid (3 x 5 image pixels per cell) at its edges.
    for class_id in (1, 2, 4):
        truth = coarse == class_id
        got = refined == class_id
        assert (truth & got).sum() / (truth | got).sum() > 0.85, class_id


def test_pixels_outside_box_are_dropped():
    # The painter grows every mask by 6 input pixels, beyond the 2-pixel margin.
    refiner, _ = _refiner(grow=6.0, margin=2)
    image, coarse = _scene()
    refined, report = refiner.refine(image, coarse)
    for class_id, entry in report["classes"].items():
        x1, y1, x2, y2 = (int(v) for v in entry["box"])
        rows, cols = np.nonzero(refined == class_id)
        assert rows.min() >= y1, class_id
        assert rows.max() <= y2, class_id
        assert cols.min() >= x1, class_id
        assert cols.max() <= x2, class_id


def test_low_predicted_iou_leaves_coarse_unchanged():
    refiner, _ = _refiner(painter_iou=0.3, min_predicted_iou=0.5, grow=2.0)
    image, coarse = _scene()
    refined, report = refiner.refine(image, coarse)
    np.testing.assert_array_equal(refined, coarse)
    assert [entry["accepted"] for entry in report["classes"].values()] == [False, False, False]
    assert report["changed_pixels"] == 0


def test_low_dice_leaves_coarse_unchanged():
    refiner, _ = _refiner(grow=2.0, min_dice=0.999)
    image, coarse = _scene()
    refined, report = refiner.refine(image, coarse)
    np.testing.assert_array_equal(refined, coarse)
    assert not any(entry["accepted"] for entry in report["classes"].values())


def test_accepted_mask_changes_the_map():
    refiner, _ = _refiner(grow=2.0, min_dice=0.5)
    image, coarse = _scene()
    refined, report = refiner.refine(image, coarse)
    assert all(entry["accepted"] for entry in report["classes"].values())
    assert report["changed_pixels"] > 0
    assert (refined == 2).sum() > (coarse == 2).sum()


def test_view_limits_refined_classes():
    refiner, painter = _refiner(grow=2.0, min_dice=0.0)
    image, coarse = _scene()
    coarse[20:40, 5:25] = 3  # right atrium: not allowed in the LVOT view (index 1)
    refined, report = refiner.refine(image, coarse, view=1)
    assert not CLASS_MASK[1, 3]
    assert sorted(report["classes"]) == [1, 4]
    assert painter.calls[0]["boxes"].shape == (2, 4)
    # A class outside the view stays exactly as the backbone drew it; nothing new appears.
    np.testing.assert_array_equal(refined == 3, coarse == 3)
    assert set(np.unique(refined)) <= set(np.unique(coarse))


def test_configured_classes_only():
    refiner, painter = _refiner(classes=(2,))
    image, coarse = _scene()
    _, report = refiner.refine(image, coarse)
    assert list(report["classes"]) == [2]
    assert painter.calls[0]["boxes"].shape == (1, 4)


def test_empty_map_skips_the_model():
    refiner, painter = _refiner()
    image = np.zeros((30, 40), np.float32)
    coarse = np.zeros((30, 40), np.uint8)
    refined, report = refiner.refine(image, coarse)
    np.testing.assert_array_equal(refined, coarse)
    assert painter.calls == []
    assert set(report["skipped"].values()) == {"absent"}


def test_point_and_mask_prompts_reach_decoder():
    refiner, painter = _refiner(use_point=True, use_mask_prompt=True, mask_logit_limit=6.0)
    image, coarse = _scene()
    refiner.refine(image, coarse)
    call = painter.calls[0]
    assert call["points"].shape == (3, 2)
    assert call["mask_logits"].shape == (3, 1, 16, 16)
    # One-hot coarse maps saturate to +limit inside a class and -limit far from it.
    assert call["mask_logits"][1].max().item() == pytest.approx(6.0, abs=1e-4)
    assert call["mask_logits"][1].min().item() == pytest.approx(-6.0, abs=1e-4)
    # The click of class 2 (rows 20..39, columns 5..24) scaled to the 64 x 64 input.
    x, y = call["points"][1].tolist()
    assert 5 * 0.8 <= x <= 24 * 0.8
    assert 20 * 4 / 3 <= y <= 39 * 4 / 3


def test_real_decoder_is_deterministic():
    torch.manual_seed(0)
    refiner = Refiner(
        RefinerConfig(backend="sam-med2d", min_area=1, min_predicted_iou=-1.0, min_dice=0.0),
        build_sam_med2d(SamMed2DConfig.tiny()),
    )
    image, coarse = _scene()
    first, first_report = refiner.refine(image, coarse)
    second, second_report = refiner.refine(image, coarse)
    np.testing.assert_array_equal(first, second)
    assert first_report == second_report
    assert set(np.unique(first)) <= {0, 1, 2, 4}


def test_refine_batch_aligns_inputs():
    refiner, painter = _refiner()
    image, coarse = _scene()
    results = refine_batch(refiner, [image, image], [coarse, np.zeros_like(coarse)], views=[0, None])
    assert len(results) == 2
    assert results[0][1]["view"] == 0
    np.testing.assert_array_equal(results[1][0], 0)
    assert len(painter.calls) == 1
    with pytest.raises(ValueError, match="2 images but 1"):
        refine_batch(refiner, [image, image], [coarse])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"coarse": np.zeros((10, 12), np.uint8)}, "differs from image shape"),
        ({"probabilities": np.zeros((15, 48, 81), np.float32)}, "probabilities shape"),
        ({"view": 4}, "view must be"),
        ({"coarse": np.full((48, 80), -1, np.int64)}, "contains value -1"),
        ({"coarse": np.full((48, 80), 1.5, np.float32)}, "integer"),
    ],
)
def test_invalid_inputs_raise(kwargs, message):
    refiner, _ = _refiner()
    image, coarse = _scene()
    arguments = {"image": image, "coarse": coarse, "probabilities": None, "view": None, **kwargs}
    with pytest.raises(ValueError, match=message):
        refiner.refine(**arguments)


def test_config_rejects_unknown_keys_and_background():
    with pytest.raises(ValueError, match="unknown refiner config keys"):
        RefinerConfig.from_dict({"backend": "litemedsam", "margins": 3})
    with pytest.raises(ValueError, match="not foreground"):
        RefinerConfig(classes=(0, 1))
    with pytest.raises(ValueError, match="unknown refiner backend"):
        RefinerConfig(backend="sam2")


def test_compose_priority_then_class_id():
    coarse = np.array([[1, 1, 2, 0]], np.uint8)
    priority = np.zeros((15, 1, 4), np.float32)
    priority[1] = [[0.9, 0.4, 0.2, 0.1]]
    priority[2] = [[0.1, 0.6, 0.7, 0.1]]
    accepted = {1: np.array([[True, True, True, True]]), 2: np.array([[True, True, True, True]])}
    # Pixel 0: class 1 has the higher priority; pixels 1-2: class 2; pixel 3: a tie goes to 1.
    assert compose_label_map(coarse, accepted, priority).tolist() == [[1, 2, 2, 1]]


def test_compose_keeps_unrefined_classes_and_clears_dropped_pixels():
    coarse = np.array([[1, 1, 3, 3]], np.uint8)
    priority = (np.arange(15)[:, None, None] == coarse[None]).astype(np.float32)
    accepted = {1: np.array([[True, False, False, False]])}
    assert compose_label_map(coarse, accepted, priority).tolist() == [[1, 0, 3, 3]]
    assert compose_label_map(coarse, {}, priority).tolist() == coarse.tolist()


def test_probabilities_decide_overlaps():
    # Two touching rectangles; the painter grows both masks into each other's coarse area.
    refiner, _ = _refiner(grow=3.0, margin=4, min_dice=0.0)
    image = np.zeros((40, 60), np.float32)
    coarse = np.zeros((40, 60), np.uint8)
    coarse[10:31, 10:30] = 1
    coarse[10:31, 30:50] = 2
    probabilities = np.zeros((15, 40, 60), np.float32)

    probabilities[1] = 0.9
    probabilities[2] = 0.1
    refined, _ = refiner.refine(image, coarse, probabilities)
    assert refined[20, 31] == 1
    assert refined[20, 45] == 2

    probabilities[1] = 0.1
    probabilities[2] = 0.9
    refined, _ = refiner.refine(image, coarse, probabilities)
    assert refined[20, 28] == 2
    assert refined[20, 15] == 1


def test_compose_enclosing_region_yields_to_inner_classes():
    # Ring 7 around heart 5. The refined cavity is the filled region; the refined heart
    # grows by one pixel into the ring, where class 7 has the higher probability.
    coarse = np.array([[7, 7, 7, 7, 7, 7]], np.uint8)
    coarse[0, 2:4] = 5
    priority = np.zeros((15, 1, 6), np.float32)
    priority[5] = [[0.0, 0.2, 0.9, 0.9, 0.2, 0.0]]
    priority[7] = [[0.9, 0.8, 0.1, 0.1, 0.8, 0.9]]
    accepted = {5: np.array([[False, True, True, True, False, False]]), 7: np.ones((1, 6), bool)}
    assert compose_label_map(coarse, accepted, priority, enclosing_classes=(7,)).tolist() == [[7, 5, 5, 5, 7, 7]]
    # Without the enclosing rule the ring's higher probability takes the pixel back.
    assert compose_label_map(coarse, accepted, priority).tolist() == [[7, 7, 5, 5, 7, 7]]


def test_compose_rejected_enclosing_class_keeps_priority():
    coarse = np.array([[7, 5, 5, 7]], np.uint8)
    priority = np.zeros((15, 1, 4), np.float32)
    priority[5] = [[0.2, 0.9, 0.9, 0.2]]
    priority[7] = [[0.8, 0.1, 0.1, 0.8]]
    accepted = {5: np.ones((1, 4), bool)}
    assert compose_label_map(coarse, accepted, priority, enclosing_classes=(7,)).tolist() == [[7, 5, 5, 7]]


def test_enclosing_class_refines_outer_boundary():
    refiner, painter = _refiner(grow=0.0, margin=0, min_dice=0.9, classes=(5, 7), enclosing_classes=(7,))
    image = np.zeros((40, 60), np.float32)
    coarse = np.zeros((40, 60), np.uint8)
    coarse[5:35, 10:50] = 7
    coarse[12:28, 20:40] = 5
    refined, report = refiner.refine(image, coarse, view=0)
    # The cavity prompt is the box of the filled region, and its Dice is taken against that
    # region, so the painted box passes the 0.9 check that the ring alone would fail.
    assert report["classes"][7]["box"] == [10.0, 5.0, 49.0, 34.0]
    assert report["classes"][7]["dice_with_coarse"] > 0.95
    assert report["classes"][7]["accepted"]
    # The heart keeps exactly the pixels it gets when refined alone, and the cavity takes
    # the rest of its filled mask, so no pixel inside the cavity becomes background.
    heart_refiner, _ = _refiner(grow=0.0, margin=0, min_dice=0.9, classes=(5,))
    heart_alone, _ = heart_refiner.refine(image, coarse, view=0)
    np.testing.assert_array_equal(refined == 5, heart_alone == 5)
    assert (refined == 5).sum() < (coarse == 5).sum()
    # Heart pixels that the refined heart drops go to the cavity, not to background.
    assert (refined[8:32, 13:47] > 0).all()


def test_config_rejects_background_enclosing_class():
    with pytest.raises(ValueError, match="enclosing_classes"):
        RefinerConfig(enclosing_classes=(0,))
