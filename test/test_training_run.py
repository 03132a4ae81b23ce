"""Whole-run tests of the trainer: resume equality, DDP on gloo, and the stage1 command."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from typer.testing import CliRunner

from fetuskit.models import build_model, tiny_config
from fetuskit.models.checkpoint import load_checkpoint, read_checkpoint
from fetuskit.training.config import TrainConfig, load_config
from fetuskit.training.data import CaseTensors
from fetuskit.training.distributed import DistContext, init_distributed, shutdown
from fetuskit.training.ema import MeanTeacher
from fetuskit.training.tasks import SegmentationTask
from fetuskit.training.trainer import Trainer

SIZE = 64
# Pixel value per view in the synthetic data, and the class its bright square belongs to.
VIEW_CLASS = (2, 8, 9, 13)


def _tiny_config(iterations: int, extra: list[str] = ()) -> TrainConfig:
    return load_config(
        None,
        [
            f"schedule.iterations={iterations}",
            "schedule.warmup_iterations=1",
            "run.log_interval=1",
            "run.checkpoint_interval=2",
            "run.validation_interval=1000",
            "data.labelled_batch_size=2",
            "data.unlabelled_batch_size=2",
            "loss.confidence_threshold=0.05",
            *extra,
        ],
    )


def _tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("timm-unet", **tiny_config("timm-unet"), input_size=SIZE)


def _synthetic_cases(count: int, labelled: bool, seed: int) -> CaseTensors:
    generator = torch.Generator().manual_seed(seed)
    views = torch.arange(count) % 4
    images = 0.2 * torch.rand(count, 1, SIZE, SIZE, generator=generator)
    masks = torch.zeros(count, SIZE, SIZE, dtype=torch.uint8)
    for index in range(count):
        top, left = torch.randint(4, SIZE - 24, (2,), generator=generator).tolist()
        images[index, 0, top : top + 20, left : left + 20] = 0.8
        masks[index, top : top + 20, left : left + 20] = VIEW_CLASS[int(views[index])]
    return CaseTensors(
        names=[f"{index}.h5" for index in range(count)],
        paths=[Path(f"{index}.h5") for index in range(count)],
        images=images,
        views=views,
        masks=masks if labelled else None,
        chd=torch.zeros(count, 7) if labelled else None,
        full_masks=[mask.numpy() for mask in masks] if labelled else [],
    )


def _trainer(config: TrainConfig, run_dir: Path, model_seed: int, context: DistContext | None = None) -> Trainer:
    context = context or DistContext()
    task = SegmentationTask(
        config,
        _synthetic_cases(6, labelled=True, seed=1),
        _synthetic_cases(8, labelled=False, seed=2),
        rank=context.rank,
        world_size=context.world_size,
    )
    return Trainer(config, _tiny_model(model_seed), task, None, run_dir, context)


def _assert_states_equal(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=1e-6, msg=key)


def test_resume_continues_identically(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    config = _tiny_config(iterations=4)
    straight = _trainer(config, tmp_path / "straight", model_seed=0)
    straight.run()

    first_half = _trainer(config, tmp_path / "resumed", model_seed=0)
    first_half.run(stop_after=2)
    assert first_half.iteration == 2
    # Another initialisation proves the weights come from the checkpoint.
    second_half = _trainer(config, tmp_path / "resumed", model_seed=123)
    second_half.resume(tmp_path / "resumed" / "latest.pt")
    assert second_half.iteration == 2
    second_half.run()

    assert second_half.iteration == 4
    _assert_states_equal(straight.model.state_dict(), second_half.model.state_dict())
    _assert_states_equal(straight.teacher.model.state_dict(), second_half.teacher.model.state_dict())
    assert straight.teacher.updates == second_half.teacher.updates == 4
    assert straight.scheduler.get_last_lr() == second_half.scheduler.get_last_lr()

    straight_log = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    resumed_log = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in resumed_log] == [1, 2, 3, 4]
    for straight_record, resumed_record in zip(straight_log, resumed_log):
        assert straight_record["loss/total"] == pytest.approx(resumed_record["loss/total"], abs=1e-6)
        assert straight_record["loss/pseudo_label"] == pytest.approx(resumed_record["loss/pseudo_label"], abs=1e-6)


def test_latest_checkpoint_loads_for_inference(tmp_path: Path) -> None:
    config = _tiny_config(iterations=2)
    trainer = _trainer(config, tmp_path, model_seed=0)
    trainer.run()
    model, info = load_checkpoint(tmp_path / "latest.pt", use="teacher")
    assert info["stage"] == "stage1"
    assert info["weights"] == "teacher"
    _assert_states_equal(model.state_dict(), trainer.teacher.model.state_dict())
    payload = read_checkpoint(tmp_path / "latest.pt")
    assert payload["extra"]["training_state"]["iteration"] == 2
    assert payload["extra"]["training_config"]["schedule"]["iterations"] == 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import os

    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    context = init_distributed("cpu")
    try:
        config = _tiny_config(iterations=3)
        trainer = _trainer(config, Path(out_dir) / "run", model_seed=rank, context=context)
        trainer.run()
        torch.save(
            {"student": trainer.model.state_dict(), "teacher": trainer.teacher.model.state_dict()},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        shutdown(context)


def test_ddp_gloo_ranks_stay_identical(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    _assert_states_equal(rank0["student"], rank1["student"])
    _assert_states_equal(rank0["teacher"], rank1["teacher"])
    # Models started from different seeds: DDP's initial broadcast made rank 1 follow rank 0.
    fresh = _tiny_model(1).state_dict()
    assert not torch.equal(fresh["seg_out.weight"], rank1["student"]["seg_out.weight"])
    assert (tmp_path / "run" / "latest.pt").is_file()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def _write_case(write_h5, root: Path, stem: str, view_id: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    image = (rng.random((SIZE, SIZE)) * 40).astype(np.uint8)
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    top, left = rng.integers(4, SIZE - 24, size=2)
    image[top : top + 20, left : left + 20] = 220
    mask[top : top + 20, left : left + 20] = VIEW_CLASS[view_id - 1]
    write_h5(root / "images" / f"{stem}.h5", image=np.repeat(image[:, :, None], 3, axis=2),
             view=np.array([view_id], dtype=np.int32))
    write_h5(root / "labels" / f"{stem}_label.h5", mask=mask, label=np.zeros(7, dtype=np.uint8))


def test_stage1_command_writes_run(tmp_path: Path, write_h5) -> None:
    from train.cli import _register_commands, app

    _register_commands()

    for index in range(4):
        _write_case(write_h5, tmp_path / "train", str(index), view_id=index % 4 + 1, seed=index)
        _write_case(write_h5, tmp_path / "val", str(index), view_id=index % 4 + 1, seed=100 + index)
    config_path = tmp_path / "tiny.json"
    config_path.write_text(
        json.dumps({"model": {"name": "timm-unet", "options": {**tiny_config("timm-unet"), "input_size": SIZE}}})
    )
    run_dir = tmp_path / "run"
    arguments = [
        "stage1",
        "--labelled", str(tmp_path / "train" / "images"),
        "--unlabelled", str(tmp_path / "train" / "images"),
        "--val", str(tmp_path / "val" / "images"),
        "--config", str(config_path),
        "--out", str(run_dir),
        "--set", "schedule.iterations=3",
        "--set", "run.validation_interval=2",
        "--set", "run.log_interval=1",
        "--set", "data.labelled_batch_size=2",
        "--set", "data.unlabelled_batch_size=2",
    ]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output

    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["schedule"]["iterations"] == 3
    assert saved["model"]["options"]["input_size"] == SIZE
    assert (run_dir / "best.pt").is_file()
    assert (run_dir / "latest.pt").is_file()
    assert (run_dir / "train.log").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in records if "validation" in r]
    assert [r["iteration"] for r in validations] == [2, 3]
    assert validations[0]["best"] is True
    for key in ("loss/cross_entropy", "loss/dice", "loss/chd", "loss/pseudo_label", "confident_share", "lr/rest"):
        assert key in records[0]
    best = read_checkpoint(run_dir / "best.pt")
    assert best["metrics"]["score"] == pytest.approx(max(r["validation"]["score"] for r in validations))

    again = CliRunner().invoke(app, arguments)
    assert again.exit_code == 2
    assert "--resume" in again.output

    resumed = CliRunner().invoke(app, [*arguments, "--set", "schedule.iterations=4", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert read_checkpoint(run_dir / "latest.pt")["extra"]["training_state"]["iteration"] == 4


def _feature_check_step(margin: float, keep_missing: bool) -> dict[str, float]:
    from fetuskit.training.tasks import FeatureCheck

    config = _tiny_config(
        2,
        [
            "features.extractor=timm",
            "features.options={architecture: tf_efficientnet_lite0, weights: null, side: 64, stride: 16}",
            f"features.keep_options={{margin: {margin}, keep_missing: {str(keep_missing).lower()}}}",
            "loss.confidence_threshold=0.0",
        ],
    )
    task = SegmentationTask(
        config,
        _synthetic_cases(6, labelled=True, seed=1),
        _synthetic_cases(8, labelled=False, seed=2),
        feature_check=FeatureCheck(config),
    )
    model = _tiny_model(0)
    result = task.step(model, MeanTeacher(model, decay=0.9), torch.device("cpu"))
    return {**result.terms, **result.stats}


def test_feature_check_drops_pseudo_labels() -> None:
    # Cosine similarities lie in [-1, 1]: a margin of -2 rejects every pixel, +2 none.
    strict = _feature_check_step(margin=-2.0, keep_missing=False)
    assert strict["confident_share"] == 1.0
    assert strict["feature_dropped_share"] == 1.0
    assert strict["pseudo_label"] == 0.0
    lenient = _feature_check_step(margin=2.0, keep_missing=True)
    assert lenient["feature_dropped_share"] == 0.0
    assert lenient["pseudo_label"] > 0.0


@pytest.mark.parametrize(
    ("override", "expected"),
    [("run.log_interval=0", "run.log_interval"), ("model.name=nope", "unknown model 'nope'")],
)
def test_stage1_command_names_bad_setting(tmp_path: Path, override: str, expected: str) -> None:
    from train.cli import _register_commands, app

    _register_commands()
    arguments = ["stage1", "--labelled", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), "--set", override]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 2, result.output
    assert expected in result.output
