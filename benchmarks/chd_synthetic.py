"""Stage 2 and threshold calibration on synthetic CHD labels that depend on visible image content.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/chd_synthetic.py [--out DIR] [--stage1-iterations 800]``

FOCUS has no disease labels, so this script draws small ultrasound-like frames of all four
views: ellipses and tubes of the classes each view allows, with multiplicative speckle. Each
CHD label is positive in about 12 % of the images whose view allows it, and changes what the
image shows:

- VSD (4CH, LVOT): a dark gap in the septum between left (2) and right (4) ventricle.
- AVV (4CH): a small left atrium (1).
- AH (LVOT, 3VT): a thin ascending aorta (8) or aortic arch (13).
- AS (LVOT): a bright spot at the root of the ascending aorta (8).
- DORV (RVOT): the aorta (8) beside the pulmonary artery instead of behind it.
- PS (RVOT, 3VT): a thin main pulmonary artery (9).
- RAA (3VT): the aortic arch (13) on the other side of the trachea (14).

It trains stage 1 (joint segmentation and pooled CHD head, tiny timm-unet, supervised). Then
it trains stage 2 twice from that checkpoint, with the pooled head and with the multiscale
head plus structure areas. The stage-2 head with the best validation F1 is calibrated on the
validation split, and everything is scored on a held-out test split with the challenge scorer. It prints a Markdown table and checks that the
segmentation logits of every stage-2 model equal the stage-1 teacher's bit for bit.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.summary import evaluate_cases  # noqa: E402
from fetuskit.calibration import CalibrationConfig, calibrate_thresholds, format_report, predict_chd  # noqa: E402
from fetuskit.labels import CHD_MASK, CHD_NAMES, CLASS_MASK  # noqa: E402
from fetuskit.models import tiny_config  # noqa: E402
from fetuskit.models.checkpoint import load_checkpoint  # noqa: E402
from fetuskit.training.config import load_config  # noqa: E402
from fetuskit.training.data import load_labelled  # noqa: E402
from fetuskit.training.run import load_case_list, train  # noqa: E402
from fetuskit.training.stage2 import train_stage2  # noqa: E402
from fetuskit.training.validation import predict_records  # noqa: E402

SIZE = 64
POSITIVE_RATE = 0.12
SPLITS = {"train": 480, "unlabelled": 240, "val": 240, "test": 480}

# Mean intensity of each class: blood pools and vessels are dark, walls are bright.
INTENSITY = {0: 0.30, 1: 0.12, 2: 0.12, 3: 0.12, 4: 0.12, 5: 0.62, 6: 0.15, 7: 0.45,
             8: 0.15, 9: 0.15, 10: 0.15, 11: 0.15, 12: 0.15, 13: 0.15, 14: 0.06}


def ellipse(centre: tuple[float, float], axes: tuple[float, float]) -> np.ndarray:
    """Return a (SIZE, SIZE) bool ellipse with centre and axes given as (row, col) in pixels."""
    rows, cols = np.ogrid[:SIZE, :SIZE]
    return ((rows - centre[0]) / axes[0]) ** 2 + ((cols - centre[1]) / axes[1]) ** 2 <= 1.0


def box(top: float, left: float, height: float, width: float) -> np.ndarray:
    """Return a (SIZE, SIZE) bool rectangle from row ``top``, column ``left``."""
    region = np.zeros((SIZE, SIZE), bool)
    region[int(round(top)) : int(round(top + height)), int(round(left)) : int(round(left + width))] = True
    return region


def draw_view(view: int, label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return the (SIZE, SIZE) uint8 class map of one case. Later shapes paint over earlier ones."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    dr, dc = rng.uniform(-3, 3, size=2)
    scale = rng.uniform(0.9, 1.1)

    def paint(region: np.ndarray, class_id: int) -> None:
        mask[region] = class_id

    if view in (0, 1):
        if view == 0:
            paint(ellipse((32 + dr, 32 + dc), (27 * scale, 28 * scale)), 7)
            paint(ellipse((50 + dr, 42 + dc), (4, 4)), 6)
        paint(ellipse((30 + dr, 30 + dc), (20 * scale, 20 * scale)), 5)
        # Ventricles below, atria above. A septum (class 5) 1 to 3 pixels wide parts left and right.
        paint(ellipse((37 + dr, 23 + dc), (9 * scale, 6 * scale)), 4)
        paint(ellipse((37 + dr, 37 + dc), (9 * scale, 6 * scale)), 2)
        la_axes = (3, 3) if view == 0 and label[1] else (6 * scale, 6 * scale)
        paint(ellipse((21 + dr, 37 + dc), la_axes), 1)
        if view == 0:
            paint(ellipse((21 + dr, 23 + dc), (6 * scale, 6 * scale)), 3)
        if label[0]:
            paint(box(34 + dr, 28 + dc, 5, 4), 2)
        if view == 1:
            width = 2 if label[2] else 5
            paint(box(8 + dr, 40 + dc, 22, width), 8)
    elif view == 2:
        paint(box(12 + dr, 28 + dc, 30, 3 if label[5] else 7), 9)
        paint(box(12 + dr, 16 + dc, 3, 12), 11)
        paint(box(12 + dr, 35 + dc, 3, 12), 10)
        aorta_centre = (30 + dr, 44 + dc) if label[4] else (46 + dr, 31 + dc)
        paint(ellipse(aorta_centre, (5, 5)), 8)
        paint(ellipse((30 + dr, 14 + dc), (4, 4)), 12)
        paint(ellipse((52 + dr, 46 + dc), (4, 4)), 6)
    else:
        arch_width = 2 if label[2] else 5
        trachea_col = 36 + dc
        arch_left = trachea_col + 6 if label[6] else trachea_col - 26
        paint(box(36 + dr, arch_left, arch_width, 20), 13)
        pa_height = 3 if label[5] else 7
        paint(box(28 + dr, 10 + dc, pa_height, 22), 9)
        paint(ellipse((40 + dr, 8 + dc), (4, 4)), 12)
        paint(ellipse((38 + dr, trachea_col), (4, 4)), 14)
    return mask


def render(mask: np.ndarray, view: int, label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return the (SIZE, SIZE, 3) uint8 image of a class map with speckle. AS adds a bright spot."""
    image = np.vectorize(INTENSITY.get)(mask).astype(np.float64)
    if view == 1 and label[3]:
        rows, cols = np.nonzero(mask == 8)
        if len(rows):
            root = (rows.max() - 2, int(cols.mean()))
            image[ellipse(root, (2, 2))] = 0.95
    speckle = rng.gamma(shape=4.0, scale=0.25, size=image.shape)
    image = np.clip(image * speckle + rng.normal(0, 0.03, image.shape), 0, 1)
    gray = (255 * image).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def write_split(root: Path, count: int, labelled: bool, rng: np.random.Generator) -> tuple[Path, np.ndarray]:
    """Write ``count`` cases under ``root/images`` and ``root/labels``, and return the image folder and labels."""
    labels = np.zeros((count, len(CHD_NAMES)), np.uint8)
    for index in range(count):
        view = index % 4
        label = ((rng.random(len(CHD_NAMES)) < POSITIVE_RATE) & CHD_MASK[view]).astype(np.uint8)
        labels[index] = label
        drawn = draw_view(view, label, rng)
        # The LVOT heart wall is drawn as class 5 for its brightness, but LVOT does not allow
        # class 5, so it is labelled background like every class the view does not allow.
        mask = np.where(CLASS_MASK[view][drawn], drawn, 0).astype(np.uint8)
        (root / "images").mkdir(parents=True, exist_ok=True)
        with h5py.File(root / "images" / f"{index}.h5", "w") as handle:
            handle.create_dataset("image", data=render(drawn, view, label, rng))
            handle.create_dataset("view", data=np.array([view + 1], dtype=np.int32))
        if labelled:
            (root / "labels").mkdir(parents=True, exist_ok=True)
            with h5py.File(root / "labels" / f"{index}_label.h5", "w") as handle:
                handle.create_dataset("mask", data=mask)
                handle.create_dataset("label", data=label)
    return root / "images", labels


def score(model: torch.nn.Module, cases, thresholds=(0.5,) * 7):
    """Score ``model`` on labelled ``cases`` with the challenge scorer; return the Summary."""
    return evaluate_cases(predict_records(model, cases, 32, torch.device("cpu"), tuple(thresholds)))


def seg_logits(model: torch.nn.Module, cases) -> torch.Tensor:
    """Return the (N, 15, SIZE, SIZE) raw segmentation logits of ``model`` in eval mode."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(cases.images[start : start + 64]).seg for start in range(0, len(cases), 64)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="Folder for data and runs; default a temporary folder.")
    parser.add_argument("--stage1-iterations", type=int, default=1200)
    parser.add_argument("--stage2-iterations", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    started = time.perf_counter()
    root = args.out or Path(tempfile.mkdtemp(prefix="chd_synthetic_"))
    rng = np.random.default_rng(args.seed)
    folders = {}
    for split, count in SPLITS.items():
        folders[split], labels = write_split(root / split, count, split != "unlabelled", rng)
        allowed = CHD_MASK[np.arange(count) % 4]
        print(f"{split}: {count} images, {int(labels.sum())} positives in {int(allowed.sum())} allowed slots")

    common = [
        "schedule.warmup_iterations=50", "run.log_interval=100", "run.validation_interval=200",
        "run.checkpoint_interval=100000", "data.labelled_batch_size=16", "data.unlabelled_batch_size=16",
        f"run.seed={args.seed}",
    ]
    model_options = json.dumps({**tiny_config("timm-unet"), "input_size": SIZE, "head_hidden": 64})
    stage1_config = load_config(None, [
        *common, f"schedule.iterations={args.stage1_iterations}", "model.name=timm-unet",
        f"model.options={model_options}", "optim.group_lr={}",
    ])
    train(stage1_config, folders["train"], None, folders["val"], root / "stage1")
    stage1_path = root / "stage1" / "best.pt"
    print(f"stage 1 done after {time.perf_counter() - started:.0f} s")

    multiscale = json.dumps({"chd_head": "multiscale", "chd_head_areas": True})
    # Run folder, overrides. Stage-2 defaults: BCE with positive weights, uniform sampling.
    variants = {
        "stage 2, pooled head, BCE": ("stage2_pooled", []),
        "stage 2, multiscale head + areas, BCE": ("stage2_multiscale", [f"stage2.head_options={multiscale}"]),
        "stage 2, multiscale head + areas, ASL + sampler + pseudo-labels": ("stage2_multiscale_asl", [
            f"stage2.head_options={multiscale}", "stage2.loss=asl", "stage2.sampler_power=1.0",
            "stage2.pseudo_weight=0.5",
        ]),
    }
    for name, (folder, overrides) in variants.items():
        config = load_config(None, [
            *common, "stage=stage2", f"schedule.iterations={args.stage2_iterations}", "optim.group_lr={}",
            "optim.lr=0.003", "teacher.decay=0.99", *overrides,
        ])
        train_stage2(config, stage1_path, folders["train"], folders["unlabelled"], folders["val"], root / folder)
        print(f"{name} done after {time.perf_counter() - started:.0f} s")

    validation = load_labelled(load_case_list(folders["val"]), SIZE)
    test = load_labelled(load_case_list(folders["test"]), SIZE, keep_full_masks=True)
    stage1_model, _ = load_checkpoint(stage1_path)
    reference_seg = seg_logits(stage1_model, test)

    rows = [("stage 1 (joint, pooled head)", score(stage1_model, test), True)]
    best_name, best_model, best_f1 = None, None, -1.0
    for name, (folder, _) in variants.items():
        model, info = load_checkpoint(root / folder / "best.pt")
        identical = torch.equal(seg_logits(model, test), reference_seg)
        rows.append((f"{name} ({info['stage']})", score(model, test), identical))
        validation_f1 = info["metrics"]["macro_f1"]
        if validation_f1 > best_f1:
            best_name, best_model, best_f1 = name, model, validation_f1

    probabilities = predict_chd(best_model, validation, 32, torch.device("cpu"))
    calibration = calibrate_thresholds(probabilities, validation.chd.numpy(), validation.views.numpy(),
                                       CalibrationConfig())
    thresholds = [row.threshold for row in calibration]
    rows.append((f"{best_name} + calibrated thresholds", score(best_model, test, thresholds), True))

    print()
    print("| model | test macro F1 | " + " | ".join(f"F1 {name}" for name in CHD_NAMES)
          + " | test Dice | test NSD | seg logits equal stage 1 |")
    print("|---|---|" + "---|" * len(CHD_NAMES) + "---|---|---|")
    for name, summary, identical in rows:
        per_label = " | ".join(f"{value:.1f}" for value in summary.f1_per_label)
        print(f"| {name} | {summary.macro_f1:.2f} | {per_label} | {summary.mean_dice:.2f} | "
              f"{summary.mean_nsd:.2f} | {'yes' if identical else 'NO'} |")
    print()
    print(f"Calibration of '{best_name}' on the validation split (thresholds {thresholds}):")
    print(format_report(calibration))
    print(f"\ntotal {time.perf_counter() - started:.0f} s; data and runs in {root}")
    if not all(identical for _, _, identical in rows):
        sys.exit("segmentation logits changed in stage 2")


if __name__ == "__main__":
    main()
