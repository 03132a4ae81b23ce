"""process.py end to end on synthetic files with a tiny registry model and a real manifest."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import h5py
import numpy as np
import pytest
import torch

from fetuskit.cases import load_cases
from fetuskit.labels import CLASS_MASK, NUM_CHD, VIEW_NAMES
from fetuskit.models import build_model, tiny_config
from fetuskit.weights_manifest import MANIFEST_NAME, write_manifest

REPOSITORY = Path(__file__).resolve().parents[1]
PROCESS_PY = REPOSITORY / "process.py"
INPUT_SIZE = 64

# Some tests change permissions, which root ignores.
is_root = hasattr(os, "geteuid") and os.geteuid() == 0


def load_process_module():
    # process.py sets cache and offline variables on import, which must not leak into other tests.
    with mock.patch.dict(os.environ):
        spec = importlib.util.spec_from_file_location("process_under_test", PROCESS_PY)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


process = load_process_module()


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    """A weights folder with one tiny timm-unet checkpoint and its manifest."""
    from fetuskit.models.checkpoint import save_checkpoint

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = build_model("timm-unet", **{**tiny_config("timm-unet"), "input_size": INPUT_SIZE})
    save_checkpoint(folder / "member.pt", model, stage="test")
    write_manifest(folder, ["member.pt"], provenance={"source": "random tiny model for tests"})
    return folder


def write_image(path: Path, image: np.ndarray, view_id: int | None = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("image", data=image)
        if view_id is not None:
            handle.create_dataset("view", data=np.array([view_id], dtype=np.int32))
    return path


def pattern(height: int, width: int) -> np.ndarray:
    """A (H, W) float64 picture in [0, 1] with structure, so predictions vary across pixels."""
    rows, columns = np.mgrid[0:height, 0:width]
    return 0.5 + 0.5 * np.sin(rows / 7.0) * np.cos(columns / 11.0)


def read_prediction(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as handle:
        assert sorted(handle.keys()) == ["label", "mask"]
        return handle["mask"][()], handle["label"][()]


def run(arguments: list[str]) -> int:
    return process.main([*arguments, "--device", "cpu", "--workers", "2", "--batch-size", "3"])


def read_report(out_dir: Path) -> dict:
    return json.loads((out_dir / "run_report.json").read_text())


@pytest.fixture
def forms_dir(tmp_path: Path) -> Path:
    """One image per supported storage form, all of the same picture."""
    picture = pattern(40, 48)
    gray8 = np.round(picture * 255).astype(np.uint8)
    folder = tmp_path / "forms"
    write_image(folder / "gray.h5", gray8, view_id=1)
    write_image(folder / "rgb_last.h5", np.repeat(gray8[:, :, None], 3, axis=2), view_id=2)
    write_image(folder / "rgb_first.h5", np.repeat(gray8[None], 3, axis=0), view_id=3)
    write_image(folder / "gray16.h5", np.round(picture * 65535).astype(np.uint16), view_id=4)
    write_image(folder / "float.h5", picture.astype(np.float32), view_id=1)
    write_image(folder / "wide.h5", np.round(pattern(480, 640) * 255).astype(np.uint8), view_id=1)
    return folder


def test_every_input_form_predicted(forms_dir, weights_dir, tmp_path):
    out_dir = tmp_path / "out"

    assert run(["--input", str(forms_dir), "--out-dir", str(out_dir), "--weights", str(weights_dir)]) == 0

    expected_views = {"gray": 0, "rgb_last": 1, "rgb_first": 2, "gray16": 3, "float": 0, "wide": 0}
    for stem, view in expected_views.items():
        mask, label = read_prediction(out_dir / f"{stem}.h5")
        assert mask.dtype == np.uint8
        assert mask.shape == ((480, 640) if stem == "wide" else (40, 48))
        assert CLASS_MASK[view][mask].all(), stem
        assert label.dtype == np.uint8
        assert label.shape == (NUM_CHD,)
    report = read_report(out_dir)
    assert report["predicted"] == 6
    assert report["fallbacks"] == []
    assert report["missing_outputs"] == []


def test_storage_forms_give_same_mask(forms_dir, weights_dir, tmp_path):
    # The same picture stored as uint8 (H, W), (H, W, 3) and (3, H, W) must predict the same
    # mask when the view is the same, so rewrite them all as 4CH.
    for path in forms_dir.glob("rgb_*.h5"):
        with h5py.File(path, "r+") as handle:
            handle["view"][...] = 1
    out_dir = tmp_path / "out"

    run(["--input", str(forms_dir), "--out-dir", str(out_dir), "--weights", str(weights_dir)])

    gray, _ = read_prediction(out_dir / "gray.h5")
    for stem in ("rgb_last", "rgb_first"):
        mask, _ = read_prediction(out_dir / f"{stem}.h5")
        assert np.array_equal(mask, gray), stem


def test_corrupt_files_get_fallbacks(weights_dir, tmp_path):
    folder = tmp_path / "input"
    write_image(folder / "a_good.h5", np.full((30, 50), 128, dtype=np.uint8))
    (folder / "b_garbage.h5").write_bytes(b"this is not an HDF5 file")
    write_image(folder / "c_bad_dtype.h5", np.zeros((70, 90, 3), dtype=np.int32))
    write_image(folder / "d_good.h5", np.full((30, 50, 3), 64, dtype=np.uint8))
    out_dir = tmp_path / "out"

    assert run(["--input", str(folder), "--out-dir", str(out_dir), "--weights", str(weights_dir)]) == 0

    for stem in ("a_good", "d_good"):
        assert read_prediction(out_dir / f"{stem}.h5")[0].shape == (30, 50)
    garbage_mask, garbage_label = read_prediction(out_dir / "b_garbage.h5")
    assert garbage_mask.shape == (512, 512)
    assert not garbage_mask.any()
    assert not garbage_label.any()
    bad_mask, _ = read_prediction(out_dir / "c_bad_dtype.h5")
    assert bad_mask.shape == (70, 90)
    assert not bad_mask.any()

    report = read_report(out_dir)
    assert report["predicted"] == 2
    fallbacks = {entry["name"]: entry["reason"] for entry in report["fallbacks"]}
    assert sorted(fallbacks) == ["b_garbage.h5", "c_bad_dtype.h5"]
    assert "not a readable HDF5 file" in fallbacks["b_garbage.h5"]
    assert "dtype" in fallbacks["c_bad_dtype.h5"]


def test_unknown_view_logged(weights_dir, tmp_path, caplog):
    folder = tmp_path / "input"
    write_image(folder / "noview.h5", np.round(pattern(40, 40) * 255).astype(np.uint8), view_id=None)
    write_image(folder / "badview.h5", np.round(pattern(40, 40) * 255).astype(np.uint8), view_id=9)
    out_dir = tmp_path / "out"

    with caplog.at_level(logging.INFO, logger="fetuskit.inference"):
        run(["--input", str(folder), "--out-dir", str(out_dir), "--weights", str(weights_dir)])

    report = read_report(out_dir)
    by_name = {entry["name"]: entry for entry in report["views_from_head"]}
    assert sorted(by_name) == ["badview.h5", "noview.h5"]
    for name, entry in by_name.items():
        view = VIEW_NAMES.index(entry["view"])
        mask, _ = read_prediction(out_dir / name)
        assert CLASS_MASK[view][mask].all()
        assert f"{name}: view unknown, view head predicts {entry['view']}" in caplog.text


def test_read_only_input(forms_dir, weights_dir, tmp_path):
    for path in forms_dir.iterdir():
        path.chmod(0o444)
    forms_dir.chmod(0o555)
    # Root ignores the permission bits, so also check that the input folder is left unchanged.
    before = sorted((path.name, path.stat().st_mtime_ns) for path in forms_dir.iterdir())
    out_dir = tmp_path / "out"
    try:
        code = run(["--input", str(forms_dir), "--out-dir", str(out_dir), "--weights", str(weights_dir)])
    finally:
        forms_dir.chmod(0o755)

    assert code == 0
    assert read_report(out_dir)["predicted"] == 6
    assert sorted((path.name, path.stat().st_mtime_ns) for path in forms_dir.iterdir()) == before


@pytest.mark.skipif(is_root, reason="root writes to read-only folders")
def test_unwritable_output_fails(forms_dir, weights_dir, tmp_path, caplog):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with caplog.at_level(logging.ERROR):
            code = run(["--input", str(forms_dir), "--out-dir", str(locked / "out"), "--weights", str(weights_dir)])
    finally:
        locked.chmod(0o755)

    assert code == 2
    assert f"output folder {locked / 'out'} is not writable" in caplog.text
    assert not (locked / "out").exists()


def test_output_path_is_file_fails(forms_dir, weights_dir, tmp_path, caplog):
    blocker = tmp_path / "output"
    blocker.write_text("a file where the output folder should be")

    with caplog.at_level(logging.ERROR):
        code = run(["--input", str(forms_dir), "--out-dir", str(blocker), "--weights", str(weights_dir)])

    assert code == 2
    assert f"output folder {blocker} is not writable" in caplog.text
    assert "exists and is not a folder" in caplog.text


def test_resume_skips_existing_outputs(forms_dir, weights_dir, tmp_path):
    out_dir = tmp_path / "out"
    arguments = ["--input", str(forms_dir), "--out-dir", str(out_dir), "--weights", str(weights_dir)]
    run(arguments)
    # A stopped run leaves some outputs: remove one, and mark another to see whether it is redone.
    (out_dir / "gray.h5").unlink()
    sentinel = np.full((40, 48), 3, dtype=np.uint8)
    with h5py.File(out_dir / "float.h5", "w") as handle:
        handle.create_dataset("mask", data=sentinel)
        handle.create_dataset("label", data=np.zeros(NUM_CHD, dtype=np.uint8))

    assert run(arguments) == 0

    report = read_report(out_dir)
    assert report["skipped_existing"] == 5
    assert report["predicted"] == 1
    assert (out_dir / "gray.h5").is_file()
    assert np.array_equal(read_prediction(out_dir / "float.h5")[0], sentinel)

    assert run([*arguments, "--overwrite"]) == 0

    assert read_report(out_dir)["predicted"] == 6
    assert not np.array_equal(read_prediction(out_dir / "float.h5")[0], sentinel)


def test_repeated_runs_byte_identical(forms_dir, weights_dir, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    run(["--input", str(forms_dir), "--out-dir", str(first), "--weights", str(weights_dir)])
    run(["--input", str(forms_dir), "--out-dir", str(second), "--weights", str(weights_dir)])

    names = sorted(path.name for path in first.glob("*.h5"))
    assert len(names) == 6
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_checksum_mismatch_stops_run(forms_dir, weights_dir, tmp_path, caplog):
    altered = tmp_path / "weights"
    shutil.copytree(weights_dir, altered)
    with open(altered / "member.pt", "ab") as handle:
        handle.write(b"\0")
    out_dir = tmp_path / "out"

    with caplog.at_level(logging.ERROR):
        code = run(["--input", str(forms_dir), "--out-dir", str(out_dir), "--weights", str(altered)])

    assert code == 2
    assert f"{altered / 'member.pt'}: sha256 is" in caplog.text
    assert not list(out_dir.glob("*.h5"))


def test_missing_checkpoint_stops_run(forms_dir, weights_dir, tmp_path, caplog):
    altered = tmp_path / "weights"
    shutil.copytree(weights_dir, altered)
    (altered / "member.pt").unlink()

    with caplog.at_level(logging.ERROR):
        code = run(["--input", str(forms_dir), "--out-dir", str(tmp_path / "out"), "--weights", str(altered)])

    assert code == 2
    assert f"{altered / 'member.pt'}: file not found" in caplog.text


def test_missing_manifest_stops_run(forms_dir, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        code = run(["--input", str(forms_dir), "--out-dir", str(tmp_path / "out"), "--weights", str(tmp_path)])

    assert code == 2
    assert f"weights manifest not found: {tmp_path / MANIFEST_NAME}" in caplog.text


def test_no_inputs_stops_run(weights_dir, tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.ERROR):
        code = run(["--out-dir", str(tmp_path / "out"), "--weights", str(weights_dir)])

    assert code == 2
    assert "case list not found: data/valid.json" in caplog.text


def test_runs_with_sockets_blocked(forms_dir, weights_dir, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("inference tried to open a network connection")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    out_dir = tmp_path / "out"

    assert run(["--input", str(forms_dir), "--out-dir", str(out_dir), "--weights", str(weights_dir)]) == 0
    assert read_report(out_dir)["predicted"] == 6


def test_json_list_with_missing_image(weights_dir, tmp_path):
    data = tmp_path / "data"
    write_image(data / "images" / "1.h5", np.full((32, 36), 90, dtype=np.uint8))
    entries = [{"image": "images/1.h5"}, {"image": "images/2.h5"}]
    (data / "valid.json").write_text(json.dumps(entries))
    out_dir = tmp_path / "out"

    code = run(["--data-json", str(data / "valid.json"), "--out-dir", str(out_dir), "--weights", str(weights_dir)])

    assert code == 0
    assert read_prediction(out_dir / "1.h5")[0].shape == (32, 36)
    assert read_prediction(out_dir / "2.h5")[0].shape == (512, 512)
    assert [entry["name"] for entry in read_report(out_dir)["fallbacks"]] == ["2.h5"]


def test_missing_default_json_uses_data_folder(weights_dir, tmp_path, caplog, monkeypatch):
    data = tmp_path / "data"
    write_image(data / "images" / "7.h5", np.full((32, 32), 90, dtype=np.uint8))
    out_dir = tmp_path / "out"
    monkeypatch.chdir(tmp_path)

    with caplog.at_level(logging.WARNING):
        code = run(["--out-dir", str(out_dir), "--weights", str(weights_dir)])

    assert code == 0
    assert (out_dir / "7.h5").is_file()
    assert "processing the .h5 files in data/images instead" in caplog.text


def test_named_json_must_exist(weights_dir, tmp_path, caplog):
    data = tmp_path / "data"
    write_image(data / "images" / "7.h5", np.full((32, 32), 90, dtype=np.uint8))
    out_dir = tmp_path / "out"

    with caplog.at_level(logging.ERROR):
        code = run(["--data-json", str(data / "lists.json"), "--out-dir", str(out_dir), "--weights", str(weights_dir)])

    assert code == 2
    assert not (out_dir / "7.h5").exists()
    assert f"case list {data / 'lists.json'} is not found" in caplog.text


def test_report_and_settings_written(forms_dir, weights_dir, tmp_path):
    out_dir = tmp_path / "out"
    run(["--input", str(forms_dir), "--out-dir", str(out_dir), "--weights", str(weights_dir), "--no-refine"])

    report = read_report(out_dir)
    assert report["total_cases"] == 6
    assert report["device"] == "cpu"
    assert report["mean_ms_per_image"] > 0
    assert report["mean_ms_per_image"] * 6 == pytest.approx(report["wall_seconds"] * 1000)
    assert 0.0 <= report["time_score"] <= 100.0
    assert report["model_load_seconds"] <= report["wall_seconds"]

    settings = json.loads((out_dir / "run_settings.json").read_text())
    assert settings["config"]["refine"] is False
    assert settings["config"]["batch_size"] == 3
    assert settings["input_size"] == INPUT_SIZE
    assert settings["manifest"]["members"][0]["checkpoint"] == "member.pt"
    assert settings["manifest"]["provenance"] == {"source": "random tiny model for tests"}


def test_validation_path_matches_process(weights_dir, tmp_path, write_case):
    from fetuskit.models.checkpoint import load_checkpoint
    from fetuskit.training.data import load_labelled
    from fetuskit.training.validation import predict_records

    mask = np.zeros((44, 52), dtype=np.uint8)
    mask[10:30, 12:40] = 5
    write_case("5", mask, [1, 0, 0, 0, 0, 0, 0], view_id=1)
    image_path = tmp_path / "images" / "5.h5"
    with h5py.File(image_path, "r+") as handle:
        handle["image"][...] = np.round(pattern(44, 52) * 255).astype(np.uint8)[:, :, None]
    out_dir = tmp_path / "out"

    run(["--input", str(tmp_path / "images"), "--out-dir", str(out_dir), "--weights", str(weights_dir)])
    model, _ = load_checkpoint(weights_dir / "member.pt")
    cases = load_labelled(load_cases(tmp_path / "images"), INPUT_SIZE, keep_full_masks=True)
    records = list(predict_records(model, cases, batch_size=1, device=torch.device("cpu")))

    process_mask, process_label = read_prediction(out_dir / "5.h5")
    assert len(records) == 1
    assert np.array_equal(records[0].pred_mask, process_mask)
    assert np.array_equal(records[0].pred_label, process_label)


def test_container_defaults_subprocess(weights_dir, tmp_path):
    # The container runs process.py by absolute path from /ws with no arguments. The weights
    # default to model_weights/ next to process.py, so the script and package are copied together.
    install = tmp_path / "opt"
    shutil.copytree(REPOSITORY / "fetuskit", install / "fetuskit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPOSITORY / "evaluation", install / "evaluation", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROCESS_PY, install / "process.py")
    shutil.copytree(weights_dir, install / "model_weights")
    workspace = tmp_path / "ws"
    write_image(workspace / "data" / "images" / "3.h5", np.round(pattern(36, 44) * 255).astype(np.uint8))
    (workspace / "data" / "valid.json").write_text(json.dumps([{"image": "images/3.h5"}]))
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment.update(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    installed_before = sorted(path.relative_to(install) for path in install.rglob("*"))

    result = subprocess.run(
        [sys.executable, str(install / "process.py"), "--device", "cpu"],
        cwd=workspace, env=environment, capture_output=True, text=True, timeout=300,
    )

    assert result.returncode == 0, result.stderr
    assert read_prediction(workspace / "output" / "3.h5")[0].shape == (36, 44)
    assert "mean wall time" in result.stderr
    # Nothing is written outside the output folder (and the temporary folder).
    assert sorted(path.name for path in workspace.iterdir()) == ["data", "output"]
    assert sorted(path.relative_to(install) for path in install.rglob("*")) == installed_before
    assert sorted(path.name for path in (workspace / "data").rglob("*")) == ["3.h5", "images", "valid.json"]


def test_help_lists_every_option():
    result = subprocess.run([sys.executable, str(PROCESS_PY), "--help"], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0
    for option in ("--data-json", "--input", "--out-dir", "--weights", "--device", "--batch-size", "--workers",
                   "--overwrite", "--no-refine"):
        assert option in result.stdout
    # argparse wraps the help text, so compare with the white space folded.
    assert "default: data/valid.json" in " ".join(result.stdout.split())


def test_refiner_settings_checked(forms_dir, weights_dir, tmp_path, caplog):
    configured = tmp_path / "weights"
    shutil.copytree(weights_dir, configured)
    write_manifest(configured, ["member.pt"], refiner={"backend": "no-such-backend"})
    arguments = ["--input", str(forms_dir), "--weights", str(configured)]

    with caplog.at_level(logging.ERROR):
        code = run([*arguments, "--out-dir", str(tmp_path / "refined")])

    assert code == 2
    assert "cannot build the refiner" in caplog.text
    assert run([*arguments, "--out-dir", str(tmp_path / "plain"), "--no-refine"]) == 0
    settings = json.loads((tmp_path / "plain" / "run_settings.json").read_text())
    assert settings["refiner_active"] is False
    assert settings["manifest"]["refiner"] == {"backend": "no-such-backend"}


def test_failed_batch_retried_singly(forms_dir, weights_dir, tmp_path, monkeypatch):
    import fetuskit.inference.runner as inference

    real_predict = inference.predict_batch
    batch_sizes = []

    def fail_on_batches(models, images, views, weights=None):
        batch_sizes.append(images.shape[0])
        if images.shape[0] > 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_predict(models, images, views, weights)

    monkeypatch.setattr(inference, "predict_batch", fail_on_batches)
    out_dir = tmp_path / "out"

    assert run(["--input", str(forms_dir), "--out-dir", str(out_dir), "--weights", str(weights_dir)]) == 0

    assert batch_sizes == [3, 1, 1, 1, 3, 1, 1, 1]
    assert read_report(out_dir)["predicted"] == 6


def test_failed_prediction_gets_fallback(forms_dir, weights_dir, tmp_path, monkeypatch):
    import fetuskit.inference.runner as inference

    def always_fail(models, images, views, weights=None):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(inference, "predict_batch", always_fail)
    out_dir = tmp_path / "out"

    assert run(["--input", str(forms_dir), "--out-dir", str(out_dir), "--weights", str(weights_dir)]) == 0

    report = read_report(out_dir)
    assert report["predicted"] == 0
    assert len(report["fallbacks"]) == 6
    assert all(entry["reason"] == "prediction failed: RuntimeError: simulated failure" for entry in report["fallbacks"])
    wide_mask, _ = read_prediction(out_dir / "wide.h5")
    assert wide_mask.shape == (480, 640)
    assert not wide_mask.any()


def test_json_list_with_bom_and_missing_image(weights_dir, tmp_path):
    data = tmp_path / "data"
    write_image(data / "images" / "1.h5", np.full((32, 36), 90, dtype=np.uint8))
    entries = [{"image": "images/1.h5"}, {"image": "images/2.h5"}]
    (data / "valid.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(entries).encode("utf-8"))
    out_dir = tmp_path / "out"

    code = run(["--data-json", str(data / "valid.json"), "--out-dir", str(out_dir), "--weights", str(weights_dir)])

    assert code == 0
    assert read_prediction(out_dir / "1.h5")[0].shape == (32, 36)
    assert read_prediction(out_dir / "2.h5")[0].shape == (512, 512)
    assert [entry["name"] for entry in read_report(out_dir)["fallbacks"]] == ["2.h5"]


def test_basename_clash_keeps_other_cases(weights_dir, tmp_path):
    data = tmp_path / "data"
    write_image(data / "1.h5", np.full((32, 36), 90, dtype=np.uint8))
    write_image(data / "other" / "1.h5", np.full((20, 24), 90, dtype=np.uint8))
    write_image(data / "2.h5", np.full((30, 30), 90, dtype=np.uint8))
    entries = [{"image": "1.h5"}, {"image": "1.h5"}, {"image": "other/1.h5"}, {"image": "2.h5"}]
    (data / "valid.json").write_text(json.dumps(entries))
    out_dir = tmp_path / "out"

    code = run(["--data-json", str(data / "valid.json"), "--out-dir", str(out_dir), "--weights", str(weights_dir)])

    assert code == 1
    assert read_prediction(out_dir / "1.h5")[0].shape == (32, 36)
    assert read_prediction(out_dir / "2.h5")[0].shape == (30, 30)
    report = read_report(out_dir)
    assert report["predicted"] == 2
    assert [entry["name"] for entry in report["missing_outputs"]] == ["1.h5"]
    assert str(data / "other" / "1.h5") in report["missing_outputs"][0]["reason"]
    assert "same basename" in report["missing_outputs"][0]["reason"]


def test_unusable_entries_do_not_stop_run(weights_dir, tmp_path):
    data = tmp_path / "data"
    write_image(data / "2.h5", np.full((30, 30), 90, dtype=np.uint8))
    entries = [{"image": "a" * 300 + ".h5"}, {"image": "absent/.."}, {"image": "x\u0000.h5"}, {"image": "2.h5"}]
    (data / "valid.json").write_text(json.dumps(entries))
    out_dir = tmp_path / "out"

    code = run(["--data-json", str(data / "valid.json"), "--out-dir", str(out_dir), "--weights", str(weights_dir)])

    assert code == 1
    assert read_prediction(out_dir / "2.h5")[0].shape == (30, 30)
    report = read_report(out_dir)
    assert report["predicted"] == 1
    assert report["skipped_existing"] == 0
    missing = {entry["name"]: entry["reason"] for entry in report["missing_outputs"]}
    assert sorted(missing) == ["..", "a" * 300 + ".h5", "x\u0000.h5"]
    assert "invalid output file name" in missing[".."]
    assert sorted(path.name for path in out_dir.iterdir()) == ["2.h5", "run_report.json", "run_settings.json"]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["resume", "overwrite"])
def test_output_folder_of_inputs_rejected(weights_dir, tmp_path, caplog, overwrite):
    folder = tmp_path / "data"
    write_image(folder / "1.h5", np.full((32, 36), 90, dtype=np.uint8))
    before = (folder / "1.h5").read_bytes()

    code = run(["--input", str(folder), "--out-dir", str(folder), "--weights", str(weights_dir), *overwrite])

    assert code == 2
    assert (folder / "1.h5").read_bytes() == before
    assert f"output folder {folder} contains the input images" in caplog.text


def test_folder_named_like_output_not_skipped(weights_dir, tmp_path):
    folder = tmp_path / "data"
    write_image(folder / "1.h5", np.full((32, 36), 90, dtype=np.uint8))
    write_image(folder / "2.h5", np.full((32, 36), 90, dtype=np.uint8))
    out_dir = tmp_path / "out"
    (out_dir / "1.h5").mkdir(parents=True)

    code = run(["--input", str(folder), "--out-dir", str(out_dir), "--weights", str(weights_dir)])

    assert code == 1
    report = read_report(out_dir)
    assert report["skipped_existing"] == 0
    assert report["predicted"] == 1
    assert [entry["name"] for entry in report["missing_outputs"]] == ["1.h5"]


def test_failed_mask_gets_fallback(forms_dir, weights_dir, tmp_path, monkeypatch):
    import fetuskit.inference.runner as inference

    real_mask = inference.probabilities_to_mask

    def fail_on_wide(probs, height, width):
        if (height, width) == (480, 640):
            raise RuntimeError("cannot allocate memory (simulated)")
        return real_mask(probs, height, width)

    monkeypatch.setattr(inference, "probabilities_to_mask", fail_on_wide)
    out_dir = tmp_path / "out"

    assert run(["--input", str(forms_dir), "--out-dir", str(out_dir), "--weights", str(weights_dir)]) == 0

    report = read_report(out_dir)
    assert report["predicted"] == 5
    assert [entry["name"] for entry in report["fallbacks"]] == ["wide.h5"]
    assert "cannot allocate memory" in report["fallbacks"][0]["reason"]
    assert read_prediction(out_dir / "wide.h5")[0].shape == (480, 640)


class _BrokenRefiner:
    """Returns a refined mask of the wrong size for one case and a disallowed class for another."""

    def refine(self, image, coarse, probabilities, view):
        if image.shape == (480, 640):
            return np.zeros((512, 512), np.uint8), {}
        refined = coarse.copy()
        refined[0, 0] = 14 if view == 0 else 7
        return refined, {}


def test_invalid_refined_mask_keeps_network_mask(forms_dir, weights_dir, tmp_path, monkeypatch):
    import fetuskit.inference.runner as inference

    monkeypatch.setattr(inference, "_build_refiner", lambda manifest, enabled, device: _BrokenRefiner())
    out_dir = tmp_path / "out"

    assert run(["--input", str(forms_dir), "--out-dir", str(out_dir), "--weights", str(weights_dir)]) == 0

    expected_views = {"gray": 0, "rgb_last": 1, "rgb_first": 2, "gray16": 3, "float": 0, "wide": 0}
    for stem, view in expected_views.items():
        mask, _ = read_prediction(out_dir / f"{stem}.h5")
        assert mask.shape == ((480, 640) if stem == "wide" else (40, 48)), stem
        assert CLASS_MASK[view][mask].all(), stem
    failures = {entry["name"]: entry["reason"] for entry in read_report(out_dir)["refiner_failures"]}
    assert sorted(failures) == sorted(f"{stem}.h5" for stem in expected_views)
    assert "shape (512, 512)" in failures["wide.h5"]
    assert "class 14" in failures["gray.h5"]


def test_more_cases_than_read_ahead_window(weights_dir, tmp_path):
    # The read-ahead queue contains 2 batches, and a run longer than that once dropped a case.
    folder = tmp_path / "data"
    for index in range(23):
        write_image(folder / f"{index:02d}.h5", np.full((32, 36), 60 + index, dtype=np.uint8))
    out_dir = tmp_path / "out"

    code = process.main(["--input", str(folder), "--out-dir", str(out_dir), "--weights", str(weights_dir),
                         "--device", "cpu", "--workers", "2", "--batch-size", "4"])

    assert code == 0
    assert sorted(path.name for path in out_dir.glob("*.h5")) == [f"{index:02d}.h5" for index in range(23)]
    assert read_report(out_dir)["predicted"] == 23
