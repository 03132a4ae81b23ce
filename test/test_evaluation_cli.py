"""End-to-end tests of ``python -m evaluation`` on small files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from evaluation.cli import app
from fetuskit.io import write_prediction

SHAPE = (10, 12)
GT_SQUARE = (slice(2, 7), slice(2, 7))
SHIFTED_SQUARE = (slice(2, 7), slice(5, 10))


def mask_with(region: tuple[slice, slice], class_id: int) -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[region] = class_id
    return mask


@pytest.fixture
def dataset(tmp_path, write_case):
    """Three 4CH cases with predictions: shifted square, perfect square, perfect empty."""
    write_case("1", mask_with(GT_SQUARE, 1), [1, 0, 0, 0, 0, 0, 0])
    write_case("2", mask_with(GT_SQUARE, 2), [0] * 7)
    write_case("3", np.zeros(SHAPE), [0] * 7, view_id=b"4CH")
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    write_prediction(pred_dir, "1.h5", mask_with(SHIFTED_SQUARE, 1), [1, 0, 0, 0, 0, 0, 0])
    write_prediction(pred_dir, "2.h5", mask_with(GT_SQUARE, 2), [0] * 7)
    write_prediction(pred_dir, "3.h5", np.zeros(SHAPE), [0] * 7)
    return tmp_path


def run(*args: str):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def folder_args(root) -> list:
    return ["--images", root / "images", "--labels", root / "labels", "--pred-dir", root / "pred", "--out", root / "out"]


def test_cli_scores_folders(dataset):
    result = run(*folder_args(dataset), "--ms-per-image", "159.4")
    assert result.exit_code == 0, result.output

    summary = json.loads((dataset / "out" / "summary.json").read_text())
    # Class 1: Dice 20/50, NSD 11/16 (see test_metrics); class 2: perfect.
    assert summary["dice_per_class"][0] == pytest.approx(40.0, abs=1e-6)
    assert summary["nsd_per_class"][0] == pytest.approx(68.75, abs=1e-12)
    assert summary["dice_per_class"][1] == pytest.approx(100.0, abs=1e-6)
    assert summary["count_per_class"][:3] == [1, 1, 0]
    assert summary["mean_dice"] == pytest.approx(70.0, abs=1e-6)
    assert summary["mean_nsd"] == pytest.approx(84.375, abs=1e-12)
    assert summary["f1_per_label"][0] == 100.0
    assert summary["macro_f1"] == pytest.approx(100 / 7, abs=1e-12)
    assert summary["time_score"] == pytest.approx(50.0, abs=1e-12)
    expected_score = 0.45 * (70.0 + 84.375) / 2 + 0.45 * 100 / 7 + 5.0
    assert summary["score"] == pytest.approx(expected_score, abs=1e-6)
    assert summary["num_cases"] == 3
    assert summary["missing_as_empty"] is False
    assert summary["classes"][0]["name"] == "left atrium"

    with open(dataset / "out" / "per_case.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["name"] for row in rows] == ["1.h5", "2.h5", "3.h5"]
    assert float(rows[0]["dice_1"]) == pytest.approx(40.0, abs=1e-5)
    assert rows[2]["mean_dice"] == ""
    assert rows[0]["gt_label"] == "1000000"

    with open(dataset / "out" / "per_class.csv", newline="") as handle:
        classes = list(csv.DictReader(handle))
    assert len(classes) == 14
    assert classes[1]["count"] == "1"
    assert "MeanDice 70.00" in result.output


def test_cli_scores_json_list(dataset):
    entries = [
        {"image": f"images/{stem}.h5", "label": f"labels/{stem}_label.h5"} for stem in ("1", "2", "3")
    ]
    case_list = dataset / "list.json"
    case_list.write_text(json.dumps(entries))
    result = run("--json", case_list, "--pred-dir", dataset / "pred", "--out", dataset / "out")
    assert result.exit_code == 0, result.output
    summary = json.loads((dataset / "out" / "summary.json").read_text())
    assert summary["mean_dice"] == pytest.approx(70.0, abs=1e-6)
    assert summary["time_score"] is None
    assert summary["score"] == pytest.approx(0.45 * (70.0 + 84.375) / 2 + 0.45 * 100 / 7, abs=1e-6)


def test_cli_reports_every_bad_case(dataset, write_h5, write_case):
    (dataset / "pred" / "1.h5").unlink()
    write_h5(dataset / "pred" / "2.h5", segmentation=np.zeros(SHAPE, np.uint8), label=np.zeros(7))
    write_h5(dataset / "pred" / "3.h5", mask=np.zeros((5, 5), np.uint8), label=np.zeros(7))
    write_case("4", np.zeros(SHAPE), [0] * 7, view_id=9)

    result = run(*folder_args(dataset))

    assert result.exit_code == 1
    output = " ".join(result.output.split())
    assert "4 of 4 cases cannot be scored" in output
    assert "1.h5: prediction file" in output
    assert "not found" in output
    assert "missing dataset 'mask'" in output
    assert "expected the image's shape (10, 12)" in output
    assert "4.h5: ground-truth image" in output
    assert not (dataset / "out" / "summary.json").exists()


def test_cli_missing_as_empty(dataset):
    (dataset / "pred" / "1.h5").unlink()
    result = run(*folder_args(dataset), "--missing-as-empty")
    assert result.exit_code == 0, result.output
    summary = json.loads((dataset / "out" / "summary.json").read_text())
    assert summary["missing_as_empty"] is True
    assert summary["missing_predictions"] == ["1.h5"]
    # Class 1 is now only in the ground truth: Dice 0 and NSD 0, still counted.
    assert summary["dice_per_class"][0] == 0.0
    assert summary["nsd_per_class"][0] == 0.0
    assert summary["count_per_class"][0] == 1
    assert summary["mean_dice"] == pytest.approx(50.0, abs=1e-6)
    assert summary["f1_per_label"][0] == 0.0
    assert "1 missing predictions were scored as empty" in result.output
    with open(dataset / "out" / "per_case.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["missing_prediction"] for row in rows] == ["1", "0", "0"]


def test_cli_missing_as_empty_keeps_invalid_files(dataset, write_h5):
    write_h5(dataset / "pred" / "2.h5", mask=np.zeros(SHAPE, np.uint8))
    result = run(*folder_args(dataset), "--missing-as-empty")
    assert result.exit_code == 1
    assert "missing dataset 'label'" in " ".join(result.output.split())


def test_cli_requires_a_source(dataset):
    result = run("--pred-dir", dataset / "pred", "--out", dataset / "out")
    assert result.exit_code == 1
    assert "pass a JSON case list" in result.output


def test_module_entry_point(dataset):
    repository = Path(__file__).resolve().parents[1]
    completed = subprocess.run(
        [sys.executable, "-m", "evaluation", *map(str, folder_args(dataset))],
        cwd=repository,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    summary = json.loads((dataset / "out" / "summary.json").read_text())
    assert summary["mean_dice"] == pytest.approx(70.0, abs=1e-6)
