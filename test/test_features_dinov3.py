"""DINOv3 ViT-S/16 against golden outputs computed with synthetic recipe weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from fetuskit.features.dinov3 import (
    DINOv3Features,
    WeightLayoutError,
    config_from_original,
    load_dinov3,
    model_from_original,
    original_to_transformers,
    patch_tokens_to_grid,
)
from fetuskit.models.state import StateDictMismatchError

FIXTURES = Path(__file__).parent / "fixtures" / "dinov3_vits16"
ATOL = 1e-4


def _recipe_value(entry: dict, rng: np.random.Generator) -> np.ndarray:
    if entry["rule"] == "normal":
        return rng.standard_normal(entry["shape"]).astype(np.float32) * 0.02
    if entry["rule"] == "one_plus_normal":
        return 1.0 + rng.standard_normal(entry["shape"]).astype(np.float32) * 0.02
    raise AssertionError(f"no drawing rule for {entry['key']}: {entry['rule']}")


def _computed_value(entry: dict, golden: dict) -> np.ndarray:
    if entry["key"] == "rope_embed.periods":
        return golden["rope_periods"]
    if entry["key"].endswith("attn.qkv.bias_mask"):
        return golden["qkv_bias_mask"]
    raise AssertionError(f"no computed value for {entry['key']}")


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((FIXTURES / "manifest.json").read_text())


@pytest.fixture(scope="module")
def golden() -> dict:
    with np.load(FIXTURES / "golden.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def original_weights(manifest: dict, golden: dict) -> dict[str, torch.Tensor]:
    """Recipe weights in the original layout, checked against the manifest's SHA-256."""
    rng = np.random.default_rng(manifest["recipe"]["seed"])
    digest = hashlib.sha256()
    weights = {}
    for entry in manifest["layouts"]["original"]["entries"]:
        if entry["rule"] == "computed":
            value = _computed_value(entry, golden)
        else:
            value = _recipe_value(entry, rng)
            digest.update(entry["key"].encode("utf-8"))
            digest.update(np.ascontiguousarray(value, dtype="<f4").tobytes())
        assert list(value.shape) == entry["shape"], entry["key"]
        weights[entry["key"]] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    assert digest.hexdigest() == manifest["recipe"]["sha256"]
    return weights


@pytest.fixture(scope="module")
def model(original_weights: dict[str, torch.Tensor]) -> DINOv3ViTModel:
    return model_from_original(original_weights, source="recipe weights")


def _run(model: DINOv3ViTModel, golden: dict):
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(golden["input"]))


def test_mapping_matches_transformers_layout(manifest: dict, original_weights: dict[str, torch.Tensor]) -> None:
    mapped = original_to_transformers(original_weights)
    entries = manifest["layouts"]["transformers"]["entries"]
    expected = {entry["transformers_v5_state_dict_key"]: entry["shape"] for entry in entries}
    assert sorted(mapped) == sorted(expected)
    for key, shape in expected.items():
        assert list(mapped[key].shape) == shape, key


def test_mapping_follows_manifest_transforms(manifest: dict, original_weights: dict[str, torch.Tensor]) -> None:
    mapped = original_to_transformers(original_weights)
    for entry in manifest["layouts"]["transformers"]["entries"]:
        source = original_weights[entry["from_original"]]
        transform = entry["transform"]
        if transform.startswith("rows["):
            start, stop = (int(bound) for bound in transform[5:-1].split(":"))
            source = source[start:stop]
        elif transform.startswith("reshape["):
            source = source.reshape(json.loads(transform[7:]))
        else:
            assert transform == "identity"
        assert torch.equal(mapped[entry["transformers_v5_state_dict_key"]], source), entry["key"]


def test_derived_config_matches_manifest(manifest: dict, original_weights: dict[str, torch.Tensor]) -> None:
    derived = config_from_original(original_weights).to_dict()
    for name, value in manifest["layouts"]["transformers"]["config"].items():
        if name in ("image_size", "pos_embed_rescale", "layerscale_value"):
            continue  # Not stored in a checkpoint and not used in eval mode.
        assert derived[name] == value, name


def test_parameter_count_matches_manifest(manifest: dict, model: DINOv3ViTModel) -> None:
    count = sum(parameter.numel() for parameter in model.parameters())
    assert count == manifest["param_counts"]["transformers_total_params"]


def test_recipe_weights_match_golden(model: DINOv3ViTModel, golden: dict) -> None:
    output = _run(model, golden)
    np.testing.assert_allclose(output.last_hidden_state.numpy(), golden["last_hidden_state"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(output.pooler_output.numpy(), golden["pooler_output"], atol=ATOL, rtol=0)


def test_manifest_config_model_matches_golden(
    manifest: dict, original_weights: dict[str, torch.Tensor], golden: dict
) -> None:
    config = DINOv3ViTConfig(**manifest["layouts"]["transformers"]["config"])
    model = DINOv3ViTModel(config)
    model.load_state_dict(original_to_transformers(original_weights), strict=True)
    output = _run(model.eval(), golden)
    np.testing.assert_allclose(output.last_hidden_state.numpy(), golden["last_hidden_state"], atol=ATOL, rtol=0)


def test_patch_grid_follows_token_order(model: DINOv3ViTModel, golden: dict) -> None:
    hidden = _run(model, golden).last_hidden_state
    grid = patch_tokens_to_grid(hidden, num_register_tokens=4, grid=(16, 16))
    assert grid.shape == (1, 384, 16, 16)
    for index, patch in enumerate(golden["patch_token_index"]):
        row, column = int(patch) // 16, int(patch) % 16
        np.testing.assert_allclose(grid[0, :, row, column].numpy(), golden["patch_tokens_sel"][0, index], atol=ATOL)


def test_extractor_returns_unit_patch_features(model: DINOv3ViTModel, golden: dict) -> None:
    extractor = DINOv3Features(model, side=256)
    # Gray frames repeated to RGB. A 256x256 input skips the resize, so the patch tokens
    # must equal the model's own tokens for the same normalised input.
    gray = torch.from_numpy(np.random.default_rng(7).random((2, 1, 256, 256)).astype(np.float32))
    features = extractor.extract(gray)
    assert features.shape == (2, 384, 16, 16)
    np.testing.assert_allclose(features.norm(dim=1).numpy(), 1.0, atol=1e-5)

    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = model(pixel_values=(gray.expand(-1, 3, -1, -1) - mean) / std).last_hidden_state
    tokens = hidden[:, 5:].reshape(2, 16, 16, 384)
    tokens = tokens / tokens.norm(dim=-1, keepdim=True)
    np.testing.assert_allclose(features.permute(0, 2, 3, 1).numpy(), tokens.numpy(), atol=1e-5)


def test_extractor_resizes_non_square_frames(model: DINOv3ViTModel) -> None:
    extractor = DINOv3Features(model, side=64)
    features = extractor.extract(torch.rand(1, 1, 48, 80))
    assert features.shape == (1, 384, 4, 4)
    assert not features.requires_grad


def test_extractor_rejects_rgb_and_bad_side(model: DINOv3ViTModel) -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        DINOv3Features(model, side=100)
    with pytest.raises(ValueError, match="one grayscale channel"):
        DINOv3Features(model, side=64).extract(torch.rand(1, 3, 64, 64))


def test_folder_round_trip_matches_golden(model: DINOv3ViTModel, golden: dict, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path)
    loaded = load_dinov3(tmp_path)
    output = _run(loaded, golden)
    np.testing.assert_allclose(output.last_hidden_state.numpy(), golden["last_hidden_state"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(output.pooler_output.numpy(), golden["pooler_output"], atol=ATOL, rtol=0)


def test_original_pth_round_trip(original_weights: dict[str, torch.Tensor], golden: dict, tmp_path: Path) -> None:
    path = tmp_path / "dinov3_vits16.pth"
    torch.save(original_weights, path)
    output = _run(load_dinov3(path), golden)
    np.testing.assert_allclose(output.pooler_output.numpy(), golden["pooler_output"], atol=ATOL, rtol=0)


def test_unexpected_original_key_is_listed(original_weights: dict[str, torch.Tensor]) -> None:
    weights = dict(original_weights)
    weights["backbone.extra"] = torch.zeros(1)
    with pytest.raises(WeightLayoutError, match=r"backbone\.extra"):
        original_to_transformers(weights)


def test_missing_original_key_is_listed(original_weights: dict[str, torch.Tensor]) -> None:
    weights = dict(original_weights)
    del weights["blocks.3.ls2.gamma"]
    with pytest.raises(StateDictMismatchError, match=r"missing keys: model\.layer\.3\.layer_scale2\.lambda1"):
        model_from_original(weights)


def test_unmasked_k_bias_is_rejected(original_weights: dict[str, torch.Tensor]) -> None:
    weights = dict(original_weights)
    weights["blocks.0.attn.qkv.bias_mask"] = torch.ones(1152)
    with pytest.raises(WeightLayoutError, match="bias_mask"):
        original_to_transformers(weights)
    del weights["blocks.0.attn.qkv.bias_mask"]
    with pytest.raises(WeightLayoutError, match="k third is non-zero"):
        original_to_transformers(weights)


def test_folder_with_missing_weights_is_rejected(model: DINOv3ViTModel, tmp_path: Path) -> None:
    state = {key: value for key, value in model.state_dict().items() if "layer.11.norm2" not in key}
    model.save_pretrained(tmp_path, state_dict=state)
    with pytest.raises(WeightLayoutError, match="norm2"):
        load_dinov3(tmp_path)


def _tiny_original(width: int, depth: int, gated: bool) -> dict[str, torch.Tensor]:
    """Original-layout zeros for a small ViT with 32-wide heads (8 RoPE periods)."""
    hidden = 4 * width
    weights = {
        "cls_token": torch.zeros(1, 1, width),
        "storage_tokens": torch.zeros(1, 2, width),
        "mask_token": torch.zeros(1, width),
        "patch_embed.proj.weight": torch.zeros(width, 3, 16, 16),
        "patch_embed.proj.bias": torch.zeros(width),
        "rope_embed.periods": 100.0 ** (torch.arange(8, dtype=torch.float32) / 8),
        "norm.weight": torch.ones(width),
        "norm.bias": torch.zeros(width),
    }
    mlp = {"w1": (hidden, width), "w2": (hidden, width), "w3": (width, hidden)} if gated else {
        "fc1": (hidden, width),
        "fc2": (width, hidden),
    }
    for index in range(depth):
        block = f"blocks.{index}."
        weights[block + "norm1.weight"] = torch.ones(width)
        weights[block + "norm1.bias"] = torch.zeros(width)
        weights[block + "attn.qkv.weight"] = torch.zeros(3 * width, width)
        weights[block + "attn.qkv.bias"] = torch.zeros(3 * width)
        weights[block + "attn.qkv.bias_mask"] = torch.cat([torch.ones(width), torch.zeros(width), torch.ones(width)])
        weights[block + "attn.proj.weight"] = torch.zeros(width, width)
        weights[block + "attn.proj.bias"] = torch.zeros(width)
        weights[block + "ls1.gamma"] = torch.zeros(width)
        weights[block + "norm2.weight"] = torch.ones(width)
        weights[block + "norm2.bias"] = torch.zeros(width)
        for name, shape in mlp.items():
            weights[block + f"mlp.{name}.weight"] = torch.zeros(shape)
            weights[block + f"mlp.{name}.bias"] = torch.zeros(shape[0])
        weights[block + "ls2.gamma"] = torch.zeros(width)
    return weights


@pytest.mark.parametrize("gated", [False, True])
def test_config_derived_for_other_sizes(gated: bool) -> None:
    model = model_from_original(_tiny_original(width=96, depth=3, gated=gated))
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (96, 3, 3)
    assert (config.intermediate_size, config.num_register_tokens, config.rope_theta) == (384, 2, 100.0)
    assert config.use_gated_mlp is gated
    assert config.hidden_act == ("silu" if gated else "gelu")


def test_truncated_original_pth_names_file(original_weights: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = tmp_path / "dinov3_vits16.pth"
    torch.save(original_weights, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="dinov3_vits16.pth"):
        load_dinov3(path)


def test_non_tensor_original_entry_is_listed(original_weights: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = tmp_path / "dinov3_vits16.pth"
    torch.save({**original_weights, "cls_token": [0.0]}, path)
    with pytest.raises(WeightLayoutError, match="cls_token"):
        load_dinov3(path)
