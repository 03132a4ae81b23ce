"""CHD threshold calibration: guards, nested held-out check, and where thresholds are written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fetuskit.calibration import (
    CalibrationConfig,
    CalibrationError,
    best_threshold,
    calibrate_label,
    calibrate_thresholds,
    stratified_folds,
    write_checkpoint_thresholds,
    write_manifest_thresholds,
)
from fetuskit.models import build_model, tiny_config
from fetuskit.models.checkpoint import load_checkpoint, save_checkpoint
from fetuskit.weights_manifest import ManifestError, load_manifest, verify_checksums, write_manifest

CONFIG = CalibrationConfig(folds=5, min_positives=5, low=0.2, high=0.8, step=0.01, seed=0)


def _targets(positives: int, negatives: int) -> np.ndarray:
    return np.array([True] * positives + [False] * negatives)


def test_grid_bounds_and_contains_half() -> None:
    grid = CalibrationConfig(low=0.23, high=0.77, step=0.1).grid()
    assert grid.tolist() == [0.23, 0.33, 0.43, 0.5, 0.53, 0.63, 0.73]
    with pytest.raises(CalibrationError):
        CalibrationConfig(low=0.6).grid()
    with pytest.raises(CalibrationError):
        CalibrationConfig(folds=1).grid()


def test_best_threshold_ties_go_to_half() -> None:
    targets = np.array([True, False])
    grid = CONFIG.grid()
    # Every threshold in [0.2, 0.8] separates 0.9 from 0.1, so 0.5 wins the tie.
    assert best_threshold(np.array([0.9, 0.1]), targets, grid) == 0.5
    # Only thresholds below 0.3 catch the positive at 0.3; the one closest to 0.5 is 0.29.
    assert best_threshold(np.array([0.3, 0.1]), targets, grid) == 0.29


def test_stratified_folds_spread_positives() -> None:
    targets = _targets(5, 15)
    folds = stratified_folds(targets, 5, seed=0)
    assert sorted(folds[targets].tolist()) == [0, 1, 2, 3, 4]
    assert np.bincount(folds, minlength=5).tolist() == [4, 4, 4, 4, 4]


def test_too_few_positives_keep_half() -> None:
    # Positives at 0.3 would be caught by 0.29, but 4 positives are below min_positives = 5.
    probabilities = np.array([0.3] * 4 + [0.1] * 10)
    row = calibrate_label(probabilities, _targets(4, 10), CONFIG, "AS")
    assert row.threshold == 0.5
    assert row.kept is False
    assert row.candidate is None
    assert row.f1_default == 0.0
    assert row.reason == "4 positives, fewer than 5"


def test_tuned_threshold_kept_when_it_generalises() -> None:
    # Three of five positives sit at 0.45: every training split prefers the largest threshold
    # below 0.45 (0.44), and every held-out fold then is classified without error.
    probabilities = np.array([0.45, 0.45, 0.45, 0.9, 0.9] + [0.1] * 15)
    row = calibrate_label(probabilities, _targets(5, 15), CONFIG, "VSD")
    assert row.kept is True
    assert row.threshold == 0.44
    assert row.candidate == 0.44
    assert row.f1_default == pytest.approx(4 / 7)
    assert row.f1_held_out == 1.0


def test_threshold_bounded_by_range() -> None:
    # Positives at 0.15 could only be caught below 0.15, outside [0.2, 0.8]: no threshold in
    # range beats 0.5, so the candidate is 0.5 itself and nothing is tuned.
    probabilities = np.array([0.15] * 5 + [0.1] * 15)
    row = calibrate_label(probabilities, _targets(5, 15), CONFIG, "PS")
    assert row.candidate == 0.5
    assert row.threshold == 0.5
    assert row.kept is False
    assert row.reason == "0.5 is already the best threshold"
    # Positives at 0.25 are caught inside the range; the threshold stays at or above 0.2.
    probabilities = np.array([0.25] * 5 + [0.1] * 15)
    row = calibrate_label(probabilities, _targets(5, 15), CONFIG, "PS")
    assert row.threshold == 0.24
    assert CONFIG.low <= row.threshold <= CONFIG.high


def test_threshold_rejected_when_held_out_worse() -> None:
    # One positive at 0.3 and one negative at 0.35; the rest are easy. On all images 0.29
    # is best (F1 10/11 against 8/9 at 0.5). Held out, the fold with the 0.3 positive was
    # tuned without it (0.5 kept, positive missed), and the fold with the 0.35 negative was
    # tuned to 0.29 (negative taken as positive): pooled F1 8/10, below 8/9, so 0.5 stays.
    targets = _targets(5, 15)
    folds = stratified_folds(targets, CONFIG.folds, CONFIG.seed)
    probabilities = np.where(targets, 0.9, 0.1)
    low_positive = int(np.flatnonzero(targets)[0])
    hard_negative = int(next(i for i in np.flatnonzero(~targets) if folds[i] != folds[low_positive]))
    probabilities[low_positive] = 0.3
    probabilities[hard_negative] = 0.35
    row = calibrate_label(probabilities, targets, CONFIG, "AVV")
    assert row.candidate == 0.29
    assert row.f1_default == pytest.approx(8 / 9)
    assert row.f1_held_out == pytest.approx(8 / 10)
    assert row.kept is False
    assert row.threshold == 0.5
    assert row.reason == "held-out F1 not above F1 at 0.5"


def test_calibrate_thresholds_uses_allowed_views_only() -> None:
    # VSD is scored in 4CH and LVOT only. Five 4CH positives at 0.45 are tunable; the RVOT
    # rows carry VSD scores of 0.45 with targets 0, which must not enter the count.
    views = np.array([0] * 20 + [2] * 10)
    targets = np.zeros((30, 7))
    targets[:5, 0] = 1
    probabilities = np.full((30, 7), 0.1)
    probabilities[:5, 0] = 0.45
    probabilities[20:, 0] = 0.45
    rows = calibrate_thresholds(probabilities, targets, views, CONFIG)
    assert [row.label for row in rows] == ["VSD", "AVV", "AH", "AS", "DORV", "PS", "RAA"]
    assert rows[0].images == 20
    assert rows[0].positives == 5
    assert rows[0].threshold == 0.44
    assert [row.images for row in rows[1:]] == [20, 0, 0, 10, 10, 0]
    assert all(row.threshold == 0.5 for row in rows[1:])
    with pytest.raises(CalibrationError):
        calibrate_thresholds(probabilities, targets, views[:5], CONFIG)


def test_thresholds_written_and_read_by_manifest_loader(tmp_path: Path) -> None:
    model = build_model("timm-unet", **tiny_config("timm-unet"), input_size=64)
    save_checkpoint(tmp_path / "a.pt", model, stage="stage2")
    save_checkpoint(tmp_path / "b.pt", model, stage="stage1")
    write_manifest(tmp_path, ["a.pt", "b.pt"])
    old_b_digest = load_manifest(tmp_path).members[1].sha256
    thresholds = [0.44, 0.5, 0.5, 0.3, 0.5, 0.71, 0.5]

    write_checkpoint_thresholds(tmp_path / "a.pt", thresholds)
    write_manifest_thresholds(tmp_path, thresholds, changed_checkpoint=tmp_path / "a.pt")

    manifest = load_manifest(tmp_path)
    assert list(manifest.chd_thresholds) == thresholds
    assert manifest.members[1].sha256 == old_b_digest
    verify_checksums(manifest)
    _, info = load_checkpoint(tmp_path / "a.pt")
    assert info["thresholds"] == thresholds
    assert info["stage"] == "stage2"

    with pytest.raises(CalibrationError):
        write_checkpoint_thresholds(tmp_path / "a.pt", [0.5] * 6)
    with pytest.raises(ManifestError):
        write_manifest_thresholds(tmp_path / "missing", thresholds)


def test_untouched_member_still_checked(tmp_path: Path) -> None:
    model = build_model("timm-unet", **tiny_config("timm-unet"), input_size=64)
    save_checkpoint(tmp_path / "a.pt", model, stage="stage2")
    write_manifest(tmp_path, ["a.pt"])
    # Changing the checkpoint without naming it leaves the old digest, so the check fails.
    write_checkpoint_thresholds(tmp_path / "a.pt", [0.4] * 7)
    write_manifest_thresholds(tmp_path, [0.4] * 7)
    with pytest.raises(ManifestError, match="a.pt"):
        verify_checksums(load_manifest(tmp_path))
    assert torch.load(tmp_path / "a.pt", weights_only=True)["thresholds"] == [0.4] * 7


def _calibration_fixture(tmp_path: Path, write_case) -> tuple[Path, Path]:
    model = build_model("timm-unet", **tiny_config("timm-unet"), input_size=64)
    weights = tmp_path / "weights"
    weights.mkdir()
    save_checkpoint(weights / "a.pt", model, stage="stage2")
    write_manifest(weights, ["a.pt"])
    mask = np.zeros((48, 40), dtype=np.uint8)
    for index in range(4):
        write_case(str(index), mask, [0] * 7, view_id=index % 4 + 1)
    return weights, tmp_path / "images"


def test_calibrate_leaves_checkpoint_on_manifest_error(tmp_path: Path, write_case) -> None:
    from fetuskit.calibration import calibrate_checkpoint

    weights, cases = _calibration_fixture(tmp_path, write_case)
    before = (weights / "a.pt").read_bytes()
    with pytest.raises(ManifestError, match="manifest"):
        calibrate_checkpoint(weights / "a.pt", cases, CONFIG, manifest_folder=tmp_path / "no_manifest_here")
    assert (weights / "a.pt").read_bytes() == before


def test_calibrate_keeps_stale_digest_detectable(tmp_path: Path, write_case) -> None:
    from fetuskit.calibration import calibrate_checkpoint

    weights, cases = _calibration_fixture(tmp_path, write_case)
    # A checkpoint changed after the manifest was written must not get a fresh digest.
    write_checkpoint_thresholds(weights / "a.pt", [0.4] * 7)
    before = (weights / "a.pt").read_bytes()
    with pytest.raises(ManifestError, match="a.pt"):
        calibrate_checkpoint(weights / "a.pt", cases, CONFIG, manifest_folder=weights)
    assert (weights / "a.pt").read_bytes() == before
    with pytest.raises(ManifestError, match="a.pt"):
        verify_checksums(load_manifest(weights))


def test_calibrate_updates_manifest_member(tmp_path: Path, write_case) -> None:
    from fetuskit.calibration import calibrate_checkpoint

    weights, cases = _calibration_fixture(tmp_path, write_case)
    rows = calibrate_checkpoint(weights / "a.pt", cases, CONFIG, manifest_folder=weights)
    assert [row.threshold for row in rows] == [0.5] * 7
    manifest = load_manifest(weights)
    verify_checksums(manifest)
    assert list(manifest.chd_thresholds) == [0.5] * 7


@pytest.mark.parametrize(
    ("options", "expected"),
    [({"batch_size": 0}, "batch size"), ({"device": "gpu0"}, "'gpu0'")]
    + ([] if torch.cuda.is_available() else [({"device": "cuda"}, "CUDA is not available")]),
)
def test_calibrate_invalid_options_write_nothing(tmp_path: Path, write_case, options: dict, expected: str) -> None:
    from fetuskit.calibration import calibrate_checkpoint

    weights, cases = _calibration_fixture(tmp_path, write_case)
    before = (weights / "a.pt").read_bytes()
    with pytest.raises(CalibrationError, match=expected):
        calibrate_checkpoint(weights / "a.pt", cases, CONFIG, manifest_folder=weights, **options)
    assert (weights / "a.pt").read_bytes() == before
