"""Tests of the FOCUS-style scores on the bundled real FOCUS cases and hand-computed cases."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from evaluation.focus import (
    Ellipse,
    app,
    ctr_from_ellipses,
    ctr_score,
    draw_ellipse,
    fit_ellipse,
    largest_component,
    predicted_ctr,
    read_focus_ellipses,
    read_focus_mask,
    score_focus_case,
)
from fetuskit.convert import PadGeometry, paint_label_map, to_canonical_mask

FOCUS12 = Path(__file__).parent / "data" / "focus12"
STEMS = sorted(path.stem for path in (FOCUS12 / "annfiles_ellipse").glob("*.txt"))


def _ground_truth(stem: str) -> tuple[np.ndarray, np.ndarray, dict[str, Ellipse]]:
    heart = read_focus_mask(FOCUS12 / "annfiles_mask" / f"{stem}-cardiac.png")
    thorax = read_focus_mask(FOCUS12 / "annfiles_mask" / f"{stem}-thorax.png")
    return heart, thorax, read_focus_ellipses(FOCUS12 / "annfiles_ellipse" / f"{stem}.txt")


def _attrs(stem: str) -> dict:
    with h5py.File(FOCUS12 / "images" / f"{stem}.h5") as h5:
        return dict(h5.attrs)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _write_predictions(pred_dir: Path, masks: dict[str, np.ndarray]) -> None:
    pred_dir.mkdir(parents=True, exist_ok=True)
    for name, mask in masks.items():
        with h5py.File(pred_dir / f"{name}.h5", "w") as h5:
            h5.create_dataset("mask", data=mask.astype(np.uint8))
            h5.create_dataset("label", data=np.zeros(7, np.uint8))


def _run_cli(tmp_path: Path):
    options = {"--pred-dir": tmp_path / "pred", "--images": FOCUS12 / "images", "--focus-split": FOCUS12}
    args = [str(item) for pair in options.items() for item in pair]
    return CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")])


def test_read_ellipses_format():
    ellipses = read_focus_ellipses(FOCUS12 / "annfiles_ellipse" / "001.txt")
    assert ellipses["cardiac"] == Ellipse(403.1, 350.0, 141.6, 100.8, 51.7)
    assert ellipses["thorax"] == Ellipse(466.0, 384.4, 243.3, 243.9, 27.0)
    assert ctr_from_ellipses(ellipses["cardiac"], ellipses["thorax"]) == pytest.approx(100.8 / 243.9, abs=1e-12)


def test_read_ellipses_invalid(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("1 2 3 4 cardiac\n")
    with pytest.raises(ValueError, match="short.txt:1: expected 'cx cy"):
        read_focus_ellipses(short)
    text = tmp_path / "text.txt"
    text.write_text("1 2 3 x 5 cardiac\n")
    with pytest.raises(ValueError, match="text.txt:1: invalid number"):
        read_focus_ellipses(text)
    missing = tmp_path / "missing.txt"
    missing.write_text("1 2 3 4 5 cardiac\n")
    with pytest.raises(ValueError, match=r"no ellipse for \['thorax'\]"):
        read_focus_ellipses(missing)


@pytest.mark.parametrize("stem", STEMS)
def test_fit_reproduces_focus_ellipse(stem):
    # Fitting an ellipse to a FOCUS mask gives back its stored parameters to within 0.6 px.
    heart, thorax, ellipses = _ground_truth(stem)
    for key, mask in (("cardiac", heart), ("thorax", thorax)):
        fitted = fit_ellipse(mask)
        stored = ellipses[key]
        assert abs(fitted.center_x - stored.center_x) < 0.6, key
        assert abs(fitted.center_y - stored.center_y) < 0.6, key
        assert abs(fitted.semi_minor - stored.semi_minor) < 0.6, key
        fitted_major = max(fitted.semi_axis_a, fitted.semi_axis_b)
        assert abs(fitted_major - max(stored.semi_axis_a, stored.semi_axis_b)) < 0.6, key
        # Drawing the stored ellipse reproduces the mask, so the angle convention matches.
        assert _dice(draw_ellipse(stored, mask.shape), mask) > 0.99, key
    fitted_ctr = predicted_ctr(fit_ellipse(heart), fit_ellipse(thorax))
    gt_ctr = ctr_from_ellipses(ellipses["cardiac"], ellipses["thorax"])
    assert ctr_score(gt_ctr, fitted_ctr) > 0.99


def test_fit_axis_a_along_angle():
    # Axis a is 40 px long at 30 degrees clockwise from +x; axis b is 15 px.
    ellipse = Ellipse(100.0, 80.0, 40.0, 15.0, 30.0)
    fitted = fit_ellipse(draw_ellipse(ellipse, (160, 200)))
    major_angle = fitted.angle_deg if fitted.semi_axis_a > fitted.semi_axis_b else fitted.angle_deg + 90.0
    assert abs((major_angle - 30.0 + 90.0) % 180.0 - 90.0) < 1.0
    assert fitted.semi_minor == pytest.approx(15.0, abs=0.6)


def test_ctr_score_hand_computed():
    assert ctr_score(0.5, 0.4) == pytest.approx(0.8, abs=1e-12)
    assert ctr_score(0.5, 0.6) == pytest.approx(0.8, abs=1e-12)
    assert ctr_score(0.5, 0.5) == 1.0
    assert ctr_score(0.4, 1.0) == 0.0
    assert ctr_score(0.5, None) == 0.0
    heart = Ellipse(0.0, 0.0, 30.0, 20.0, 10.0)
    thorax = Ellipse(0.0, 0.0, 60.0, 80.0, 10.0)
    assert predicted_ctr(heart, thorax) == pytest.approx(20.0 / 60.0, abs=1e-12)
    assert predicted_ctr(None, thorax) is None


def test_largest_component_and_empty_fit():
    region = np.zeros((20, 20), bool)
    region[1:4, 1:4] = True
    region[8:18, 6:12] = True
    largest = largest_component(region)
    assert largest.sum() == 60
    assert largest[8:18, 6:12].all()
    assert not largest[1:4, 1:4].any()
    assert fit_ellipse(np.zeros((20, 20), bool)) is None
    single = np.zeros((20, 20), bool)
    single[5, 5] = True
    assert fit_ellipse(single) is None
    assert not draw_ellipse(None, (4, 4)).any()


def test_empty_prediction_scores_zero():
    heart, thorax, ellipses = _ground_truth("050")
    scores = score_focus_case("050", np.zeros((512, 512), np.uint8), _attrs("050"), heart, thorax, ellipses)
    assert scores.heart_dice_raw == 0.0
    assert scores.heart_dice_fitted == 0.0
    assert scores.thorax_dice_raw == 0.0
    assert scores.thorax_dice_fitted == 0.0
    assert scores.heart_nsd == 0.0
    assert scores.thorax_nsd == 0.0
    assert scores.ctr_pred is None
    assert scores.ctr_score == 0.0


def test_shrunk_shifted_heart_ctr():
    # The true thorax and a heart ellipse shrunk to 80 % and moved 20 px right: CTR score 0.8.
    heart, thorax, ellipses = _ground_truth("050")
    stored = ellipses["cardiac"]
    shrunk = Ellipse(
        stored.center_x + 20.0, stored.center_y, 0.8 * stored.semi_axis_a, 0.8 * stored.semi_axis_b, stored.angle_deg
    )
    label_map = paint_label_map([(draw_ellipse(shrunk, heart.shape), 5), (thorax, 7)])
    geometry = PadGeometry.for_size(*heart.shape)
    pred = to_canonical_mask(label_map, geometry)
    scores = score_focus_case("050", pred, _attrs("050"), heart, thorax, ellipses)
    expected_ctr = 0.8 * stored.semi_minor / fit_ellipse(thorax).semi_minor
    assert scores.ctr_pred == pytest.approx(expected_ctr, rel=0.01)
    assert scores.ctr_score == pytest.approx(0.8, abs=0.01)
    # Area ratio 0.64 and a shift of 20 px lower the heart Dice well below 1.
    assert 0.6 < scores.heart_dice_raw < 0.8
    assert scores.thorax_dice_raw > 0.99


def test_cli_ground_truth_scores_one(tmp_path):
    masks = {}
    for stem in STEMS:
        with h5py.File(FOCUS12 / "labels" / f"{stem}_label.h5") as h5:
            masks[stem] = h5["mask"][()]
    _write_predictions(tmp_path / "pred", masks)
    result = _run_cli(tmp_path)
    assert result.exit_code == 0, result.output
    assert "mean" in result.output

    summary = json.loads((tmp_path / "out" / "focus_summary.json").read_text())
    assert summary["cases"] == 12
    mean = summary["mean"]
    assert mean["heart_nsd"] == 1.0
    assert mean["thorax_nsd"] == 1.0
    with open(tmp_path / "out" / "focus_cases.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["name"] for row in rows] == STEMS
    # Measured minimums over the 12 cases: raw Dice 0.9937, fitted Dice 0.9900, CTR score 0.9929.
    for row in rows:
        for metric in ("heart_dice_raw", "thorax_dice_raw", "ctr_score"):
            assert float(row[metric]) > 0.99, (row["name"], metric)
        for metric in ("heart_dice_fitted", "thorax_dice_fitted"):
            assert float(row[metric]) > 0.985, (row["name"], metric)
        assert math.isclose(float(mean["ctr_score"]), np.mean([float(r["ctr_score"]) for r in rows]))


def test_cli_missing_files_all_reported(tmp_path):
    _write_predictions(tmp_path / "pred", {"001": np.zeros((512, 512), np.uint8)})
    result = _run_cli(tmp_path)
    assert result.exit_code == 2
    message = result.output
    assert message.startswith("11 input file(s) missing; write a prediction for every converted image")
    assert "004.h5: not found (for image 004.h5)" in message
    assert "050.h5: not found" in message
