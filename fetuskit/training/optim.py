"""AdamW with parameter groups and the warm-up plus poly learning-rate schedule."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from fetuskit.training.config import OptimConfig, ScheduleConfig

logger = logging.getLogger(__name__)


def parameter_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], config: OptimConfig) -> list[dict]:
    """Split parameters into AdamW groups by name.

    A parameter whose name contains a key of ``config.group_lr`` joins that key's group (first
    matching key in the mapping's order); the rest use ``config.lr``. Biases and
    one-dimensional weights (normalisation scales) get no weight decay. Empty groups are left out.
    """
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in named_parameters:
        key = next((pattern for pattern in config.group_lr if pattern in name), "")
        decay = param.ndim > 1
        groups.setdefault((key, decay), []).append(param)
    result = []
    for (key, decay), params in groups.items():
        lr = config.group_lr[key] if key else config.lr
        result.append(
            {
                "params": params,
                "lr": lr,
                "initial_lr": lr,
                "weight_decay": config.weight_decay if decay else 0.0,
                "name": f"{key.strip('.') or 'rest'}{'' if decay else '_no_decay'}",
            }
        )
        logger.info("parameter group %s: %d tensors, lr %.3g", result[-1]["name"], len(params), lr)
    return result


def build_optimizer(named_parameters: Iterable[tuple[str, nn.Parameter]], config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the given trainable parameters; raises ValueError if there are none."""
    groups = parameter_groups(named_parameters, config)
    if not groups:
        raise ValueError("no trainable parameters: the task froze every parameter of the model")
    return torch.optim.AdamW(groups, betas=(config.beta1, config.beta2))


def lr_factor(step: int, config: ScheduleConfig) -> float:
    """Multiplier of each group's learning rate at 0-based optimiser step ``step``.

    Linear warm-up (step + 1) / warmup_iterations, then (1 - t) ** poly_power with t the share
    of the post-warm-up steps already taken; 0 at and after the last step.
    """
    if step < config.warmup_iterations:
        return (step + 1) / config.warmup_iterations
    decay_steps = max(1, config.iterations - config.warmup_iterations)
    progress = min(1.0, (step - config.warmup_iterations) / decay_steps)
    return (1.0 - progress) ** config.poly_power


def build_scheduler(optimizer: torch.optim.Optimizer, config: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying :func:`lr_factor`; call ``step()`` once after each optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
