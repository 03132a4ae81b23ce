"""Offline scoring of FETUS 2026 predictions: ``python -m evaluation --help``."""
