"""FOCUS-style scores of FETUS predictions on converted FOCUS images: ``python -m evaluation.focus``.

FOCUS annotates each four-chamber frame with two filled ellipses, the heart (``cardiac``) and
the thorax. A FETUS prediction covers them with classes, so this module compares:

- heart region = union of predicted classes 1-5 (chambers and heart);
- thorax region = union of predicted classes 1-7 (everything inside the thoracic cavity).

Per case, after mapping the (512, 512) prediction back to the original pixels with
``fetuskit.convert.to_original``:

- Dice of each region against the FOCUS mask PNG, (a) on the raw region and (b) on an
  ellipse fitted to the region's largest 8-connected component with ``cv2.fitEllipse``.
  That call is a least-squares fit to the component's outer contour, which runs through
  the centres of its boundary pixels.
- CTR (cardiothoracic ratio) = heart ``semi_axis_b`` / thorax ``semi_axis_b``. The ground
  truth comes from ``annfiles_ellipse/NNN.txt`` (``cx cy semi_axis_a semi_axis_b angle_deg
  label``, pixels, angle of axis a in degrees clockwise from +x on screen). CTR score =
  ``1 - |CTR_gt - CTR_pred| / CTR_gt``, clipped to [0, 1] so that no error scores below a
  missing prediction.
- NSD (2 px) of each region on the 512 grid, with ``evaluation.metrics``, against the FOCUS
  masks resampled to the grid as ``fetuskit.convert`` resamples ground truth.

Empty-input policy: an empty predicted region scores Dice 0 (raw and fitted) and NSD 0, and
a case whose heart or thorax ellipse cannot be fitted has an undefined predicted CTR, which
scores 0. All scores are in [0, 1].
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated, Any

import cv2
import h5py
import numpy as np
import typer
from PIL import Image
from rich.console import Console
from rich.table import Table

from evaluation.metrics import segmentation_scores
from fetuskit.convert import CANONICAL_SIZE, PadGeometry, to_canonical_mask, to_original
from fetuskit.io import read_prediction

logger = logging.getLogger(__name__)

HEART_CLASSES = (1, 2, 3, 4, 5)
THORAX_CLASSES = (1, 2, 3, 4, 5, 6, 7)


@dataclass(frozen=True)
class Ellipse:
    """A filled ellipse in pixel coordinates (x = column, y = row, pixel centres at integers).

    Attributes:
        center_x, center_y: centre, in pixels.
        semi_axis_a: half-length of the axis that points along ``angle_deg``, in pixels.
        semi_axis_b: half-length of the perpendicular axis, in pixels.
        angle_deg: direction of axis a, degrees from +x towards +y (clockwise on screen).
    """

    center_x: float
    center_y: float
    semi_axis_a: float
    semi_axis_b: float
    angle_deg: float

    @property
    def semi_minor(self) -> float:
        return min(self.semi_axis_a, self.semi_axis_b)


def read_focus_ellipses(path: Path) -> dict[str, Ellipse]:
    """Read a FOCUS ``annfiles_ellipse`` file into ``{"cardiac": Ellipse, "thorax": Ellipse}``.

    Raises:
        ValueError: a line without 6 fields or with a non-numeric value, or a missing structure.
    """
    ellipses = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 6:
            raise ValueError(
                f"{path}:{number}: expected 'cx cy semi_axis_a semi_axis_b angle_deg label', got {line!r}"
            )
        try:
            values = [float(part) for part in parts[:5]]
        except ValueError as error:
            raise ValueError(f"{path}:{number}: invalid number in {line!r}") from error
        ellipses[parts[5]] = Ellipse(*values)
    missing = {"cardiac", "thorax"} - ellipses.keys()
    if missing:
        raise ValueError(f"{path}: no ellipse for {sorted(missing)}; expected one line each for cardiac and thorax")
    return ellipses


def ctr_from_ellipses(heart: Ellipse, thorax: Ellipse) -> float:
    """Return the cardiothoracic ratio of ground-truth ellipses: heart b over thorax b, as FOCUS stores them."""
    return heart.semi_axis_b / thorax.semi_axis_b


def predicted_ctr(heart: Ellipse | None, thorax: Ellipse | None) -> float | None:
    """Return the CTR of fitted ellipses, minor over minor semi-axis, or None when one is missing.

    A fitted ellipse has no annotator's axis order, so the minor semi-axis replaces
    FOCUS's ``semi_axis_b``. In the FOCUS files b is the minor axis in 99.3 % of the heart
    and 88.3 % of the thorax ellipses (all 300 cases). Applied to the ground-truth ellipses
    themselves, this rule has a mean CTR score of 0.9885 over all 300 cases (0.99995 on the
    testing split), which is the ceiling for a perfect prediction.
    """
    if heart is None or thorax is None:
        return None
    return heart.semi_minor / thorax.semi_minor


def ctr_score(ctr_gt: float, ctr_pred: float | None) -> float:
    """Score a predicted CTR: ``1 - |gt - pred| / gt`` clipped to [0, 1]; None scores 0."""
    if ctr_pred is None:
        return 0.0
    return float(np.clip(1.0 - abs(ctr_gt - ctr_pred) / ctr_gt, 0.0, 1.0))


def largest_component(region: np.ndarray) -> np.ndarray:
    """Return the largest 8-connected component of an (H, W) bool region; empty stays empty."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros(region.shape, dtype=bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == largest


def fit_ellipse(region: np.ndarray) -> Ellipse | None:
    """Fit an ellipse to the largest component of an (H, W) bool region.

    Uses ``cv2.fitEllipse`` on the component's outer contour. Its first axis points along
    its angle, so it becomes axis a here. Returns None for an empty region or a contour of
    fewer than 5 points, which ``cv2.fitEllipse`` cannot fit.
    """
    component = largest_component(region)
    contours, _ = cv2.findContours(component.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    contour = max(contours, key=len)
    if len(contour) < 5:
        return None
    (center_x, center_y), (width, height), angle = cv2.fitEllipse(contour)
    return Ellipse(center_x, center_y, width / 2.0, height / 2.0, angle)


def draw_ellipse(ellipse: Ellipse | None, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise a filled ellipse: (H, W) bool, True at pixel centres inside it; None is empty."""
    if ellipse is None:
        return np.zeros(shape, dtype=bool)
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    dx = cols - ellipse.center_x
    dy = rows - ellipse.center_y
    angle = math.radians(ellipse.angle_deg)
    along_a = dx * math.cos(angle) + dy * math.sin(angle)
    along_b = -dx * math.sin(angle) + dy * math.cos(angle)
    return (along_a / ellipse.semi_axis_a) ** 2 + (along_b / ellipse.semi_axis_b) ** 2 <= 1.0


def region_dice_nsd(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Return (Dice, NSD) of two (H, W) bool regions with the challenge's metrics; both empty gives (NaN, NaN)."""
    scores = segmentation_scores(pred.astype(np.uint8), gt.astype(np.uint8))
    return float(scores.dice[1]), float(scores.nsd[1])


@dataclass(frozen=True)
class FocusCaseScores:
    """FOCUS-style scores of one case, all in [0, 1] except the CTR values (ratios)."""

    name: str
    source_file: str
    heart_dice_raw: float
    heart_dice_fitted: float
    thorax_dice_raw: float
    thorax_dice_fitted: float
    heart_nsd: float
    thorax_nsd: float
    ctr_gt: float
    ctr_pred: float | None
    ctr_score: float


SUMMARY_METRICS = (
    "heart_dice_raw",
    "heart_dice_fitted",
    "thorax_dice_raw",
    "thorax_dice_fitted",
    "heart_nsd",
    "thorax_nsd",
    "ctr_score",
)


def score_focus_case(
    name: str,
    pred_mask: np.ndarray,
    attrs: dict[str, Any],
    gt_heart: np.ndarray,
    gt_thorax: np.ndarray,
    gt_ellipses: dict[str, Ellipse],
) -> FocusCaseScores:
    """Score one prediction against FOCUS ground truth.

    Args:
        name: case name, reported as is.
        pred_mask: (512, 512) uint8 predicted classes on the converted image's grid.
        attrs: attributes of the converted image file (``fetuskit.convert.GEOMETRY_ATTRS``
            and ``source_file``).
        gt_heart, gt_thorax: (H, W) bool FOCUS masks at the original size.
        gt_ellipses: the case's FOCUS ellipses, from ``read_focus_ellipses``.
    """
    geometry = PadGeometry.from_attrs(attrs)
    original = to_original(pred_mask, geometry)
    if original.shape != gt_heart.shape or original.shape != gt_thorax.shape:
        raise ValueError(
            f"case {name}: original size {original.shape} from the image attributes does not match the "
            f"FOCUS masks {gt_heart.shape} and {gt_thorax.shape}; check that --focus-split is the converted split"
        )
    heart = np.isin(original, HEART_CLASSES)
    thorax = np.isin(original, THORAX_CLASSES)
    heart_ellipse = fit_ellipse(heart)
    thorax_ellipse = fit_ellipse(thorax)

    heart_dice_raw, _ = region_dice_nsd(heart, gt_heart)
    thorax_dice_raw, _ = region_dice_nsd(thorax, gt_thorax)
    heart_dice_fitted, _ = region_dice_nsd(draw_ellipse(heart_ellipse, heart.shape), gt_heart)
    thorax_dice_fitted, _ = region_dice_nsd(draw_ellipse(thorax_ellipse, thorax.shape), gt_thorax)

    # NSD uses a fixed pixel tolerance, so it is measured on the 512 grid that all cases share.
    _, heart_nsd = region_dice_nsd(
        np.isin(pred_mask, HEART_CLASSES), to_canonical_mask(gt_heart, geometry).astype(bool)
    )
    _, thorax_nsd = region_dice_nsd(
        np.isin(pred_mask, THORAX_CLASSES), to_canonical_mask(gt_thorax, geometry).astype(bool)
    )

    ctr_gt = ctr_from_ellipses(gt_ellipses["cardiac"], gt_ellipses["thorax"])
    ctr_pred = predicted_ctr(heart_ellipse, thorax_ellipse)
    return FocusCaseScores(
        name=name,
        source_file=str(attrs.get("source_file", "")),
        heart_dice_raw=heart_dice_raw,
        heart_dice_fitted=heart_dice_fitted,
        thorax_dice_raw=thorax_dice_raw,
        thorax_dice_fitted=thorax_dice_fitted,
        heart_nsd=heart_nsd,
        thorax_nsd=thorax_nsd,
        ctr_gt=ctr_gt,
        ctr_pred=ctr_pred,
        ctr_score=ctr_score(ctr_gt, ctr_pred),
    )


def summarize_focus(cases: list[FocusCaseScores]) -> dict[str, float]:
    """Return the mean of each of ``SUMMARY_METRICS`` over the cases; no cases gives 0.0 each."""
    if not cases:
        return {metric: 0.0 for metric in SUMMARY_METRICS}
    return {metric: float(np.mean([getattr(case, metric) for case in cases])) for metric in SUMMARY_METRICS}


def read_focus_mask(path: Path) -> np.ndarray:
    """Read a FOCUS mask PNG (0/255, 1 or 3 identical channels) as (H, W) bool."""
    values = np.asarray(Image.open(path))
    if values.ndim == 3:
        values = values[..., 0]
    return values > 0


def _find_focus_inputs(pred_dir: Path, images_dir: Path, focus_split: Path) -> list[tuple[Path, Path, str]]:
    """Return (image, prediction, FOCUS stem) per converted image; raise once listing every missing file."""
    images = sorted(images_dir.glob("*.h5"))
    if not images:
        raise FileNotFoundError(f"{images_dir}: no converted .h5 images found; run python -m train convert-focus")
    found = []
    problems = []
    for image in images:
        prediction = pred_dir / image.name
        with h5py.File(image, "r") as h5:
            stem = Path(str(h5.attrs.get("source_file", image.name))).stem
        required = [
            prediction,
            focus_split / "annfiles_mask" / f"{stem}-cardiac.png",
            focus_split / "annfiles_mask" / f"{stem}-thorax.png",
            focus_split / "annfiles_ellipse" / f"{stem}.txt",
        ]
        problems += [f"{path}: not found (for image {image.name})" for path in required if not path.is_file()]
        found.append((image, prediction, stem))
    if problems:
        header = f"{len(problems)} input file(s) missing; write a prediction for every converted image and check --focus-split:"
        raise FileNotFoundError("\n".join([header, *problems]))
    return found


def score_focus_folder(pred_dir: Path, images_dir: Path, focus_split: Path) -> list[FocusCaseScores]:
    """Score every converted image in ``images_dir`` whose prediction is ``pred_dir/<name>.h5``."""
    cases = []
    for image, prediction, stem in _find_focus_inputs(pred_dir, images_dir, focus_split):
        with h5py.File(image, "r") as h5:
            attrs = dict(h5.attrs)
        pred_mask, _ = read_prediction(prediction, (CANONICAL_SIZE, CANONICAL_SIZE))
        masks = focus_split / "annfiles_mask"
        cases.append(
            score_focus_case(
                image.stem,
                pred_mask,
                attrs,
                read_focus_mask(masks / f"{stem}-cardiac.png"),
                read_focus_mask(masks / f"{stem}-thorax.png"),
                read_focus_ellipses(focus_split / "annfiles_ellipse" / f"{stem}.txt"),
            )
        )
        logger.debug("scored %s", image.name)
    return cases


def write_focus_report(cases: list[FocusCaseScores], out_dir: Path) -> dict[str, Any]:
    """Write ``focus_summary.json`` and ``focus_cases.csv`` into ``out_dir``; return the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"cases": len(cases), "scale": "0..1", "mean": summarize_focus(cases)}
    (out_dir / "focus_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    with open(out_dir / "focus_cases.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[field.name for field in fields(FocusCaseScores)])
        writer.writeheader()
        for case in cases:
            writer.writerow({key: "" if value is None else value for key, value in asdict(case).items()})
    return summary


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    pred_dir: Annotated[Path, typer.Option(help="Folder of prediction files <name>.h5 with 'mask' (512, 512).")],
    images: Annotated[Path, typer.Option(help="Folder of converted images, as written by convert-focus.")],
    focus_split: Annotated[
        Path, typer.Option(help="Original FOCUS split folder with annfiles_mask/ and annfiles_ellipse/.")
    ],
    out: Annotated[Path, typer.Option(help="Output folder for focus_summary.json and focus_cases.csv.")],
) -> None:
    """Score predictions on converted FOCUS images: heart and thorax Dice, NSD and CTR score (0..1)."""
    try:
        cases = score_focus_folder(pred_dir, images, focus_split)
    except (FileNotFoundError, ValueError) as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(code=2) from error
    summary = write_focus_report(cases, out)
    table = Table(title=f"FOCUS scores, {len(cases)} cases")
    columns = ("heart Dice raw", "heart Dice fitted", "thorax Dice raw", "thorax Dice fitted", "heart NSD", "thorax NSD", "CTR score")
    table.add_column("case")
    for column in columns:
        table.add_column(column, justify="right")
    for case in cases:
        table.add_row(case.name, *(f"{getattr(case, metric):.4f}" for metric in SUMMARY_METRICS))
    table.add_row("mean", *(f"{summary['mean'][metric]:.4f}" for metric in SUMMARY_METRICS), style="bold")
    Console().print(table)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app()
