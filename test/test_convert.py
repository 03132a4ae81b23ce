"""Tests of the PNG-to-FETUS converter on synthetic PNGs and bundled real FOCUS cases."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fetuskit.convert import (
    FOCUS_CONFIG,
    ConversionError,
    ConvertConfig,
    PadGeometry,
    convert_png_folder,
    parse_class_map,
    to_canonical_mask,
    to_original,
)
from train import commands_data  # noqa: F401  (registers the commands on the app)
from train.cli import app

FOCUS12 = Path(__file__).parent / "data" / "focus12"


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _write_case(root: Path, stem: str, image: np.ndarray, masks: dict[str, np.ndarray]) -> None:
    _write_png(root / "images" / f"{stem}.png", image)
    for key, mask in masks.items():
        _write_png(root / "masks" / f"{stem}-{key}.png", mask)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (5, 8, (1, 2, 0, 0)),
        (9, 4, (0, 0, 2, 3)),
        (6, 6, (0, 0, 0, 0)),
        (661, 959, (149, 149, 0, 0)),
        (787, 1137, (175, 175, 0, 0)),
    ],
)
def test_geometry_padding_centred(height, width, expected):
    geometry = PadGeometry.for_size(height, width)
    padding = (geometry.pad_top, geometry.pad_bottom, geometry.pad_left, geometry.pad_right)
    assert padding == expected
    assert geometry.side == max(height, width)
    assert geometry.scale == 512 / max(height, width)
    assert geometry.size == 512


def test_convert_synthetic_odd_sizes(tmp_path):
    # A 5x8 (H x W) gray image and a 9x4 one, each with a thorax mask containing a cardiac mask.
    wide = np.arange(40, dtype=np.uint8).reshape(5, 8) * 5 + 10
    wide_thorax = np.zeros((5, 8), np.uint8)
    wide_thorax[1:5, 2:7] = 255
    wide_cardiac = np.zeros((5, 8), np.uint8)
    wide_cardiac[2:4, 3:5] = 255
    _write_case(tmp_path, "wide", wide, {"cardiac": wide_cardiac, "thorax": wide_thorax})
    tall = np.full((9, 4, 3), 200, np.uint8)
    tall_thorax = np.zeros((9, 4), np.uint8)
    tall_thorax[0:9, 1:3] = 1
    tall_cardiac = np.zeros((9, 4), np.uint8)
    _write_case(tmp_path, "tall", tall, {"cardiac": tall_cardiac, "thorax": tall_thorax})

    config = ConvertConfig(class_map=parse_class_map("cardiac=5,thorax=7", 1), size=16, licence="test licence")
    entries = convert_png_folder(tmp_path / "images", tmp_path / "masks", tmp_path / "out", config)

    expected_entries = [
        {"image": "images/tall.h5", "label": "labels/tall_label.h5", "view_id": 1},
        {"image": "images/wide.h5", "label": "labels/wide_label.h5", "view_id": 1},
    ]
    assert entries == expected_entries
    assert json.loads((tmp_path / "out" / "list.json").read_text()) == expected_entries

    with h5py.File(tmp_path / "out" / "images" / "wide.h5") as h5:
        image = h5["image"][()]
        view = h5["view"][()]
        attrs = dict(h5.attrs)
    assert image.shape == (16, 16, 3)
    assert image.dtype == np.uint8
    assert (image[..., 0] == image[..., 1]).all()
    assert (image[..., 0] == image[..., 2]).all()
    assert view.dtype == np.int32
    assert view.tolist() == [1]
    assert attrs["pad_top"] == 1
    assert attrs["pad_bottom"] == 2
    assert attrs["pad_left"] == 0
    assert attrs["pad_right"] == 0
    assert attrs["scale"] == 2.0
    assert attrs["original_height"] == 5
    assert attrs["original_width"] == 8
    assert attrs["source_file"] == "wide.png"
    assert attrs["licence"] == "test licence"
    # Padded rows 0 and 6-7 scale to rows 0-1 and 12-15, but bilinear sampling at pixel
    # centres blends rows 1 and 12 with the image, so only rows 0 and 13-15 stay black.
    assert (image[0] == 0).all()
    assert (image[13:] == 0).all()
    assert (image[1] > 0).all()

    with h5py.File(tmp_path / "out" / "labels" / "wide_label.h5") as h5:
        mask = h5["mask"][()]
        label = h5["label"][()]
    expected_small = np.zeros((8, 8), np.uint8)
    expected_small[2:6, 2:7] = 7
    expected_small[3:5, 3:5] = 5
    # Scale 2 with the pixel-centre nearest rule repeats each padded pixel 2x2.
    assert np.array_equal(mask, np.kron(expected_small, np.ones((2, 2), np.uint8)))
    assert label.dtype == np.uint8
    assert label.tolist() == [0] * 7

    with h5py.File(tmp_path / "out" / "images" / "tall.h5") as h5:
        tall_attrs = dict(h5.attrs)
    assert (tall_attrs["pad_left"], tall_attrs["pad_right"]) == (2, 3)
    assert (tall_attrs["pad_top"], tall_attrs["pad_bottom"]) == (0, 0)
    with h5py.File(tmp_path / "out" / "labels" / "tall_label.h5") as h5:
        tall_mask = h5["mask"][()]
    assert set(np.unique(tall_mask).tolist()) == {0, 7}


def test_class_map_first_entry_wins():
    config_thorax_first = ConvertConfig(class_map=parse_class_map("thorax=7,cardiac=5", 1))
    assert config_thorax_first.class_map == (("thorax", 7), ("cardiac", 5))
    assert FOCUS_CONFIG.class_map == (("cardiac", 5), ("thorax", 7))


def test_to_original_exact_when_upscaled():
    rng = np.random.default_rng(0)
    for height, width in [(37, 23), (23, 37), (1, 5), (511, 300)]:
        mask = rng.integers(0, 15, size=(height, width), dtype=np.uint8)
        geometry = PadGeometry.for_size(height, width)
        canonical = to_canonical_mask(mask, geometry)
        assert canonical.shape == (512, 512)
        assert np.array_equal(to_original(canonical, geometry.to_attrs()), mask)


def test_to_original_rejects_wrong_grid():
    geometry = PadGeometry.for_size(30, 40)
    with pytest.raises(ValueError, match=r"\(256, 256\)"):
        to_original(np.zeros((256, 256), np.uint8), geometry)
    with pytest.raises(KeyError, match="pad_top"):
        to_original(np.zeros((512, 512), np.uint8), {"scale": 1.0})


def test_bad_inputs_all_reported(tmp_path):
    image = np.zeros((6, 7), np.uint8)
    good = np.zeros((6, 7), np.uint8)
    gray = np.zeros((6, 7), np.uint8)
    gray[0, 0] = 128
    _write_case(tmp_path, "a_missing", image, {"thorax": good})
    _write_case(tmp_path, "b_size", image, {"cardiac": np.zeros((7, 6), np.uint8), "thorax": good})
    _write_case(tmp_path, "c_gray", image, {"cardiac": gray, "thorax": good})
    _write_case(tmp_path, "d_good", image, {"cardiac": good, "thorax": good})

    config = ConvertConfig(class_map=parse_class_map("cardiac=5,thorax=7", 1))
    with pytest.raises(ConversionError) as caught:
        convert_png_folder(tmp_path / "images", tmp_path / "masks", tmp_path / "out", config)

    problems = caught.value.problems
    assert len(problems) == 3
    assert "a_missing-cardiac.png: mask not found" in problems[0]
    assert "b_size-cardiac.png: mask size 7x6 (HxW) does not match" in problems[1]
    assert "6x7" in problems[1]
    assert "c_gray-cardiac.png: mask is not binary, values [0, 128]" in problems[2]
    assert not (tmp_path / "out").exists()


def test_class_map_errors():
    with pytest.raises(ValueError, match="invalid class map entry 'cardiac'"):
        parse_class_map("cardiac", 1)
    with pytest.raises(ValueError, match="class 15"):
        parse_class_map("cardiac=15", 1)
    with pytest.raises(ValueError, match=r"class 9 \(main pulmonary artery\) is not allowed in view 1"):
        parse_class_map("vessel=9", 1)
    with pytest.raises(ValueError, match="appears twice"):
        parse_class_map("a=5,a=7", 1)
    with pytest.raises(ValueError, match="view id 5"):
        parse_class_map("a=5", 5)


def test_cli_convert_png_reports_errors(tmp_path):
    image = np.zeros((6, 7), np.uint8)
    _write_case(tmp_path, "one", image, {"thorax": np.zeros((6, 7), np.uint8)})
    _write_case(tmp_path, "two", image, {})
    runner = CliRunner()
    args = ["convert-png", str(tmp_path / "images"), str(tmp_path / "masks"), str(tmp_path / "out")]
    result = runner.invoke(app, [*args, "--class-map", "thorax=7", "--view", "1"])
    assert result.exit_code == 2
    assert "two-thorax.png: mask not found" in result.output
    assert "1 problem(s)" in result.output

    result = runner.invoke(app, [*args, "--class-map", "thorax=9"])
    assert result.exit_code == 2
    assert "not allowed in view 1" in result.output


def test_focus_real_png_matches_bundled(tmp_path):
    # The two bundled original FOCUS images convert to exactly the bundled HDF5 files.
    entries = convert_png_folder(FOCUS12 / "png", FOCUS12 / "annfiles_mask", tmp_path, FOCUS_CONFIG)
    assert [entry["image"] for entry in entries] == ["images/015.h5", "images/034.h5"]
    for stem in ("015", "034"):
        for relative, dataset in [(f"images/{stem}.h5", "image"), (f"labels/{stem}_label.h5", "mask")]:
            with h5py.File(tmp_path / relative) as new, h5py.File(FOCUS12 / relative) as bundled:
                assert np.array_equal(new[dataset][()], bundled[dataset][()]), relative
                assert dict(new.attrs) == dict(bundled.attrs)


def test_focus_bundled_mask_round_trip():
    entries = json.loads((FOCUS12 / "list.json").read_text())
    assert len(entries) == 12
    worst = 1.0
    for entry in entries:
        with h5py.File(FOCUS12 / entry["image"]) as h5:
            attrs = dict(h5.attrs)
        with h5py.File(FOCUS12 / entry["label"]) as h5:
            mask = h5["mask"][()]
        assert set(np.unique(mask).tolist()) == {0, 5, 7}
        original = to_original(mask, attrs)
        stem = Path(attrs["source_file"]).stem
        cardiac = np.asarray(Image.open(FOCUS12 / "annfiles_mask" / f"{stem}-cardiac.png"))[..., 0] > 0
        thorax = np.asarray(Image.open(FOCUS12 / "annfiles_mask" / f"{stem}-thorax.png"))[..., 0] > 0
        assert original.shape == cardiac.shape
        worst = min(worst, _dice(original == 5, cardiac), _dice(original > 0, thorax))
    assert worst > 0.99


def test_upper_case_png_converted(tmp_path):
    image = np.full((6, 7), 90, np.uint8)
    thorax = np.zeros((6, 7), np.uint8)
    thorax[1:5, 1:6] = 255
    _write_png(tmp_path / "images" / "scan.PNG", image)
    _write_png(tmp_path / "masks" / "scan-thorax.png", thorax)

    config = ConvertConfig(class_map=parse_class_map("thorax=7", 1), size=16)
    entries = convert_png_folder(tmp_path / "images", tmp_path / "masks", tmp_path / "out", config)

    assert [entry["image"] for entry in entries] == ["images/scan.h5"]


def test_missing_images_folder_reported(tmp_path):
    config = ConvertConfig(class_map=parse_class_map("thorax=7", 1))
    with pytest.raises(ConversionError) as caught:
        convert_png_folder(tmp_path / "absent", tmp_path / "masks", tmp_path / "out", config)
    assert caught.value.problems == [f"{tmp_path / 'absent'}: images folder not found"]
