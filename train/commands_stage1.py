"""Commands: stage1."""

from train.cli import app  # noqa: F401
