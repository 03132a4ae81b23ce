"""Resizing shared by training, validation and inference.

Images are resized bilinearly and label maps with nearest neighbour, everywhere. Training,
the validation path and ``process.py`` all call these functions, so a network gets its input
prepared the same way at inference as in training.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def image_to_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """Resize a canonical grayscale image to the network's input.

    Args:
        image: (H, W) float32 in [0, 1], the form ``fetuskit.io`` returns.
        size: side of the square network input, in pixels.

    Returns:
        (1, size, size) float32 tensor in [0, 1], bilinear, ``align_corners=False``.
    """
    if image.ndim != 2:
        raise ValueError(f"expected a (H, W) grayscale image, got shape {image.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    if tensor.shape[-2:] != (size, size):
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)
    return tensor[0].clamp_(0.0, 1.0)


def mask_to_tensor(mask: np.ndarray, size: int) -> torch.Tensor:
    """Resize a (H, W) integer label map to (size, size) int64 with nearest neighbour."""
    if mask.ndim != 2:
        raise ValueError(f"expected a (H, W) label map, got shape {mask.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64))[None, None]
    if tensor.shape[-2:] != (size, size):
        tensor = F.interpolate(tensor.float(), size=(size, size), mode="nearest-exact").long()
    return tensor[0, 0]


def resize_probabilities(probabilities: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize (N, C, h, w) class probabilities to (N, C, height, width), bilinear, before argmax."""
    if probabilities.shape[-2:] == (height, width):
        return probabilities
    return F.interpolate(probabilities, size=(height, width), mode="bilinear", align_corners=False)
