"""Training data held in memory at the training resolution, and resumable samplers.

Each image is read once, converted with ``fetuskit.transforms.image_to_tensor`` (bilinear) and
its mask with ``mask_to_tensor`` (nearest), and kept as one stacked tensor. At 256 x 256 this
is 256 KiB per image in float32, about 0.7 GiB for all 2,800 FETUS training frames.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fetuskit.labels import CLASS_MASK, CLASS_NAMES, NUM_CHD, NUM_VIEWS
from fetuskit.transforms import image_to_tensor, mask_to_tensor

logger = logging.getLogger(__name__)


class TrainingDataError(ValueError):
    """Training cases that cannot be used as given; the message lists every offending file."""


@dataclass
class CaseTensors:
    """A set of cases stacked at one square size S.

    Attributes:
        names: case names, in order.
        paths: image file of each case.
        images: (N, 1, S, S) float32 in [0, 1].
        views: (N,) int64 0-based view indices.
        masks: (N, S, S) uint8 class maps (nearest-resized), or None for unlabelled cases.
        chd: (N, 7) float32 0/1 CHD labels, or None for unlabelled cases.
        full_masks: per case the (H, W) uint8 mask at the label file's own size. Only
            validation keeps them, because scoring happens at full resolution. Else empty.
    """

    names: list[str]
    paths: list[Path]
    images: torch.Tensor
    views: torch.Tensor
    masks: torch.Tensor | None = None
    chd: torch.Tensor | None = None
    full_masks: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    def indices_by_view(self) -> list[torch.Tensor]:
        """Return, per 0-based view index, the (K,) int64 indices of the cases of that view."""
        return [torch.nonzero(self.views == view).flatten() for view in range(NUM_VIEWS)]


def _case_view(case: Any, image: Any) -> int | None:
    if image.view is not None:
        return int(image.view)
    # A case list may carry the file view id 1..4 when the image file lacks it.
    view_id = getattr(case, "view_id", None)
    if view_id is not None and 1 <= int(view_id) <= NUM_VIEWS:
        return int(view_id) - 1
    return None


def drop_disallowed_classes(mask: np.ndarray, view: int, source: Path | str) -> np.ndarray:
    """Return ``mask`` with pixels of classes the view does not allow set to background.

    The loss gives disallowed classes a logit of -1e9, so one such ground-truth pixel would
    add about 1e9 to the cross-entropy. Inference can never output these classes either, so
    training treats them as background and logs each file where this happens.
    """
    disallowed = ~CLASS_MASK[view][mask]
    if not disallowed.any():
        return mask
    found = sorted(int(c) for c in np.unique(mask[disallowed]))
    logger.warning(
        "%s: %d pixels of classes %s, which view %d does not allow, are trained as background; "
        "check the label file or the view id",
        source, int(disallowed.sum()), ", ".join(f"{c} ({CLASS_NAMES[c]})" for c in found), view + 1,
    )
    cleaned = mask.copy()
    cleaned[disallowed] = 0
    return cleaned


def load_labelled(cases: Sequence[Any], size: int, keep_full_masks: bool = False) -> CaseTensors:
    """Read labelled cases into memory at ``size``.

    Args:
        cases: ``fetuskit.cases.Case`` objects, each with an image and a label file.
        size: side of the square training input, in pixels.
        keep_full_masks: also keep each full-resolution mask (for validation).

    Raises:
        TrainingDataError: listing every case without a label file or without a known view;
            training needs both, because the loss masks classes by view.
    """
    from fetuskit.io import read_image, read_label

    problems = []
    names, paths, images, views, masks, chd, full_masks = [], [], [], [], [], [], []
    for case in cases:
        if case.label is None:
            problems.append(f"{case.image}: no label file")
            continue
        image = read_image(case.image)
        view = _case_view(case, image)
        if view is None:
            problems.append(f"{case.image}: unknown view ({image.view_reason})")
            continue
        mask, label = read_label(case.label, image.image.shape)
        names.append(case.name)
        paths.append(Path(case.image))
        images.append(image_to_tensor(image.image, size))
        views.append(view)
        masks.append(mask_to_tensor(drop_disallowed_classes(mask, view, case.label), size).to(torch.uint8))
        chd.append(torch.from_numpy(np.asarray(label, dtype=np.float32)))
        if keep_full_masks:
            full_masks.append(np.asarray(mask, dtype=np.uint8))
    if problems:
        raise TrainingDataError(
            f"{len(problems)} labelled case(s) cannot be used for training: " + "; ".join(problems)
            + ". Give each labelled image a view id 1..4 and a label file, or move it to the unlabelled list."
        )
    return CaseTensors(
        names=names,
        paths=paths,
        images=_stack(images, (0, 1, size, size), torch.float32),
        views=torch.tensor(views, dtype=torch.long),
        masks=_stack(masks, (0, size, size), torch.uint8),
        chd=_stack(chd, (0, NUM_CHD), torch.float32),
        full_masks=full_masks,
    )


def load_unlabelled(cases: Sequence[Any], size: int) -> CaseTensors:
    """Read unlabelled cases into memory at ``size``; a case without a known view is skipped.

    Each skipped case is logged as a warning with its file and reason.
    """
    from fetuskit.io import read_image

    names, paths, images, views = [], [], [], []
    for case in cases:
        image = read_image(case.image)
        view = _case_view(case, image)
        if view is None:
            logger.warning("skipping unlabelled image %s: unknown view (%s)", case.image, image.view_reason)
            continue
        names.append(case.name)
        paths.append(Path(case.image))
        images.append(image_to_tensor(image.image, size))
        views.append(view)
    return CaseTensors(
        names=names,
        paths=paths,
        images=_stack(images, (0, 1, size, size), torch.float32),
        views=torch.tensor(views, dtype=torch.long),
    )


def _stack(tensors: list[torch.Tensor], empty_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if not tensors:
        return torch.zeros(empty_shape, dtype=dtype)
    return torch.stack(tensors).to(dtype)


class ShardedSampler:
    """Endless shuffled batches of indices, sharded across processes, resumable.

    Each epoch is a permutation of 0..size-1 drawn from a generator seeded with
    (seed, epoch), so the order depends only on the seed and never on global RNG state.
    Process ``rank`` of ``world_size`` takes every ``world_size``-th element; an epoch is
    padded by wrapping around so all processes get the same number of indices.

    Args:
        size: number of cases; must be positive.
        batch_size: indices per batch on this process.
        seed: base seed, the same on every process.
        rank, world_size: this process's shard.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if size <= 0:
            raise TrainingDataError("cannot sample batches from an empty set of cases")
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0
        self._shard = self._epoch_shard(0)

    def _epoch_shard(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.size, generator=generator)
        per_rank = -(-self.size // self.world_size)
        padded = order.repeat(-(-per_rank * self.world_size // self.size))[: per_rank * self.world_size]
        return padded[self.rank :: self.world_size]

    def next_batch(self) -> torch.Tensor:
        """Return the next (batch_size,) int64 indices, continuing into the next epoch as needed."""
        picked = []
        remaining = self.batch_size
        while remaining > 0:
            if self.position >= len(self._shard):
                self.epoch += 1
                self.position = 0
                self._shard = self._epoch_shard(self.epoch)
            take = self._shard[self.position : self.position + remaining]
            picked.append(take)
            self.position += len(take)
            remaining -= len(take)
        return torch.cat(picked)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._shard = self._epoch_shard(self.epoch)


def same_view_partners(
    views: torch.Tensor, pool_by_view: Sequence[torch.Tensor], generator: torch.Generator
) -> torch.Tensor:
    """Draw for each (N,) view a random case index of the SAME view from ``pool_by_view``.

    A CutMix partner of another view would paste structures the view does not allow.
    One random number is drawn per item whatever the pools hold, to keep the stream aligned.
    """
    draws = torch.rand(len(views), generator=generator)
    partners = torch.empty(len(views), dtype=torch.long)
    for item, view in enumerate(views.tolist()):
        pool = pool_by_view[view]
        if len(pool) == 0:
            raise TrainingDataError(f"no case of view index {view} to pair with for CutMix")
        partners[item] = pool[min(int(draws[item] * len(pool)), len(pool) - 1)]
    return partners
