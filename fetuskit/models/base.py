"""The output contract every registered network follows."""

from __future__ import annotations

from typing import NamedTuple

import torch


class ModelOutput(NamedTuple):
    """Outputs of one forward pass, all raw logits.

    Attributes:
        seg: (N, 15, H, W) segmentation logits at the input's height and width.
        chd: (N, 7) CHD logits, one independent binary logit per label.
        view: (N, 4) view logits over the 0-based view indices.
    """

    seg: torch.Tensor
    chd: torch.Tensor
    view: torch.Tensor
