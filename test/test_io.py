"""Tests for fetuskit.io: image layouts and dtypes, views, label files and prediction writing."""

from __future__ import annotations

import logging
import os
import time

import h5py
import numpy as np
import pytest

from fetuskit.errors import FetusFileError, OutputDirError
from fetuskit.io import ensure_output_dir, read_image, read_label, read_prediction, write_prediction

GRAY_LEVELS = np.arange(256, dtype=np.uint8).reshape(16, 16)


@pytest.fixture
def picture() -> np.ndarray:
    """(16, 24, 3) uint8 RGB picture whose first 16 x 16 block has equal channels."""
    rng = np.random.default_rng(7)
    colour = rng.integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    colour[:, :16] = GRAY_LEVELS[..., None]
    return colour


def test_uint8_gray_scaled_exactly(tmp_path, write_h5):
    path = write_h5(tmp_path / "gray.h5", image=GRAY_LEVELS)
    case = read_image(path)
    assert case.image.dtype == np.float32
    assert case.image.shape == (16, 16)
    np.testing.assert_array_equal(case.image, (GRAY_LEVELS / 255.0).astype(np.float32))
    assert case.image.min() == 0.0
    assert case.image.max() == 1.0


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda x: x, id="uint8"),
        pytest.param(lambda x: (x / 255.0).astype(np.float32), id="float32-unit"),
        pytest.param(lambda x: x / 255.0, id="float64-unit"),
        pytest.param(lambda x: x.astype(np.float32), id="float32-255"),
        pytest.param(lambda x: x.astype(np.float64), id="float64-255"),
        pytest.param(lambda x: x.astype(np.uint16) * 257, id="uint16"),
    ],
)
def test_dtypes_give_identical_image(tmp_path, write_h5, picture, encode):
    expected = read_image(write_h5(tmp_path / "reference.h5", image=picture)).image
    result = read_image(write_h5(tmp_path / "encoded.h5", image=encode(picture))).image
    np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(lambda x: x, id="HW3"),
        pytest.param(lambda x: np.concatenate([x, np.full_like(x[..., :1], 9)], axis=-1), id="HW4-alpha"),
        pytest.param(lambda x: np.moveaxis(x, -1, 0), id="3HW"),
    ],
)
def test_colour_layouts_give_identical_image(tmp_path, write_h5, picture, layout):
    expected = read_image(write_h5(tmp_path / "reference.h5", image=picture)).image
    result = read_image(write_h5(tmp_path / "layout.h5", image=layout(picture))).image
    assert result.shape == (16, 24)
    np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(lambda x: x, id="HW"),
        pytest.param(lambda x: x[..., None], id="HW1"),
        pytest.param(lambda x: np.repeat(x[..., None], 3, axis=-1), id="HW3-equal"),
        pytest.param(lambda x: np.repeat(x[None], 3, axis=0), id="3HW-equal"),
    ],
)
def test_equal_channels_keep_gray_exactly(tmp_path, write_h5, layout):
    case = read_image(write_h5(tmp_path / "gray.h5", image=layout(GRAY_LEVELS)))
    np.testing.assert_array_equal(case.image, (GRAY_LEVELS / 255.0).astype(np.float32))


def test_colour_uses_luma_weights(tmp_path, write_h5):
    image = np.zeros((2, 3, 3), dtype=np.uint8)
    image[0, 0] = (255, 0, 0)
    image[0, 1] = (0, 255, 0)
    image[0, 2] = (0, 0, 255)
    case = read_image(write_h5(tmp_path / "rgb.h5", image=image))
    np.testing.assert_allclose(case.image[0], [0.299, 0.587, 0.114], rtol=1e-6)
    np.testing.assert_array_equal(case.image[1], [0.0, 0.0, 0.0])


def test_non_square_shape_kept(tmp_path, write_h5):
    case = read_image(write_h5(tmp_path / "wide.h5", image=np.zeros((7, 300), dtype=np.uint8)))
    assert case.image.shape == (7, 300)


def test_nan_pixels_replaced_and_logged(tmp_path, write_h5, caplog):
    image = np.full((4, 5), 0.5, dtype=np.float32)
    image[0, 0] = np.nan
    image[2, 3] = np.nan
    path = write_h5(tmp_path / "nan.h5", image=image)
    with caplog.at_level(logging.WARNING, logger="fetuskit.io"):
        case = read_image(path)
    assert case.image[0, 0] == 0.0
    assert case.image[2, 3] == 0.0
    assert case.image[1, 1] == 0.5
    assert "nan.h5" in caplog.text
    assert "replaced 2 non-finite" in caplog.text


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (np.array([2], dtype=np.int32), 1),
        (np.array(3), 2),
        (np.array([[4]]), 3),
        (np.array([1.0]), 0),
        (np.array(2.0), 1),
        (b"4CH", 0),
        ("LVOT", 1),
        (np.array([b"RVOT"]), 2),
        ("3vt", 3),
        ("2", 1),
        (np.array([b"LVOT"], dtype=object), 1),
    ],
)
def test_view_forms(tmp_path, write_h5, stored, expected):
    case = read_image(write_h5(tmp_path / "view.h5", image=GRAY_LEVELS, view=stored))
    assert case.view == expected
    assert case.view_reason is None


@pytest.mark.parametrize(
    ("stored", "reason"),
    [
        (np.array([0]), "outside 1..4"),
        (np.array([5]), "outside 1..4"),
        (np.array([-1]), "outside 1..4"),
        (np.array([2.5]), "not an integral"),
        (np.array([np.nan]), "not an integral"),
        (np.array([1, 2]), "2 values"),
        ("SAX", "unknown view name"),
    ],
)
def test_invalid_view_gives_none_with_reason(tmp_path, write_h5, caplog, stored, reason):
    path = write_h5(tmp_path / "badview.h5", image=GRAY_LEVELS, view=stored)
    with caplog.at_level(logging.WARNING, logger="fetuskit.io"):
        case = read_image(path)
    assert case.view is None
    assert reason in case.view_reason
    assert "badview.h5" in caplog.text


def test_missing_view_gives_none(tmp_path, write_h5):
    case = read_image(write_h5(tmp_path / "noview.h5", image=GRAY_LEVELS))
    assert case.view is None
    assert "no 'view' dataset" in case.view_reason


def test_file_attributes_returned(tmp_path, write_h5):
    path = write_h5(tmp_path / "attrs.h5", attrs={"padding": [1, 2, 3, 4], "scale": 0.5}, image=GRAY_LEVELS)
    case = read_image(path)
    assert case.attrs["scale"] == 0.5
    assert list(case.attrs["padding"]) == [1, 2, 3, 4]
    assert case.path == path


def test_non_ascii_file_name(tmp_path, write_h5):
    path = write_h5(tmp_path / "病例_01.h5", image=GRAY_LEVELS, view=np.array([3]))
    case = read_image(path)
    assert case.view == 2
    written = write_prediction(tmp_path, "病例_01.h5", np.zeros((16, 16), np.uint8), np.zeros(7, np.uint8))
    mask, label = read_prediction(written, (16, 16))
    assert mask.shape == (16, 16)
    assert label.shape == (7,)


def test_not_hdf5_rejected(tmp_path):
    path = tmp_path / "text.h5"
    path.write_text("this is not an HDF5 file")
    with pytest.raises(FetusFileError, match="text.h5: not a readable HDF5 file"):
        read_image(path)


def test_truncated_file_rejected(tmp_path, write_h5):
    whole = write_h5(tmp_path / "whole.h5", image=np.zeros((64, 64), np.uint8))
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(whole.read_bytes()[:1000])
    with pytest.raises(FetusFileError, match="truncated.h5: .*truncated"):
        read_image(truncated)


def test_empty_file_rejected(tmp_path):
    path = tmp_path / "empty.h5"
    path.write_bytes(b"")
    with pytest.raises(FetusFileError, match=r"empty.h5: file is empty \(0 bytes\)"):
        read_image(path)


def test_missing_file_rejected(tmp_path):
    with pytest.raises(FetusFileError, match="absent.h5: file not found"):
        read_image(tmp_path / "absent.h5")


def test_missing_image_dataset_rejected(tmp_path, write_h5):
    path = write_h5(tmp_path / "noimage.h5", picture=GRAY_LEVELS, view=np.array([1]))
    with pytest.raises(FetusFileError, match=r"noimage.h5: missing dataset 'image' \(datasets found: picture, view\)"):
        read_image(path)


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        (np.zeros((4, 5, 2), np.uint8), "unsupported shape"),
        (np.zeros((2, 4, 5, 3), np.uint8), "unsupported shape"),
        (np.zeros(10, np.uint8), "unsupported shape"),
        (np.zeros((0, 5), np.uint8), "zero-size axis"),
        (np.zeros((4, 0, 3), np.uint8), "zero-size axis"),
        (np.zeros((4, 5), np.int32), "unsupported dtype"),
    ],
)
def test_unsupported_image_rejected(tmp_path, write_h5, image, problem):
    path = write_h5(tmp_path / "odd.h5", image=image)
    with pytest.raises(FetusFileError, match=f"odd.h5: .*{problem}"):
        read_image(path)


def test_read_label_valid(tmp_path, write_h5):
    mask = np.arange(20).reshape(4, 5) % 15
    path = write_h5(tmp_path / "1_label.h5", mask=mask.astype(np.int64), label=np.array([0, 1, 0, 0, 0, 0, 1]))
    read_mask, label = read_label(path, (4, 5))
    assert read_mask.dtype == np.uint8
    np.testing.assert_array_equal(read_mask, mask)
    assert label.dtype == np.uint8
    assert label.tolist() == [0, 1, 0, 0, 0, 0, 1]


@pytest.mark.parametrize(
    ("datasets", "problem"),
    [
        ({"mask": np.zeros((4, 5), np.uint8)}, "missing dataset 'label'"),
        ({"label": np.zeros(7, np.uint8)}, "missing dataset 'mask'"),
        ({"mask": np.zeros((5, 4), np.uint8), "label": np.zeros(7, np.uint8)}, "expected the image's shape"),
        ({"mask": np.full((4, 5), 15, np.uint8), "label": np.zeros(7, np.uint8)}, r"values 15..15"),
        ({"mask": np.zeros((4, 5), np.uint8), "label": np.zeros(6, np.uint8)}, r"expected \(7,\)"),
        ({"mask": np.zeros((4, 5), np.uint8), "label": np.full(7, 2, np.uint8)}, "expected 0 or 1"),
    ],
)
def test_read_label_invalid(tmp_path, write_h5, datasets, problem):
    path = write_h5(tmp_path / "bad_label.h5", **datasets)
    with pytest.raises(FetusFileError, match=f"bad_label.h5: .*{problem}"):
        read_label(path, (4, 5))


def test_read_prediction_keeps_scores(tmp_path, write_h5):
    scores = np.array([0.1, 0.9, 0.5, 0.51, 0.0, 1.0, 0.3])
    path = write_h5(tmp_path / "1.h5", mask=np.zeros((4, 5), np.uint8), label=scores)
    _, label = read_prediction(path, (4, 5))
    np.testing.assert_array_equal(label, scores)


def test_write_prediction_round_trip(tmp_path):
    mask = (np.arange(12).reshape(3, 4) % 15).astype(np.int64)
    label = np.array([1, 0, 0, 1, 0, 0, 0])
    path = write_prediction(tmp_path, "1.h5", mask, label)
    assert path == tmp_path / "1.h5"
    with h5py.File(path, "r") as handle:
        assert sorted(handle.keys()) == ["label", "mask"]
        assert handle["mask"].dtype == np.uint8
        assert handle["mask"].shape == (3, 4)
        assert handle["label"].dtype == np.uint8
        assert handle["label"].shape == (7,)
        np.testing.assert_array_equal(handle["mask"][()], mask)
        np.testing.assert_array_equal(handle["label"][()], label)


def test_write_prediction_byte_identical(tmp_path):
    mask = np.eye(8, dtype=np.uint8) * 3
    label = np.array([0, 1, 0, 0, 0, 0, 0], np.uint8)
    first = write_prediction(tmp_path, "a.h5", mask, label).read_bytes()
    # HDF5 object timestamps have one-second resolution, so wait past a tick.
    time.sleep(1.1)
    second = write_prediction(tmp_path, "a.h5", mask, label).read_bytes()
    assert first == second


def test_write_prediction_leaves_no_temp_files(tmp_path):
    write_prediction(tmp_path, "1.h5", np.zeros((4, 4), np.uint8), np.zeros(7, np.uint8))
    write_prediction(tmp_path, "1.h5", np.ones((4, 4), np.uint8), np.zeros(7, np.uint8))
    assert sorted(os.listdir(tmp_path)) == ["1.h5"]
    assert oct(os.stat(tmp_path / "1.h5").st_mode & 0o777) == oct(0o644)


def test_write_prediction_failure_cleans_up(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("simulated rename failure")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="simulated"):
        write_prediction(tmp_path, "1.h5", np.zeros((4, 4), np.uint8), np.zeros(7, np.uint8))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["../escape.h5", "sub/1.h5", "", "..", "."])
def test_write_prediction_rejects_paths(tmp_path, name):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ValueError, match="invalid output file name"):
        write_prediction(out_dir, name, np.zeros((4, 4), np.uint8), np.zeros(7, np.uint8))
    assert os.listdir(tmp_path) == ["out"]
    assert os.listdir(out_dir) == []


@pytest.mark.parametrize(
    ("mask", "label", "problem"),
    [
        (np.full((4, 4), 15), np.zeros(7), "expected class ids 0..14"),
        (np.zeros((4, 4, 2)), np.zeros(7), r"expected \(H, W\)"),
        (np.zeros((4, 4)), np.full(7, 0.7), "expected 0 or 1"),
    ],
)
def test_write_prediction_rejects_values(tmp_path, mask, label, problem):
    with pytest.raises(ValueError, match=problem):
        write_prediction(tmp_path, "1.h5", mask, label)
    assert os.listdir(tmp_path) == []


def test_ensure_output_dir_creates(tmp_path):
    target = tmp_path / "a" / "b"
    assert ensure_output_dir(target) == target
    assert target.is_dir()
    assert os.listdir(target) == []


def test_ensure_output_dir_rejects_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match="exists and is not a folder"):
        ensure_output_dir(blocker)
    with pytest.raises(OutputDirError, match="failed to create the output folder"):
        ensure_output_dir(blocker / "child")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_ensure_output_dir_rejects_read_only(tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        with pytest.raises(OutputDirError, match="not writable"):
            ensure_output_dir(read_only)
    finally:
        read_only.chmod(0o755)


@pytest.mark.parametrize(
    "link",
    [
        pytest.param(lambda folder: h5py.SoftLink("/absent"), id="soft"),
        pytest.param(lambda folder: h5py.ExternalLink(str(folder / "absent.h5"), "image"), id="external"),
    ],
)
def test_dangling_image_link_rejected(tmp_path, link):
    path = tmp_path / "linked.h5"
    with h5py.File(path, "w") as handle:
        handle["image"] = link(tmp_path)
    with pytest.raises(FetusFileError, match="linked.h5: failed to read dataset 'image'"):
        read_image(path)


def test_external_image_link_followed(tmp_path, write_h5):
    target = write_h5(tmp_path / "target.h5", pixels=GRAY_LEVELS)
    path = tmp_path / "linked.h5"
    with h5py.File(path, "w") as handle:
        handle["image"] = h5py.ExternalLink(str(target), "pixels")
    case = read_image(path)
    np.testing.assert_array_equal(case.image, (GRAY_LEVELS / 255.0).astype(np.float32))


def test_dangling_view_link_gives_none(tmp_path):
    path = tmp_path / "viewlink.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("image", data=GRAY_LEVELS)
        handle["view"] = h5py.SoftLink("/absent")
    case = read_image(path)
    assert case.view is None
    assert "failed to read dataset 'view'" in case.view_reason
    assert case.image.shape == (16, 16)


def test_overlong_path_rejected(tmp_path):
    path = tmp_path / ("a" * 300 + ".h5")
    with pytest.raises(FetusFileError, match="aaa.h5: cannot access the file"):
        read_image(path)


def test_float_overshoot_stays_unit_scale(tmp_path, write_h5):
    # Resampling a [0, 1] image with a cubic kernel overshoots slightly above 1.0. Such an
    # image must not be divided by 255 as if it were on the 0..255 scale.
    image = np.array([[0.0, 0.25], [0.5, 1.02]], dtype=np.float32)
    case = read_image(write_h5(tmp_path / "overshoot.h5", image=image))
    np.testing.assert_array_equal(case.image, np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32))


def test_float_255_scale_with_low_maximum(tmp_path, write_h5):
    image = np.array([[0.0, 1.0], [2.0, 3.0]], dtype=np.float32)
    case = read_image(write_h5(tmp_path / "dark.h5", image=image))
    np.testing.assert_array_equal(case.image, (image.astype(np.float64) / 255.0).astype(np.float32))


def test_write_prediction_long_valid_name(tmp_path):
    # 250 characters is a valid name on common file systems (at most 255 bytes), but not
    # with the temporary file's prefix and suffix around it.
    name = "c" * 247 + ".h5"
    written = write_prediction(tmp_path, name, np.zeros((3, 4), np.uint8), np.zeros(7, np.uint8))
    assert written == tmp_path / name
    assert sorted(path.name for path in tmp_path.iterdir()) == [name]
