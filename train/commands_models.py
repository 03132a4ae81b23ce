"""Commands: models."""

from __future__ import annotations

import typer

from fetuskit.models import build_model, count_parameters, registered_models, tiny_config
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
