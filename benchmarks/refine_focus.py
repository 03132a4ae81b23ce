"""Measure boundary refinement on converted FOCUS images, with and without the refiner.

Two commands:

``compare``
    Runs ``process.py`` on a split twice, with ``--no-refine`` and with a refiner. Both runs
    are scored with ``python -m evaluation`` (classes 5 and 7 at 512 px) and ``python -m
    evaluation.focus`` (heart and thorax regions). One table shows the scores and the time
    per image from each ``run_report.json``. The refiner comes from a JSON file of ``RefinerConfig``
    fields; the weights folder is copied with that object as its manifest's ``"refiner"``.
``tune``
    Predicts a split once with the ensemble, then refines the same probabilities with every
    refiner setting of a JSON grid (a list of ``{"name": ..., "refiner": {...}}``) and prints
    the same scores per setting, plus the share of prompts each setting accepted.

Example (testing split, refiner settings in refiner.json)::

    OMP_NUM_THREADS=1 python benchmarks/refine_focus.py compare \\
        --split data/focus/testing --focus-split PATH/TO/FOCUS/testing \\
        --weights model_weights --refiner refiner.json --out runs/refine_testing
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import h5py
import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from evaluation.focus import read_focus_ellipses, read_focus_mask, score_focus_case, summarize_focus  # noqa: E402
from evaluation.metrics import segmentation_scores  # noqa: E402
from fetuskit.cases import load_cases  # noqa: E402
from fetuskit.inference import load_ensemble  # noqa: E402
from fetuskit.io import read_image, read_label  # noqa: E402
from fetuskit.predict import UNKNOWN_VIEW, predict_batch  # noqa: E402
from fetuskit.refine import build_refiner  # noqa: E402
from fetuskit.transforms import image_to_tensor, resize_probabilities  # noqa: E402
from fetuskit.weights_manifest import load_manifest  # noqa: E402

logger = logging.getLogger("refine_focus")
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

# FOCUS ground truth uses class 5 (heart) and 7 (thoracic cavity minus heart) only.
FOCUS_CLASSES = (5, 7)
COLUMNS = (
    ("dice_5", "Dice 5"),
    ("nsd_5", "NSD 5"),
    ("dice_7", "Dice 7"),
    ("nsd_7", "NSD 7"),
    ("heart_dice_raw", "heart Dice"),
    ("heart_nsd", "heart NSD"),
    ("thorax_dice_raw", "thorax Dice"),
    ("thorax_nsd", "thorax NSD"),
    ("ctr_score", "CTR"),
)


SplitOption = Annotated[Path, typer.Option(help="Converted FOCUS split with images/, labels/ and list.json.")]
FocusSplitOption = Annotated[
    Path, typer.Option(help="Original FOCUS split with annfiles_mask/ and annfiles_ellipse/.")
]


# ---------------------------------------------------------------- compare: process.py runs


def _weights_with_refiner(weights: Path, refiner: dict[str, Any], folder: Path) -> Path:
    """Write ``folder/manifest.json``: the manifest of ``weights`` with ``refiner`` set, and
    links to its checkpoints, so the shipped folder stays untouched."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((weights / "manifest.json").read_text())
    for member in manifest["members"]:
        link = folder / member["checkpoint"]
        if not link.exists():
            link.symlink_to((weights / member["checkpoint"]).resolve())
    manifest["refiner"] = refiner
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def _run(command: list[str]) -> None:
    logger.info("running %s", " ".join(command))
    subprocess.run(command, check=True, cwd=REPOSITORY)


def _predict_and_score(split: Path, focus_split: Path, weights: Path, out: Path, refine: bool) -> dict[str, float]:
    predictions = out / "predictions"
    command = [sys.executable, "process.py", "--input", str(split / "images"), "--out-dir", str(predictions)]
    command += ["--weights", str(weights), "--overwrite"]
    _run(command + ([] if refine else ["--no-refine"]))
    _run([sys.executable, "-m", "evaluation", "--json", str(split / "list.json"), "--pred-dir", str(predictions),
          "--out", str(out / "scores")])
    _run([sys.executable, "-m", "evaluation.focus", "--pred-dir", str(predictions), "--images", str(split / "images"),
          "--focus-split", str(focus_split), "--out", str(out / "focus_scores")])

    report = json.loads((predictions / "run_report.json").read_text())
    summary = json.loads((out / "scores" / "summary.json").read_text())
    focus = json.loads((out / "focus_scores" / "focus_summary.json").read_text())["mean"]
    row = {key: 100.0 * value for key, value in focus.items()}
    row.update(_class_scores(summary))
    row["ms_per_image"] = report["mean_ms_per_image"]
    row["refiner_failures"] = len(report["refiner_failures"])
    return row


def _class_scores(summary: dict[str, Any]) -> dict[str, float]:
    # summary.json already gives per-class means times 100.
    scores = {}
    for class_id in FOCUS_CLASSES:
        entry = next(item for item in summary["classes"] if int(item["id"]) == class_id)
        scores[f"dice_{class_id}"] = entry["dice"]
        scores[f"nsd_{class_id}"] = entry["nsd"]
    return scores


@app.command()
def compare(
    split: SplitOption,
    focus_split: FocusSplitOption,
    weights: Annotated[Path, typer.Option(help="Weights folder with manifest.json (not modified).")],
    refiner: Annotated[Path, typer.Option(help="JSON file with the RefinerConfig fields to test.")],
    out: Annotated[Path, typer.Option(help="Folder for predictions, scores and results.json.")],
) -> None:
    """Run process.py with and without the refiner on one split and print both scores."""
    settings = json.loads(refiner.read_text())
    refined_weights = _weights_with_refiner(weights, settings, out / "weights_refined")
    rows = {
        "no refinement": _predict_and_score(split, focus_split, weights, out / "base", refine=False),
        "refined": _predict_and_score(split, focus_split, refined_weights, out / "refined", refine=True),
    }
    (out / "results.json").write_text(json.dumps({"refiner": settings, "rows": rows}, indent=2) + "\n")
    _print_table(f"{split.name}: process.py with and without refinement", rows, extra=("ms_per_image",))


# ---------------------------------------------------------------- tune: one prediction, many refiners


@dataclass
class _CachedCase:
    name: str
    image: np.ndarray  # (H, W) float32 in [0, 1]
    probabilities: np.ndarray  # (15, H, W) float16, the ensemble's, at the image's size
    view: int
    truth: np.ndarray  # (H, W) uint8 ground-truth classes
    attrs: dict[str, Any]
    gt_heart: np.ndarray
    gt_thorax: np.ndarray
    ellipses: dict[str, Any]


def _cache_split(split: Path, focus_split: Path, weights: Path, batch_size: int = 8) -> list[_CachedCase]:
    """Predict every case of ``split`` once and keep what scoring and refinement need."""
    ensemble = load_ensemble(load_manifest(weights), torch.device("cpu"))
    cases = load_cases(split / "list.json")
    cached: list[_CachedCase] = []
    for start in range(0, len(cases), batch_size):
        batch = cases[start : start + batch_size]
        images = [read_image(case.image).image for case in batch]
        tensors = torch.stack([image_to_tensor(image, ensemble.input_size) for image in images])
        # The views stay unknown, as for process.py --input, so the view head chooses them.
        views = torch.full((len(batch),), UNKNOWN_VIEW, dtype=torch.long)
        prediction = predict_batch(ensemble.models, tensors, views, ensemble.weights)
        for index, (case, image) in enumerate(zip(batch, images, strict=True)):
            probabilities = resize_probabilities(prediction.probs[index][None].float(), *image.shape)[0]
            truth, _ = read_label(case.label, image.shape)
            with h5py.File(case.image, "r") as h5:
                attrs = dict(h5.attrs)
            stem = Path(str(attrs["source_file"])).stem
            masks = focus_split / "annfiles_mask"
            cached.append(
                _CachedCase(
                    name=Path(case.image).stem,
                    image=image,
                    probabilities=probabilities.numpy().astype(np.float16),
                    view=int(prediction.views[index]),
                    truth=truth,
                    attrs=attrs,
                    gt_heart=read_focus_mask(masks / f"{stem}-cardiac.png"),
                    gt_thorax=read_focus_mask(masks / f"{stem}-thorax.png"),
                    ellipses=read_focus_ellipses(focus_split / "annfiles_ellipse" / f"{stem}.txt"),
                )
            )
        logger.info("predicted %d/%d", len(cached), len(cases))
    return cached


def _score_masks(cases: list[_CachedCase], masks: list[np.ndarray]) -> dict[str, float]:
    """Score (H, W) label maps the way both scorers do, as means times 100."""
    per_class: dict[int, tuple[list[float], list[float]]] = {c: ([], []) for c in FOCUS_CLASSES}
    focus_cases = []
    for case, mask in zip(cases, masks, strict=True):
        scores = segmentation_scores(mask, case.truth)
        for class_id in FOCUS_CLASSES:
            if scores.counted[class_id]:
                per_class[class_id][0].append(float(scores.dice[class_id]))
                per_class[class_id][1].append(float(scores.nsd[class_id]))
        focus_cases.append(
            score_focus_case(case.name, mask, case.attrs, case.gt_heart, case.gt_thorax, case.ellipses)
        )
    row = {key: 100.0 * value for key, value in summarize_focus(focus_cases).items()}
    for class_id, (dice, nsd) in per_class.items():
        row[f"dice_{class_id}"] = 100.0 * float(np.mean(dice)) if dice else float("nan")
        row[f"nsd_{class_id}"] = 100.0 * float(np.mean(nsd)) if nsd else float("nan")
    return row


class _EmbeddingCache:
    """Cache of refiner image embeddings, keyed by backend and network input.

    Fine-tuning changes only the mask decoder, so the packaged and the fine-tuned LiteMedSAM
    share their encoder, and one cache per backend serves every setting of a grid. NOTE: a
    SAM-Med2D refiner trained with ``train_adapters`` changes its encoder, so it needs a grid
    and a cache file of its own.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.embeddings: dict[str, torch.Tensor] = {}
        if path is not None and path.is_file():
            self.embeddings = torch.load(path, weights_only=True)
            logger.info("loaded %d cached embeddings from %s", len(self.embeddings), path)

    def save(self) -> None:
        """Write the embeddings to ``path`` (a torch file), when a path was given."""
        if self.path is not None:
            torch.save(self.embeddings, self.path)

    def attach(self, refiner: Any) -> None:
        encode = refiner.segmenter.encode
        backend = refiner.config.backend

        def cached_encode(images: torch.Tensor) -> torch.Tensor:
            key = f"{backend}:{hashlib.sha1(images.cpu().numpy().tobytes()).hexdigest()}"
            if key not in self.embeddings:
                self.embeddings[key] = encode(images)
            return self.embeddings[key]

        refiner.segmenter.encode = cached_encode


def _refine_cases(
    cases: list[_CachedCase], settings: dict[str, Any], cache: _EmbeddingCache
) -> tuple[list[np.ndarray], dict[str, float]]:
    refiner = build_refiner(settings)
    cache.attach(refiner)
    masks = []
    prompted = accepted = 0
    started = time.perf_counter()
    for case in cases:
        probabilities = case.probabilities.astype(np.float32)
        coarse = probabilities.argmax(axis=0).astype(np.uint8)
        refined, report = refiner.refine(case.image, coarse, probabilities, case.view)
        prompted += len(report["classes"])
        accepted += sum(bool(entry["accepted"]) for entry in report["classes"].values())
        masks.append(refined)
    elapsed_ms = 1000.0 * (time.perf_counter() - started) / max(len(cases), 1)
    # refine_ms includes the encoder only for the first setting of each backend (cached after).
    return masks, {"accepted": 100.0 * accepted / max(prompted, 1), "refine_ms": elapsed_ms}


@app.command()
def tune(
    split: SplitOption,
    focus_split: FocusSplitOption,
    weights: Annotated[Path, typer.Option(help="Weights folder with manifest.json; its refiner entry is ignored.")],
    grid: Annotated[Path, typer.Option(help='JSON list of {"name": str, "refiner": {RefinerConfig fields}}.')],
    out: Annotated[Path | None, typer.Option(help="JSON file for the table rows.")] = None,
    embedding_cache: Annotated[
        Path | None,
        typer.Option(help="Torch file of refiner image embeddings, read if present and written after each setting."),
    ] = None,
) -> None:
    """Predict a split once, refine it with every setting of a grid and print the scores."""
    settings_grid = json.loads(grid.read_text())
    cases = _cache_split(split, focus_split, weights)
    coarse = [case.probabilities.astype(np.float32).argmax(axis=0).astype(np.uint8) for case in cases]
    rows = {"no refinement": _score_masks(cases, coarse)}
    cache = _EmbeddingCache(embedding_cache)
    for entry in settings_grid:
        masks, extra = _refine_cases(cases, entry["refiner"], cache)
        rows[entry["name"]] = {**_score_masks(cases, masks), **extra}
        cache.save()
        logger.info("%s: %s", entry["name"], {key: round(value, 2) for key, value in rows[entry["name"]].items()})
        if out is not None:
            out.write_text(json.dumps({"grid": settings_grid, "rows": rows}, indent=2) + "\n")
    _print_table(f"{split.name}: refiner settings on one ensemble prediction", rows, extra=("accepted", "refine_ms"))


def _print_table(title: str, rows: dict[str, dict[str, float]], extra: tuple[str, ...]) -> None:
    table = Table(title=title)
    table.add_column("setting")
    for _, header in COLUMNS:
        table.add_column(header, justify="right")
    for key in extra:
        table.add_column(key, justify="right")
    for name, row in rows.items():
        cells = [f"{row[key]:.2f}" for key, _ in COLUMNS]
        cells += ["" if row.get(key) is None else f"{row[key]:.1f}" for key in extra]
        table.add_row(name, *cells)
    Console(width=200).print(table)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    app()
