"""The promptable segmenter shared by both backends, and the image-to-input frame.

Both SAM-Med2D and LiteMedSAM are SAM's layout: an image encoder, the prompt encoder and the
mask decoder of the ``segment_anything`` package. They differ in the encoder and in how an
image becomes the square network input (see ``InputFrame``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fetuskit.transforms import resize_probabilities

# SAM's pixel statistics on the 0-255 scale (ImageNet mean/std times 255).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

ResizeMode = Literal["stretch", "longest-side"]


class PromptableSegmenter(nn.Module):
    """SAM-style model: ``image_encoder``, ``prompt_encoder`` and ``mask_decoder`` modules.

    The attribute names are the state_dict prefixes of SAM, SAM-Med2D and LiteMedSAM weights.
    """

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module):
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    @property
    def input_size(self) -> int:
        """Side of the square network input, in pixels."""
        return int(self.prompt_encoder.input_image_size[0])

    @property
    def mask_input_size(self) -> tuple[int, int]:
        """(h, w) of mask prompts and low-resolution masks: 4 times the embedding grid."""
        return tuple(self.prompt_encoder.mask_input_size)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Encode (B, 3, S, S) prepared inputs to (B, C, S / 16, S / 16) image embeddings."""
        return self.image_encoder(images)

    def decode(
        self,
        embedding: torch.Tensor,
        boxes: torch.Tensor,
        points: torch.Tensor | None = None,
        mask_logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode N prompts on ONE image embedding in a single batch.

        Args:
            embedding: (1, C, h, w) embedding of one image.
            boxes: (N, 4) float32 boxes (x1, y1, x2, y2) in network-input pixel coordinates.
            points: optional (N, 2) float32 positive clicks (x, y), network-input pixels.
            mask_logits: optional (N, 1, 4h, 4w) float32 mask prompts as logits.

        Returns:
            low-resolution mask logits (N, 1, 4h, 4w) and predicted IoU (N, 1), from the
            first (single-mask) output token.
        """
        if embedding.shape[0] != 1:
            raise ValueError(f"decode takes the embedding of one image, got batch {embedding.shape[0]}")
        point_prompt = None
        if points is not None:
            labels = torch.ones(points.shape[0], 1, dtype=torch.int64, device=points.device)
            point_prompt = (points[:, None, :], labels)
        sparse, dense = self.prompt_encoder(points=point_prompt, boxes=boxes, masks=mask_logits)
        return self.mask_decoder(
            image_embeddings=embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )


@dataclass(frozen=True)
class InputFrame:
    """Map between an (H, W) image and the square (size, size) network input.

    ``stretch`` resizes both sides to ``size`` (SAM-Med2D). ``longest-side`` scales the longer
    side to ``size`` and pads the bottom and right with zeros (LiteMedSAM). Coordinates scale
    as SAM's own transform does: ``x_input = x * scaled_width / width``, likewise for y.
    """

    height: int
    width: int
    size: int
    scaled_height: int
    scaled_width: int

    @classmethod
    def create(cls, height: int, width: int, size: int, mode: ResizeMode) -> InputFrame:
        if height < 1 or width < 1:
            raise ValueError(f"image must have a positive size, got {height} x {width}")
        if mode == "stretch":
            return cls(height, width, size, size, size)
        if mode == "longest-side":
            scale = size / max(height, width)
            return cls(height, width, size, int(height * scale + 0.5), int(width * scale + 0.5))
        raise ValueError(f"unknown resize mode {mode!r}: expected 'stretch' or 'longest-side'")

    @property
    def scale_xy(self) -> np.ndarray:
        """(2,) float32 (x, y) scale from image to network-input pixels."""
        return np.array([self.scaled_width / self.width, self.scaled_height / self.height], np.float32)

    def boxes_to_input(self, boxes: np.ndarray) -> np.ndarray:
        """Scale (N, 4) image boxes (x1, y1, x2, y2) to network-input pixels."""
        return (np.asarray(boxes, np.float32).reshape(-1, 4) * np.tile(self.scale_xy, 2)).astype(np.float32)

    def points_to_input(self, points: np.ndarray) -> np.ndarray:
        """Scale (N, 2) image points (x, y) to network-input pixels."""
        return (np.asarray(points, np.float32).reshape(-1, 2) * self.scale_xy).astype(np.float32)

    def maps_to_input(self, maps: torch.Tensor, pad_value: float = 0.0) -> torch.Tensor:
        """Resize (N, C, H, W) float maps into the (N, C, size, size) input frame, padded."""
        scaled = resize_probabilities(maps, self.scaled_height, self.scaled_width)
        pad = (0, self.size - self.scaled_width, 0, self.size - self.scaled_height)
        return F.pad(scaled, pad, value=pad_value)

    def logits_to_image(self, low_res: torch.Tensor) -> torch.Tensor:
        """Resize (N, 1, h, w) low-resolution logits to (N, 1, H, W) image logits.

        Bilinear to the input size, crop the padding, bilinear to the image size, as SAM's
        ``postprocess_masks`` does.
        """
        logits = resize_probabilities(low_res, self.size, self.size)
        logits = logits[..., : self.scaled_height, : self.scaled_width]
        return resize_probabilities(logits, self.height, self.width)


def prepare_input(
    image: np.ndarray, size: int, mode: ResizeMode, normalisation: Literal["sam", "min-max"]
) -> tuple[torch.Tensor, InputFrame]:
    """Turn a grayscale image into the network input of a backend.

    Args:
        image: (H, W) float32 in [0, 1].
        size: side of the square network input.
        mode: ``stretch`` or ``longest-side`` (see ``InputFrame``).
        normalisation: ``sam`` scales to 0-255 and applies SAM's pixel mean/std (SAM-Med2D);
            ``min-max`` stretches the resized image to [0, 1] (LiteMedSAM; a constant image
            becomes zeros).

    Returns:
        (1, 3, size, size) float32 tensor (the gray channel repeated) and its ``InputFrame``.
    """
    if image.ndim != 2:
        raise ValueError(f"expected a (H, W) grayscale image, got shape {image.shape}")
    frame = InputFrame.create(image.shape[0], image.shape[1], size, mode)
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    tensor = resize_probabilities(tensor, frame.scaled_height, frame.scaled_width)
    if normalisation == "sam":
        mean = torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1)
        tensor = (tensor.clamp(0.0, 1.0) * 255.0 - mean) / std
    elif normalisation == "min-max":
        low, high = tensor.min(), tensor.max()
        tensor = (tensor - low) / (high - low).clamp(min=1e-8)
        tensor = tensor.expand(1, 3, -1, -1)
    else:
        raise ValueError(f"unknown normalisation {normalisation!r}: expected 'sam' or 'min-max'")
    pad = (0, size - frame.scaled_width, 0, size - frame.scaled_height)
    return F.pad(tensor, pad, value=0.0).contiguous(), frame
