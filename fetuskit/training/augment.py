"""Batch augmentation on CPU tensors, deterministic given a ``torch.Generator``.

All functions take (N, 1, H, W) float32 images in [0, 1] and, where given, (N, H, W) integer
label maps in the same pixel grid. Every random number is drawn from the generator passed in,
in a fixed order, so saving and restoring the generator state reproduces a run exactly.

The weak view moves image and mask with one affine warp, bilinear for the image and nearest
for the mask. Pixels from outside the frame become 0 and background. It then changes gamma. The strong
view adds brightness, contrast and blur to the image only, and CutMix pastes a box from a
partner image of the same view.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fetuskit.training.config import AugmentConfig


def _uniform(count: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator)


def random_affine(count: int, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Draw (N, 2, 3) ``affine_grid`` matrices: rotation, isotropic scale, shift, optional flip.

    The matrix maps output coordinates to input coordinates, both normalised to [-1, 1] in
    (x, y) order. A scale above 1 enlarges the content.
    """
    angle = _uniform(count, -config.rotation_degrees, config.rotation_degrees, generator) * (math.pi / 180.0)
    scale = _uniform(count, config.scale_min, config.scale_max, generator)
    shift = _uniform(2 * count, -config.translate_fraction, config.translate_fraction, generator).view(count, 2)
    flip = torch.rand(count, generator=generator) < 0.5
    cos = torch.cos(angle) / scale
    sin = torch.sin(angle) / scale
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin
    theta[:, 1, 0] = sin
    theta[:, 1, 1] = cos
    # A shift of a fraction f of the side is 2f in normalised coordinates.
    theta[:, :, 2] = 2.0 * shift
    if config.horizontal_flip:
        theta[flip, :, 0] = -theta[flip, :, 0]
    return theta


def warp(
    images: torch.Tensor, masks: torch.Tensor | None, theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply (N, 2, 3) affine matrices: images bilinear, masks nearest, outside pixels 0."""
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    warped_masks = None
    if masks is not None:
        moved = F.grid_sample(masks[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        warped_masks = moved[:, 0].round().to(masks.dtype)
    return warped.clamp_(0.0, 1.0), warped_masks


def random_gamma(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Raise each image to a gamma drawn uniformly from [gamma_min, gamma_max]."""
    gamma = _uniform(images.shape[0], config.gamma_min, config.gamma_max, generator)
    return images.clamp(min=0.0).pow(gamma.view(-1, 1, 1, 1))


def warp_maps(values: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Apply (N, 2, 3) affine matrices to (N, C, H, W) float maps: bilinear, outside 0, no clamp.

    For maps that live in the image's pixel grid but not in [0, 1], such as cosine similarities.
    """
    grid = F.affine_grid(theta.to(values.dtype), list(values.shape), align_corners=False)
    return F.grid_sample(values, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def weak_augment_with_affine(
    images: torch.Tensor, masks: torch.Tensor | None, config: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Return the weak view like ``weak_augment`` and also its (N, 2, 3) affine matrices.

    The random numbers are drawn in the same order as ``weak_augment``, so both give the same
    images for the same generator state.
    """
    theta = random_affine(images.shape[0], config, generator)
    images, masks = warp(images, masks, theta)
    return random_gamma(images, config, generator), masks, theta


def weak_augment(
    images: torch.Tensor, masks: torch.Tensor | None, config: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return the weak view: one shared affine warp of image and mask, then gamma on the image."""
    images, masks, _ = weak_augment_with_affine(images, masks, config, generator)
    return images, masks


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur one (1, 1, H, W) image with a separable Gaussian of ``sigma`` pixels, reflect padding."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    padded = F.pad(image, (radius, radius, radius, radius), mode="reflect")
    blurred = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(blurred, kernel.view(1, 1, -1, 1))


def strong_augment(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Return the strong photometric view: brightness, contrast about the image mean, blur.

    Geometry is unchanged, so a pseudo-label made on the input stays aligned with the output.
    """
    count = images.shape[0]
    brightness = _uniform(count, -config.brightness, config.brightness, generator).view(-1, 1, 1, 1)
    contrast = _uniform(count, 1.0 - config.contrast, 1.0 + config.contrast, generator).view(-1, 1, 1, 1)
    blur = torch.rand(count, generator=generator) < config.blur_probability
    sigma = _uniform(count, config.blur_sigma_min, config.blur_sigma_max, generator)

    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = (images - mean) * contrast + mean + brightness
    if blur.any():
        images = images.clone()
        for index in torch.nonzero(blur).flatten().tolist():
            images[index : index + 1] = gaussian_blur(images[index : index + 1], float(sigma[index]))
    return images.clamp_(0.0, 1.0)


def cutmix_boxes(count: int, height: int, width: int, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Draw (N, H, W) bool CutMix boxes; a sample left unmixed gets an all-False box.

    Each sample is mixed with probability ``cutmix_probability``. A box covers a share of the
    image drawn from [cutmix_area_min, cutmix_area_max], aspect ratio between 1:3 and 3:1, and
    is clipped to the frame.
    """
    mixed = torch.rand(count, generator=generator) < config.cutmix_probability
    area = _uniform(count, config.cutmix_area_min, config.cutmix_area_max, generator)
    log_ratio = _uniform(count, -math.log(3.0), math.log(3.0), generator)
    centre = torch.rand(count, 2, generator=generator)
    ratio = torch.exp(log_ratio)
    box_height = (torch.sqrt(area / ratio) * height).round().long()
    box_width = (torch.sqrt(area * ratio) * width).round().long()
    centre_row = (centre[:, 0] * height).long()
    centre_col = (centre[:, 1] * width).long()

    rows = torch.arange(height).view(1, -1, 1)
    cols = torch.arange(width).view(1, 1, -1)
    top = (centre_row - box_height // 2).view(-1, 1, 1)
    left = (centre_col - box_width // 2).view(-1, 1, 1)
    boxes = (rows >= top) & (rows < top + box_height.view(-1, 1, 1))
    boxes = boxes & (cols >= left) & (cols < left + box_width.view(-1, 1, 1))
    return boxes & mixed.view(-1, 1, 1)


def apply_cutmix(values: torch.Tensor, partner_values: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Paste ``partner_values`` into ``values`` inside (N, H, W) boxes.

    Works on (N, C, H, W) images or probabilities and on (N, H, W) label or keep maps alike.
    """
    box = boxes if values.ndim == 3 else boxes[:, None]
    return torch.where(box, partner_values, values)
