"""Loss terms of the trainer, all with hard view masking.

Logits arrive in any float dtype (fp16 or bf16 under autocast) and are converted to float32
before masking. Disallowed classes get :data:`VIEW_MASK_FILL`, a large negative finite value.
The fp16 minimum would overflow to -inf in later fp16 arithmetic and turn losses into NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fetuskit.labels import CHD_MASK, CLASS_MASK, NUM_CHD, NUM_CLASSES
from fetuskit.predict import MASKED_LOGIT

VIEW_MASK_FILL = MASKED_LOGIT
"""Float32 logit given to classes the view does not allow, the same value inference uses.

It lies far below every finite fp16 value (-65504), so a disallowed class cannot win even
against allowed logits at the fp16 extreme, and its softmax probability is exactly 0.
"""

DICE_SMOOTH = 1.0
"""Added to numerator and denominator of the soft Dice, in pixels."""


def allowed_classes(views: torch.Tensor) -> torch.Tensor:
    """(N,) long 0-based view indices -> (N, 15) bool allowed segmentation classes."""
    return torch.tensor(CLASS_MASK, device=views.device)[views]


def allowed_chd(views: torch.Tensor) -> torch.Tensor:
    """(N,) long 0-based view indices -> (N, 7) bool CHD labels the view allows."""
    return torch.tensor(CHD_MASK, device=views.device)[views]


def mask_logits_by_view(logits: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """Return float32 (N, 15, H, W) logits with every class the view disallows set to -1e9."""
    allowed = allowed_classes(views)[:, :, None, None]
    return logits.float().masked_fill(~allowed, VIEW_MASK_FILL)


def soft_dice_loss(masked_logits: torch.Tensor, target: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """Mean over images of 1 - mean soft Dice over the view's allowed foreground classes.

    Args:
        masked_logits: (N, 15, H, W) float32 logits already masked by view.
        target: (N, H, W) int64 class map.
        views: (N,) int64 0-based view indices.

    Per image and class c: Dice_c = (2 sum(p_c g_c) + 1) / (sum p_c + sum g_c + 1), with p the
    softmax and g the one-hot target. A class absent from both sides scores close to 1. An
    empty batch gives 0.
    """
    if masked_logits.shape[0] == 0:
        return masked_logits.sum() * 0.0
    probabilities = masked_logits.softmax(dim=1)
    one_hot = F.one_hot(target, NUM_CLASSES).permute(0, 3, 1, 2).to(probabilities.dtype)
    intersection = (probabilities * one_hot).sum(dim=(2, 3))
    total = probabilities.sum(dim=(2, 3)) + one_hot.sum(dim=(2, 3))
    dice = (2.0 * intersection + DICE_SMOOTH) / (total + DICE_SMOOTH)
    foreground = allowed_classes(views).clone()
    foreground[:, 0] = False
    per_image = (dice * foreground).sum(dim=1) / foreground.sum(dim=1).clamp(min=1)
    return (1.0 - per_image).mean()


def chd_loss(
    chd_logits: torch.Tensor, targets: torch.Tensor, views: torch.Tensor, pos_weight: torch.Tensor | None
) -> torch.Tensor:
    """Binary cross-entropy over the CHD labels each image's view allows.

    Args:
        chd_logits: (N, 7) logits, any float dtype.
        targets: (N, 7) float 0/1.
        views: (N,) int64 0-based view indices.
        pos_weight: (7,) weight of the positive term per label, or None for 1.

    Returns:
        The mean over allowed (image, label) entries; 0 when there are none.
    """
    allowed = allowed_chd(views)
    losses = F.binary_cross_entropy_with_logits(
        chd_logits.float(), targets.float(), pos_weight=pos_weight, reduction="none"
    )
    return (losses * allowed).sum() / allowed.sum().clamp(min=1)


def chd_pos_weight_from_labels(
    labels: torch.Tensor, views: torch.Tensor, maximum: float
) -> torch.Tensor:
    """Derive (7,) positive weights negatives / positives per label, over allowed images.

    A label without positives gets ``maximum``; every weight is clipped to [1, maximum].
    """
    allowed = allowed_chd(views).float()
    positives = (labels.float() * allowed).sum(dim=0)
    negatives = ((1.0 - labels.float()) * allowed).sum(dim=0)
    weights = torch.where(positives > 0, negatives / positives.clamp(min=1), torch.full((NUM_CHD,), maximum))
    return weights.clamp(1.0, maximum)


def pseudo_labels(teacher_logits: torch.Tensor, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn teacher segmentation logits into (N, H, W) labels and float32 confidences.

    The logits are view-masked first, so a pseudo-label is always a class the view allows.
    """
    probabilities = mask_logits_by_view(teacher_logits, views).softmax(dim=1)
    confidence, labels = probabilities.max(dim=1)
    return labels, confidence


def pseudo_label_loss(
    student_logits: torch.Tensor, labels: torch.Tensor, views: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy on pseudo-labelled pixels in ``keep``, divided by ALL pixels.

    Dividing by every pixel instead of the kept ones makes the term shrink while the teacher is
    unsure, in place of giving a handful of confident pixels the full weight.

    Args:
        student_logits: (N, 15, H, W) raw logits; view masking is applied here.
        labels: (N, H, W) int64 pseudo-labels.
        views: (N,) int64 0-based view indices.
        keep: (N, H, W) bool pixels that passed the confidence and feature checks.
    """
    if labels.numel() == 0:
        return student_logits.sum() * 0.0
    per_pixel = F.cross_entropy(mask_logits_by_view(student_logits, views), labels, reduction="none")
    return (per_pixel * keep).sum() / labels.numel()
