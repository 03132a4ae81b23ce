"""The CHD and view heads, the base class of every network and helpers that treat heads apart.

Every network has two submodules with fixed names, ``chd_head`` and ``view_head``, that read a
pooled feature vector. Everything else in the network counts as segmentation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fetuskit.labels import NUM_CHD, NUM_VIEWS
from fetuskit.models.base import ModelOutput

logger = logging.getLogger(__name__)

HEAD_NAMES: tuple[str, ...] = ("chd_head", "view_head")


def mlp_head(in_features: int, hidden_features: int, out_features: int) -> nn.Sequential:
    """Return Linear -> ReLU -> Linear; its keys are ``0.weight``, ``0.bias``, ``2.weight``, ``2.bias``."""
    return nn.Sequential(
        nn.Linear(in_features, hidden_features),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_features, out_features),
    )


class Network(nn.Module):
    """Base class of the registered networks.

    Subclasses set ``self.config`` (a dataclass with an ``input_size`` field), build ``chd_head``
    and ``view_head`` on the vector that :meth:`heads_input` returns, and implement
    :meth:`encode` and :meth:`forward`.
    """

    name: str
    config: Any

    @property
    def input_size(self) -> int:
        """Side in pixels of the square input the network is trained and run at."""
        return int(self.config.input_size)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the encoder feature maps, each (N, C_i, H_i, W_i), from lowest to highest level."""
        raise NotImplementedError

    def heads_input(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Return the (N, F) vector that ``chd_head`` and ``view_head`` read, from :meth:`encode` output."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> ModelOutput:
        raise NotImplementedError

    def predict_heads(
        self,
        pooled: torch.Tensor,
        features: list[torch.Tensor] | None = None,
        seg: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (chd logits (N, 7), view logits (N, 4)) for a pooled (N, F) feature vector.

        A CHD head with ``reads_features`` (``fetuskit.models.chd_heads.MultiscaleCHDHead``)
        reads the :meth:`encode` maps, the (N, 15, H, W) segmentation logits and the view
        logits instead of ``pooled``, so ``features`` and ``seg`` are required for it.
        """
        view = self.view_head(pooled)
        if not getattr(self.chd_head, "reads_features", False):
            return self.chd_head(pooled), view
        if features is None or seg is None:
            raise ValueError(f"the {type(self.chd_head).__name__} CHD head needs the encoder features and seg logits")
        return self.chd_head(features, seg, view), view


def check_image_batch(x: torch.Tensor, multiple: int, model_name: str) -> None:
    """Raise ValueError unless ``x`` is a float (N, 1, H, W) batch with H and W multiples of ``multiple``."""
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(
            f"{model_name} expects images of shape (N, 1, H, W), got {tuple(x.shape)}; "
            "convert with fetuskit.transforms.image_to_tensor"
        )
    if not torch.is_floating_point(x):
        raise ValueError(f"{model_name} expects a float tensor in [0, 1], got dtype {x.dtype}")
    height, width = x.shape[-2:]
    if height % multiple or width % multiple:
        raise ValueError(
            f"{model_name} needs height and width divisible by {multiple}, got {height}x{width}; "
            "resize to the model's input_size first"
        )


def check_heads_output(chd: torch.Tensor, view: torch.Tensor) -> None:
    """Raise RuntimeError if a replaced head returns the wrong number of logits."""
    if chd.shape[-1] != NUM_CHD or view.shape[-1] != NUM_VIEWS:
        raise RuntimeError(
            f"heads returned {chd.shape[-1]} CHD and {view.shape[-1]} view logits, "
            f"expected {NUM_CHD} and {NUM_VIEWS}; check a replaced chd_head or view_head"
        )


def segmentation_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Yield every parameter of ``model`` outside ``chd_head`` and ``view_head``, frozen ones included."""
    for name, parameter in model.named_parameters():
        if name.split(".", 1)[0] not in HEAD_NAMES:
            yield parameter


def reset_head(model: nn.Module, head_name: str) -> None:
    """Re-initialise every layer of the head ``head_name`` (``chd_head`` or ``view_head``) and log it.

    Raises:
        ValueError: for any other name, because only the heads may be re-initialised.
    """
    if head_name not in HEAD_NAMES:
        raise ValueError(f"only {HEAD_NAMES} may be re-initialised, got {head_name!r}")
    head = getattr(model, head_name)
    count = 0
    for module in head.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
            count += 1
    parameters = sum(parameter.numel() for parameter in head.parameters())
    logger.info("Re-initialised %s of %s: %d layers, %d parameters", head_name, model.name, count, parameters)
