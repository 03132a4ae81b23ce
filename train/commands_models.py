"""Commands: models."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fetuskit.models import build_model, count_parameters, registered_models, tiny_config
from fetuskit.models.checkpoint import export_checkpoint, save_checkpoint
from fetuskit.models.foreign import load_echocare_baseline
from fetuskit.models.registry import UnknownModelError, build_from_config
from fetuskit.models.state import StateDictMismatchError
from fetuskit.weights_manifest import MANIFEST_NAME, load_manifest, write_manifest
from train.cli import app


@app.command("models")
def list_models(
    name: list[str] = typer.Option(None, "--name", help="Model to list; repeat for several. Default: all."),
    tiny: bool = typer.Option(False, "--tiny", help="Count the small test variants instead of the defaults."),
) -> None:
    """List the registered models with total and trainable parameter counts."""
    names = name or registered_models()
    typer.echo(f"{'model':<16} {'total':>14} {'trainable':>14}")
    for model_name in names:
        config = tiny_config(model_name) if tiny else {}
        total, trainable = count_parameters(build_model(model_name, **config))
        typer.echo(f"{model_name:<16} {total:>14,} {trainable:>14,}")


@app.command("export")
def export_weights(
    checkpoints: list[Path] = typer.Argument(..., help="Training checkpoints, one per ensemble member, e.g. RUN/best.pt."),
    out: Path = typer.Option(..., "--out", help="Weights folder to write the slim checkpoints and manifest.json into."),
    name: list[str] = typer.Option(
        None, "--name", help="File name of each exported member, in CHECKPOINTS order. Default: <run folder>.pt."
    ),
    use: str = typer.Option("auto", "--use", help="Weights to export: teacher, student, or auto (teacher if stored)."),
    provenance: Path = typer.Option(
        None, "--provenance", help="JSON object with source, licence, training command and metrics, copied into the manifest."
    ),
) -> None:
    """Export training checkpoints as the ensemble of a weights folder, with checksums.

    CHD thresholds and refiner settings of an existing manifest in --out are kept.
    """
    if name and len(name) != len(checkpoints):
        raise typer.BadParameter(f"got {len(name)} --name values for {len(checkpoints)} checkpoints; give one per checkpoint")
    names = list(name) if name else [f"{path.resolve().parent.name}.pt" for path in checkpoints]
    if len(set(names)) != len(names):
        raise typer.BadParameter(f"member file names repeat: {names}; pass --name for each checkpoint")

    thresholds, refiner = None, None
    if (out / MANIFEST_NAME).is_file():
        previous = load_manifest(out)
        thresholds, refiner = list(previous.chd_thresholds), previous.refiner
    try:
        provenance_fields = json.loads(provenance.read_text(encoding="utf-8")) if provenance else {}
    except (OSError, json.JSONDecodeError) as error:
        raise typer.BadParameter(f"cannot read --provenance {provenance}: {error}") from error
    if not isinstance(provenance_fields, dict):
        raise typer.BadParameter(f"{provenance} must contain a JSON object, got {type(provenance_fields).__name__}")

    for source, file_name in zip(checkpoints, names, strict=True):
        try:
            export_checkpoint(source, out / file_name, use=use)
        except (FileNotFoundError, ValueError, StateDictMismatchError, UnknownModelError) as error:
            # The manifest is written only after every member exported, so it never names a
            # member that failed; members exported before this one stay in --out.
            typer.echo(f"error: cannot export {source}: {error}", err=True)
            raise typer.Exit(code=2) from error
    manifest = write_manifest(out, names, chd_thresholds=thresholds, refiner=refiner, provenance=provenance_fields)
    for member in manifest.members:
        size_mb = manifest.checkpoint_path(member).stat().st_size / 1e6
        typer.echo(f"{member.checkpoint}: {size_mb:.1f} MB, sha256 {member.sha256}")
    typer.echo(f"wrote {out / MANIFEST_NAME}")


def _parse_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise typer.BadParameter(f"--option takes KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


@app.command("import-baseline")
def import_baseline(
    source: Path = typer.Argument(..., help="The organisers' baseline checkpoint (best.pth or latest.pth with ckpt['model'])."),
    destination: Path = typer.Argument(..., help="fetuskit checkpoint to write; `train export` turns it into a weights folder."),
    option: list[str] = typer.Option(
        None, "--option", help="echocare config override KEY=VALUE (JSON value), e.g. input_size=256; repeatable."
    ),
) -> None:
    """Import a FETUS 2026 baseline (Echocare_UniMatch) checkpoint as an ``echocare`` checkpoint.

    Every baseline key must map onto ``echocare`` and load strictly; the baseline has no view
    head, so ours keeps its initialisation. Optimiser state and other entries of the file are
    ignored. The file is read with ``weights_only=True``.
    """
    model = build_from_config("echocare", _parse_options(option or []), load_weights=False)
    try:
        load_echocare_baseline(model, source)
    except (FileNotFoundError, ValueError, StateDictMismatchError) as error:
        typer.echo(f"error: cannot import {source}: {error}", err=True)
        raise typer.Exit(code=2) from error
    save_checkpoint(destination, model, stage="baseline", extra={"imported_from": source.name})
    typer.echo(f"wrote {destination}")
