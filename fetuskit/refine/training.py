"""Fine-tuning of a refiner on labelled FETUS cases, with prompts from perturbed ground truth.

The image encoder is frozen, so each image is encoded once and its embedding cached. Only the
mask decoder learns, unless SAM-Med2D's ``train_adapters`` also trains the encoder adapters,
which turns the cache off. Each step takes one image, perturbs the ground-truth mask of up to
``prompts_per_image`` classes the way a backbone errs (erosion or dilation, elastic warp, blob
noise, box jitter), and decodes all their prompts as one batch. The loss is binary cross
entropy plus Dice against the ground truth inside the prompt box, plus the squared error of
the predicted IoU against the IoU actually reached (the refiner gates on that prediction).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fetuskit.cases import load_cases
from fetuskit.io import read_image, read_label
from fetuskit.labels import NUM_CLASSES
from fetuskit.refine.perturb import jitter_box, perturb_mask
from fetuskit.refine.prompts import box_with_margin, enclosed_region, interior_point, largest_component
from fetuskit.refine.refiner import RefinerConfig, box_mask, mask_prompt_logits
from fetuskit.refine.segmenter import InputFrame, PromptableSegmenter, prepare_input
from fetuskit.refine.weights import get_backend, load_state_dict_strict, resolve_weights, save_weights

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "refiner.pt"
REFINER_CONFIG_FILE = "refiner_config.json"
TRAINING_CONFIG_FILE = "training_config.json"
METRICS_FILE = "metrics.jsonl"


class RefinerTrainingError(ValueError):
    """Training data or settings that cannot be used; the message names the case or value."""


@dataclass
class RefinerTrainingConfig:
    """Settings of refiner fine-tuning. Distances are in image pixels.

    Attributes:
        backend: ``"litemedsam"`` or ``"sam-med2d"``.
        weights: starting weights; None uses the backend's packaged weights.
        epochs: passes over the labelled images.
        prompts_per_image: classes decoded together per image and step (one batch).
        lr: AdamW learning rate; weight_decay: AdamW weight decay.
        margin: box margin, as in ``RefinerConfig.margin``.
        max_shift: largest boundary shift of the mask perturbations.
        box_jitter: largest move of each box side, as a fraction of the box size.
        min_area: classes with fewer ground-truth pixels are not trained on.
        use_point, use_mask_prompt: prompts as in ``RefinerConfig``.
        enclosing_classes: classes trained on the filled region they outline, as in
            ``RefinerConfig.enclosing_classes``; use the same setting when refining.
        train_adapters: also train SAM-Med2D's encoder adapters (encodes every step).
        max_cases: use only the first N labelled cases (None: all).
        seed: seed of numpy and torch generators.
        device: torch device.
    """

    backend: str = "litemedsam"
    weights: str | None = None
    epochs: int = 5
    prompts_per_image: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-4
    margin: int = 5
    max_shift: int = 3
    box_jitter: float = 0.05
    min_area: int = 16
    use_point: bool = False
    use_mask_prompt: bool = False
    enclosing_classes: tuple[int, ...] = ()
    train_adapters: bool = False
    max_cases: int | None = None
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        get_backend(self.backend)
        self.enclosing_classes = tuple(int(c) for c in self.enclosing_classes)
        invalid = [c for c in self.enclosing_classes if not 1 <= c < NUM_CLASSES]
        if invalid:
            raise RefinerTrainingError(
                f"enclosing_classes {invalid} are not foreground classes: expected ids 1..{NUM_CLASSES - 1}"
            )
        if self.train_adapters and self.backend != "sam-med2d":
            raise RefinerTrainingError(f"train_adapters needs the sam-med2d backend, got {self.backend!r}")
        if self.epochs < 1 or self.prompts_per_image < 1:
            raise RefinerTrainingError(
                f"epochs and prompts_per_image must be >= 1, got {self.epochs} and {self.prompts_per_image}"
            )


@dataclass
class _TrainingImage:
    name: str
    image: np.ndarray
    mask: np.ndarray
    classes: list[int]
    frame: InputFrame
    input: torch.Tensor
    embedding: torch.Tensor | None


def load_training_images(source: str | Path, config: RefinerTrainingConfig) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Read (name, image (H, W) float32 [0, 1], mask (H, W) uint8) for every labelled case."""
    cases = [case for case in load_cases(source) if case.label is not None]
    if config.max_cases is not None:
        cases = cases[: config.max_cases]
    if not cases:
        raise RefinerTrainingError(f"no labelled cases in {source}: refiner training needs label files")
    items = []
    for case in cases:
        image = read_image(case.image).image
        mask, _ = read_label(case.label, image.shape)
        items.append((case.name, image, mask))
    return items


def _trainable_parameters(model: PromptableSegmenter, config: RefinerTrainingConfig) -> list[torch.nn.Parameter]:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainable = list(model.mask_decoder.parameters())
    if config.train_adapters:
        trainable += [p for name, p in model.image_encoder.named_parameters() if ".Adapter." in name]
    for parameter in trainable:
        parameter.requires_grad_(True)
    return trainable


def _prepare(
    items: list[tuple[str, np.ndarray, np.ndarray]], model: PromptableSegmenter, config: RefinerTrainingConfig
) -> list[_TrainingImage]:
    backend = get_backend(config.backend)
    prepared = []
    for name, image, mask in items:
        classes = [c for c in range(1, NUM_CLASSES) if int((mask == c).sum()) >= config.min_area]
        if not classes:
            logger.warning("%s: no class with at least %d pixels, skipped", name, config.min_area)
            continue
        tensor, frame = prepare_input(image, model.input_size, backend.resize_mode, backend.normalisation)
        tensor = tensor.to(config.device)
        embedding = None
        if not config.train_adapters:
            with torch.inference_mode():
                embedding = model.encode(tensor).clone()
        prepared.append(_TrainingImage(name, image, mask, classes, frame, tensor, embedding))
    if not prepared:
        raise RefinerTrainingError(f"none of the {len(items)} labelled images has a class of >= {config.min_area} pixels")
    return prepared


def _prompt_batch(item: _TrainingImage, rng: np.random.Generator, config: RefinerTrainingConfig):
    count = min(config.prompts_per_image, len(item.classes))
    classes = sorted(int(c) for c in rng.choice(item.classes, size=count, replace=False))
    boxes, points, coarse_maps, targets = [], [], [], []
    for class_id in classes:
        truth = enclosed_region(item.mask, class_id) if class_id in config.enclosing_classes else item.mask == class_id
        coarse = largest_component(perturb_mask(truth, rng, config.max_shift))
        box = jitter_box(box_with_margin(coarse, config.margin), rng, config.box_jitter, truth.shape)
        boxes.append(box)
        points.append(interior_point(coarse))
        coarse_maps.append(coarse.astype(np.float32))
        targets.append(truth & box_mask(box, truth.shape))
    return np.stack(boxes), np.stack(points), np.stack(coarse_maps), np.stack(targets)


def _step_loss(
    model: PromptableSegmenter, item: _TrainingImage, rng: np.random.Generator, config: RefinerTrainingConfig
) -> torch.Tensor:
    boxes, points, coarse_maps, targets = _prompt_batch(item, rng, config)
    device = config.device
    embedding = item.embedding if item.embedding is not None else model.encode(item.input)
    box_tensor = torch.from_numpy(item.frame.boxes_to_input(boxes)).to(device)
    point_tensor = torch.from_numpy(item.frame.points_to_input(points)).to(device) if config.use_point else None
    mask_logits = None
    if config.use_mask_prompt:
        mask_logits = mask_prompt_logits(coarse_maps, item.frame, model.mask_input_size, limit=8.0).to(device)

    low_res, predicted_iou = model.decode(embedding, box_tensor, point_tensor, mask_logits)
    logits = item.frame.logits_to_image(low_res)[:, 0]
    target = torch.from_numpy(targets).to(device=device, dtype=logits.dtype)

    bce = F.binary_cross_entropy_with_logits(logits, target)
    probability = torch.sigmoid(logits)
    intersection = (probability * target).sum(dim=(1, 2))
    dice = 1.0 - (2.0 * intersection + 1.0) / (probability.sum(dim=(1, 2)) + target.sum(dim=(1, 2)) + 1.0)
    with torch.no_grad():
        predicted = logits > 0
        reached = target > 0.5
        union = (predicted | reached).sum(dim=(1, 2)).clamp(min=1)
        reached_iou = (predicted & reached).sum(dim=(1, 2)) / union
    iou_loss = F.mse_loss(predicted_iou[:, 0], reached_iou.to(predicted_iou.dtype))
    return bce + dice.mean() + iou_loss


def train_refiner(source: str | Path, out_dir: str | Path, config: RefinerTrainingConfig) -> dict[str, Any]:
    """Fine-tune a refiner and write its slim weights and configs to ``out_dir``.

    Writes ``refiner.pt`` (slim weights, see ``fetuskit.refine.weights``), ``refiner_config.json``
    (a ``RefinerConfig`` pointing at those weights), ``training_config.json`` and
    ``metrics.jsonl`` (one line per epoch). Returns a summary with the per-epoch mean losses.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)

    weights = resolve_weights(config.backend, config.weights)
    model = get_backend(config.backend).build(weights.model_config)
    load_state_dict_strict(model, weights.state_dict, weights.source)
    model = model.to(config.device).eval()
    trainable = _trainable_parameters(model, config)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)

    items = _prepare(load_training_images(source, config), model, config)
    logger.info(
        "training the %s refiner on %d images, %d trainable parameters", config.backend, len(items),
        sum(p.numel() for p in trainable),
    )
    (out_dir / TRAINING_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=2))

    losses: list[float] = []
    with (out_dir / METRICS_FILE).open("w") as metrics:
        for epoch in range(1, config.epochs + 1):
            # The decoder has no dropout, so eval mode trains it as train mode would, and it
            # keeps the BatchNorm statistics of the frozen TinyViT encoder fixed.
            epoch_losses = []
            for index in rng.permutation(len(items)):
                loss = _step_loss(model, items[int(index)], rng, config)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                epoch_losses.append(float(loss.detach()))
            losses.append(float(np.mean(epoch_losses)))
            metrics.write(json.dumps({"epoch": epoch, "loss": losses[-1]}) + "\n")
            metrics.flush()
            logger.info("epoch %d/%d: loss %.4f", epoch, config.epochs, losses[-1])

    weights_path = save_weights(
        out_dir / WEIGHTS_FILE,
        config.backend,
        weights.model_config,
        model.state_dict(),
        source=f"fine-tuned from {weights.source}",
        extra={"epochs": config.epochs, "final_loss": losses[-1]},
    )
    refiner_config = RefinerConfig(
        backend=config.backend,
        weights=str(weights_path),
        margin=config.margin,
        min_area=config.min_area,
        use_point=config.use_point,
        use_mask_prompt=config.use_mask_prompt,
        enclosing_classes=tuple(config.enclosing_classes),
        device=config.device,
    )
    (out_dir / REFINER_CONFIG_FILE).write_text(json.dumps(refiner_config.to_dict(), indent=2))
    return {"weights": str(weights_path), "losses": losses, "images": len(items)}
