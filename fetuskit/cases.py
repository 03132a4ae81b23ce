"""Case lists: a folder of ``.h5`` images or a JSON list of image entries.

A folder named ``images`` finds its labels in the sibling ``labels`` folder as
``<stem>_label.h5``. A JSON list contains objects ``{"image": path, "label": path or null,
"view_id": 1..4}``; ``label`` and ``view_id`` are optional. Every entry is checked and all
problems are raised together in one CaseListError.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from fetuskit.errors import CaseListError
from fetuskit.labels import NUM_VIEWS

logger = logging.getLogger(__name__)

IMAGE_SUFFIX = ".h5"
LABEL_SUFFIX = "_label.h5"


@dataclass(frozen=True)
class Case:
    """One input case.

    Attributes:
        name: the output file name, which is the image's basename (``1.h5``).
        image: path of the image file.
        label: path of the label file, or None when the case has no label.
        view_id: view id 1..4 given by the case list, or None; the image file's own
            ``view`` is read by ``fetuskit.io.read_image``.
    """

    name: str
    image: Path
    label: Path | None
    view_id: int | None


def find_label(image: Path, labels_dir: Path | None = None) -> Path | None:
    """Return the label file ``<stem>_label.h5`` of an image, or None if it does not exist.

    The label is looked for in ``labels_dir`` when given. Otherwise it is looked for in the
    sibling ``labels`` folder when the image lies in a folder named ``images``.
    """
    if labels_dir is None:
        if image.parent.name != "images":
            return None
        labels_dir = image.parent.parent / "labels"
    candidate = labels_dir / f"{image.stem}{LABEL_SUFFIX}"
    return candidate if candidate.is_file() else None


def load_cases(source: str | os.PathLike, input_dir: str | os.PathLike | None = None) -> list[Case]:
    """Load a case list from a folder of ``.h5`` files or a JSON list.

    A folder gives its ``.h5`` files sorted by name, each with the label that
    ``find_label`` finds. A JSON entry's paths are resolved in this order: as given
    (absolute, or relative to the current folder), then relative to the JSON file's
    folder, then by basename under ``input_dir``.

    Raises:
        CaseListError: the source does not exist, contains no cases, or is invalid JSON or
            not a list. Also when entries have missing or unresolvable paths or an invalid
            view_id, or when two images share a basename, because their outputs would
            overwrite each other. The message lists every problem found. An entry that repeats an
            earlier one (same image, label and view_id) is dropped with a warning instead.
    """
    source = Path(source)
    if source.is_dir():
        cases = _cases_from_folder(source)
    elif source.is_file():
        cases = _cases_from_json(source, Path(input_dir) if input_dir is not None else None)
    else:
        raise CaseListError(f"{source}: case list not found; pass a folder of .h5 files or a JSON list")
    cases = _drop_repeated_entries(cases)
    _check_unique_names(source, cases)
    return cases


def _cases_from_folder(folder: Path) -> list[Case]:
    images = sorted(path for path in folder.iterdir() if path.suffix == IMAGE_SUFFIX and path.is_file())
    if not images:
        raise CaseListError(f"{folder}: folder contains no {IMAGE_SUFFIX} files; check the input folder")
    return [Case(name=image.name, image=image, label=find_label(image), view_id=None) for image in images]


def _cases_from_json(list_path: Path, input_dir: Path | None) -> list[Case]:
    try:
        # utf-8-sig also accepts the byte order mark that some Windows editors write.
        entries = json.loads(list_path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CaseListError(f"{list_path}: invalid JSON ({error}); fix the case list") from error
    if not isinstance(entries, list):
        raise CaseListError(
            f"{list_path}: expected a JSON list of objects with an 'image' path, got {type(entries).__name__}"
        )
    if not entries:
        raise CaseListError(f"{list_path}: the case list is empty; add entries with an 'image' path")

    cases: list[Case] = []
    problems: list[str] = []
    invalid_entries = 0
    for index, entry in enumerate(entries):
        case, entry_problems = _case_from_entry(entry, list_path.parent, input_dir)
        problems.extend(f"entry {index}: {problem}" for problem in entry_problems)
        invalid_entries += bool(entry_problems)
        if case is not None:
            cases.append(case)
    if problems:
        raise CaseListError(
            f"{list_path}: {invalid_entries} of {len(entries)} entries are invalid:\n  " + "\n  ".join(problems)
        )
    return cases


def _case_from_entry(entry: object, list_dir: Path, input_dir: Path | None) -> tuple[Case | None, list[str]]:
    if not isinstance(entry, dict):
        return None, [f"expected an object with an 'image' path, got {entry!r}"]
    problems: list[str] = []
    image = _entry_path(entry, "image", list_dir, input_dir, problems)
    label = _entry_path(entry, "label", list_dir, input_dir, problems)

    view_id = entry.get("view_id")
    valid_view = isinstance(view_id, int) and not isinstance(view_id, bool) and 1 <= view_id <= NUM_VIEWS
    if view_id is not None and not valid_view:
        problems.append(f"invalid 'view_id' {view_id!r}, expected an integer 1..{NUM_VIEWS} or no key")

    if problems or image is None:
        return None, problems
    return Case(name=image.name, image=image, label=label, view_id=view_id), []


def _entry_path(entry: dict, key: str, list_dir: Path, input_dir: Path | None, problems: list[str]) -> Path | None:
    # "image" is required. "label" may be missing or null.
    raw = entry.get(key)
    if raw is None and key != "image":
        return None
    if not isinstance(raw, str) or not raw:
        problems.append(f"missing or invalid '{key}' path: {raw!r}")
        return None
    path = resolve_path(raw, list_dir, input_dir)
    if path is None:
        places = f"as given or in {list_dir}"
        if input_dir is not None:
            places += f" or by basename in {input_dir}"
        problems.append(f"{key} {raw!r} not found ({places}); fix the path or pass the input folder")
    return path


def resolve_path(raw: str, list_dir: Path, input_dir: Path | None) -> Path | None:
    """Find a listed file: as given, then under ``list_dir``, then by basename under ``input_dir``.

    Returns the first existing candidate, or None.
    """
    given = Path(raw)
    candidates = [given]
    if not given.is_absolute():
        candidates.append(list_dir / given)
    if input_dir is not None:
        candidates.append(input_dir / given.name)
    for candidate in candidates:
        try:
            if candidate.is_file():
                return candidate
        # is_file returns False for a missing file but raises for a name too long to exist.
        except OSError:
            continue
    return None


def _drop_repeated_entries(cases: list[Case]) -> list[Case]:
    # The same image listed twice with the same label and view is one case, and is kept once.
    # Entries that differ in any of these are left for _check_unique_names to report.
    kept: dict[tuple[Path, Path | None, int | None], Case] = {}
    repeats: dict[tuple[Path, Path | None, int | None], int] = defaultdict(int)
    for case in cases:
        key = (case.image.resolve(), case.label.resolve() if case.label else None, case.view_id)
        kept.setdefault(key, case)
        repeats[key] += 1
    for key, count in repeats.items():
        if count > 1:
            logger.warning(
                "%s is listed %d times with the same label and view; keeping one entry", kept[key].image, count
            )
    return list(kept.values())


def _check_unique_names(source: Path, cases: list[Case]) -> None:
    by_name: dict[str, list[Path]] = defaultdict(list)
    for case in cases:
        by_name[case.name].append(case.image)
    clashes = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    if not clashes:
        return
    lines = [f"{name}: " + ", ".join(str(path) for path in paths) for name, paths in sorted(clashes.items())]
    raise CaseListError(
        f"{source}: {len(clashes)} image basenames occur more than once, and their predictions "
        "would overwrite each other; rename the files or split the list:\n  " + "\n  ".join(lines)
    )
