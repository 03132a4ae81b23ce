"""Frozen DINOv3 ViT patch features through transformers' ``DINOv3ViTModel``.

Weights come from a local Hugging Face folder (``config.json`` + ``model.safetensors``) or
from Meta's original ``.pth`` state_dict. The original layout goes through one key-mapping
function, ``original_to_transformers``, and every load is strict.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from fetuskit.features.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_images,
    check_side,
    normalise_features,
    prepare_images,
    state_fingerprint,
)
from fetuskit.models.state import load_state_dict_strict, load_weights_only

logger = logging.getLogger(__name__)

# Not stored in the checkpoint. The ViT-S/16 reference uses LayerNorm eps 1e-5.
# NOTE: the other sizes are assumed to use the same eps; no real checkpoint was checked here.
LAYER_NORM_EPS = 1e-5

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")

# Original block sub-key -> transformers sub-key, for tensors that are copied unchanged.
_BLOCK_RENAMES = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.proj.weight": "attention.o_proj.weight",
    "attn.proj.bias": "attention.o_proj.bias",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.up_proj.weight",
    "mlp.fc1.bias": "mlp.up_proj.bias",
    "mlp.fc2.weight": "mlp.down_proj.weight",
    "mlp.fc2.bias": "mlp.down_proj.bias",
    # SwiGLU blocks of the "plus" and 7B models: out = w3(silu(w1(x)) * w2(x)).
    # NOTE: only the key and shape coverage of this branch is tested, not outputs of real weights.
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w1.bias": "mlp.gate_proj.bias",
    "mlp.w2.weight": "mlp.up_proj.weight",
    "mlp.w2.bias": "mlp.up_proj.bias",
    "mlp.w3.weight": "mlp.down_proj.weight",
    "mlp.w3.bias": "mlp.down_proj.bias",
    "ls2.gamma": "layer_scale2.lambda1",
}

_TOP_RENAMES = {
    "cls_token": "embeddings.cls_token",
    "storage_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}


class WeightLayoutError(ValueError):
    """A checkpoint whose keys, shapes or values do not fit the expected weight layout."""


def _format_keys(keys: list[str], limit: int = 20) -> str:
    listed = ", ".join(keys[:limit])
    return listed if len(keys) <= limit else f"{listed} ... ({len(keys)} in all)"


def _split_qkv_bias(prefix: str, bias: torch.Tensor, bias_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a fused qkv bias into the q and v biases after checking the k third is unused.

    transformers' k_proj has no bias, so the k third may be dropped only when the original
    model masks it to zero (``bias_mask``) or when it is zero already.
    """
    dim = bias.shape[0] // 3
    if bias_mask is not None:
        expected = torch.ones_like(bias_mask)
        expected[dim : 2 * dim] = 0.0
        if not torch.equal(bias_mask, expected):
            raise WeightLayoutError(
                f"invalid {prefix}qkv.bias_mask: expected 1 on the q and v thirds and 0 on the k third, "
                "because transformers' k_proj has no bias to hold an unmasked k bias"
            )
    elif bool(bias[dim : 2 * dim].any()):
        raise WeightLayoutError(
            f"invalid {prefix}qkv.bias: the k third is non-zero and no bias_mask masks it, "
            "but transformers' k_proj has no bias, so these weights cannot be loaded unchanged"
        )
    return bias[:dim], bias[2 * dim :]


def _map_block(index: int, entries: dict[str, torch.Tensor], unknown: list[str]) -> dict[str, torch.Tensor]:
    source = f"blocks.{index}."
    target = f"model.layer.{index}."
    mapped: dict[str, torch.Tensor] = {}
    bias_mask = entries.pop("attn.qkv.bias_mask", None)

    qkv_weight = entries.pop("attn.qkv.weight", None)
    if qkv_weight is not None:
        q_weight, k_weight, v_weight = qkv_weight.chunk(3, dim=0)
        mapped[target + "attention.q_proj.weight"] = q_weight
        mapped[target + "attention.k_proj.weight"] = k_weight
        mapped[target + "attention.v_proj.weight"] = v_weight

    qkv_bias = entries.pop("attn.qkv.bias", None)
    if qkv_bias is not None:
        q_bias, v_bias = _split_qkv_bias(source + "attn.", qkv_bias, bias_mask)
        mapped[target + "attention.q_proj.bias"] = q_bias
        mapped[target + "attention.v_proj.bias"] = v_bias

    for name, tensor in entries.items():
        if name in _BLOCK_RENAMES:
            mapped[target + _BLOCK_RENAMES[name]] = tensor
        else:
            unknown.append(source + name)
    return mapped


def original_to_transformers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map Meta's original DINOv3 ViT state_dict to transformers 5.x ``DINOv3ViTModel`` keys.

    The output keys are the in-memory names of transformers 5.x (the encoder sits under
    ``model.layer.N``). The mapping splits ``qkv`` into q/k/v rows [0:D], [D:2D], [2D:3D].
    It keeps the q and v biases and drops the masked k bias. It renames LayerScale ``gamma``
    to ``lambda1``, ``fc1/fc2`` to ``up_proj/down_proj`` (SwiGLU ``w1/w2/w3`` to
    ``gate_proj/up_proj/down_proj``) and ``storage_tokens`` to ``register_tokens``. It
    reshapes ``mask_token`` from (1, D) to (1, 1, D). The constant buffers
    ``rope_embed.periods`` and ``qkv.bias_mask`` are dropped because transformers computes
    them itself.

    Raises:
        WeightLayoutError: on keys this layout does not have (all listed), or when a k bias
            that is not masked to zero would be dropped.
    """
    mapped: dict[str, torch.Tensor] = {}
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []

    for key, tensor in state_dict.items():
        block = _BLOCK_KEY.match(key)
        if block is not None:
            blocks.setdefault(int(block.group(1)), {})[block.group(2)] = tensor
        elif key in _TOP_RENAMES:
            mapped[_TOP_RENAMES[key]] = tensor
        elif key == "mask_token":
            mapped["embeddings.mask_token"] = tensor.reshape(1, 1, tensor.shape[-1])
        elif key != "rope_embed.periods":
            unknown.append(key)

    for index in sorted(blocks):
        mapped.update(_map_block(index, blocks[index], unknown))

    if unknown:
        raise WeightLayoutError(
            f"unexpected keys for the original DINOv3 ViT layout: {_format_keys(unknown)}; "
            "pass a flat state_dict without a prefix such as 'backbone.' or 'teacher.'"
        )
    return mapped


def _rope_settings(periods: torch.Tensor) -> tuple[int, float]:
    """Derive (head_dim, rope base) from the stored periods base ** (arange(n) / n)."""
    count = periods.numel()
    head_dim = 4 * count
    values = periods.double()
    base = float(values[-1]) ** (count / (count - 1)) if count > 1 else 100.0
    base = round(base, 3)
    expected = base ** (torch.arange(count, dtype=torch.float64) / count)
    if not torch.allclose(values, expected, rtol=1e-5, atol=0.0):
        raise WeightLayoutError(
            f"rope_embed.periods {values.tolist()} are not base ** (arange(n) / n) for any base; "
            "the checkpoint uses a RoPE that DINOv3ViTModel cannot reproduce"
        )
    return head_dim, base


def config_from_original(state_dict: Mapping[str, torch.Tensor]) -> DINOv3ViTConfig:
    """Derive the ``DINOv3ViTConfig`` of an original DINOv3 ViT checkpoint from its tensor shapes.

    Width, depth, patch size, register count and MLP width and type come from the shapes.
    The head dimension is 4 x the length of ``rope_embed.periods`` and the RoPE base follows
    from their values, so the head count needs no table. LayerNorm eps is not stored and is
    set to 1e-5, the value of every published DINOv3 ViT.

    Raises:
        WeightLayoutError: when a tensor the derivation needs is missing, listing all of them.
    """
    required = ["cls_token", "patch_embed.proj.weight", "rope_embed.periods", "blocks.0.attn.qkv.weight"]
    missing = [key for key in required if key not in state_dict]
    gated = "blocks.0.mlp.w1.weight" in state_dict
    mlp_in = "blocks.0.mlp.w1.weight" if gated else "blocks.0.mlp.fc1.weight"
    if mlp_in not in state_dict:
        missing.append(mlp_in)
    if missing:
        raise WeightLayoutError(
            f"cannot derive a DINOv3 ViT config: missing keys {_format_keys(missing)}; "
            "expected Meta's original flat state_dict"
        )

    hidden_size = state_dict["cls_token"].shape[-1]
    patch_weight = state_dict["patch_embed.proj.weight"]
    if patch_weight.shape[-1] != patch_weight.shape[-2]:
        raise WeightLayoutError(f"patch_embed.proj.weight has non-square patches {tuple(patch_weight.shape)}")
    head_dim, rope_theta = _rope_settings(state_dict["rope_embed.periods"])
    if hidden_size % head_dim != 0:
        raise WeightLayoutError(f"embed width {hidden_size} is not a multiple of the head dimension {head_dim}")
    depth = 1 + max(int(match.group(1)) for key in state_dict if (match := _BLOCK_KEY.match(key)))
    registers = state_dict["storage_tokens"].shape[1] if "storage_tokens" in state_dict else 0

    return DINOv3ViTConfig(
        patch_size=patch_weight.shape[-1],
        hidden_size=hidden_size,
        intermediate_size=state_dict[mlp_in].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=hidden_size // head_dim,
        hidden_act="silu" if gated else "gelu",
        use_gated_mlp=gated,
        layer_norm_eps=LAYER_NORM_EPS,
        rope_theta=rope_theta,
        num_channels=patch_weight.shape[1],
        query_bias="blocks.0.attn.qkv.bias" in state_dict,
        key_bias=False,
        value_bias="blocks.0.attn.qkv.bias" in state_dict,
        proj_bias="blocks.0.attn.proj.bias" in state_dict,
        mlp_bias=mlp_in.replace(".weight", ".bias") in state_dict,
        num_register_tokens=registers,
    )


def model_from_original(state_dict: Mapping[str, torch.Tensor], source: str = "state_dict") -> DINOv3ViTModel:
    """Build a ``DINOv3ViTModel`` from an original-layout state_dict, loaded strictly, in eval mode."""
    config = config_from_original(state_dict)
    model = DINOv3ViTModel(config)
    load_state_dict_strict(model, original_to_transformers(state_dict), source)
    return model.eval()


def load_original_checkpoint(path: Path) -> DINOv3ViTModel:
    """Load Meta's original ``.pth`` DINOv3 ViT checkpoint (a flat state_dict) strictly.

    Raises:
        UnreadableWeightsError: (a ValueError) naming ``path`` when torch cannot read the file.
        WeightLayoutError: when the file contains no flat dict of tensors or its keys do not match.
    """
    state_dict = load_weights_only(path)
    if not isinstance(state_dict, Mapping):
        raise WeightLayoutError(
            f"{path} contains a {type(state_dict).__name__}, expected a flat state_dict; pass the original DINOv3 .pth file"
        )
    not_tensors = [str(key) for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise WeightLayoutError(
            f"{path} has entries that are not tensors: {_format_keys(not_tensors)}; expected a flat state_dict"
        )
    return model_from_original(state_dict, source=str(path))


def load_pretrained_folder(path: Path) -> DINOv3ViTModel:
    """Load a local Hugging Face folder (config.json + model.safetensors) strictly, never from the hub."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path / 'config.json'} not found; a DINOv3 folder needs config.json and model.safetensors "
            "as written by save_pretrained"
        )
    model, info = DINOv3ViTModel.from_pretrained(path, local_files_only=True, output_loading_info=True)
    problems = {name: list(info.get(name, [])) for name in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {name: keys for name, keys in problems.items() if keys}
    if problems:
        details = "; ".join(f"{name}: {_format_keys([str(key) for key in keys])}" for name, keys in problems.items())
        raise WeightLayoutError(f"weights in {path} do not fit DINOv3ViTModel: {details}")
    return model.eval()


def load_dinov3(weights: Path) -> DINOv3ViTModel:
    """Load DINOv3 weights from a Hugging Face folder or an original ``.pth``/``.pt`` file."""
    weights = Path(weights)
    if weights.is_dir():
        return load_pretrained_folder(weights)
    if weights.is_file() and weights.suffix in (".pth", ".pt"):
        return load_original_checkpoint(weights)
    raise FileNotFoundError(
        f"DINOv3 weights {weights} not found; pass a Hugging Face folder or Meta's original .pth file"
    )


def patch_tokens_to_grid(last_hidden_state: torch.Tensor, num_register_tokens: int, grid: tuple[int, int]) -> torch.Tensor:
    """Drop the CLS and register tokens and lay the patch tokens out on their grid.

    Args:
        last_hidden_state: (N, 1 + R + h * w, D), token order CLS, R registers, then patches
            row-major (patch p sits at row p // w, column p % w).
        num_register_tokens: R.
        grid: (h, w) patch rows and columns.

    Returns:
        (N, D, h, w) patch tokens, unnormalised.
    """
    rows, columns = grid
    prefix = 1 + num_register_tokens
    count, tokens, dim = last_hidden_state.shape
    if tokens != prefix + rows * columns:
        raise ValueError(
            f"expected {prefix} prefix tokens + {rows}x{columns} patches = {prefix + rows * columns} tokens, got {tokens}"
        )
    patches = last_hidden_state[:, prefix:]
    return patches.reshape(count, rows, columns, dim).permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class DINOv3FeaturesConfig:
    """Settings of the DINOv3 patch-feature extractor.

    Attributes:
        weights: Hugging Face folder or original ``.pth`` file.
        side: side in pixels of the square input; a multiple of the patch size (16).
        device: torch device the model runs on.
    """

    weights: str
    side: int = 448
    device: str = "cpu"


class DINOv3Features:
    """Frozen DINOv3 ViT that returns L2-normalised patch features for grayscale frames."""

    name = "dinov3"

    def __init__(self, model: DINOv3ViTModel, side: int = 448, device: str | torch.device = "cpu") -> None:
        patch = model.config.patch_size
        if not isinstance(patch, int):
            raise ValueError(f"only square patches are supported, got patch_size {patch}")
        check_side(side, patch)
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.side = side
        self.stride = patch
        self.dim = model.config.hidden_size
        self.num_register_tokens = model.config.num_register_tokens
        self._identity: str | None = None

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Compute patch features of grayscale frames.

        Args:
            images: (N, 1, H, W) float in [0, 1], any H and W. Each frame is resized
                bilinearly to (side, side) without cropping, repeated to RGB and normalised
                with the ImageNet mean and std.

        Returns:
            (N, D, side / 16, side / 16) float32 on ``device``, unit L2 norm over D. The tensor
            is an ordinary tensor (not an inference tensor), so it may enter autograd graphs
            as a constant.
        """
        check_images(images)
        pixels = prepare_images(images.to(self.device), self.side, IMAGENET_MEAN, IMAGENET_STD)
        grid = (self.side // self.stride, self.side // self.stride)
        with torch.inference_mode():
            hidden = self.model(pixel_values=pixels).last_hidden_state
            features = normalise_features(patch_tokens_to_grid(hidden, self.num_register_tokens, grid))
        return features.clone()

    def cache_identity(self) -> str:
        """Return the extractor name, input side and a digest of the weights."""
        if self._identity is None:
            self._identity = f"{self.name}:side={self.side}:weights={state_fingerprint(self.model)}"
        return self._identity


def build_dinov3_features(weights: str | Path, side: int = 448, device: str = "cpu") -> DINOv3Features:
    """Load DINOv3 weights (folder or ``.pth``) and wrap them as a feature extractor."""
    config = DINOv3FeaturesConfig(weights=str(weights), side=side, device=device)
    model = load_dinov3(Path(config.weights))
    logger.info("Loaded DINOv3 ViT (width %d, depth %d) from %s", model.config.hidden_size,
                model.config.num_hidden_layers, config.weights)
    return DINOv3Features(model, side=config.side, device=config.device)
