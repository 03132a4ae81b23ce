"""Commands: refiner."""

from train.cli import app  # noqa: F401
