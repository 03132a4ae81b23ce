"""Low-rank adapters (LoRA) on the query and value projections of a fused qkv linear layer."""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRAQKV(nn.Module):
    """A frozen fused qkv ``nn.Linear`` plus trainable low-rank updates of its q and v thirds.

    The wrapped layer maps (..., dim) to (..., 3 * dim) laid out as [q | k | v]. The output is
    ``qkv(x) + [scale * B_q A_q x | 0 | scale * B_v A_v x]`` with ``scale = alpha / rank``.
    Submodule names (``qkv``, ``linear_a_q``, ``linear_b_q``, ``linear_a_v``, ``linear_b_v``)
    follow the FETUS 2026 baseline checkpoints so that they load key for key.
    """

    def __init__(self, qkv: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if qkv.out_features != 3 * qkv.in_features:
            raise ValueError(
                f"LoRAQKV needs a fused qkv layer with out_features = 3 * in_features, "
                f"got {qkv.in_features} -> {qkv.out_features}"
            )
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.dim = qkv.in_features
        self.scale = alpha / rank
        self.qkv = qkv
        self.linear_a_q = nn.Linear(self.dim, rank, bias=False)
        self.linear_b_q = nn.Linear(rank, self.dim, bias=False)
        self.linear_a_v = nn.Linear(self.dim, rank, bias=False)
        self.linear_b_v = nn.Linear(rank, self.dim, bias=False)
        self.reset_lora()

    def reset_lora(self) -> None:
        """Initialise A with Kaiming-uniform and B with zeros, so the adapters add exactly 0."""
        for a_layer in (self.linear_a_q, self.linear_a_v):
            nn.init.kaiming_uniform_(a_layer.weight, a=math.sqrt(5))
        for b_layer in (self.linear_b_q, self.linear_b_v):
            nn.init.zeros_(b_layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.qkv(x)
        query, key, value = fused.split(self.dim, dim=-1)
        query = query + self.scale * self.linear_b_q(self.linear_a_q(x))
        value = value + self.scale * self.linear_b_v(self.linear_a_v(x))
        return torch.cat((query, key, value), dim=-1)


def lora_parameter_names(module: nn.Module) -> list[str]:
    """Return the names of the LoRA parameters inside ``module``, relative to it."""
    return [
        name
        for name, _ in module.named_parameters()
        if name.rsplit(".", 2)[-2].startswith(("linear_a_", "linear_b_"))
    ]
