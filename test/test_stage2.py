"""Stage 2: frozen segmentation, CHD head reset and replacement, losses, sampler, pseudo-labels, CLI."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fetuskit.models import build_model, registered_models, tiny_config
from fetuskit.models.chd_heads import MultiscaleCHDHead, structure_areas
from fetuskit.models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from fetuskit.training.config import load_config
from fetuskit.training.data import CaseTensors
from fetuskit.training.stage2 import (
    CHDFineTuneTask,
    Stage2Error,
    WeightedCaseSampler,
    asymmetric_loss,
    case_sampling_weights,
    chd_pseudo_labels,
    masked_bce,
    model_from_stage1,
)
from fetuskit.training.trainer import Trainer
from fetuskit.weights_manifest import load_manifest, verify_checksums, write_manifest

SIZE = 64


def _stage1_checkpoint(path: Path) -> Path:
    """Save a tiny timm-unet whose teacher differs from its student and whose BN stats are not defaults."""
    torch.manual_seed(0)
    model = build_model("timm-unet", **tiny_config("timm-unet"), input_size=SIZE)
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(1.0 + torch.rand(module.running_var.shape, generator=generator))
    teacher = {key: value.clone() for key, value in model.state_dict().items()}
    teacher["seg_out.bias"] += 0.5
    save_checkpoint(path, model, stage="stage1", teacher_state=teacher)
    return path


def _cases(count: int, seed: int, labelled: bool = True) -> CaseTensors:
    generator = torch.Generator().manual_seed(seed)
    views = torch.arange(count) % 4
    chd = torch.zeros(count, 7)
    chd[0::5, 0] = 1.0  # VSD on 4CH cases 0, 20, ... and on LVOT case 5, 25, ...
    chd[2::8, 5] = 1.0
    masks = torch.zeros(count, SIZE, SIZE, dtype=torch.uint8)
    return CaseTensors(
        names=[f"{index}.h5" for index in range(count)],
        paths=[Path(f"{index}.h5") for index in range(count)],
        images=torch.rand(count, 1, SIZE, SIZE, generator=generator),
        views=views,
        masks=masks if labelled else None,
        chd=chd if labelled else None,
        full_masks=[mask.numpy() for mask in masks] if labelled else [],
    )


def _config(iterations: int, extra: list[str] = ()):
    return load_config(
        None,
        [
            "stage=stage2",
            f"schedule.iterations={iterations}",
            "schedule.warmup_iterations=0",
            "run.log_interval=1",
            "run.checkpoint_interval=1000",
            "data.labelled_batch_size=4",
            "data.unlabelled_batch_size=4",
            "stage2.loss=asl",
            "stage2.sampler_power=1.0",
            "stage2.pseudo_weight=0.5",
            "stage2.pseudo_negative_threshold=0.45",
            "stage2.pseudo_positive_threshold=0.55",
            *extra,
        ],
    )


def _segmentation_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items() if not key.startswith("chd_head.")}


def test_model_from_stage1_uses_teacher_and_resets_head(tmp_path: Path, caplog) -> None:
    path = _stage1_checkpoint(tmp_path / "stage1.pt")
    stored = read_checkpoint(path)
    with caplog.at_level(logging.INFO):
        model = model_from_stage1(path, {}, seed=0)
    assert "Re-initialised chd_head" in caplog.text
    assert torch.equal(model.state_dict()["seg_out.bias"], stored["teacher"]["seg_out.bias"])
    assert not torch.equal(model.state_dict()["seg_out.bias"], stored["student"]["seg_out.bias"])
    assert not torch.equal(model.state_dict()["chd_head.0.weight"], stored["teacher"]["chd_head.0.weight"])
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == {"chd_head.0.weight", "chd_head.0.bias", "chd_head.2.weight", "chd_head.2.bias"}


def test_head_options_reject_segmentation_keys(tmp_path: Path) -> None:
    path = _stage1_checkpoint(tmp_path / "stage1.pt")
    with pytest.raises(Stage2Error, match="decoder_channels"):
        model_from_stage1(path, {"decoder_channels": [8, 8, 8, 8, 8]}, seed=0)


@pytest.mark.parametrize(
    ("head_options", "expected"),
    [({"chd_head": "bogus"}, "bogus"), ({"chd_head_nonexistent": 1}, "chd_head_nonexistent")],
)
def test_head_options_invalid_value(tmp_path: Path, head_options: dict, expected: str) -> None:
    path = _stage1_checkpoint(tmp_path / "stage1.pt")
    with pytest.raises(Stage2Error, match="stage2.head_options") as raised:
        model_from_stage1(path, head_options, seed=0)
    assert expected in str(raised.value)


def test_only_head_gets_gradients(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model = model_from_stage1(_stage1_checkpoint(tmp_path / "stage1.pt"), {}, seed=0)
    config = _config(1)
    task = CHDFineTuneTask(config, _cases(12, seed=1), _cases(8, seed=2, labelled=False))
    trainer = Trainer(config, model, task, None, tmp_path / "run")
    trainer.train_step()
    for name, parameter in model.named_parameters():
        if name.startswith("chd_head."):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.chd_head.parameters()}


@pytest.mark.parametrize("head_options", [{}, {"chd_head": "multiscale", "chd_head_areas": True}])
def test_segmentation_bit_identical_after_steps(tmp_path: Path, head_options: dict) -> None:
    torch.set_num_threads(1)
    model = model_from_stage1(_stage1_checkpoint(tmp_path / "stage1.pt"), head_options, seed=0)
    fixed = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        seg_before = model(fixed).seg.clone()
        chd_before = model(fixed).chd.clone()
    state_before = _segmentation_state(model)

    config = _config(3)
    task = CHDFineTuneTask(config, _cases(12, seed=1), _cases(8, seed=2, labelled=False))
    trainer = Trainer(config, model, task, None, tmp_path / "run")
    trainer.run()

    model.eval()
    with torch.no_grad():
        assert torch.equal(model(fixed).seg, seg_before)
        assert torch.equal(trainer.teacher.model(fixed).seg, seg_before)
        assert not torch.equal(model(fixed).chd, chd_before)
    state_after = _segmentation_state(model)
    for key, value in state_before.items():
        assert torch.equal(state_after[key], value), key
    assert any("running_mean" in key for key in state_before)


def test_multiscale_head_rebuilt_from_checkpoint(tmp_path: Path) -> None:
    model = model_from_stage1(
        _stage1_checkpoint(tmp_path / "stage1.pt"), {"chd_head": "multiscale", "chd_head_levels": 2}, seed=0
    )
    save_checkpoint(tmp_path / "stage2.pt", model, stage="stage2")
    loaded, info = load_checkpoint(tmp_path / "stage2.pt")
    assert isinstance(loaded.chd_head, MultiscaleCHDHead)
    assert info["config"]["chd_head"] == "multiscale"
    assert info["config"]["chd_head_levels"] == 2
    assert info["stage"] == "stage2"
    fixed = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(fixed).chd, model(fixed).chd)


@pytest.mark.parametrize("name", registered_models())
def test_every_model_builds_multiscale_head(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, **tiny_config(name), chd_head="multiscale", chd_head_levels=2, chd_head_areas=True)
    assert isinstance(model.chd_head, MultiscaleCHDHead)
    side = model.input_size
    output = model(torch.rand(2, 1, side, side, generator=torch.Generator().manual_seed(0)))
    assert output.chd.shape == (2, 7)
    output.chd.sum().backward()
    assert model.chd_head.mlp[0].weight.grad is not None
    with pytest.raises(ValueError, match="chd_head_areas"):
        build_model(name, **tiny_config(name), chd_head_areas=True)


def test_structure_areas_masked_by_predicted_view() -> None:
    seg = torch.zeros(1, 15, 2, 2)
    seg[0, 8, 0, 0] = 50.0  # class 8 is not allowed in view 0 (4CH)
    seg[0, 2, 0, 1] = 50.0
    view = torch.tensor([[5.0, 0.0, 0.0, 0.0]])
    areas = structure_areas(seg, view)
    assert areas[0, 8] == 0.0
    # Pixel (0, 1) is all class 2; the other three spread over the 8 classes 4CH allows.
    assert areas[0, 2].item() == pytest.approx((1.0 + 3.0 / 8.0) / 4.0, abs=1e-6)
    assert areas.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_masked_bce_by_hand() -> None:
    logits = torch.tensor([[0.0, 2.0, -1.0, 0.0, 0.0, 0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False, False, False, False]])
    pos_weight = torch.tensor([2.0, 1.0, 3.0, 1.0, 1.0, 1.0, 1.0])
    expected = (2.0 * math.log(2.0) + math.log(1.0 + math.exp(2.0)) + 3.0 * math.log(1.0 + math.exp(1.0))) / 3.0
    assert masked_bce(logits, targets, mask, pos_weight).item() == pytest.approx(expected, rel=1e-6)
    assert masked_bce(logits, targets, torch.zeros_like(mask)).item() == 0.0


def test_asymmetric_loss_by_hand() -> None:
    # Entry 0: positive at p = 0.5. Entry 1: negative at p = sigmoid(2). Entry 2: an easy
    # negative (p = sigmoid(-4) = 0.018 < clip), which costs exactly 0.
    logits = torch.tensor([[0.0, 2.0, -4.0, 0.0, 0.0, 0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False, False, False, False]])
    p = 1.0 / (1.0 + math.exp(-2.0))
    shifted = p - 0.05
    positive = (0.5**1.0) * math.log(2.0)
    negative = -(shifted**4.0) * math.log(1.0 - shifted)
    value = asymmetric_loss(logits, targets, mask, gamma_negative=4.0, gamma_positive=1.0, clip=0.05)
    assert value.item() == pytest.approx((positive + negative + 0.0) / 3.0, rel=1e-5)


def test_asymmetric_loss_equals_bce_without_focusing() -> None:
    logits = torch.tensor([[0.3, -1.2, 2.0, 0.0, 0.5, -0.5, 1.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]])
    mask = torch.ones(1, 7, dtype=torch.bool)
    value = asymmetric_loss(logits, targets, mask, gamma_negative=0.0, gamma_positive=0.0, clip=0.0)
    assert value.item() == pytest.approx(masked_bce(logits, targets, mask).item(), rel=1e-6)


def test_sampling_weights_inverse_to_frequency() -> None:
    # View 0 (4CH): 10 cases, case 0 VSD-positive. View 2 (RVOT): 4 cases, cases 10 and 11 PS-positive,
    # case 10 also VSD-positive, which RVOT does not allow and so does not count.
    views = torch.tensor([0] * 10 + [2] * 4)
    chd = torch.zeros(14, 7)
    chd[0, 0] = 1.0
    chd[10, 5] = 1.0
    chd[11, 5] = 1.0
    chd[10, 0] = 1.0
    weights = case_sampling_weights(chd, views, power=1.0, max_weight=20.0)
    assert weights.tolist() == [10.0] + [1.0] * 9 + [2.0, 2.0, 1.0, 1.0]
    capped = case_sampling_weights(chd, views, power=1.0, max_weight=4.0)
    assert capped[0].item() == 4.0
    assert case_sampling_weights(chd, views, power=0.0, max_weight=20.0).tolist() == [1.0] * 14


def test_sampler_positive_rate() -> None:
    views = torch.zeros(10, dtype=torch.long)
    chd = torch.zeros(10, 7)
    chd[0, 0] = 1.0
    weights = case_sampling_weights(chd, views, power=1.0, max_weight=20.0)
    sampler = WeightedCaseSampler(weights, batch_size=100, seed=0)
    drawn = torch.cat([sampler.next_batch() for _ in range(200)])
    # Case 0 carries weight 10 against 9 negatives of weight 1: an expected rate of 10 / 19.
    assert (drawn == 0).float().mean().item() == pytest.approx(10.0 / 19.0, abs=0.01)

    # _cases(20): 5 cases per view. Allowed positives: case 0 (4CH, VSD), case 5 (LVOT, VSD) and
    # cases 2, 10, 18 (RVOT, PS), weighted 5, 5 and 5/3 each: 15 of a total weight of 30.
    task = CHDFineTuneTask(_config(1), _cases(20, seed=0), None)
    assert task.expected_positive_share == pytest.approx(0.5, abs=1e-12)


def test_sampler_resumes_same_stream() -> None:
    weights = torch.tensor([1.0, 5.0, 2.0])
    first = WeightedCaseSampler(weights, batch_size=4, seed=3)
    first.next_batch()
    state = first.state_dict()
    expected = first.next_batch()
    second = WeightedCaseSampler(weights, batch_size=4, seed=99)
    second.load_state_dict(state)
    assert torch.equal(second.next_batch(), expected)


def test_chd_pseudo_labels_only_allowed_slots() -> None:
    probabilities = torch.tensor([
        [0.9, 0.1, 0.95, 0.5, 0.85, 0.15, 0.05],  # view 0 (4CH) allows labels 0 and 1
        [0.8, 0.2, 0.79, 0.21, 0.9, 0.1, 0.9],  # view 3 (3VT) allows labels 2, 5 and 6
    ])
    views = torch.tensor([0, 3])
    targets, keep = chd_pseudo_labels(probabilities, views, positive_threshold=0.8, negative_threshold=0.2)
    assert keep.tolist() == [
        [True, True, False, False, False, False, False],
        [False, False, False, False, False, True, True],
    ]
    assert targets[keep].tolist() == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(Stage2Error):
        chd_pseudo_labels(probabilities, views, positive_threshold=0.2, negative_threshold=0.8)


def _write_case(write_h5, root: Path, stem: str, view_id: int, label: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    image = (rng.random((SIZE, SIZE)) * 40).astype(np.uint8)
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    image[20:40, 20:40] = 200
    mask[20:40, 20:40] = (2, 8, 9, 13)[view_id - 1]
    write_h5(root / "images" / f"{stem}.h5", image=np.repeat(image[:, :, None], 3, axis=2),
             view=np.array([view_id], dtype=np.int32))
    write_h5(root / "labels" / f"{stem}_label.h5", mask=mask, label=np.asarray(label, dtype=np.uint8))


def test_stage2_and_calibrate_commands(tmp_path: Path, write_h5) -> None:
    from train.cli import _register_commands, app

    _register_commands()
    for index in range(8):
        label = [1 if index % 4 == 0 else 0, 0, 0, 0, 0, 0, 0]
        _write_case(write_h5, tmp_path / "data", str(index), view_id=index % 4 + 1, label=label, seed=index)
    init = _stage1_checkpoint(tmp_path / "stage1.pt")
    run_dir = tmp_path / "run"
    images = str(tmp_path / "data" / "images")
    result = CliRunner().invoke(app, [
        "stage2", "--init", str(init), "--labelled", images, "--unlabelled", images, "--val", images,
        "--out", str(run_dir),
        "--set", "schedule.iterations=2", "--set", "run.validation_interval=1",
        "--set", "data.labelled_batch_size=2", "--set", "data.unlabelled_batch_size=2",
        "--set", "stage2.head_options.chd_head=multiscale",
    ])
    assert result.exit_code == 0, result.output
    best = read_checkpoint(run_dir / "best.pt")
    assert best["stage"] == "stage2"
    assert best["config"]["chd_head"] == "multiscale"
    assert json.loads((run_dir / "config.json").read_text())["stage"] == "stage2"
    assert "macro_f1" in best["metrics"]

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model.pt").write_bytes((run_dir / "best.pt").read_bytes())
    write_manifest(weights, ["model.pt"])
    result = CliRunner().invoke(app, [
        "calibrate", "--checkpoint", str(weights / "model.pt"), "--cases", images,
        "--manifest-dir", str(weights), "--folds", "2", "--min-positives", "1",
    ])
    assert result.exit_code == 0, result.output
    assert result.output.count("| VSD |") == 1
    manifest = load_manifest(weights)
    verify_checksums(manifest)
    assert list(manifest.chd_thresholds) == read_checkpoint(weights / "model.pt")["thresholds"]

    missing = CliRunner().invoke(app, ["stage2", "--init", str(tmp_path / "none.pt"), "--labelled", images,
                                       "--out", str(tmp_path / "other")])
    assert missing.exit_code == 2
    assert "none.pt" in missing.output
