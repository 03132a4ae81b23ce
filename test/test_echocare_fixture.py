"""``echocare`` against the published FETUS 2026 baseline: key layouts and golden outputs.

The fixture in test/fixtures/echocare_unimatch contains the baseline's key manifest and the
outputs its own code computed from synthetic recipe weights (see SOURCE.md there). Loading the
same weights into ``echocare`` through the key-mapping functions must reproduce those outputs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fetuskit.models import StateDictMismatchError, build_model
from fetuskit.models.foreign import (
    echocare_baseline_to_fetuskit,
    echocare_encoder_to_swin,
    load_echocare_baseline,
)
from fetuskit.models.lora import lora_parameter_names

FIXTURE = Path(__file__).parent / "fixtures" / "echocare_unimatch"
# Tolerances of the fixture recipe: an independent rebuild matched within 3e-7 on logits and
# 8.3e-6 on hidden maps (float32, CPU).
LOGIT_ATOL = 1e-5
HIDDEN_ATOL = 1e-4
# Sub-sampling steps of the stored hidden maps, one per Swin output.
HIDDEN_STEPS = (32, 16, 8, 4, 2)


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((FIXTURE / "manifest.json").read_text())


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "golden.npz") as data:
        return {key: data[key] for key in data.files}


def draw_recipe_weights(entries: list[dict]) -> tuple[dict[str, torch.Tensor], str]:
    """Draw the recipe weights in manifest order; return (drawn tensors by key, their SHA-256)."""
    rng = np.random.default_rng(2026)
    digest = hashlib.sha256()
    drawn: dict[str, torch.Tensor] = {}
    for entry in entries:
        if entry["rule"] == "computed":
            continue
        value = rng.standard_normal(entry["shape"]).astype(np.float32) * np.float32(0.02)
        if entry["rule"] == "one_plus_normal":
            value = np.float32(1.0) + value
        elif entry["rule"] != "normal":
            raise ValueError(f"unknown recipe rule {entry['rule']!r} for {entry['key']}")
        digest.update(entry["key"].encode("utf-8"))
        digest.update(np.ascontiguousarray(value, dtype="<f4").tobytes())
        drawn[entry["key"]] = torch.from_numpy(value)
    return drawn, digest.hexdigest()


@pytest.fixture(scope="module")
def recipe(manifest) -> tuple[dict[str, torch.Tensor], str]:
    return draw_recipe_weights(manifest["layouts"]["full_model"]["entries"])


@pytest.fixture(scope="module")
def baseline_state(manifest, recipe, golden) -> dict[str, torch.Tensor]:
    """The baseline's ``ckpt["model"]``: recipe draws plus the computed index buffers."""
    drawn, _ = recipe
    index = torch.from_numpy(golden["relative_position_index_w8"])
    state = {}
    for entry in manifest["layouts"]["full_model"]["entries"]:
        state[entry["key"]] = index.clone() if entry["rule"] == "computed" else drawn[entry["key"]]
    return state


@pytest.fixture(scope="module")
def loaded_model(baseline_state):
    torch.set_num_threads(2)
    model = build_model("echocare").eval()
    load_echocare_baseline(model, baseline_state)
    return model


def assert_hidden_maps_match(hidden: list[torch.Tensor], golden: dict, prefix: str) -> None:
    """Compare the 5 Swin outputs, sub-sampled as stored, with ``golden[f"{prefix}{level}_grid4"]``."""
    for level, step in enumerate(HIDDEN_STEPS):
        np.testing.assert_allclose(
            hidden[level][:, :, ::step, ::step].numpy(),
            golden[f"{prefix}{level}_grid4"],
            rtol=0,
            atol=HIDDEN_ATOL,
            err_msg=f"{prefix} level {level}",
        )


def _without_view_head(state: dict) -> dict:
    return {key: value for key, value in state.items() if not key.startswith("view_head.")}


def test_recipe_sha256_matches(manifest, recipe):
    _, sha256 = recipe
    assert sha256 == manifest["recipe"]["sha256"]


def test_full_model_layout_matches_state_dict(manifest):
    entries = manifest["layouts"]["full_model"]["entries"]
    assert len(entries) == 499
    theirs = {entry["key"]: torch.empty(entry["shape"]) for entry in entries}
    mapped = echocare_baseline_to_fetuskit(theirs)
    ours = _without_view_head(build_model("echocare").state_dict())
    assert list(mapped) == list(ours)
    assert {key: list(value.shape) for key, value in mapped.items()} == {
        key: list(value.shape) for key, value in ours.items()
    }


def test_encoder_layout_matches_swin(manifest):
    entries = manifest["layouts"]["encoder_checkpoint"]["entries"]
    assert len(entries) == 359
    theirs = {entry["key"]: torch.empty(entry["shape"]) for entry in entries}
    mapped = echocare_encoder_to_swin(theirs)
    swin = build_model("echocare").swin
    lora = set(lora_parameter_names(swin))
    ours = {key: value for key, value in swin.state_dict().items() if key not in lora}
    assert "mask_token" not in mapped
    assert list(mapped) == list(ours)
    assert {key: list(value.shape) for key, value in mapped.items()} == {
        key: list(value.shape) for key, value in ours.items()
    }


def test_parameter_counts_match_baseline(manifest):
    model = build_model("echocare")
    counts = manifest["param_counts"]
    total = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("view_head."))
    trainable = sum(
        p.numel() for name, p in model.named_parameters() if p.requires_grad and not name.startswith("view_head.")
    )
    assert total == counts["total_params"] == 174_552_913
    assert trainable == counts["trainable_params"] == 54_331_225


def test_trainable_parameters_follow_baseline(manifest):
    model = build_model("echocare")
    mapped_flags = echocare_baseline_to_fetuskit(
        {e["key"]: e["trainable"] for e in manifest["layouts"]["full_model"]["entries"] if e["kind"] == "parameter"}
    )
    ours = {name: p.requires_grad for name, p in model.named_parameters() if not name.startswith("view_head.")}
    assert ours == mapped_flags


def test_relative_position_index_matches(loaded_model, golden):
    expected = torch.from_numpy(golden["relative_position_index_w8"])
    index = loaded_model.swin.layers1[0].blocks[0].attn.relative_position_index
    assert torch.equal(index, expected)


def test_baseline_outputs_match_golden(loaded_model, golden):
    x = torch.from_numpy(golden["input"])
    with torch.no_grad():
        output = loaded_model(x)
        hidden = loaded_model.encode(x)
    seg = output.seg.numpy()
    np.testing.assert_allclose(seg[:, :, 0::4, 0::4], golden["seg_logits_s4o0"], rtol=0, atol=LOGIT_ATOL)
    np.testing.assert_allclose(seg[:, :, 3::4, 3::4], golden["seg_logits_s4o3"], rtol=0, atol=LOGIT_ATOL)
    mean_hw = output.seg.double().mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(mean_hw, golden["seg_logits_mean_hw"], rtol=0, atol=LOGIT_ATOL)
    np.testing.assert_allclose(output.chd.numpy(), golden["cls_logits"], rtol=0, atol=LOGIT_ATOL)
    assert_hidden_maps_match(hidden, golden, "swin_hidden")


def test_encoder_checkpoint_matches_golden(manifest, baseline_state, golden, tmp_path):
    entries = manifest["layouts"]["encoder_checkpoint"]["entries"]
    encoder_state = {"mask_token": torch.zeros(1, 1, 128)}
    for entry in entries:
        if entry["rule"] == "from_full_model":
            encoder_state[entry["key"]] = baseline_state[entry["full_model_key"]]
        elif entry["rule"] == "computed":
            encoder_state[entry["key"]] = torch.from_numpy(golden["relative_position_index_w8"])
    path = tmp_path / "echocare_encoder.pth"
    torch.save({"state_dict": encoder_state}, path)

    torch.set_num_threads(2)
    model = build_model("echocare", encoder_weights=str(path)).eval()
    with torch.no_grad():
        hidden = model.encode(torch.from_numpy(golden["input"]))
    assert_hidden_maps_match(hidden, golden, "encoder_only_swin_hidden")
    b_weights = [p for name, p in model.swin.named_parameters() if ".linear_b_" in name]
    assert all(torch.count_nonzero(weight) == 0 for weight in b_weights)


def test_baseline_missing_key_is_listed(baseline_state):
    model = build_model("echocare")
    broken = dict(baseline_state)
    del broken["cls_decoder.2.bias"]
    broken["seg_net.extra.weight"] = torch.zeros(1)
    with pytest.raises(StateDictMismatchError) as caught:
        load_echocare_baseline(model, broken)
    assert caught.value.missing == ["chd_head.2.bias"]
    assert caught.value.unexpected == ["unetr.extra.weight"]
    assert "chd_head.2.bias" in str(caught.value)


def test_baseline_unknown_prefix_rejected():
    with pytest.raises(ValueError, match="module.in_adapter.weight"):
        echocare_baseline_to_fetuskit({"module.in_adapter.weight": torch.zeros(3, 1, 1, 1)})
