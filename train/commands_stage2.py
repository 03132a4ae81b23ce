"""Commands: stage2."""

from train.cli import app  # noqa: F401
