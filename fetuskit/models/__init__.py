"""Model registry and network families.

Importing this package registers every family: ``echocare`` (the FETUS 2026 baseline network)
and ``timm-unet`` (a timm encoder with a U-Net decoder).
"""

from fetuskit.models import echocare, timm_unet  # noqa: F401  (registers the families)
from fetuskit.models.base import ModelOutput
from fetuskit.models.heads import HEAD_NAMES, reset_head, segmentation_parameters
from fetuskit.models.registry import (
    ModelConfigError,
    UnknownModelError,
    build_model,
    count_parameters,
    model_config_class,
    registered_models,
    tiny_config,
)
from fetuskit.models.state import StateDictMismatchError

__all__ = [
    "HEAD_NAMES",
    "ModelConfigError",
    "ModelOutput",
    "StateDictMismatchError",
    "UnknownModelError",
    "build_model",
    "count_parameters",
    "model_config_class",
    "registered_models",
    "reset_head",
    "segmentation_parameters",
    "tiny_config",
]
