"""Fetal cardiac ultrasound segmentation and CHD classification for FETUS 2026."""

__version__ = "0.1.0"
