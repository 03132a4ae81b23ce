"""Resolve the cases of a run and their output file names."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from fetuskit.cases import Case, load_cases, resolve_path
from fetuskit.errors import CaseListError, FetusError
from fetuskit.inference.config import InferenceConfig, InferenceSetupError

logger = logging.getLogger(__name__)


def _is_existing_file(path: Path) -> bool:
    # pathlib raises instead of returning False for a name longer than the file system allows.
    try:
        return path.is_file()
    except OSError:
        return False


def _check_inputs_outside(cases: Sequence[Case], out_dir: Path) -> None:
    """Raise when an output file would be an input image itself, so no input is ever overwritten."""
    clashes = []
    for case in cases:
        target = out_dir / output_name(case)
        try:
            if _is_existing_file(target) and target.samefile(case.image):
                clashes.append(case.name)
        # An image that cannot be examined (missing, or a NUL in its name) is not in the output folder.
        except (OSError, ValueError):
            continue
    if clashes:
        shown = ", ".join(clashes[:5]) + (", ..." if len(clashes) > 5 else "")
        raise InferenceSetupError(
            f"output folder {out_dir} contains the input images ({len(clashes)} of {len(cases)}: {shown}), "
            "and the predictions would replace them. Pass --out-dir with another folder."
        )


def output_name(case: Case) -> str:
    """Return the prediction file name of a case: the input file's basename."""
    return case.name


def resolve_cases(config: InferenceConfig) -> tuple[list[Case], str]:
    """Return the cases to predict and a description of where they came from.

    ``input_dir`` wins over ``data_json``. With ``data_json_fallback``, a missing ``data_json``
    whose folder (or its ``images`` subfolder) contains ``.h5`` files falls back to that folder,
    with a warning. Without it, a missing ``data_json`` is an error.
    Image paths of a JSON list are resolved as given, then relative to the list's folder, then
    by basename in the list's folder and its ``images`` subfolder. A listed image that is not
    found still becomes a case, so it gets a fallback output instead of stopping the run.

    Raises:
        InferenceSetupError: when no source exists or it lists no cases. Images that share a
            basename are returned, and the run gives an output to the first of them only.
    """
    if config.input_dir is not None:
        source = Path(config.input_dir)
        if not source.is_dir():
            raise InferenceSetupError(f"input folder not found: {source}. Pass --input with a folder of .h5 images.")
    elif Path(config.data_json).is_file():
        source = Path(config.data_json)
    elif not config.data_json_fallback:
        kind = "a folder, not a file" if Path(config.data_json).is_dir() else "not found"
        raise InferenceSetupError(
            f"case list {config.data_json} is {kind}. Pass --data-json with a JSON list of "
            '{"image": path} entries, or --input with a folder of .h5 images.'
        )
    else:
        source = _image_folder_near(Path(config.data_json))
        logger.warning("case list %s not found; processing the .h5 files in %s instead", config.data_json, source)

    try:
        if source.is_file():
            cases = _cases_from_list(source)
        else:
            cases = load_cases(source)
    except FetusError as error:
        raise InferenceSetupError(f"cannot read the cases of {source}: {error}") from error
    logger.info("found %d case(s) in %s", len(cases), source)
    return cases, str(source)


def _image_folder_near(data_json: Path) -> Path:
    folder = data_json.parent
    for candidate in (folder, folder / "images"):
        if candidate.is_dir() and any(path.suffix == ".h5" for path in candidate.iterdir()):
            return candidate
    raise InferenceSetupError(
        f"case list not found: {data_json}, and neither {folder} nor {folder / 'images'} contains .h5 "
        "files. Mount the input folder at /ws/data (with valid.json or the images), or pass "
        "--data-json FILE or --input DIR."
    )


def _cases_from_list(list_path: Path) -> list[Case]:
    images_dir = list_path.parent / "images"
    input_dir = images_dir if images_dir.is_dir() else list_path.parent
    try:
        return load_cases(list_path, input_dir=input_dir)
    except CaseListError as error:
        logger.warning("%s\nPredicting every entry that names an image; images not found get fallback outputs.", error)

    try:
        entries = json.loads(list_path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InferenceSetupError(f"cannot read the case list {list_path}: {error}") from error
    if not isinstance(entries, list) or not entries:
        raise InferenceSetupError(f"{list_path}: expected a non-empty JSON list of {{\"image\": path}} objects")

    cases = []
    listed: set[Path] = set()
    for index, entry in enumerate(entries):
        raw = entry.get("image") if isinstance(entry, dict) else None
        if not isinstance(raw, str) or not raw:
            logger.error("%s: entry %d names no image, so it cannot get an output: %r", list_path, index, entry)
            continue
        found = resolve_path(raw, list_path.parent, input_dir)
        image = found if found is not None else Path(raw)
        if found is not None and found.resolve() in listed:
            logger.warning("%s: entry %d lists %s again; predicting it once", list_path, index, found)
            continue
        if found is not None:
            listed.add(found.resolve())
        cases.append(Case(name=image.name, image=image, label=None, view_id=None))
    if not cases:
        raise InferenceSetupError(f"{list_path}: no entry names an image; nothing to predict")
    return cases
