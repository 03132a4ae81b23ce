"""Commands: stage2 (CHD fine-tuning on a frozen segmentation network) and calibrate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fetuskit.calibration import CalibrationConfig, CalibrationError, calibrate_checkpoint, format_report
from fetuskit.errors import FetusError
from fetuskit.models.checkpoint import CheckpointError
from fetuskit.models.state import StateDictMismatchError
from fetuskit.training.config import ConfigError, load_config
from fetuskit.training.data import TrainingDataError
from fetuskit.training.run import RunFolderError
from fetuskit.training.stage2 import Stage2Error, train_stage2
from fetuskit.weights_manifest import ManifestError
from train.cli import app


@app.command("stage2")
def stage2(
    init: Annotated[Path, typer.Option(help="Stage-1 checkpoint to start from; its teacher weights are used.")],
    labelled: Annotated[Path, typer.Option(help="Labelled cases: a folder of .h5 images or a JSON case list.")],
    out: Annotated[Path, typer.Option(help="Run folder for config.json, train.log, metrics.jsonl, best.pt, latest.pt.")],
    unlabelled: Annotated[
        Path | None, typer.Option(help="Unlabelled cases (folder or JSON) for CHD pseudo-labels; optional.")
    ] = None,
    val: Annotated[
        Path | None, typer.Option(help="Labelled validation cases (folder or JSON); without it no best.pt is chosen.")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="JSON or YAML training config, e.g. configs/stage2_multiscale.json.")] = None,
    set_values: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config value with a dotted key, e.g. --set stage2.loss=bce; repeatable."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its latest.pt.")] = False,
) -> None:
    """Fine-tune the CHD head on a frozen stage-1 network (stage 2).

    Every weight outside the CHD head is frozen and its BatchNorm statistics stay fixed, so
    the segmentation output is unchanged. best.pt is chosen by the view-masked macro F1.
    """
    try:
        resolved = load_config(config, ["stage=stage2", *(set_values or [])])
        summary = train_stage2(resolved, init, labelled, unlabelled, val, out, resume=resume)
    except (ConfigError, TrainingDataError, RunFolderError, Stage2Error, CheckpointError, StateDictMismatchError,
            FileNotFoundError, FetusError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from error
    typer.echo(
        f"finished at iteration {summary['iteration']}; best score {summary['best_score']:.3f} "
        f"at iteration {summary['best_iteration']}"
    )


@app.command("calibrate")
def calibrate(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint to calibrate; its thresholds are rewritten in place.")],
    cases: Annotated[
        Path, typer.Option(help="Labelled cases the checkpoint did NOT train on (folder or JSON), e.g. the validation split.")
    ],
    manifest_dir: Annotated[
        Path | None, typer.Option(help="Folder of the weights manifest.json that process.py reads; also updated.")
    ] = None,
    folds: Annotated[int, typer.Option(help="K of the nested held-out check, at least 2.")] = 5,
    min_positives: Annotated[int, typer.Option(help="Minimum number of positives a label needs to be tuned; other labels keep 0.5.")] = 5,
    low: Annotated[float, typer.Option(help="Lowest threshold tried.")] = 0.2,
    high: Annotated[float, typer.Option(help="Highest threshold tried.")] = 0.8,
    step: Annotated[float, typer.Option(help="Spacing of the threshold grid.")] = 0.01,
    seed: Annotated[int, typer.Option(help="Seed of the fold assignment.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 8,
    device: Annotated[str, typer.Option(help="Torch device for the forward passes, e.g. cpu or cuda.")] = "cpu",
) -> None:
    """Choose per-label CHD thresholds on held-out cases and write them where inference reads them."""
    settings = CalibrationConfig(folds=folds, min_positives=min_positives, low=low, high=high, step=step, seed=seed)
    try:
        rows = calibrate_checkpoint(checkpoint, cases, settings, manifest_dir, batch_size, device)
    except (CalibrationError, CheckpointError, ManifestError, TrainingDataError, FileNotFoundError, FetusError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from error
    typer.echo(format_report(rows))
    typer.echo(f"thresholds: {[row.threshold for row in rows]}")
