"""Ensemble prediction with hard view masking, shared by validation and ``process.py``.

The trainer's validation and the inference container both call :func:`predict_batch`, so a
validation score measures exactly what the container will output.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fetuskit.labels import CHD_MASK, CLASS_MASK, NUM_CHD, NUM_CLASSES, NUM_VIEWS, VIEW_NAMES
from fetuskit.transforms import resize_probabilities

logger = logging.getLogger(__name__)

# Logit given to classes the view does not allow, applied in float32. It is finite, so softmax
# gives them exactly 0.0 and later arithmetic never meets -inf or NaN (the fp16 minimum would
# overflow), and it is far below any real logit (-1e4 would lose to an fp16 logit of -6e4).
# Training masks with the same value.
MASKED_LOGIT = -1.0e9

UNKNOWN_VIEW = -1


@dataclass(frozen=True)
class BatchPrediction:
    """Averaged ensemble outputs for a batch of N images at the network side S.

    Attributes:
        probs: (N, 15, S, S) float32 class probabilities after view masking. Every class the
            view does not allow is exactly 0.0. A pixel whose logits are NaN, or whose allowed
            logits are all at or below MASKED_LOGIT, is 0.0 in every class (argmax background).
        chd: (N, 7) float32 CHD probabilities (sigmoid), before thresholding or view masking.
        view_probs: (N, 4) float32 view probabilities (softmax of the view head).
        views: (N,) int64 0-based view index used for masking: the given view where known,
            else the argmax of ``view_probs``.
        view_from_head: (N,) bool, True where the view was unknown and came from the view head.
    """

    probs: torch.Tensor
    chd: torch.Tensor
    view_probs: torch.Tensor
    views: torch.Tensor
    view_from_head: torch.Tensor


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # Mixed precision only on CUDA: CPU autocast is slower for these networks and changes results.
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(models: Sequence[nn.Module]) -> Iterator[None]:
    # Validation may pass a model in training mode, so restore each model's mode afterwards.
    was_training = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, training in zip(models, was_training):
            model.train(training)


def _check_inputs(models: Sequence[nn.Module], images: torch.Tensor, views: torch.Tensor) -> None:
    if len(models) == 0:
        raise ValueError("predict_batch needs at least one model, got an empty sequence")
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3]:
        raise ValueError(f"expected images of shape (N, 1, S, S), got {tuple(images.shape)}")
    if views.shape != (images.shape[0],):
        raise ValueError(
            f"expected views of shape ({images.shape[0]},) to match the images, got {tuple(views.shape)}"
        )
    if views.numel() and (views.min() < UNKNOWN_VIEW or views.max() >= NUM_VIEWS):
        raise ValueError(
            f"views must be 0-based view indices 0..{NUM_VIEWS - 1} or {UNKNOWN_VIEW} for unknown, "
            f"got {views.tolist()}"
        )


def _run_member(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run one member and return float32 (seg logits at side S, CHD logits, view logits)."""
    device = _model_device(model)
    side = images.shape[-1]
    member_side = getattr(model, "input_size", side)
    batch = images.to(device=device, dtype=torch.float32)
    if member_side != side:
        batch = F.interpolate(batch, size=(member_side, member_side), mode="bilinear", align_corners=False)

    with _autocast(device):
        output = model(batch)

    seg = output.seg.float()
    if seg.shape[-2:] != (side, side):
        seg = F.interpolate(seg, size=(side, side), mode="bilinear", align_corners=False)
    return seg, output.chd.float(), output.view.float()


def predict_batch(
    models: Sequence[nn.Module],
    images: torch.Tensor,
    views: torch.Tensor,
    weights: Sequence[float] | None = None,
) -> BatchPrediction:
    """Predict a batch with an ensemble, masking every class the view does not allow.

    Each member runs under ``torch.inference_mode`` (with bf16 or fp16 autocast on CUDA only).
    Its segmentation logits are masked in float32 with :data:`MASKED_LOGIT` and turned into
    probabilities, which are then averaged over members, as are the CHD sigmoids and view
    softmaxes. A member whose ``input_size`` differs from S gets the batch resized bilinearly
    to its size, and its logits are resized back to S before masking.

    Args:
        models: ensemble members following the ``ModelOutput`` contract. Each runs on the
            device of its parameters, in eval mode, and gets its previous mode back afterwards.
        images: (N, 1, S, S) float in [0, 1], prepared with ``fetuskit.transforms.image_to_tensor``.
        views: (N,) int64 0-based view index, or -1 where unknown. For an unknown view, the
            averaged view head picks the view that masks the classes.
        weights: optional non-negative weight per member; None weighs members equally.

    Returns:
        A :class:`BatchPrediction` on the device of ``images``. An empty batch (N = 0) returns
        empty tensors without running any model.

    Raises:
        ValueError: on an empty ensemble, wrong shapes, out-of-range views or invalid weights.
    """
    _check_inputs(models, images, views)
    member_weights = _normalised_weights(weights, len(models))
    count, side = images.shape[0], images.shape[-1]
    out_device = images.device
    if count == 0:
        return BatchPrediction(
            probs=torch.zeros((0, NUM_CLASSES, side, side), device=out_device),
            chd=torch.zeros((0, NUM_CHD), device=out_device),
            view_probs=torch.zeros((0, NUM_VIEWS), device=out_device),
            views=torch.zeros((0,), dtype=torch.long, device=out_device),
            view_from_head=torch.zeros((0,), dtype=torch.bool, device=out_device),
        )

    # Run every member first: an unknown view needs the averaged view head before masking.
    member_outputs = []
    with torch.inference_mode(), _eval_mode(models):
        for model in models:
            seg, chd, view = _run_member(model, images)
            member_outputs.append((seg.to(out_device), chd.to(out_device), view.to(out_device)))

        chd_probs = sum(w * torch.sigmoid(chd) for w, (_, chd, _) in zip(member_weights, member_outputs))
        view_probs = sum(w * torch.softmax(view, dim=1) for w, (_, _, view) in zip(member_weights, member_outputs))

        views = views.to(device=out_device, dtype=torch.long)
        view_from_head = views == UNKNOWN_VIEW
        resolved_views = torch.where(view_from_head, view_probs.argmax(dim=1), views)
        for index in torch.nonzero(view_from_head).flatten().tolist():
            view = int(resolved_views[index])
            logger.debug(
                "batch item %d: view unknown, view head predicts %s (p=%.3f)",
                index, VIEW_NAMES[view], float(view_probs[index, view]),
            )

        allowed = torch.tensor(CLASS_MASK, device=out_device)[resolved_views]
        disallowed = ~allowed[:, :, None, None]
        probs = torch.zeros((count, NUM_CLASSES, side, side), dtype=torch.float32, device=out_device)
        for w, (seg, _, _) in zip(member_weights, member_outputs):
            masked = torch.softmax(seg.masked_fill(disallowed, MASKED_LOGIT), dim=1)
            # Where every allowed logit is at or below MASKED_LOGIT (fp16 -inf, or NaN), the
            # softmax moves the mass to disallowed classes or gives NaN. Zero both, so such a
            # pixel has no probability anywhere and its argmax is background.
            masked = torch.nan_to_num(masked, nan=0.0).masked_fill(disallowed, 0.0)
            probs += w * masked

    return BatchPrediction(
        probs=probs,
        chd=chd_probs.float(),
        view_probs=view_probs.float(),
        views=resolved_views,
        view_from_head=view_from_head,
    )


def _normalised_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise ValueError(f"expected {count} member weights, one per model, got {len(weights)}")
    if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"member weights must be finite, non-negative and not all zero, got {list(weights)}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def probabilities_to_mask(probs: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Turn (15, S, S) class probabilities into a (height, width) uint8 label map.

    Probabilities are resized bilinearly to the input's own size first and the argmax taken
    after, so a 480x640 input gets a 480x640 mask with smooth borders. A class whose probability
    is 0.0 everywhere (view-masked) stays 0.0 after resizing, so it never wins the argmax.
    """
    if probs.ndim != 3 or probs.shape[0] != NUM_CLASSES:
        raise ValueError(f"expected probabilities of shape ({NUM_CLASSES}, S, S), got {tuple(probs.shape)}")
    if height <= 0 or width <= 0:
        raise ValueError(f"mask size must be positive, got {height}x{width}")
    resized = resize_probabilities(probs[None].float(), height, width)[0]
    return resized.argmax(dim=0).to(torch.uint8).cpu().numpy()


def chd_to_label(chd: torch.Tensor | np.ndarray, view: int, thresholds: Sequence[float]) -> np.ndarray:
    """Threshold (7,) CHD probabilities into a (7,) uint8 0/1 vector for a 0-based view index.

    A label is 1 where its probability is strictly above its threshold and the view allows it
    (``fetuskit.labels.CHD_MASK``). Labels the view does not allow are always 0.
    """
    probabilities = torch.as_tensor(chd).detach().float().cpu().numpy()
    if probabilities.shape != (NUM_CHD,):
        raise ValueError(f"expected ({NUM_CHD},) CHD probabilities, got shape {probabilities.shape}")
    if len(thresholds) != NUM_CHD:
        raise ValueError(f"expected {NUM_CHD} CHD thresholds, one per label, got {len(thresholds)}")
    if not 0 <= view < NUM_VIEWS:
        raise ValueError(f"view must be a 0-based view index 0..{NUM_VIEWS - 1}, got {view}")
    label = probabilities > np.asarray(thresholds, dtype=np.float32)
    return (label & CHD_MASK[view]).astype(np.uint8)
