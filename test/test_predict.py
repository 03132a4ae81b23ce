"""Ensemble prediction: view masking, averaging, unknown views, mask resizing and CHD labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fetuskit.labels import CHD_MASK, CLASS_MASK, NUM_CHD, NUM_CLASSES, NUM_VIEWS
from fetuskit.models import ModelOutput, build_model, tiny_config
from fetuskit.predict import MASKED_LOGIT, chd_to_label, predict_batch, probabilities_to_mask


class ConstantModel(nn.Module):
    """Returns the same logits at every pixel, in a chosen dtype, whatever the input."""

    def __init__(
        self,
        seg: list[float],
        chd: list[float] | None = None,
        view: list[float] | None = None,
        dtype: torch.dtype = torch.float32,
        input_size: int = 8,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.anchor = nn.Parameter(torch.zeros(()))
        self.register_buffer("seg", torch.tensor(seg, dtype=dtype))
        self.register_buffer("chd", torch.tensor(chd or [0.0] * NUM_CHD, dtype=dtype))
        self.register_buffer("view", torch.tensor(view or [0.0] * NUM_VIEWS, dtype=dtype))
        self.seen_sizes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> ModelOutput:
        self.seen_sizes.append(tuple(x.shape))
        count, _, height, width = x.shape
        seg = self.seg.view(1, -1, 1, 1).expand(count, -1, height, width)
        return ModelOutput(seg, self.chd.expand(count, -1), self.view.expand(count, -1))


def images(count: int, side: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand((count, 1, side, side), generator=generator)


def test_masking_with_huge_fp16_logits():
    # Every class gets a huge logit except background, which gets the smallest. Only the
    # view's allowed classes may ever win, and nothing may become NaN.
    logits = [65504.0] * NUM_CLASSES
    logits[0] = -65504.0
    model = ConstantModel(logits, dtype=torch.float16)
    views = torch.arange(NUM_VIEWS)

    prediction = predict_batch([model], images(NUM_VIEWS).half(), views)

    assert prediction.probs.dtype == torch.float32
    assert torch.isfinite(prediction.probs).all()
    for view in range(NUM_VIEWS):
        disallowed = torch.from_numpy(~CLASS_MASK[view])
        assert prediction.probs[view][disallowed].abs().max() == 0.0
        mask = probabilities_to_mask(prediction.probs[view], 8, 8)
        assert CLASS_MASK[view][mask].all()


def test_masked_class_never_wins_resize():
    # The disallowed class 14 dominates in the raw logits of a 4CH image.
    logits = [0.0] * NUM_CLASSES
    logits[14] = 1.0e6
    logits[3] = 1.0
    prediction = predict_batch([ConstantModel(logits)], images(1), torch.tensor([0]))

    mask = probabilities_to_mask(prediction.probs[0], 13, 21)

    assert mask.shape == (13, 21)
    assert np.unique(mask).tolist() == [3]


def test_masked_logit_is_finite_in_float32():
    assert np.isfinite(MASKED_LOGIT)
    # Masking happens in float32, so the value must lose to every fp16 logit yet stay finite.
    assert MASKED_LOGIT < torch.finfo(torch.float16).min
    masked = torch.tensor([torch.finfo(torch.float16).min, MASKED_LOGIT], dtype=torch.float32)
    assert torch.isfinite(masked - masked.max()).all()
    assert torch.softmax(masked, dim=0)[1] == 0.0


def test_ensemble_averages_probabilities():
    first = [0.0] * NUM_CLASSES
    second = [0.0] * NUM_CLASSES
    first[1] = np.log(3.0)  # with classes 0..7 allowed: p1 = 3 / 10
    second[2] = np.log(3.0)  # p2 = 3 / 10
    chd_first, chd_second = [0.0] * NUM_CHD, [np.log(3.0)] * NUM_CHD  # sigmoids 0.5 and 0.75
    view_first, view_second = [0.0] * NUM_VIEWS, [np.log(4.0), 0.0, 0.0, 0.0]  # softmax 0.25 and 4/7
    models = [ConstantModel(first, chd_first, view_first), ConstantModel(second, chd_second, view_second)]

    prediction = predict_batch(models, images(1), torch.tensor([0]))

    pixel = prediction.probs[0, :, 3, 3]
    assert pixel[1].item() == pytest.approx((0.3 + 0.1) / 2, abs=1e-6)
    assert pixel[2].item() == pytest.approx((0.1 + 0.3) / 2, abs=1e-6)
    assert pixel[0].item() == pytest.approx(0.1, abs=1e-6)
    assert pixel[8:].abs().max().item() == 0.0
    assert prediction.chd[0].tolist() == pytest.approx([0.625] * NUM_CHD, abs=1e-6)
    assert prediction.view_probs[0, 0].item() == pytest.approx((0.25 + 4 / 7) / 2, abs=1e-6)
    assert prediction.views.tolist() == [0]
    assert prediction.view_from_head.tolist() == [False]


def test_member_weights_shift_average():
    first = [0.0] * NUM_CLASSES
    second = [0.0] * NUM_CLASSES
    first[1] = np.log(3.0)
    second[2] = np.log(3.0)
    models = [ConstantModel(first), ConstantModel(second)]

    prediction = predict_batch(models, images(1), torch.tensor([0]), weights=[3.0, 1.0])

    pixel = prediction.probs[0, :, 0, 0]
    assert pixel[1].item() == pytest.approx(0.75 * 0.3 + 0.25 * 0.1, abs=1e-6)
    assert pixel[2].item() == pytest.approx(0.75 * 0.1 + 0.25 * 0.3, abs=1e-6)


def test_unknown_view_uses_view_head():
    # Class 13 (aortic arch) is only allowed in 3VT, and the view head favours 3VT (index 3).
    logits = [0.0] * NUM_CLASSES
    logits[13] = 5.0
    logits[1] = 4.0
    model = ConstantModel(logits, view=[0.0, 0.0, 0.0, 3.0])

    prediction = predict_batch([model], images(2), torch.tensor([-1, 0]))

    assert prediction.views.tolist() == [3, 0]
    assert prediction.view_from_head.tolist() == [True, False]
    assert np.unique(probabilities_to_mask(prediction.probs[0], 8, 8)).tolist() == [13]
    assert np.unique(probabilities_to_mask(prediction.probs[1], 8, 8)).tolist() == [1]


def test_member_with_other_input_size():
    small = ConstantModel([0.0] * NUM_CLASSES, input_size=4)
    large = ConstantModel([0.0] * NUM_CLASSES, input_size=8)

    prediction = predict_batch([small, large], images(2, side=8), torch.tensor([0, 1]))

    assert small.seen_sizes == [(2, 1, 4, 4)]
    assert large.seen_sizes == [(2, 1, 8, 8)]
    assert tuple(prediction.probs.shape) == (2, NUM_CLASSES, 8, 8)


def test_training_mode_is_restored():
    model = ConstantModel([0.0] * NUM_CLASSES)
    model.train()
    predict_batch([model], images(1), torch.tensor([0]))
    assert model.training


def test_empty_batch_runs_no_model():
    model = ConstantModel([0.0] * NUM_CLASSES)
    prediction = predict_batch([model], torch.zeros((0, 1, 8, 8)), torch.zeros((0,), dtype=torch.long))
    assert tuple(prediction.probs.shape) == (0, NUM_CLASSES, 8, 8)
    assert model.seen_sizes == []


@pytest.mark.parametrize(
    ("batch", "views", "message"),
    [
        (torch.zeros((1, 3, 8, 8)), torch.tensor([0]), "shape"),
        (torch.zeros((1, 1, 8, 6)), torch.tensor([0]), "shape"),
        (torch.zeros((2, 1, 8, 8)), torch.tensor([0]), "views of shape"),
        (torch.zeros((1, 1, 8, 8)), torch.tensor([4]), "view indices"),
        (torch.zeros((1, 1, 8, 8)), torch.tensor([-2]), "view indices"),
    ],
)
def test_invalid_inputs_raise(batch, views, message):
    with pytest.raises(ValueError, match=message):
        predict_batch([ConstantModel([0.0] * NUM_CLASSES)], batch, views)


def test_invalid_weights_raise():
    model = ConstantModel([0.0] * NUM_CLASSES)
    with pytest.raises(ValueError, match="member weights"):
        predict_batch([model], images(1), torch.tensor([0]), weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="not all zero"):
        predict_batch([model], images(1), torch.tensor([0]), weights=[0.0])
    with pytest.raises(ValueError, match="at least one model"):
        predict_batch([], images(1), torch.tensor([0]))


def test_registry_model_respects_masks():
    torch.manual_seed(0)
    model = build_model("timm-unet", **{**tiny_config("timm-unet"), "input_size": 64})
    batch = images(NUM_VIEWS + 1, side=64)
    views = torch.tensor([0, 1, 2, 3, -1])

    prediction = predict_batch([model], batch, views)

    assert tuple(prediction.probs.shape) == (5, NUM_CLASSES, 64, 64)
    assert torch.allclose(prediction.probs.sum(dim=1), torch.ones(5, 64, 64), atol=1e-5)
    for index in range(5):
        view = int(prediction.views[index])
        mask = probabilities_to_mask(prediction.probs[index], 48, 80)
        assert mask.shape == (48, 80)
        assert mask.dtype == np.uint8
        assert CLASS_MASK[view][mask].all()


def test_mask_non_square_size():
    probs = torch.zeros((NUM_CLASSES, 16, 16))
    probs[0] = 1.0
    probs[0, :, 8:] = 0.0
    probs[2, :, 8:] = 1.0

    mask = probabilities_to_mask(probs, 480, 640)

    assert mask.shape == (480, 640)
    assert mask.dtype == np.uint8
    assert (mask[:, :320] == 0).all()
    assert (mask[:, 320:] == 2).all()


def test_mask_rejects_bad_shape():
    with pytest.raises(ValueError, match="probabilities of shape"):
        probabilities_to_mask(torch.zeros((3, 8, 8)), 8, 8)
    with pytest.raises(ValueError, match="positive"):
        probabilities_to_mask(torch.zeros((NUM_CLASSES, 8, 8)), 0, 8)


def test_chd_disallowed_labels_zero():
    probabilities = torch.ones(NUM_CHD) * 0.9
    for view in range(NUM_VIEWS):
        label = chd_to_label(probabilities, view, [0.5] * NUM_CHD)
        assert label.dtype == np.uint8
        assert label.tolist() == CHD_MASK[view].astype(np.uint8).tolist()


def test_chd_thresholds_per_label():
    probabilities = np.array([0.30, 0.50, 0.2, 0.2, 0.2, 0.2, 0.2], dtype=np.float32)
    thresholds = [0.25, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    # 4CH allows VSD (0) and AVV (1). AVV sits exactly on its threshold, which is not above it.
    assert chd_to_label(probabilities, 0, thresholds).tolist() == [1, 0, 0, 0, 0, 0, 0]


def test_chd_rejects_bad_arguments():
    with pytest.raises(ValueError, match="view index"):
        chd_to_label(np.zeros(NUM_CHD), -1, [0.5] * NUM_CHD)
    with pytest.raises(ValueError, match="thresholds"):
        chd_to_label(np.zeros(NUM_CHD), 0, [0.5])
    with pytest.raises(ValueError, match="CHD probabilities"):
        chd_to_label(np.zeros(3), 0, [0.5] * NUM_CHD)


@pytest.mark.parametrize(
    ("allowed_logit", "dtype"),
    [
        pytest.param(float("-inf"), torch.float16, id="fp16-minus-inf"),
        pytest.param(-3.0e38, torch.bfloat16, id="bf16-huge-negative"),
        pytest.param(-1.0e10, torch.float32, id="float32-below-fill"),
        pytest.param(float("nan"), torch.float32, id="nan"),
    ],
)
def test_allowed_logits_below_fill_keep_masking(allowed_logit, dtype):
    # Every allowed class gets a logit at or below MASKED_LOGIT and every other class 0, so
    # the filled classes would win a plain softmax.
    for view in range(NUM_VIEWS):
        logits = [allowed_logit if CLASS_MASK[view][c] else 0.0 for c in range(NUM_CLASSES)]
        model = ConstantModel(logits, dtype=dtype)

        prediction = predict_batch([model], images(1), torch.tensor([view]))

        disallowed = torch.from_numpy(~CLASS_MASK[view])
        assert torch.isfinite(prediction.probs).all(), view
        assert prediction.probs[0][disallowed].abs().max() == 0.0, view
        mask = probabilities_to_mask(prediction.probs[0], 5, 9)
        assert CLASS_MASK[view][mask].all(), view
