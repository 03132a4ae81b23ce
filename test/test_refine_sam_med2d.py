"""SAM-Med2D: checkpoint layout, strict loading, conversion and reference outputs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fetuskit.refine.sam_med2d import SamMed2DConfig, build_sam_med2d
from fetuskit.refine.weights import (
    WEIGHTS_FORMAT,
    WeightsError,
    convert_weights,
    load_segmenter,
    load_state_dict_strict,
    read_weights,
    save_weights,
)

FIXTURES = Path(__file__).parent / "fixtures" / "sam_med2d"


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((FIXTURES / "manifest.json").read_text())


def _recipe_state_dict(manifest: dict) -> tuple[dict[str, torch.Tensor], str]:
    # One generator drawn in manifest order, as the fixture recipe defines.
    rng = np.random.default_rng(manifest["recipe"]["seed"])
    digest = hashlib.sha256()
    state = {}
    for entry in manifest["layouts"]["ckpt_model"]["entries"]:
        value = rng.standard_normal(entry["shape"]).astype(np.float32) * np.float32(0.02)
        if entry["rule"] == "one_plus_normal":
            value = np.float32(1.0) + value
        assert entry["rule"] in ("normal", "one_plus_normal"), entry
        digest.update(entry["key"].encode("utf-8"))
        digest.update(value.astype("<f4").tobytes())
        state[entry["key"]] = torch.from_numpy(value)
    return state, digest.hexdigest()


def test_state_dict_layout_matches_manifest(manifest):
    with torch.device("meta"):
        model = build_sam_med2d()
    state = model.state_dict()
    entries = manifest["layouts"]["ckpt_model"]["entries"]
    assert list(state) == [entry["key"] for entry in entries]
    for entry in entries:
        assert list(state[entry["key"]].shape) == entry["shape"], entry["key"]
        assert state[entry["key"]].dtype == torch.float32, entry["key"]


def test_parameter_counts_match_manifest(manifest):
    with torch.device("meta"):
        model = build_sam_med2d()
    counts = manifest["param_counts"]
    assert sum(p.numel() for p in model.parameters()) == counts["total_params"]
    assert sum(p.numel() for p in model.image_encoder.parameters()) == counts["image_encoder_params_incl_adapters"]
    adapters = sum(p.numel() for name, p in model.image_encoder.named_parameters() if ".Adapter." in name)
    assert adapters == counts["adapter_params"]
    assert sum(p.numel() for p in model.prompt_encoder.parameters()) == counts["prompt_encoder_params"]
    assert sum(p.numel() for p in model.mask_decoder.parameters()) == counts["mask_decoder_params"]


def test_reference_outputs_with_recipe_weights(manifest):
    state, sha256 = _recipe_state_dict(manifest)
    assert sha256 == manifest["recipe"]["sha256"]
    with torch.device("meta"):
        model = build_sam_med2d()
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    golden = np.load(FIXTURES / "golden.npz")
    box = torch.from_numpy(golden["box"])

    with torch.inference_mode():
        embedding = model.encode(torch.from_numpy(golden["input"]))
        sparse, _ = model.prompt_encoder(points=None, boxes=box, masks=None)
        low_res, iou = model.decode(embedding, box)
        masks = F.interpolate(low_res, size=(256, 256), mode="bilinear", align_corners=False)

    np.testing.assert_allclose(embedding.numpy(), golden["image_embedding"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(sparse.numpy(), golden["sparse_embeddings"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(low_res.numpy(), golden["low_res_logits"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(iou.numpy(), golden["iou_predictions"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(masks[:, :, 0::4, 0::4].numpy(), golden["masks_s4o0"], rtol=0, atol=1e-6)


def _tiny_state() -> tuple[dict, dict[str, torch.Tensor]]:
    config = SamMed2DConfig.tiny()
    torch.manual_seed(0)
    return dataclasses.asdict(config), build_sam_med2d(config).state_dict()


def test_layer_norm_eps_of_blocks_and_adapters():
    # The reference outputs barely move when these are swapped, so they are pinned here.
    model = build_sam_med2d(SamMed2DConfig.tiny())
    for block in model.image_encoder.blocks:
        assert block.norm1.eps == 1e-6
        assert block.norm2.eps == 1e-6
        assert block.Adapter.norm.eps == 1e-5


def test_strict_load_lists_missing_and_unexpected_keys():
    _, state = _tiny_state()
    state = dict(state)
    del state["mask_decoder.iou_token.weight"]
    state["image_encoder.blocks.0.extra.weight"] = torch.zeros(1)
    model = build_sam_med2d(SamMed2DConfig.tiny())
    with pytest.raises(WeightsError) as raised:
        load_state_dict_strict(model, state, "test-file")
    message = str(raised.value)
    assert "mask_decoder.iou_token.weight" in message
    assert "image_encoder.blocks.0.extra.weight" in message
    assert "test-file" in message


def test_strict_load_reports_shape_mismatch():
    _, state = _tiny_state()
    state = dict(state)
    state["image_encoder.pos_embed"] = torch.zeros(1, 2, 2, 32)
    with pytest.raises(WeightsError, match="image_encoder.pos_embed"):
        load_state_dict_strict(build_sam_med2d(SamMed2DConfig.tiny()), state, "test-file")


def test_convert_weights_drops_optimizer_state(tmp_path):
    model_config, state = _tiny_state()
    published = tmp_path / "published.pth"
    # A published training checkpoint: model entries plus optimizer state and a non-tensor object.
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "args": object}, published)

    with pytest.raises(WeightsError, match="convert-weights"):
        read_weights(published)

    slim = convert_weights(published, tmp_path / "slim.pt", "sam-med2d", model_config)
    payload = torch.load(slim, weights_only=True)
    assert payload["format"] == WEIGHTS_FORMAT
    assert payload["kind"] == "sam-med2d"
    assert payload["extra"]["dropped_entries"] == ["args", "optimizer"]
    assert set(payload["state_dict"]) == set(state)

    loaded = load_segmenter("sam-med2d", slim)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_load_rejects_weights_of_other_backend(tmp_path):
    model_config, state = _tiny_state()
    path = save_weights(tmp_path / "w.pt", "sam-med2d", model_config, state, "test")
    with pytest.raises(WeightsError, match="litemedsam"):
        load_segmenter("litemedsam", path)


def test_convert_weights_rejects_incomplete_checkpoint(tmp_path):
    model_config, state = _tiny_state()
    partial = {key: value for key, value in state.items() if not key.startswith("mask_decoder.")}
    source = tmp_path / "partial.pth"
    torch.save({"model": partial}, source)
    with pytest.raises(WeightsError, match="missing keys"):
        convert_weights(source, tmp_path / "out.pt", "sam-med2d", model_config)
    assert not (tmp_path / "out.pt").exists()


def _write_broken(path: Path, kind: str) -> None:
    """Write a truncated weights file, an empty file or a text file to ``path``."""
    if kind == "truncated":
        model_config, state = _tiny_state()
        save_weights(path, "sam-med2d", model_config, state, "test")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"" if kind == "empty" else b"not a torch file\n")


@pytest.mark.parametrize("kind", ["truncated", "empty", "text"])
def test_read_weights_rejects_broken_file(kind, tmp_path):
    path = tmp_path / f"{kind}.pt"
    _write_broken(path, kind)
    with pytest.raises(WeightsError, match=f"{kind}.pt"):
        read_weights(path)


@pytest.mark.parametrize("kind", ["truncated", "empty", "text"])
def test_convert_weights_rejects_broken_file(kind, tmp_path):
    source = tmp_path / f"{kind}.pth"
    _write_broken(source, kind)
    with pytest.raises(WeightsError, match=f"{kind}.pth"):
        convert_weights(source, tmp_path / "out.pt", "sam-med2d", _tiny_state()[0])
    assert not (tmp_path / "out.pt").exists()


def test_convert_weights_rejects_non_tensor_entry(tmp_path):
    model_config, state = _tiny_state()
    key = next(iter(state))
    state[key] = [0.0, 1.0]
    source = tmp_path / "listed.pth"
    torch.save({"model": state}, source)
    with pytest.raises(WeightsError, match=key):
        convert_weights(source, tmp_path / "out.pt", "sam-med2d", model_config)


def test_slim_file_with_unknown_config_key_rejected(tmp_path):
    model_config, state = _tiny_state()
    path = save_weights(tmp_path / "w.pt", "sam-med2d", {**model_config, "depth_typo": 3}, state, "test")
    with pytest.raises(WeightsError, match="depth_typo"):
        load_segmenter("sam-med2d", path)


def test_convert_weights_command_rejects_truncated_file(tmp_path):
    from typer.testing import CliRunner

    from train.cli import _register_commands, app

    _register_commands()
    source = tmp_path / "truncated.pth"
    _write_broken(source, "truncated")
    result = CliRunner().invoke(app, ["convert-weights", str(source), str(tmp_path / "out.pt")])
    assert result.exit_code == 2, result.output
    assert str(source) in result.output
    assert not (tmp_path / "out.pt").exists()
