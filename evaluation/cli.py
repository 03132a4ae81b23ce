"""The ``python -m evaluation`` command: score a prediction folder against ground truth."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console

from evaluation.loading import LoadReport, ScoringInputError, load_records, scoring_cases
from evaluation.report import print_summary, summary_dict, write_reports
from evaluation.summary import evaluate_cases
from fetuskit.errors import FetusError
from fetuskit.io import ensure_output_dir

logger = logging.getLogger(__name__)

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def score_folder(
    pred_dir: Path,
    out_dir: Path,
    images_dir: Path | None = None,
    labels_dir: Path | None = None,
    case_list: Path | None = None,
    ms_per_image: float | None = None,
    missing_as_empty: bool = False,
    console: Console | None = None,
) -> dict:
    """Score ``pred_dir`` against the ground truth and write the reports into ``out_dir``.

    Returns:
        the summary.json content.

    Raises:
        ScoringInputError: one or more cases cannot be scored; the message lists all of them.
        CaseListError, OutputDirError, ValueError: invalid sources or output folder.
    """
    cases = scoring_cases(images_dir, labels_dir, case_list)
    out_dir = ensure_output_dir(out_dir)
    report = LoadReport()
    summary = evaluate_cases(load_records(cases, pred_dir, report, missing_as_empty), ms_per_image)
    if report.problems:
        raise ScoringInputError(
            f"{len(report.problems)} of {len(cases)} cases cannot be scored; fix them or rerun the "
            "prediction (--missing-as-empty scores missing prediction files as empty):\n  "
            + "\n  ".join(report.problems)
        )
    write_reports(summary, out_dir, report.missing_predictions, missing_as_empty)
    if console is not None:
        print_summary(summary, console, report.missing_predictions)
    return summary_dict(summary, report.missing_predictions, missing_as_empty)


@app.command()
def evaluate(
    pred_dir: Path = typer.Option(..., "--pred-dir", help="Folder of prediction files named like the input images."),
    out: Path = typer.Option(..., "--out", help="Folder for summary.json and the CSV reports; created if needed."),
    images: Path | None = typer.Option(None, "--images", help="Folder of ground-truth image files (<id>.h5)."),
    labels: Path | None = typer.Option(None, "--labels", help="Folder of ground-truth label files (<id>_label.h5)."),
    json_list: Path | None = typer.Option(
        None, "--json", help="JSON list of {\"image\": path, \"label\": path}, instead of --images and --labels."
    ),
    ms_per_image: float | None = typer.Option(
        None, "--ms-per-image", help="Mean wall time per image in milliseconds; adds the TimeScore term."
    ),
    missing_as_empty: bool = typer.Option(
        False,
        "--missing-as-empty",
        help="Score missing prediction files as all background with a zero label. Invalid files still fail.",
    ),
) -> None:
    """Score FETUS 2026 predictions with Dice, NSD, macro-F1 and the challenge score."""
    console = Console()
    try:
        score_folder(pred_dir, out, images, labels, json_list, ms_per_image, missing_as_empty, console)
    except (FetusError, ValueError) as error:
        Console(stderr=True).print(f"error: {error}", markup=False, highlight=False)
        raise typer.Exit(code=1) from error


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app()
