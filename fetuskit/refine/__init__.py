"""Boundary refiners: SAM-Med2D and LiteMedSAM prompted from a coarse label map."""

from fetuskit.refine.refiner import Refiner, RefinerConfig, build_refiner, compose_label_map, refine_batch
from fetuskit.refine.weights import WeightsError, convert_weights, load_segmenter

__all__ = [
    "Refiner",
    "RefinerConfig",
    "WeightsError",
    "build_refiner",
    "compose_label_map",
    "convert_weights",
    "load_segmenter",
    "refine_batch",
]
