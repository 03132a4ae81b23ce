"""Commands: data."""

from train.cli import app  # noqa: F401
