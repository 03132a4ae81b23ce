"""Checkpoint round trips for every registered model, and strict key errors."""

from __future__ import annotations

import json

import pytest
import torch

from fetuskit.models import StateDictMismatchError, build_model, registered_models, tiny_config
from fetuskit.models.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint

THRESHOLDS = [0.5, 0.4, 0.3, 0.6, 0.5, 0.45, 0.55]


def build_tiny(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(name, **tiny_config(name)).eval()


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)


@pytest.mark.parametrize("name", registered_models())
def test_round_trip_same_outputs(name, tmp_path):
    model = build_tiny(name)
    path = save_checkpoint(
        tmp_path / "model.pt", model, stage="stage1", thresholds=THRESHOLDS, metrics={"score": 61.5}
    )
    loaded, info = load_checkpoint(path)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        expected = model(x)
        actual = loaded(x)
    for want, got in zip(expected, actual):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert loaded.name == name
    assert loaded.config == model.config
    assert info["weights"] == "student"
    assert info["stage"] == "stage1"
    assert info["thresholds"] == THRESHOLDS
    assert info["metrics"] == {"score": 61.5}


@pytest.mark.parametrize("name", registered_models())
def test_teacher_preferred_when_present(name, tmp_path):
    student = build_tiny(name, seed=0)
    teacher = build_tiny(name, seed=1)
    path = save_checkpoint(tmp_path / "model.pt", student, stage="stage2", teacher_state=teacher.state_dict())
    auto, auto_info = load_checkpoint(path, use="auto")
    chosen_student, student_info = load_checkpoint(path, use="student")
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(auto(x).chd, teacher(x).chd, rtol=0, atol=0)
        torch.testing.assert_close(chosen_student(x).chd, student(x).chd, rtol=0, atol=0)
    assert auto_info["weights"] == "teacher"
    assert student_info["weights"] == "student"


def test_checkpoint_fields(tmp_path):
    model = build_tiny("timm-unet")
    path = save_checkpoint(tmp_path / "a" / "model.pt", model, stage="stage1", extra={"epoch": 3})
    content = torch.load(path, weights_only=True)
    assert content["format"] == "fetuskit-checkpoint"
    assert content["version"] == 1
    assert content["arch"] == "timm-unet"
    assert content["config"]["encoder"] == "mobilenetv3_small_050"
    assert content["teacher"] is None
    assert content["thresholds"] is None
    assert content["extra"] == {"epoch": 3}
    assert sorted(content["student"]) == sorted(model.state_dict())
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]


def test_pretrained_weights_not_reloaded(tmp_path):
    model = build_tiny("echocare")
    model.config.encoder_weights = str(tmp_path / "absent_encoder.pth")
    path = save_checkpoint(tmp_path / "model.pt", model, stage="stage1")
    loaded, info = load_checkpoint(path)
    assert info["config"]["encoder_weights"].endswith("absent_encoder.pth")
    assert loaded.config.encoder_weights == model.config.encoder_weights


def test_missing_and_unexpected_keys_listed(tmp_path):
    model = build_tiny("timm-unet")
    path = save_checkpoint(tmp_path / "model.pt", model, stage="stage1")
    content = read_checkpoint(path)
    del content["student"]["seg_out.bias"]
    content["student"]["extra_head.weight"] = torch.zeros(2)
    torch.save(content, path)
    with pytest.raises(StateDictMismatchError) as caught:
        load_checkpoint(path)
    assert caught.value.missing == ["seg_out.bias"]
    assert caught.value.unexpected == ["extra_head.weight"]
    assert "seg_out.bias" in str(caught.value)
    assert "extra_head.weight" in str(caught.value)


def test_config_mismatch_lists_shapes(tmp_path):
    model = build_tiny("timm-unet")
    path = save_checkpoint(tmp_path / "model.pt", model, stage="stage1")
    content = read_checkpoint(path)
    content["config"]["head_hidden"] = 12
    torch.save(content, path)
    with pytest.raises(StateDictMismatchError) as caught:
        load_checkpoint(path)
    mismatched = sorted(key for key, _, _ in caught.value.shape_mismatches)
    assert mismatched == sorted(
        ["chd_head.0.weight", "chd_head.0.bias", "chd_head.2.weight",
         "view_head.0.weight", "view_head.0.bias", "view_head.2.weight"]
    )


def test_teacher_request_without_teacher(tmp_path):
    path = save_checkpoint(tmp_path / "model.pt", build_tiny("timm-unet"), stage="stage1")
    with pytest.raises(CheckpointError, match="no teacher"):
        load_checkpoint(path, use="teacher")


def test_foreign_file_rejected(tmp_path):
    path = tmp_path / "foreign.pth"
    torch.save({"model": {"w": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="not a fetuskit-checkpoint"):
        load_checkpoint(path)


def test_wrong_threshold_count_rejected(tmp_path):
    with pytest.raises(ValueError, match="7 values"):
        save_checkpoint(tmp_path / "model.pt", build_tiny("timm-unet"), stage="stage1", thresholds=[0.5] * 4)
    assert not (tmp_path / "model.pt").exists()


def test_export_keeps_teacher_only(tmp_path):
    from fetuskit.models.checkpoint import export_checkpoint

    student = build_tiny("timm-unet", seed=0)
    teacher = build_tiny("timm-unet", seed=1)
    source = save_checkpoint(
        tmp_path / "run" / "best.pt", student, stage="stage1", teacher_state=teacher.state_dict(),
        thresholds=THRESHOLDS, metrics={"score": 70.0}, extra={"training_state": {"iteration": 9}},
    )
    exported = export_checkpoint(source, tmp_path / "slim.pt")
    content = read_checkpoint(exported)
    assert content["teacher"] is None
    assert content["extra"] == {"exported_from": "best.pt", "exported_weights": "teacher"}
    assert content["thresholds"] == THRESHOLDS
    assert content["metrics"] == {"score": 70.0}
    loaded, _ = load_checkpoint(exported)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).seg, teacher(x).seg, rtol=0, atol=0)
    assert exported.stat().st_size < source.stat().st_size


def test_export_command_writes_manifest(tmp_path):
    from typer.testing import CliRunner

    from fetuskit.weights_manifest import load_manifest, verify_checksums, write_manifest
    from train.cli import _register_commands, app

    _register_commands()
    runs = []
    for seed in (0, 1):
        model = build_tiny("timm-unet", seed=seed)
        runs.append(save_checkpoint(tmp_path / f"run{seed}" / "best.pt", model, stage="stage1"))
    out = tmp_path / "weights"
    out.mkdir()
    # An earlier manifest's thresholds survive a re-export.
    save_checkpoint(out / "old.pt", build_tiny("timm-unet"), stage="stage1")
    write_manifest(out, ["old.pt"], chd_thresholds=THRESHOLDS)

    result = CliRunner().invoke(app, ["export", str(runs[0]), str(runs[1]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out)
    verify_checksums(manifest)
    assert [m.checkpoint for m in manifest.members] == ["run0.pt", "run1.pt"]
    assert list(manifest.chd_thresholds) == THRESHOLDS


def test_equal_checkpoints_have_equal_bytes(tmp_path):
    model = build_tiny("timm-unet")
    first = save_checkpoint(tmp_path / "a" / "model.pt", model, stage="stage1", thresholds=THRESHOLDS)
    second = save_checkpoint(tmp_path / "b" / "model.pt", model, stage="stage1", thresholds=THRESHOLDS)
    assert first.read_bytes() == second.read_bytes()


def test_import_baseline_command(tmp_path):
    from typer.testing import CliRunner

    from fetuskit.models.foreign import _ECHOCARE_BASELINE_PREFIXES
    from train.cli import _register_commands, app

    _register_commands()
    ours = build_tiny("echocare", seed=3)
    baseline = {}
    for key, value in ours.state_dict().items():
        if key.startswith("view_head."):
            continue
        for theirs, prefix in _ECHOCARE_BASELINE_PREFIXES:
            if key.startswith(prefix):
                baseline[theirs + key[len(prefix):]] = value
                break
    source = tmp_path / "best.pth"
    torch.save({"model": baseline, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3}, source)
    options = [f"--option={key}={json.dumps(value)}" for key, value in tiny_config("echocare").items()]

    result = CliRunner().invoke(app, ["import-baseline", str(source), str(tmp_path / "echocare.pt"), *options])
    assert result.exit_code == 0, result.output
    imported, info = load_checkpoint(tmp_path / "echocare.pt")
    assert info["stage"] == "baseline"
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(imported(x).seg, ours(x).seg, rtol=0, atol=0)
        torch.testing.assert_close(imported(x).chd, ours(x).chd, rtol=0, atol=0)

    del baseline[next(iter(baseline))]
    torch.save({"model": baseline}, source)
    result = CliRunner().invoke(app, ["import-baseline", str(source), str(tmp_path / "bad.pt"), *options])
    assert result.exit_code == 2
    assert "missing" in result.output
    assert not (tmp_path / "bad.pt").exists()


class _CustomObject:
    """A class that ``torch.load(weights_only=True)`` must not unpickle."""


def _write_unreadable(path, kind):
    """Write a file that is not a readable weights-only torch file: truncated, empty, text or a pickled object."""
    if kind == "custom-class":
        torch.save({"model": _CustomObject()}, path)
        return
    if kind == "truncated":
        save_checkpoint(path, build_tiny("timm-unet"), stage="stage1")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return
    path.write_bytes(b"" if kind == "empty" else b"not a torch file\n")


UNREADABLE_KINDS = ["truncated", "empty", "text", "custom-class"]


@pytest.mark.parametrize("kind", UNREADABLE_KINDS)
def test_unreadable_checkpoint_names_file(kind, tmp_path):
    path = tmp_path / f"{kind}.pt"
    _write_unreadable(path, kind)
    with pytest.raises(CheckpointError, match=f"{kind}.pt"):
        read_checkpoint(path)


@pytest.mark.parametrize("kind", UNREADABLE_KINDS)
def test_unreadable_state_file_names_file(kind, tmp_path):
    from fetuskit.models.foreign import read_state_file

    path = tmp_path / f"{kind}.pth"
    _write_unreadable(path, kind)
    with pytest.raises(ValueError, match=f"{kind}.pth"):
        read_state_file(path)


@pytest.mark.parametrize("kind", ["plain-state-dict", "truncated", "custom-class"])
def test_export_command_rejects_foreign_file(kind, tmp_path):
    from typer.testing import CliRunner

    from train.cli import _register_commands, app

    _register_commands()
    source = tmp_path / "run" / "best.pt"
    source.parent.mkdir()
    if kind == "plain-state-dict":
        torch.save(build_tiny("timm-unet").state_dict(), source)
    else:
        _write_unreadable(source, kind)

    result = CliRunner().invoke(app, ["export", str(source), "--out", str(tmp_path / "weights")])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert str(source) in result.output
    assert not (tmp_path / "weights" / "manifest.json").exists()


def test_import_baseline_rejects_truncated_file(tmp_path):
    from typer.testing import CliRunner

    from train.cli import _register_commands, app

    _register_commands()
    source = tmp_path / "best.pth"
    _write_unreadable(source, "truncated")
    result = CliRunner().invoke(app, ["import-baseline", str(source), str(tmp_path / "echocare.pt")])
    assert result.exit_code == 2, result.output
    assert str(source) in result.output
    assert not (tmp_path / "echocare.pt").exists()


def _replace_first_weight(state):
    key = next(iter(state))
    return {**state, key: "not a tensor"}


@pytest.mark.parametrize(
    ("field", "change", "message"),
    [
        ("arch", lambda _: "no-such-model", "no-such-model"),
        ("config", lambda _: {"typo_key": 1}, "typo_key"),
        ("student", _replace_first_weight, "not tensors"),
        ("student", lambda _: None, "student"),
    ],
)
def test_broken_checkpoint_field_names_file(field, change, message, tmp_path):
    path = save_checkpoint(tmp_path / "model.pt", build_tiny("timm-unet"), stage="stage1")
    content = torch.load(path, weights_only=True)
    content[field] = change(content[field])
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=message) as raised:
        load_checkpoint(path, use="student")
    assert str(path) in str(raised.value)
