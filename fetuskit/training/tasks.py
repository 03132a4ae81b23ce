"""Training tasks: what one optimiser step samples, which parameters train and which losses apply.

The trainer is generic. A task object, chosen by ``TrainConfig.stage``, supplies the batches,
the trainable parameters and the loss terms, so another stage (for example classification
fine-tuning with a frozen segmentation network) is another task class in :data:`TASKS`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fetuskit.labels import NUM_CLASSES
from fetuskit.training import augment, losses
from fetuskit.training.config import TrainConfig
from fetuskit.training.data import CaseTensors, ShardedSampler, same_view_partners
from fetuskit.training.ema import MeanTeacher

if TYPE_CHECKING:
    from fetuskit.features.cache import ImageFeatureStore


@dataclass
class StepResult:
    """The outcome of one task step.

    Attributes:
        total: scalar loss to back-propagate.
        terms: each weighted-in loss term as a float, for logging.
        stats: other per-step figures (shares of kept pixels), for logging.
    """

    total: torch.Tensor
    terms: dict[str, float]
    stats: dict[str, float]


class Task(Protocol):
    """The interface the trainer requires of a training stage."""

    name: str

    def trainable_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]: ...

    def step(self, student: nn.Module, teacher: MeanTeacher, device: torch.device) -> StepResult: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class FeatureCheck:
    """Prototype check on frozen features: drops pseudo-labels closer to another class's prototype.

    Each training image goes through the extractor once, un-augmented, and its features are
    kept in memory (``fetuskit.features.cache.ImageFeatureStore``). Class prototypes come from
    the labelled images of each step with their un-augmented ground-truth masks and are kept
    across steps in an EMA bank (``fetuskit.features.prototypes.PrototypeEMA``). For the weak
    view of an unlabelled image, the prototype similarities of the un-augmented image are
    warped with the view's affine matrix. The weak view's gamma change is not seen by the
    extractor, so the check approximates one on features of the augmented image.

    Call :meth:`attach` with the training images before the first ``update`` or ``keep``.
    """

    def __init__(self, config: TrainConfig) -> None:
        from fetuskit.features import build_feature_extractor
        from fetuskit.features.prototypes import PrototypeEMA

        options = config.features
        self.extractor = build_feature_extractor(options.extractor, **options.options)
        self.keep_options = dict(options.keep_options)
        self.bank = PrototypeEMA(NUM_CLASSES, self.extractor.dim, momentum=options.prototype_momentum)
        self.labelled: ImageFeatureStore | None = None
        self.labelled_masks: torch.Tensor | None = None
        self.unlabelled: ImageFeatureStore | None = None

    def attach(self, labelled: CaseTensors, unlabelled: CaseTensors | None) -> None:
        """Index the training-size images and masks that ``update`` and ``keep`` refer to."""
        from fetuskit.features.cache import ImageFeatureStore

        self.labelled = ImageFeatureStore(self.extractor, labelled.images)
        self.labelled_masks = labelled.masks
        self.unlabelled = ImageFeatureStore(self.extractor, unlabelled.images) if unlabelled is not None else None

    @torch.no_grad()
    def update(self, indices: torch.Tensor) -> None:
        """Blend the prototypes of the labelled images at (N,) ``indices`` into the bank."""
        from fetuskit.features.prototypes import class_prototypes

        if self.labelled is None or self.labelled_masks is None:
            raise RuntimeError("FeatureCheck.attach must be called before update")
        masks = self.labelled_masks[indices].long()
        prototypes, present = class_prototypes(self.labelled.features(indices), masks, None, NUM_CLASSES)
        self.bank.update(prototypes, present)

    @torch.no_grad()
    def keep(
        self, indices: torch.Tensor, theta: torch.Tensor, labels: torch.Tensor, confident: torch.Tensor
    ) -> torch.Tensor:
        """Return (N, S, S) bool: confident pixels whose pseudo-label passes the prototype check.

        Args:
            indices: (N,) int64 unlabelled images the weak views were made from.
            theta: (N, 2, 3) affine matrices of the weak views, as ``augment.random_affine`` draws them.
            labels: (N, S, S) int64 pseudo-labels of the weak views.
            confident: (N, S, S) bool pixels above the confidence threshold.
        """
        from fetuskit.features.prototypes import prototype_similarity, similarity_keep_mask

        if self.unlabelled is None:
            raise RuntimeError("FeatureCheck.attach must be called with unlabelled images before keep")
        features = self.unlabelled.features(indices).to(labels.device)
        similarity = prototype_similarity(features, self.bank.prototypes, (labels.shape[1], labels.shape[2]))
        # Warping the similarities at full size keeps boundaries as sharp as the labels they check.
        similarity = augment.warp_maps(similarity, theta.to(similarity.device))
        check = similarity_keep_mask(similarity, labels, confident, self.bank.present, **self.keep_options)
        return check.keep.to(confident.device)

    def state_dict(self) -> dict[str, Any]:
        return {"bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bank.load_state_dict(state["bank"])


class SegmentationTask:
    """Stage 1: supervised segmentation, CHD and view losses, plus mean-teacher pseudo-labels.

    Labelled batches get the weak view (shared warp of image and mask, gamma). Unlabelled
    batches, when present, get the weak view for the teacher and the strong view with CutMix
    (partner of the same view) for the student. Both go through the student in ONE forward
    pass, so DistributedDataParallel gets one forward per backward and BatchNorm normalises both.

    Args:
        config: the training configuration.
        labelled: labelled cases at the training size (masks and CHD labels present).
        unlabelled: unlabelled cases at the same size, or None for supervised-only training.
        rank, world_size: this process's data shard.
        chd_pos_weight: (7,) positive-class weights of the CHD loss.
        feature_check: optional prototype check of pseudo-labels.
    """

    name = "stage1"

    def __init__(
        self,
        config: TrainConfig,
        labelled: CaseTensors,
        unlabelled: CaseTensors | None,
        *,
        rank: int = 0,
        world_size: int = 1,
        chd_pos_weight: torch.Tensor | None = None,
        feature_check: FeatureCheck | None = None,
    ) -> None:
        self.config = config
        self.labelled = labelled
        self.unlabelled = unlabelled if unlabelled is not None and len(unlabelled) > 0 else None
        seed = config.run.seed
        self.labelled_sampler = ShardedSampler(
            len(labelled), config.data.labelled_batch_size, seed, rank, world_size
        )
        self.unlabelled_sampler = None
        self.pool_by_view: list[torch.Tensor] = []
        if self.unlabelled is not None:
            self.unlabelled_sampler = ShardedSampler(
                len(self.unlabelled), config.data.unlabelled_batch_size, seed + 1, rank, world_size
            )
            self.pool_by_view = self.unlabelled.indices_by_view()
        # Augmentation differs per process; sampling order is shared and sharded.
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (rank + 1))
        self.chd_pos_weight = chd_pos_weight
        self.feature_check = feature_check
        if feature_check is not None:
            feature_check.attach(labelled, self.unlabelled)

    def trainable_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        """Yield every parameter that requires gradients, so frozen encoders stay frozen."""
        return ((name, param) for name, param in model.named_parameters() if param.requires_grad)

    def step(self, student: nn.Module, teacher: MeanTeacher, device: torch.device) -> StepResult:
        """Sample, augment and run one step's forward pass; return the loss and its terms."""
        config = self.config
        weights = config.loss
        labelled = self._labelled_batch()
        unlabelled = self._unlabelled_batch() if self.unlabelled is not None else None

        images_l = labelled["images"].to(device)
        masks_l = labelled["masks"].to(device)
        views_l = labelled["views"].to(device)
        inputs = [images_l]
        pseudo = None
        if self.feature_check is not None:
            self.feature_check.update(labelled["indices"])
        if unlabelled is not None:
            pseudo = self._pseudo_labels(teacher, unlabelled, device)
            inputs.append(pseudo["student_images"])
        output = student(torch.cat(inputs))
        count_l = images_l.shape[0]

        seg_l = losses.mask_logits_by_view(output.seg[:count_l], views_l)
        cross_entropy = F.cross_entropy(seg_l, masks_l)
        dice = losses.soft_dice_loss(seg_l, masks_l, views_l)
        pos_weight = self.chd_pos_weight.to(device) if self.chd_pos_weight is not None else None
        chd = losses.chd_loss(output.chd[:count_l], labelled["chd"].to(device), views_l, pos_weight)
        all_views = views_l if pseudo is None else torch.cat([views_l, pseudo["views"]])
        view = F.cross_entropy(output.view.float(), all_views)

        terms = {
            "cross_entropy": cross_entropy,
            "dice": dice,
            "chd": chd,
            "view": view,
        }
        total = (
            weights.cross_entropy_weight * cross_entropy
            + weights.dice_weight * dice
            + weights.chd_weight * chd
            + weights.view_weight * view
        )
        stats: dict[str, float] = {}
        if pseudo is not None:
            unsupervised = losses.pseudo_label_loss(
                output.seg[count_l:], pseudo["labels"], pseudo["views"], pseudo["keep"]
            )
            terms["pseudo_label"] = unsupervised
            total = total + weights.unlabelled_weight * unsupervised
            stats = pseudo["stats"]
        return StepResult(total=total, terms={k: float(v.detach()) for k, v in terms.items()}, stats=stats)

    def _labelled_batch(self) -> dict[str, torch.Tensor]:
        indices = self.labelled_sampler.next_batch()
        images, masks = augment.weak_augment(
            self.labelled.images[indices],
            self.labelled.masks[indices].long(),
            self.config.augment,
            self.generator,
        )
        return {
            "indices": indices,
            "images": images,
            "masks": masks,
            "views": self.labelled.views[indices],
            "chd": self.labelled.chd[indices],
        }

    def _unlabelled_batch(self) -> dict[str, torch.Tensor]:
        indices = self.unlabelled_sampler.next_batch()
        views = self.unlabelled.views[indices]
        partners = same_view_partners(views, self.pool_by_view, self.generator)
        config = self.config.augment
        both = torch.cat([self.unlabelled.images[indices], self.unlabelled.images[partners]])
        weak, _, theta = augment.weak_augment_with_affine(both, None, config, self.generator)
        strong = augment.strong_augment(weak, config, self.generator)
        size = weak.shape[-1]
        boxes = augment.cutmix_boxes(len(indices), size, size, config, self.generator)
        return {
            "indices": torch.cat([indices, partners]),
            "theta": theta,
            "weak": weak,
            "strong": strong,
            "views": views,
            "boxes": boxes,
        }

    @torch.no_grad()
    def _pseudo_labels(self, teacher: MeanTeacher, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
        """Teacher pseudo-labels for the weak view of each image and its CutMix partner.

        The teacher runs in eval mode, so each image's labels do not depend on the batch.
        """
        count = batch["views"].shape[0]
        weak = batch["weak"].to(device)
        views = batch["views"].to(device)
        both_views = torch.cat([views, views])
        teacher.model.eval()
        labels, confidence = losses.pseudo_labels(teacher.model(weak).seg, both_views)
        confident = confidence >= self.config.loss.confidence_threshold
        keep = confident
        if self.feature_check is not None:
            keep = self.feature_check.keep(batch["indices"], batch["theta"], labels, confident)

        boxes = batch["boxes"].to(device)
        mixed_labels = augment.apply_cutmix(labels[:count], labels[count:], boxes)
        mixed_keep = augment.apply_cutmix(keep[:count], keep[count:], boxes)
        strong = batch["strong"].to(device)
        student_images = augment.apply_cutmix(strong[:count], strong[count:], boxes)

        confident_count = float(confident.sum())
        stats = {
            "confident_share": confident_count / confident.numel(),
            "feature_dropped_share": float((confident & ~keep).sum()) / max(confident_count, 1.0),
        }
        return {
            "student_images": student_images,
            "labels": mixed_labels,
            "keep": mixed_keep,
            "views": views,
            "stats": stats,
        }

    def state_dict(self) -> dict[str, Any]:
        state = {
            "labelled_sampler": self.labelled_sampler.state_dict(),
            "generator": self.generator.get_state(),
        }
        if self.unlabelled_sampler is not None:
            state["unlabelled_sampler"] = self.unlabelled_sampler.state_dict()
        if self.feature_check is not None:
            state["feature_check"] = self.feature_check.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.labelled_sampler.load_state_dict(state["labelled_sampler"])
        self.generator.set_state(state["generator"])
        if self.unlabelled_sampler is not None:
            self.unlabelled_sampler.load_state_dict(state["unlabelled_sampler"])
        if self.feature_check is not None:
            self.feature_check.load_state_dict(state["feature_check"])


# Imported here because stage2 builds on this module's StepResult.
from fetuskit.training.stage2 import CHDFineTuneTask  # noqa: E402

TASKS: dict[str, type] = {"stage1": SegmentationTask, "stage2": CHDFineTuneTask}
