"""CHD heads that read more than the pooled bottleneck: several encoder levels and structure areas.

A model config chooses its CHD head with ``chd_head``:

- ``"pooled"``: the MLP on the pooled vector that the view head also reads (the default).
- ``"multiscale"``: :class:`MultiscaleCHDHead`, attention pooling over the deepest
  ``chd_head_levels`` encoder maps, concatenated, optionally with the predicted structure
  areas, then an MLP.

Both live in the ``chd_head`` submodule, so checkpoints record the choice in the model config,
``load_checkpoint`` rebuilds the same head and inference needs no change.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fetuskit.labels import CLASS_MASK, NUM_CHD, NUM_CLASSES

CHD_HEAD_KINDS: tuple[str, ...] = ("pooled", "multiscale")

# Logit given to classes the predicted view does not allow before the area softmax; finite, so
# the softmax gives them exactly 0 without NaN.
_DISALLOWED_LOGIT = -1.0e9


class AttentionPool(nn.Module):
    """Pool an (N, C, H, W) map to (N, C) with a softmax over positions of a 1x1-conv score."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.score = nn.Conv2d(channels, 1, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        weights = self.score(features).flatten(2).softmax(dim=-1)
        return (features.flatten(2) * weights).sum(dim=-1)


def structure_areas(seg_logits: torch.Tensor, view_logits: torch.Tensor) -> torch.Tensor:
    """Return the (N, 15) share of the image each class covers, from softmax probabilities.

    Classes that the view predicted by ``view_logits`` (argmax, 0-based index) does not allow
    get probability 0. Both inputs are detached, so the CHD loss never moves the segmentation
    or the view head. Values lie in [0, 1] and sum to 1 per image.
    """
    allowed = torch.tensor(CLASS_MASK, device=seg_logits.device)[view_logits.detach().argmax(dim=1)]
    masked = seg_logits.detach().float().masked_fill(~allowed[:, :, None, None], _DISALLOWED_LOGIT)
    return masked.softmax(dim=1).mean(dim=(2, 3))


class MultiscaleCHDHead(nn.Module):
    """CHD logits from attention-pooled encoder levels and, optionally, structure areas.

    Args:
        level_channels: channels of every encoder level the model's ``encode`` returns, lowest first.
        levels: how many of the deepest levels to read (1 to ``len(level_channels)``).
        hidden: hidden width of the MLP.
        use_areas: append the (N, 15) :func:`structure_areas` to the pooled vector.

    ``forward(features, seg_logits, view_logits)`` takes the encoder maps (each (N, C_i, H_i, W_i)),
    the (N, 15, H, W) segmentation logits and the (N, 4) view logits, and returns (N, 7) logits.
    """

    # Tells ``Network.predict_heads`` to pass feature maps and logits instead of the pooled vector.
    reads_features = True

    def __init__(self, level_channels: Sequence[int], levels: int, hidden: int, use_areas: bool) -> None:
        super().__init__()
        if not 1 <= levels <= len(level_channels):
            raise ValueError(
                f"chd_head_levels must be 1..{len(level_channels)} for this encoder, got {levels}"
            )
        self.levels = levels
        self.use_areas = use_areas
        channels = list(level_channels)[-levels:]
        self.pools = nn.ModuleList(AttentionPool(count) for count in channels)
        width = sum(channels) + (NUM_CLASSES if use_areas else 0)
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, NUM_CHD))

    def forward(
        self, features: Sequence[torch.Tensor], seg_logits: torch.Tensor, view_logits: torch.Tensor
    ) -> torch.Tensor:
        pooled = [pool(level) for pool, level in zip(self.pools, list(features)[-self.levels:])]
        if self.use_areas:
            pooled.append(structure_areas(seg_logits, view_logits).to(pooled[0].dtype))
        return self.mlp(self.norm(torch.cat(pooled, dim=1)))


def build_chd_head(
    kind: str, *, pooled_features: int, level_channels: Sequence[int], hidden: int, levels: int, use_areas: bool
) -> nn.Module:
    """Build the CHD head ``kind`` (one of :data:`CHD_HEAD_KINDS`) for a network.

    ``"pooled"`` returns Linear -> ReLU -> Linear on the ``pooled_features`` vector, with the
    same state-dict keys as before this option existed, so older checkpoints still load.

    Raises:
        ValueError: for an unknown ``kind``, an invalid ``levels`` or areas on the pooled head.
    """
    from fetuskit.models.heads import mlp_head

    if kind == "pooled":
        if use_areas:
            raise ValueError("chd_head_areas needs chd_head='multiscale'; the pooled head reads one vector only")
        return mlp_head(pooled_features, hidden, NUM_CHD)
    if kind == "multiscale":
        return MultiscaleCHDHead(level_channels, levels, hidden, use_areas)
    raise ValueError(f"unknown chd_head {kind!r}; choose one of {CHD_HEAD_KINDS}")
