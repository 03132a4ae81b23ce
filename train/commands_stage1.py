"""Command: stage1, supervised plus mean-teacher segmentation training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fetuskit.errors import FetusError
from fetuskit.models.registry import UnknownModelError
from fetuskit.training.config import ConfigError, load_config
from fetuskit.training.data import TrainingDataError
from fetuskit.training.run import RunFolderError, train
from train.cli import app


@app.command("stage1")
def stage1(
    labelled: Annotated[Path, typer.Option(help="Labelled cases: a folder of .h5 images or a JSON case list.")],
    out: Annotated[Path, typer.Option(help="Run folder for config.json, train.log, metrics.jsonl, best.pt, latest.pt.")],
    unlabelled: Annotated[
        Path | None, typer.Option(help="Unlabelled cases (folder or JSON); without it training is supervised only.")
    ] = None,
    val: Annotated[
        Path | None, typer.Option(help="Labelled validation cases (folder or JSON); without it no best.pt is chosen.")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="JSON or YAML training config; defaults where absent.")] = None,
    set_values: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config value with a dotted key, e.g. --set optim.lr=3e-4; repeatable."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its latest.pt.")] = False,
) -> None:
    """Train a segmentation network with the EMA mean teacher (stage 1).

    Runs on one process, or on several under torchrun (one GPU each, or CPU processes with gloo).
    """
    try:
        resolved = load_config(config, set_values or [])
        summary = train(resolved, labelled, unlabelled, val, out, resume=resume)
    except (ConfigError, TrainingDataError, RunFolderError, UnknownModelError, FetusError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from error
    typer.echo(
        f"finished at iteration {summary['iteration']}; best score {summary['best_score']:.3f} "
        f"at iteration {summary['best_iteration']}"
    )
