"""Refiner prompts: components, boxes, interior points and mask-prompt logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fetuskit.refine.prompts import (
    box_with_margin,
    class_prompts,
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
