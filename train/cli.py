"""The ``python -m train`` application; each command lives in its own module."""

from __future__ import annotations

import logging

import typer

app = typer.Typer(
    help="Train, convert and calibrate FETUS 2026 models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_commands() -> None:
    # Importing a command module registers its commands on ``app``.
    from train import (  # noqa: F401
        commands_data,
        commands_models,
        commands_refiner,
        commands_stage1,
        commands_stage2,
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _register_commands()
    app()
