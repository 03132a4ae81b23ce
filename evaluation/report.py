"""Write a Summary as summary.json, per_class.csv, per_label.csv and per_case.csv, and as a rich table."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from evaluation.summary import Summary
from fetuskit.labels import CHD_NAMES, CLASS_NAMES, NUM_CLASSES, VIEW_NAMES

FOREGROUND_CLASSES = range(1, NUM_CLASSES)


def summary_dict(summary: Summary, missing_predictions: list[str], missing_as_empty: bool) -> dict:
    """Build the summary.json content: headline metrics, per-class and per-label lists, counts."""
    content = {key: value for key, value in asdict(summary).items() if key != "cases"}
    content["classes"] = [
        {
            "id": class_id,
            "name": CLASS_NAMES[class_id],
            "dice": summary.dice_per_class[class_id - 1],
            "nsd": summary.nsd_per_class[class_id - 1],
            "count": summary.count_per_class[class_id - 1],
        }
        for class_id in FOREGROUND_CLASSES
    ]
    content["labels"] = [
        {"id": label, "name": name, "f1": summary.f1_per_label[label], "count": summary.count_per_label[label]}
        for label, name in enumerate(CHD_NAMES)
    ]
    content["missing_as_empty"] = missing_as_empty
    content["missing_predictions"] = list(missing_predictions)
    return content


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def write_reports(summary: Summary, out_dir: Path, missing_predictions: list[str], missing_as_empty: bool) -> None:
    """Write summary.json, per_class.csv, per_label.csv and per_case.csv into ``out_dir``.

    Values are on the 0..100 scale; a class no image counted has an empty cell (null in JSON).
    """
    content = summary_dict(summary, missing_predictions, missing_as_empty)
    (out_dir / "summary.json").write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")

    with open(out_dir / "per_class.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class_id", "class_name", "dice", "nsd", "count"])
        for entry in content["classes"]:
            writer.writerow([entry["id"], entry["name"], _cell(entry["dice"]), _cell(entry["nsd"]), entry["count"]])

    with open(out_dir / "per_label.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label_id", "label_name", "f1", "count"])
        for entry in content["labels"]:
            writer.writerow([entry["id"], entry["name"], _cell(entry["f1"]), entry["count"]])

    missing = set(missing_predictions)
    with open(out_dir / "per_case.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        class_columns = [f"{metric}_{class_id}" for class_id in FOREGROUND_CLASSES for metric in ("dice", "nsd")]
        writer.writerow(
            ["name", "view", "mean_dice", "mean_nsd", "pred_label", "gt_label", "missing_prediction", *class_columns]
        )
        for row in summary.cases:
            per_class = [_cell(value) for pair in zip(row.dice, row.nsd) for value in pair]
            writer.writerow(
                [
                    row.name,
                    VIEW_NAMES[row.view],
                    _cell(row.mean_dice),
                    _cell(row.mean_nsd),
                    "".join(map(str, row.pred_label)),
                    "".join(map(str, row.gt_label)),
                    int(row.name in missing),
                    *per_class,
                ]
            )


def print_summary(summary: Summary, console: Console, missing_predictions: list[str]) -> None:
    """Print per-class and per-label tables and the headline metrics."""
    classes = Table(title="Segmentation per class (0..100)")
    for column in ("class", "Dice", "NSD", "images"):
        classes.add_column(column, justify="left" if column == "class" else "right")
    for class_id in FOREGROUND_CLASSES:
        dice = summary.dice_per_class[class_id - 1]
        nsd = summary.nsd_per_class[class_id - 1]
        count = summary.count_per_class[class_id - 1]
        classes.add_row(
            f"{class_id} {CLASS_NAMES[class_id]}",
            "-" if dice is None else f"{dice:.2f}",
            "-" if nsd is None else f"{nsd:.2f}",
            str(count),
        )
    console.print(classes)

    labels = Table(title="CHD classification per label (0..100)")
    for column in ("label", "F1", "images"):
        labels.add_column(column, justify="left" if column == "label" else "right")
    for label, name in enumerate(CHD_NAMES):
        labels.add_row(name, f"{summary.f1_per_label[label]:.2f}", str(summary.count_per_label[label]))
    console.print(labels)

    time_part = "" if summary.time_score is None else f"  TimeScore {summary.time_score:.2f}"
    console.print(
        f"{summary.num_cases} cases  MeanDice {summary.mean_dice:.2f}  MeanNSD {summary.mean_nsd:.2f}  "
        f"MacroF1 {summary.macro_f1:.2f}{time_part}  Score {summary.score:.2f}"
    )
    if missing_predictions:
        console.print(f"{len(missing_predictions)} missing predictions were scored as empty (--missing-as-empty)")
