"""Run the scorer: ``python -m evaluation --help``."""

from evaluation.cli import main

main()
