"""Refiner prompts: components, boxes, interior points and mask-prompt logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fetuskit.refine.prompts import (
    box_with_margin,
    class_prompts,
    enclosed_region,
    interior_point,
    largest_component,
    probability_to_logits,
)


def test_empty_class_is_skipped():
    coarse = np.zeros((20, 30), np.uint8)
    coarse[2:5, 2:5] = 1
    prompts, skipped = class_prompts(coarse, [1, 2], margin=0, min_area=1, use_point=False)
    assert [p.class_id for p in prompts] == [1]
    assert skipped == {2: "absent"}


def test_one_pixel_class_box_and_min_area():
    coarse = np.zeros((20, 30), np.uint8)
    coarse[7, 11] = 3
    prompts, skipped = class_prompts(coarse, [3], margin=0, min_area=1, use_point=True)
    assert prompts[0].box.tolist() == [11.0, 7.0, 11.0, 7.0]
    assert prompts[0].point.tolist() == [11.0, 7.0]
    assert skipped == {}

    prompts, skipped = class_prompts(coarse, [3], margin=0, min_area=2, use_point=True)
    assert prompts == []
    assert skipped[3].startswith("smaller than min_area")


def test_box_at_image_border_is_clipped():
    coarse = np.zeros((20, 30), np.uint8)
    coarse[0:4, 26:30] = 5
    prompts, _ = class_prompts(coarse, [5], margin=3, min_area=1, use_point=False)
    assert prompts[0].box.tolist() == [23.0, 0.0, 29.0, 6.0]


def test_box_and_point_use_x_y_order():
    # Non-square image with the structure far from the diagonal: rows 5..10, columns 60..80.
    coarse = np.zeros((40, 90), np.uint8)
    coarse[5:11, 60:81] = 2
    prompts, _ = class_prompts(coarse, [2], margin=2, min_area=1, use_point=True)
    assert prompts[0].box.tolist() == [58.0, 3.0, 82.0, 12.0]
    x, y = prompts[0].point
    assert 60 <= x <= 80
    assert 5 <= y <= 10


def test_largest_component_wins():
    mask = np.zeros((20, 20), bool)
    mask[1:3, 1:3] = True
    mask[10:15, 10:15] = True
    component = largest_component(mask)
    assert component.sum() == 25
    assert component[12, 12]
    assert not component[1, 1]


def test_diagonal_pixels_are_one_component():
    mask = np.zeros((5, 5), bool)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = True
    assert largest_component(mask).sum() == 3


def test_interior_point_of_rectangle_is_centre():
    mask = np.zeros((30, 40), bool)
    mask[10:21, 5:16] = True
    assert interior_point(mask).tolist() == [10.0, 15.0]


def test_box_of_empty_mask_raises():
    with pytest.raises(ValueError, match="empty"):
        box_with_margin(np.zeros((4, 4), bool), 0)


def test_probability_to_logits_values():
    probability = torch.tensor([0.0, 0.5, 0.8, 1.0])
    logits = probability_to_logits(probability, limit=8.0)
    assert logits[0].item() == pytest.approx(-8.0, abs=1e-4)
    assert logits[1].item() == 0.0
    assert logits[2].item() == pytest.approx(np.log(4.0), abs=1e-5)
    assert logits[3].item() == pytest.approx(8.0, abs=1e-4)


def _ring_scene() -> np.ndarray:
    # A thoracic cavity ring (7) around a heart (5) with one chamber (2), and a stray
    # blob of class 3 outside the ring.
    coarse = np.zeros((30, 40), np.uint8)
    coarse[4:26, 6:34] = 7
    coarse[9:21, 12:28] = 5
    coarse[12:16, 15:19] = 2
    coarse[1:3, 36:39] = 3
    return coarse


def test_enclosed_region_fills_ring():
    coarse = _ring_scene()
    region = enclosed_region(coarse, 7)
    assert region.sum() == 22 * 28
    assert region[4:26, 6:34].all()
    assert not region[1:3, 36:39].any()


def test_enclosed_region_fills_open_gap_inside_ring():
    coarse = _ring_scene()
    # A background hole between ring and heart is filled as well.
    coarse[6, 10] = 0
    assert enclosed_region(coarse, 7).sum() == 22 * 28


def test_enclosed_region_absent_class_is_empty():
    assert not enclosed_region(_ring_scene(), 9).any()


def test_enclosing_class_prompt_uses_filled_region():
    coarse = _ring_scene()
    prompts, skipped = class_prompts(coarse, [5, 7], margin=1, min_area=1, use_point=True, enclosing_classes=(7,))
    assert skipped == {}
    heart, cavity = prompts
    assert heart.component.sum() == 12 * 16 - 4 * 4
    assert cavity.component.sum() == 22 * 28
    assert cavity.box.tolist() == [5.0, 3.0, 34.0, 26.0]
    # The interior point of the filled region is its centre, inside the heart, whereas the
    # ring alone would put it on the ring.
    assert coarse[int(cavity.point[1]), int(cavity.point[0])] in (2, 5)
