"""Validation during training, predicting exactly as ``process.py`` does.

Images are cached with ``image_to_tensor`` at the model's input size. ``predict_batch`` applies
softmax with hard view masking. Probabilities are resized bilinearly to the label's own size
with ``resize_probabilities`` and the argmax is taken there. CHD probabilities are thresholded
at 0.5 within the labels the view allows. The challenge scorer then scores the full-resolution maps.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from evaluation.summary import CaseRecord, Summary, evaluate_cases
from fetuskit.labels import NUM_CHD
from fetuskit.predict import chd_to_label, predict_batch, probabilities_to_mask
from fetuskit.training.data import CaseTensors

DEFAULT_CHD_THRESHOLDS = (0.5,) * NUM_CHD


def predict_records(
    model: nn.Module,
    cases: CaseTensors,
    batch_size: int,
    device: torch.device,
    thresholds: tuple[float, ...] = DEFAULT_CHD_THRESHOLDS,
) -> Iterator[CaseRecord]:
    """Yield one scorer record per validation case, predicted batch by batch.

    Args:
        model: the network to validate; ``predict_batch`` runs it in eval mode and restores its mode.
        cases: validation cases with ``full_masks`` and ``chd`` present.
        batch_size: images per forward pass.
        device: where the images go for the forward pass.
        thresholds: (7,) CHD probability thresholds.
    """
    if cases.chd is None or len(cases.full_masks) != len(cases):
        raise ValueError("validation cases need labels: load them with load_labelled(..., keep_full_masks=True)")
    for start in range(0, len(cases), batch_size):
        stop = min(start + batch_size, len(cases))
        images = cases.images[start:stop].to(device)
        views = cases.views[start:stop].to(device)
        prediction = predict_batch([model], images, views)
        for offset, index in enumerate(range(start, stop)):
            gt_mask = cases.full_masks[index]
            view = int(prediction.views[offset])
            yield CaseRecord(
                name=cases.names[index],
                pred_mask=probabilities_to_mask(prediction.probs[offset], *gt_mask.shape),
                gt_mask=gt_mask,
                pred_label=chd_to_label(prediction.chd[offset], view, thresholds),
                gt_label=cases.chd[index].numpy().astype("uint8"),
                view=int(cases.views[index]),
            )


def validate(model: nn.Module, cases: CaseTensors, batch_size: int, device: torch.device) -> Summary:
    """Score ``model`` on the validation cases; ``Summary.score`` has no time term."""
    return evaluate_cases(predict_records(model, cases, batch_size, device))


def summary_metrics(summary: Summary) -> dict[str, float]:
    """Return the summary figures that the run log and checkpoints record, on the 0..100 scale."""
    return {
        "mean_dice": summary.mean_dice,
        "mean_nsd": summary.mean_nsd,
        "macro_f1": summary.macro_f1,
        "score": summary.score,
    }
