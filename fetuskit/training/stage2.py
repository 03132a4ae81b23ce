"""Stage 2: CHD classification fine-tuning on a frozen segmentation network.

Stage 2 starts from a stage-1 checkpoint's teacher weights. Every parameter outside
``chd_head`` is frozen and every BatchNorm outside it stays in eval mode, so the segmentation
output does not change by a single bit. The CHD head is re-initialised and may be replaced by
another kind (``stage2.head_options``, see ``fetuskit.models.chd_heads``). The generic trainer
runs :class:`CHDFineTuneTask`. With the segmentation fixed, its validation score differs
between checkpoints only through the view-masked macro F1, so ``best.pt`` is the best-F1 head.

NOTE: bit-identical segmentation is tested on CPU only. On CUDA the weights and BatchNorm
statistics stay identical too, but non-deterministic cuDNN kernels may differ between calls.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from fetuskit.training import augment
from fetuskit.training.config import Stage2Config, TrainConfig
from fetuskit.training.data import CaseTensors, ShardedSampler, TrainingDataError
from fetuskit.training.ema import MeanTeacher, unwrap
from fetuskit.training.losses import allowed_chd

if TYPE_CHECKING:
    # tasks.py imports this module to list it in TASKS, so StepResult is imported where used.
    from fetuskit.training.tasks import StepResult

logger = logging.getLogger(__name__)

CHD_HEAD = "chd_head"
STAGE2_LOSSES = ("bce", "asl")


class Stage2Error(ValueError):
    """A stage-2 setting or starting checkpoint that cannot be used."""


# Model preparation


def freeze_segmentation(model: nn.Module) -> list[nn.Parameter]:
    """Turn off gradients of every parameter outside ``chd_head`` and return the head's parameters."""
    trainable = []
    for name, parameter in model.named_parameters():
        is_head = name.split(".", 1)[0] == CHD_HEAD
        parameter.requires_grad_(is_head)
        if is_head:
            trainable.append(parameter)
    return trainable


def set_stage2_mode(model: nn.Module) -> None:
    """Put the whole network in eval mode and only ``chd_head`` in train mode.

    Eval mode keeps the BatchNorm running statistics of the frozen layers from moving.
    """
    model.eval()
    getattr(model, CHD_HEAD).train()


def model_from_stage1(init: Path, head_options: dict[str, Any], seed: int) -> nn.Module:
    """Build the stage-2 network from a stage-1 checkpoint and reset its CHD head.

    The checkpoint's teacher weights are used (its student where it stores no teacher). The
    model config is the checkpoint's own with ``head_options`` applied on top. Every weight
    outside ``chd_head`` must load strictly. The head is then re-initialised (logged) with a
    generator seeded by ``seed``, and everything but the head is frozen.

    Raises:
        FileNotFoundError: ``init`` does not exist.
        Stage2Error: ``head_options`` changes a key outside the CHD head, or the model cannot
            be built with it (unknown key, invalid value).
        StateDictMismatchError: a segmentation weight is missing or has another shape.
    """
    from fetuskit.models.checkpoint import read_checkpoint
    from fetuskit.models.heads import reset_head
    from fetuskit.models.registry import build_from_config
    from fetuskit.models.state import load_state_dict_strict

    init = Path(init)
    content = read_checkpoint(init)
    not_head = sorted(key for key in head_options if not key.startswith(CHD_HEAD))
    if not_head:
        raise Stage2Error(
            f"stage2.head_options may only set chd_head* model keys, got {not_head}; the segmentation "
            f"network must stay as stored in {init}"
        )
    weights = "teacher" if content.get("teacher") is not None else "student"
    config = {**content["config"], **head_options}
    try:
        model = build_from_config(content["arch"], config, load_weights=False)
    except ValueError as error:
        # ModelConfigError (unknown key, wrong type) and a head builder's invalid value are both ValueErrors.
        raise Stage2Error(
            f"cannot build the model stored in {init} with stage2.head_options={head_options}: {error}"
        ) from error

    # The head is reset below, so its stored weights are skipped and the new head fills its keys.
    stored = content[weights]
    state = {key: value for key, value in stored.items() if not key.startswith(CHD_HEAD + ".")}
    own_head = {key: value for key, value in model.state_dict().items() if key.startswith(CHD_HEAD + ".")}
    load_state_dict_strict(model, {**state, **own_head}, f"{init} ({weights})")
    logger.info("stage 2 starts from the %s weights of %s (stage %s)", weights, init, content["stage"])

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reset_head(model, CHD_HEAD)
    freeze_segmentation(model)
    return model


# Losses


def masked_bce(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, pos_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary cross-entropy averaged over the (image, label) entries in ``mask``.

    Args:
        logits: (N, 7) logits, any float dtype.
        targets: (N, 7) float 0/1.
        mask: (N, 7) bool entries that count (labels the view allows, confident pseudo-labels).
        pos_weight: (7,) weight of the positive term per label, or None for 1.

    Returns:
        The float32 mean over masked entries; 0 when none is masked.
    """
    losses = F.binary_cross_entropy_with_logits(
        logits.float(), targets.float(), pos_weight=pos_weight, reduction="none"
    )
    return (losses * mask).sum() / mask.sum().clamp(min=1)


def asymmetric_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    gamma_negative: float,
    gamma_positive: float,
    clip: float,
) -> torch.Tensor:
    """Asymmetric loss (ASL) for rare positives, averaged over the entries in ``mask``.

    With p = sigmoid(logit), a positive costs -(1 - p)^gamma_positive * log(p). A negative
    uses the shifted p_m = max(p - clip, 0) and costs -p_m^gamma_negative * log(1 - p_m), so
    easy negatives (p <= clip) cost exactly 0 and the many negatives do not drown the rare
    positives. Shapes are those of :func:`masked_bce`. Returns 0 when no entry is masked.
    """
    logits = logits.float()
    targets = targets.float()
    probabilities = torch.sigmoid(logits)
    positive = -((1.0 - probabilities) ** gamma_positive) * F.logsigmoid(logits)
    shifted = (probabilities - clip).clamp(min=0.0)
    # With clip = 0 a saturated float32 sigmoid gives p_m = 1; the clamp keeps the log finite.
    negative = -(shifted**gamma_negative) * torch.log((1.0 - shifted).clamp(min=1e-8))
    losses = targets * positive + (1.0 - targets) * negative
    return (losses * mask).sum() / mask.sum().clamp(min=1)


def chd_pseudo_labels(
    probabilities: torch.Tensor, views: torch.Tensor, positive_threshold: float, negative_threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn teacher CHD probabilities into pseudo-labels in the slots each view allows.

    Args:
        probabilities: (N, 7) float sigmoid probabilities.
        views: (N,) int64 0-based view indices.
        positive_threshold: p >= this is a positive pseudo-label.
        negative_threshold: p <= this is a negative pseudo-label.

    Returns:
        (targets, keep): (N, 7) float32 0/1 and (N, 7) bool. ``keep`` is False in every slot
        the view does not allow and for probabilities between the two thresholds.
    """
    if not 0.0 <= negative_threshold < positive_threshold <= 1.0:
        raise Stage2Error(
            f"pseudo-label thresholds need 0 <= negative < positive <= 1, got negative={negative_threshold} "
            f"positive={positive_threshold}"
        )
    positive = probabilities >= positive_threshold
    confident = positive | (probabilities <= negative_threshold)
    keep = confident & allowed_chd(views)
    return positive.float(), keep


def stage2_chd_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    options: Stage2Config,
    pos_weight: torch.Tensor | None,
) -> torch.Tensor:
    """Apply the stage-2 loss chosen by ``options.loss`` (``"bce"`` uses ``pos_weight``)."""
    if options.loss == "bce":
        return masked_bce(logits, targets, mask, pos_weight)
    return asymmetric_loss(
        logits, targets, mask, options.asl_gamma_negative, options.asl_gamma_positive, options.asl_clip
    )


# Sampling


def has_allowed_positive(chd: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """Return (N,) bool: the case is positive for at least one label its view allows."""
    return ((chd > 0.5) & allowed_chd(views)).any(dim=1)


def case_sampling_weights(chd: torch.Tensor, views: torch.Tensor, power: float, max_weight: float) -> torch.Tensor:
    """Return (N,) float64 sampling weights that raise cases with rare allowed CHD labels.

    A case without a positive in a slot its view allows gets 1. A case with positives gets
    ``min(max_weight, (n_view / n_positive) ** power)`` for its rarest such label, where
    n_view counts the cases of its view and n_positive those of them positive for the label.
    ``power=0`` gives uniform sampling.

    Args:
        chd: (N, 7) float 0/1 labels.
        views: (N,) int64 0-based view indices.
    """
    if power < 0 or max_weight < 1:
        raise Stage2Error(f"need stage2.sampler_power >= 0 and sampler_max_weight >= 1, got {power} and {max_weight}")
    positives = (chd > 0.5) & allowed_chd(views)
    weights = torch.ones(len(views), dtype=torch.float64)
    for view in views.unique().tolist():
        rows = views == view
        cases_in_view = int(rows.sum())
        per_label = positives[rows].sum(dim=0).double()
        label_weight = (cases_in_view / per_label.clamp(min=1)) ** power
        label_weight = label_weight.clamp(max=max_weight)
        # Only labels with a positive in this row count; max over them picks the rarest.
        row_weights = torch.where(positives[rows], label_weight, torch.zeros_like(label_weight)).amax(dim=1)
        weights[rows] = torch.where(row_weights > 0, row_weights, torch.ones_like(row_weights))
    return weights


class WeightedCaseSampler:
    """Endless batches of case indices drawn with replacement in proportion to ``weights``.

    The draws depend only on the seed and the rank, never on global RNG state. The state dict
    stores the generator, so a resumed run continues the same stream.
    """

    def __init__(self, weights: torch.Tensor, batch_size: int, seed: int, rank: int = 0) -> None:
        if len(weights) == 0:
            raise TrainingDataError("cannot sample batches from an empty set of cases")
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.weights = weights.double()
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + 104_729 * (rank + 1))

    def next_batch(self) -> torch.Tensor:
        """Return the next (batch_size,) int64 indices."""
        return torch.multinomial(self.weights, self.batch_size, replacement=True, generator=self.generator)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


# The task


class CHDFineTuneTask:
    """Stage 2: train only ``chd_head`` on labelled images and confident teacher pseudo-labels.

    Labelled batches come from :class:`WeightedCaseSampler` with weak augmentation. When
    unlabelled images are given and ``stage2.pseudo_weight > 0``, the EMA teacher (eval mode)
    labels their weak view and the student learns the confident slots. Both batches go through
    the student in one forward pass, with every layer but the head in eval mode.

    The constructor takes the same arguments as the stage-1 task; ``feature_check`` applies to
    segmentation pseudo-labels only and is rejected here.
    """

    name = "stage2"

    def __init__(
        self,
        config: TrainConfig,
        labelled: CaseTensors,
        unlabelled: CaseTensors | None,
        *,
        rank: int = 0,
        world_size: int = 1,
        chd_pos_weight: torch.Tensor | None = None,
        feature_check: Any = None,
    ) -> None:
        options = config.stage2
        if options.loss not in STAGE2_LOSSES:
            raise Stage2Error(f"stage2.loss must be one of {STAGE2_LOSSES}, got {options.loss!r}")
        if feature_check is not None:
            raise Stage2Error("stage 2 does not use the prototype check; remove features.extractor from the config")
        self.config = config
        self.options = options
        self.labelled = labelled
        self.chd_pos_weight = chd_pos_weight
        seed = config.run.seed
        weights = case_sampling_weights(labelled.chd, labelled.views, options.sampler_power, options.sampler_max_weight)
        positive_cases = has_allowed_positive(labelled.chd, labelled.views)
        self.expected_positive_share = float(weights[positive_cases].sum() / weights.sum())
        logger.info(
            "stage 2 sampler: %d of %d labelled cases carry an allowed positive; %.1f%% of draws are expected to",
            int(positive_cases.sum()), len(labelled), 100 * self.expected_positive_share,
        )
        self.labelled_sampler = WeightedCaseSampler(weights, config.data.labelled_batch_size, seed, rank)
        use_unlabelled = unlabelled is not None and len(unlabelled) > 0 and options.pseudo_weight > 0
        self.unlabelled = unlabelled if use_unlabelled else None
        self.unlabelled_sampler = None
        if self.unlabelled is not None:
            self.unlabelled_sampler = ShardedSampler(
                len(self.unlabelled), config.data.unlabelled_batch_size, seed + 1, rank, world_size
            )
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (rank + 1))

    def trainable_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        """Freeze everything outside ``chd_head`` and yield the head's named parameters."""
        freeze_segmentation(model)
        return ((name, p) for name, p in model.named_parameters() if p.requires_grad)

    def step(self, student: nn.Module, teacher: MeanTeacher, device: torch.device) -> StepResult:
        """Sample, augment and run one step's forward pass; return the loss and its terms."""
        from fetuskit.training.tasks import StepResult

        set_stage2_mode(unwrap(student))
        indices = self.labelled_sampler.next_batch()
        images, _ = augment.weak_augment(self.labelled.images[indices], None, self.config.augment, self.generator)
        images = images.to(device)
        views = self.labelled.views[indices].to(device)
        targets = self.labelled.chd[indices].to(device)
        count = images.shape[0]
        inputs = [images]
        stats = {"positive_share": float(has_allowed_positive(targets, views).float().mean())}

        pseudo = None
        if self.unlabelled is not None:
            pseudo = self._pseudo_labels(teacher, device)
            inputs.append(pseudo["images"])
            stats.update(pseudo["stats"])
        logits = student(torch.cat(inputs)).chd

        pos_weight = self.chd_pos_weight.to(device) if self.chd_pos_weight is not None else None
        supervised = stage2_chd_loss(logits[:count], targets, allowed_chd(views), self.options, pos_weight)
        terms = {"chd": supervised}
        total = supervised
        if pseudo is not None:
            unsupervised = stage2_chd_loss(logits[count:], pseudo["targets"], pseudo["keep"], self.options, pos_weight)
            terms["chd_pseudo_label"] = unsupervised
            total = total + self.options.pseudo_weight * unsupervised
        return StepResult(total=total, terms={k: float(v.detach()) for k, v in terms.items()}, stats=stats)

    @torch.no_grad()
    def _pseudo_labels(self, teacher: MeanTeacher, device: torch.device) -> dict[str, Any]:
        indices = self.unlabelled_sampler.next_batch()
        images, _ = augment.weak_augment(self.unlabelled.images[indices], None, self.config.augment, self.generator)
        images = images.to(device)
        views = self.unlabelled.views[indices].to(device)
        teacher.model.eval()
        probabilities = torch.sigmoid(teacher.model(images).chd.float())
        targets, keep = chd_pseudo_labels(
            probabilities, views, self.options.pseudo_positive_threshold, self.options.pseudo_negative_threshold
        )
        allowed = allowed_chd(views)
        stats = {
            "chd_pseudo_kept_share": float(keep.sum()) / max(float(allowed.sum()), 1.0),
            "chd_pseudo_positive_share": float((targets.bool() & keep).sum()) / max(float(keep.sum()), 1.0),
        }
        return {"images": images, "views": views, "targets": targets, "keep": keep, "stats": stats}

    def state_dict(self) -> dict[str, Any]:
        state = {"labelled_sampler": self.labelled_sampler.state_dict(), "generator": self.generator.get_state()}
        if self.unlabelled_sampler is not None:
            state["unlabelled_sampler"] = self.unlabelled_sampler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.labelled_sampler.load_state_dict(state["labelled_sampler"])
        self.generator.set_state(state["generator"])
        if self.unlabelled_sampler is not None:
            self.unlabelled_sampler.load_state_dict(state["unlabelled_sampler"])


def train_stage2(
    config: TrainConfig,
    init: Path,
    labelled_source: Path,
    unlabelled_source: Path | None,
    validation_source: Path | None,
    run_dir: Path,
    resume: bool = False,
) -> dict[str, Any]:
    """Run stage 2 from the stage-1 checkpoint ``init`` with the generic trainer.

    ``config.model`` is not used: the network comes from ``init`` plus ``stage2.head_options``.

    Returns:
        The trainer's summary: final iteration, best score and its iteration.
    """
    from fetuskit.training.run import train

    if config.stage != CHDFineTuneTask.name:
        raise Stage2Error(f"train_stage2 needs stage={CHDFineTuneTask.name!r}, got {config.stage!r}")
    model = model_from_stage1(init, config.stage2.head_options, config.run.seed)
    return train(config, labelled_source, unlabelled_source, validation_source, run_dir, resume=resume, model=model)
