"""Frozen feature extractors for the prototype check of pseudo-labels, built by name.

Every extractor maps (N, 1, H, W) grayscale frames in [0, 1] to (N, D, h, w) features of
unit L2 norm (see ``fetuskit.features.base.FeatureExtractor``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fetuskit.features.base import FeatureExtractor


def _build_dinov3(**config: Any) -> FeatureExtractor:
    from fetuskit.features.dinov3 import build_dinov3_features

    return build_dinov3_features(**config)


def _build_timm(**config: Any) -> FeatureExtractor:
    from fetuskit.features.timm_features import build_timm_features

    return build_timm_features(**config)


# Builders import their module on first use, so transformers loads only when DINOv3 is built.
FEATURE_EXTRACTORS: dict[str, Callable[..., FeatureExtractor]] = {
    "dinov3": _build_dinov3,
    "timm": _build_timm,
}


def build_feature_extractor(name: str, **config: Any) -> FeatureExtractor:
    """Build the extractor registered under ``name`` with keyword ``config``.

    ``"dinov3"`` takes ``weights`` (Hugging Face folder or original ``.pth``), ``side`` and
    ``device``. ``"timm"`` takes ``architecture``, ``weights``, ``stride``, ``side`` and ``device``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
        TypeError: for a config key the builder does not take.
    """
    if name not in FEATURE_EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}; expected one of {sorted(FEATURE_EXTRACTORS)}")
    return FEATURE_EXTRACTORS[name](**config)


__all__ = ["FEATURE_EXTRACTORS", "FeatureExtractor", "build_feature_extractor"]
