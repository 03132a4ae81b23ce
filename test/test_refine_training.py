"""Refiner fine-tuning, mask perturbations and the convert-weights and refiner commands."""

from __future__ import annotations

import dataclasses
import json
import types

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fetuskit.refine import build_refiner, load_segmenter
from fetuskit.refine.litemedsam import packaged_weights_path
from fetuskit.refine.perturb import blob_noise, elastic_warp, erode_or_dilate, jitter_box, perturb_mask
from fetuskit.refine.sam_med2d import SamMed2DConfig, build_sam_med2d
from fetuskit.refine.training import RefinerTrainingConfig, RefinerTrainingError, _prompt_batch
from fetuskit.refine.weights import save_weights
from train.cli import _register_commands, app

_register_commands()


def _square(size: int = 20, low: int = 5, high: int = 10) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[low:high, low:high] = True
    return mask


def test_erode_or_dilate_areas():
    mask = _square()
    assert erode_or_dilate(mask, 1).sum() == 25 + 4 * 5
    assert erode_or_dilate(mask, -1).sum() == 9
    assert np.array_equal(erode_or_dilate(mask, 0), mask)


def test_elastic_warp_zero_amplitude_is_identity():
    mask = _square()
    assert np.array_equal(elastic_warp(mask, np.random.default_rng(0), 0.0, 4.0), mask)


def test_blob_noise_stays_near_boundary():
    mask = _square(40, 10, 30)
    noisy = blob_noise(mask, np.random.default_rng(1), count=5, max_radius=3)
    changed = noisy ^ mask
    # Discs of radius <= 3 centred on the boundary change nothing farther than 3 pixels away.
    far_inside = erode_or_dilate(mask, -4)
    far_outside = ~erode_or_dilate(mask, 4)
    assert not (changed & far_inside).any()
    assert not (changed & far_outside).any()


def test_perturb_mask_is_seeded_and_non_empty():
    mask = _square(40, 10, 30)
    first = perturb_mask(mask, np.random.default_rng(5), max_shift=3)
    second = perturb_mask(mask, np.random.default_rng(5), max_shift=3)
    assert np.array_equal(first, second)
    assert first.any()
    tiny = np.zeros((10, 10), bool)
    tiny[4, 4] = True
    for seed in range(10):
        assert perturb_mask(tiny, np.random.default_rng(seed), max_shift=3).any()


def test_jitter_box_stays_ordered_inside_image():
    rng = np.random.default_rng(2)
    for _ in range(200):
        x1, y1, x2, y2 = jitter_box(np.array([0, 3, 5, 4], np.float32), rng, 0.5, (6, 8))
        assert 0 <= x1 <= x2 <= 7
        assert 0 <= y1 <= y2 <= 5


def test_training_config_rejects_adapters_on_litemedsam():
    with pytest.raises(RefinerTrainingError, match="train_adapters"):
        RefinerTrainingConfig(backend="litemedsam", train_adapters=True)


@pytest.fixture
def tiny_weights(tmp_path):
    torch.manual_seed(0)
    config = SamMed2DConfig.tiny()
    model = build_sam_med2d(config)
    return save_weights(tmp_path / "tiny.pt", "sam-med2d", dataclasses.asdict(config), model.state_dict(), "test")


@pytest.fixture
def labelled_cases(tmp_path, write_h5):
    rows, cols = np.mgrid[:48, :72]
    for index in range(2):
        chamber = ((cols - 20 - 20 * index) / 12.0) ** 2 + ((rows - 22) / 9.0) ** 2 <= 1
        vessel = ((cols - 55) / 6.0) ** 2 + ((rows - 10 - 5 * index) / 5.0) ** 2 <= 1
        mask = np.zeros((48, 72), np.uint8)
        mask[chamber] = 2
        mask[vessel] = 6
        image = (40 + 180 * (mask > 0)).astype(np.uint8)
        write_h5(tmp_path / "data" / "images" / f"{index}.h5", image=image, view=np.array([1]))
        write_h5(tmp_path / "data" / "labels" / f"{index}_label.h5", mask=mask, label=np.zeros(7, np.uint8))
    return tmp_path / "data" / "images"


def test_refiner_command_trains_decoder_only(tmp_path, tiny_weights, labelled_cases):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "refiner", "--data", str(labelled_cases), "--out", str(out), "--backend", "sam-med2d",
            "--weights", str(tiny_weights), "--epochs", "6", "--lr", "1e-3", "--seed", "1",
        ],
    )
    assert result.exit_code == 0, result.output

    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6
    assert losses[-1] < losses[0]

    before = load_segmenter("sam-med2d", tiny_weights).state_dict()
    after = load_segmenter("sam-med2d", out / "refiner.pt").state_dict()
    decoder_changed = [k for k in before if k.startswith("mask_decoder.") and not torch.equal(before[k], after[k])]
    frozen_changed = [
        k for k in before if not k.startswith("mask_decoder.") and not torch.equal(before[k], after[k])
    ]
    assert decoder_changed
    assert frozen_changed == []

    refiner_config = json.loads((out / "refiner_config.json").read_text())
    assert refiner_config["weights"] == str(out / "refiner.pt")
    refiner = build_refiner(refiner_config)
    image = np.full((48, 72), 0.5, np.float32)
    coarse = np.zeros((48, 72), np.uint8)
    coarse[10:30, 10:30] = 2
    refined, _ = refiner.refine(image, coarse, view=0)
    assert refined.shape == (48, 72)


def test_refiner_command_reports_missing_labels(tmp_path, tiny_weights, write_h5):
    write_h5(tmp_path / "data" / "1.h5", image=np.zeros((8, 8), np.uint8))
    result = CliRunner().invoke(
        app,
        ["refiner", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--backend", "sam-med2d",
         "--weights", str(tiny_weights)],
    )
    assert result.exit_code == 2
    assert "no labelled cases" in result.output


def test_convert_weights_command(tmp_path):
    # LiteMedSAM keeps this fast; the SAM-Med2D path is covered in test_refine_sam_med2d.py.
    state = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    source = tmp_path / "published.pth"
    torch.save({"model": state, "optimizer": {"param_groups": [{"lr": 1e-4}]}, "epoch": 3, "args": object}, source)
    result = CliRunner().invoke(app, ["convert-weights", str(source), str(tmp_path / "slim.pt"), "--kind", "litemedsam"])
    assert result.exit_code == 0, result.output
    payload = torch.load(tmp_path / "slim.pt", weights_only=True)
    assert payload["kind"] == "litemedsam"
    assert payload["extra"]["dropped_entries"] == ["args", "epoch", "optimizer"]
    assert set(payload["state_dict"]) == set(state)


def test_convert_weights_command_reports_wrong_kind(tmp_path):
    state = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    source = tmp_path / "published.pth"
    torch.save({"model": state}, source)
    result = CliRunner().invoke(app, ["convert-weights", str(source), str(tmp_path / "slim.pt"), "--kind", "sam-med2d"])
    assert result.exit_code == 2
    assert "missing keys" in result.output


def test_enclosing_class_trains_on_filled_region():
    mask = np.zeros((40, 50), np.uint8)
    mask[5:35, 5:45] = 7
    mask[12:28, 15:35] = 5
    item = types.SimpleNamespace(mask=mask, classes=[5, 7])
    config = RefinerTrainingConfig(backend="litemedsam", enclosing_classes=(7,), max_shift=0, box_jitter=0.0)
    boxes, _, _, targets = _prompt_batch(item, np.random.default_rng(0), config)
    # Prompts come sorted by class id: the heart first, then the filled cavity.
    assert targets[0].sum() == 16 * 20
    assert targets[1].sum() == 30 * 40
    assert targets[1][12:28, 15:35].all()

    plain = RefinerTrainingConfig(backend="litemedsam", max_shift=0, box_jitter=0.0)
    _, _, _, ring_targets = _prompt_batch(item, np.random.default_rng(0), plain)
    assert ring_targets[1].sum() == 30 * 40 - 16 * 20


def test_training_config_rejects_background_enclosing_class():
    with pytest.raises(RefinerTrainingError, match="enclosing_classes"):
        RefinerTrainingConfig(enclosing_classes=(0,))
