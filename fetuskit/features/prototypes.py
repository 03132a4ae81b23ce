"""Class prototypes in a frozen feature space and the check of pseudo-labels against them.

A class prototype is the L2-normalised mean feature of the pixels labelled with that class.
A confident pseudo-labelled pixel stays in the loss only when its feature is at least as
similar (cosine) to its own class's prototype as to every other present class's prototype.
All functions are pure except ``PrototypeEMA``, which keeps prototypes across iterations.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from fetuskit.transforms import resize_probabilities


class PrototypeCheck(NamedTuple):
    """Result of ``prototype_keep_mask``.

    Attributes:
        keep: (N, H, W) bool, True where a confident pixel passes the check. False wherever
            ``confident`` is False.
        dropped_fraction: dropped confident pixels / confident pixels, 0.0 when none is confident.
    """

    keep: torch.Tensor
    dropped_fraction: float


def _check_label_inputs(features: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if features.ndim != 4:
        raise ValueError(f"features must be (N, D, h, w), got shape {tuple(features.shape)}")
    if labels.ndim != 3 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"{name} must be (N, H, W) with N = {features.shape[0]} as in features, got shape {tuple(labels.shape)}"
        )


def class_fractions(
    labels: torch.Tensor, weights: torch.Tensor, num_classes: int, grid: tuple[int, int]
) -> torch.Tensor:
    """Downsample a label map to a feature grid as weighted class fractions.

    Each class's one-hot map, multiplied by the pixel weights, is average-pooled onto the grid
    with ``adaptive_avg_pool2d``. A cell's value for class k is the weighted share of its
    pixels labelled k, so a cell on a boundary counts towards both classes in proportion.

    Args:
        labels: (N, H, W) integer class ids. Values outside [0, num_classes) are allowed only
            where ``weights`` is 0.
        weights: (N, H, W) float in [0, 1] (or bool). 0 excludes a pixel.
        num_classes: K.
        grid: (h, w) feature rows and columns.

    Returns:
        (N, K, h, w) float32 in [0, 1].
    """
    weights = weights.float()
    valid = weights > 0
    if bool(((labels < 0) | (labels >= num_classes))[valid].any()):
        found = sorted(set(labels[valid].unique().tolist()) - set(range(num_classes)))
        raise ValueError(f"labels contain class ids {found} outside [0, {num_classes}) on weighted pixels")
    safe_labels = torch.where(valid, labels.long(), torch.zeros_like(labels, dtype=torch.long))
    one_hot = F.one_hot(safe_labels, num_classes).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(one_hot * weights[:, None], grid)


def class_prototypes(
    features: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None,
    num_classes: int,
    min_mass: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute one prototype per class as the fraction-weighted mean feature.

    Labels are brought to the feature grid with ``class_fractions`` (one-hot average pooling),
    so a feature cell contributes to a class in proportion to the weighted share of its pixels
    in that class.

    Args:
        features: (N, D, h, w) float, any norm. They are L2-normalised over D first.
        labels: (N, H, W) integer class ids (pseudo-labels, ground truth or both). H and W
            need not be multiples of h and w.
        weights: (N, H, W) bool or float in [0, 1] selecting the pixels used, for example the
            confident pseudo-labels or the labelled images. None uses every pixel.
        num_classes: K.
        min_mass: a class with total fraction (in feature cells) at or below this has no prototype.

    Returns:
        ``(prototypes, present)``: (K, D) float32 with unit rows for present classes and zero
        rows otherwise, and (K,) bool. With no weighted pixel at all, nothing is present.
    """
    _check_label_inputs(features, labels, "labels")
    if weights is None:
        weights = torch.ones(labels.shape, device=labels.device)
    if weights.shape != labels.shape:
        raise ValueError(f"weights must have the labels' shape {tuple(labels.shape)}, got {tuple(weights.shape)}")

    grid = (features.shape[2], features.shape[3])
    fractions = class_fractions(labels.to(features.device), weights.to(features.device), num_classes, grid)
    unit = F.normalize(features.float(), dim=1)
    sums = torch.einsum("nkhw,ndhw->kd", fractions, unit)
    mass = fractions.sum(dim=(0, 2, 3))
    present = mass > min_mass
    prototypes = torch.where(present[:, None], F.normalize(sums, dim=1), torch.zeros_like(sums))
    return prototypes, present


def prototype_similarity(features: torch.Tensor, prototypes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Return cosine similarities to each prototype, upsampled to ``size``.

    Args:
        features: (N, D, h, w) float, normalised over D inside.
        prototypes: (K, D) unit rows (zero rows give similarity 0).
        size: (H, W) output rows and columns.

    Returns:
        (N, K, H, W) float32 in [-1, 1], computed at the feature grid and resized bilinearly
        (align_corners=False).
    """
    unit = F.normalize(features.float(), dim=1)
    similarity = torch.einsum("ndhw,kd->nkhw", unit, prototypes.float().to(unit.device))
    return resize_probabilities(similarity, size[0], size[1])


def prototype_keep_mask(
    features: torch.Tensor,
    pseudo: torch.Tensor,
    confident: torch.Tensor,
    prototypes: torch.Tensor,
    present: torch.Tensor,
    margin: float = 0.0,
    keep_missing: bool = True,
) -> PrototypeCheck:
    """Check confident pseudo-labels against the class prototypes.

    Computes the similarities with ``prototype_similarity`` at the pseudo-labels' size and
    applies ``similarity_keep_mask`` to them; see there for the rule.

    Args:
        features: (N, D, h, w) float, any norm.
        pseudo: (N, H, W) integer class ids in [0, K) where ``confident`` is True.
        confident: (N, H, W) bool, the pixels that would enter the loss.
        prototypes: (K, D) unit rows, from ``class_prototypes`` or ``PrototypeEMA``.
        present: (K,) bool, classes that have a prototype.
        margin: tolerance in cosine similarity.
        keep_missing: policy for pixels whose class has no prototype.

    Returns:
        ``PrototypeCheck(keep, dropped_fraction)``; ``keep`` is False wherever ``confident``
        is False.
    """
    _check_label_inputs(features, pseudo, "pseudo")
    similarity = prototype_similarity(features, prototypes, (pseudo.shape[1], pseudo.shape[2]))
    return similarity_keep_mask(similarity, pseudo, confident, present, margin, keep_missing)


def similarity_keep_mask(
    similarity: torch.Tensor,
    pseudo: torch.Tensor,
    confident: torch.Tensor,
    present: torch.Tensor,
    margin: float = 0.0,
    keep_missing: bool = True,
) -> PrototypeCheck:
    """Check confident pseudo-labels against per-pixel similarities to the class prototypes.

    A confident pixel of class c is kept when ``sim_c >= sim_j - margin`` for every present
    class j != c. ``margin`` 0 is the plain rule (ties are kept), a positive margin tolerates
    another class being slightly closer, and a negative one requires the own class to win by
    that much. A pixel whose class has no prototype is kept when ``keep_missing`` is True and
    dropped otherwise. A pixel is kept when no other class is present.

    Args:
        similarity: (N, K, H, W) float, for example from ``prototype_similarity``.
        pseudo: (N, H, W) integer class ids in [0, K) where ``confident`` is True.
        confident: (N, H, W) bool, the pixels that would enter the loss.
        present: (K,) bool, classes that have a prototype.
        margin: tolerance in cosine similarity, see above.
        keep_missing: policy for pixels whose class has no prototype.

    Returns:
        ``PrototypeCheck(keep, dropped_fraction)``; ``keep`` is False wherever ``confident``
        is False.
    """
    if similarity.ndim != 4 or similarity.shape[0] != pseudo.shape[0] or similarity.shape[2:] != pseudo.shape[1:]:
        raise ValueError(
            f"similarity must be (N, K, H, W) with N, H, W of the pseudo-labels {tuple(pseudo.shape)}, "
            f"got {tuple(similarity.shape)}"
        )
    if confident.shape != pseudo.shape:
        raise ValueError(f"confident must have the pseudo-labels' shape {tuple(pseudo.shape)}, got {tuple(confident.shape)}")
    num_classes = similarity.shape[1]
    if present.shape != (num_classes,):
        raise ValueError(f"present must be ({num_classes},) like the prototype rows, got {tuple(present.shape)}")
    confident = confident.bool()
    if bool(((pseudo < 0) | (pseudo >= num_classes))[confident].any()):
        raise ValueError(f"confident pseudo-labels must be class ids in [0, {num_classes})")

    present = present.to(similarity.device)
    classes = torch.where(confident, pseudo.long(), torch.zeros_like(pseudo, dtype=torch.long)).to(similarity.device)

    own = similarity.gather(1, classes[:, None])[:, 0]
    # Other classes compete only when present. The own class is excluded by setting it to -inf.
    competing = present[None, :, None, None] & (torch.arange(num_classes, device=similarity.device)[None, :, None, None] != classes[:, None])
    best_other = similarity.masked_fill(~competing, float("-inf")).amax(dim=1)
    consistent = own >= best_other - margin

    own_present = present[classes]
    passes = torch.where(own_present, consistent, torch.full_like(consistent, keep_missing))
    keep = passes & confident.to(passes.device)

    confident_count = int(confident.sum())
    dropped = confident_count - int(keep.sum())
    fraction = dropped / confident_count if confident_count else 0.0
    return PrototypeCheck(keep=keep, dropped_fraction=fraction)


class PrototypeEMA:
    """Prototypes kept as an exponential moving average across training iterations.

    A batch rarely contains all 15 classes, so each update changes only the classes present
    in it: ``p = normalise(momentum * p + (1 - momentum) * p_batch)``. A class seen for the
    first time takes the batch prototype as is.

    Attributes:
        prototypes: (K, D) float32, unit rows for present classes, zero rows otherwise.
        present: (K,) bool, classes seen in at least one update.
    """

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.9) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.prototypes = torch.zeros(num_classes, dim)
        self.present = torch.zeros(num_classes, dtype=torch.bool)

    def update(self, prototypes: torch.Tensor, present: torch.Tensor) -> None:
        """Blend in the (K, D) batch prototypes of the classes marked in the (K,) ``present``."""
        if prototypes.shape != self.prototypes.shape or present.shape != self.present.shape:
            raise ValueError(
                f"expected prototypes {tuple(self.prototypes.shape)} and present {tuple(self.present.shape)}, "
                f"got {tuple(prototypes.shape)} and {tuple(present.shape)}"
            )
        batch = prototypes.detach().float().to(self.prototypes.device)
        present = present.to(self.present.device)
        seen = present & self.present
        new = present & ~self.present
        blended = F.normalize(self.momentum * self.prototypes + (1.0 - self.momentum) * batch, dim=1)
        self.prototypes = torch.where(seen[:, None], blended, self.prototypes)
        self.prototypes = torch.where(new[:, None], batch, self.prototypes)
        self.present = self.present | present

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Return the prototypes and presence mask for a checkpoint."""
        return {"prototypes": self.prototypes.clone(), "present": self.present.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned, checking shapes."""
        if state["prototypes"].shape != self.prototypes.shape or state["present"].shape != self.present.shape:
            raise ValueError(
                f"prototype state has shapes {tuple(state['prototypes'].shape)} and {tuple(state['present'].shape)}, "
                f"expected {tuple(self.prototypes.shape)} and {tuple(self.present.shape)}"
            )
        self.prototypes = state["prototypes"].float().clone()
        self.present = state["present"].bool().clone()
