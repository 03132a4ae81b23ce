"""The feature-extractor interface and the input preparation every extractor shares."""

from __future__ import annotations

import hashlib
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from fetuskit.transforms import resize_probabilities

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@runtime_checkable
class FeatureExtractor(Protocol):
    """A frozen encoder that turns grayscale images into a grid of unit-length features.

    Attributes:
        name: registry name, for example ``"dinov3"``.
        dim: feature channels D of ``extract``'s output.
        stride: input pixels per feature cell along each axis, after the resize to ``side``.
        side: side in pixels of the square network input every image is resized to.
    """

    name: str
    dim: int
    stride: int
    side: int

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Map (N, 1, H, W) float images in [0, 1] to (N, D, side/stride, side/stride) features."""
        ...

    def cache_identity(self) -> str:
        """Return a string that changes whenever the same image would give other features."""
        ...


def check_images(images: torch.Tensor) -> None:
    """Raise ValueError unless ``images`` is a non-empty (N, 1, H, W) floating tensor."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (N, 1, H, W), got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(
            f"images must have shape (N, 1, H, W) with one grayscale channel, got {tuple(images.shape)}. "
            "Convert RGB frames to grayscale first"
        )
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"images must not be empty, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype}. Divide uint8 frames by 255")


def check_side(side: int, stride: int) -> None:
    """Raise ValueError unless ``side`` is a positive multiple of ``stride``."""
    if side <= 0 or side % stride != 0:
        raise ValueError(f"side must be a positive multiple of {stride} pixels, got {side}")


def prepare_images(
    images: torch.Tensor,
    side: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> torch.Tensor:
    """Turn grayscale images into a normalised RGB network input.

    Args:
        images: (N, 1, H, W) float in [0, 1]. H and W may differ from each other and from ``side``.
        side: output side in pixels. The whole frame is resized bilinearly to (side, side)
            without cropping, so a non-square frame is stretched.
        mean, std: per-channel RGB normalisation applied after repeating the gray channel.

    Returns:
        (N, 3, side, side) float32 on the device of ``images``.
    """
    check_images(images)
    pixels = images.float()
    # The same bilinear resize (align_corners=False) that training and inference use.
    pixels = resize_probabilities(pixels, side, side)
    pixels = pixels.expand(-1, 3, -1, -1)
    mean_tensor = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std_tensor = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean_tensor) / std_tensor


def normalise_features(features: torch.Tensor) -> torch.Tensor:
    """L2-normalise (N, D, h, w) features over D. An all-zero vector stays zero."""
    return F.normalize(features, p=2.0, dim=1, eps=1e-12)


def state_fingerprint(module: torch.nn.Module) -> str:
    """Return the SHA-256 hex digest over a module's state_dict keys, shapes, dtypes and bytes.

    Two modules with equal weights give the same digest wherever the weights were loaded from,
    so a feature cache stays valid when a checkpoint moves and is invalidated when it changes.
    """
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        value = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(key.encode("utf-8"))
        digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode("utf-8"))
        digest.update(value.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
