"""Commands: models."""

from train.cli import app  # noqa: F401
