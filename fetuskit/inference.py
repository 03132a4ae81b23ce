"""The inference run behind ``process.py``: cases in, one prediction file per case out.

A run resolves its cases and checks and loads the ensemble once. It then reads images ahead
in a thread pool while the network runs on batches. Each input gets ``<basename>.h5`` with a
``mask`` (H, W) uint8 at the input's own size and a ``label`` (7,) uint8.

A case is never dropped. An image that cannot be read or predicted gets an all-background
mask (at the input's size when its image dataset's shape is readable, else 512x512) and a zero
label, and the run report lists it with the reason. A case without a usable output name
(a second image with the same basename, or a name such as "..") or whose file cannot be
written gets no file, and the report lists it under ``missing_outputs``. The run writes ``run_settings.json`` at
the start and ``run_report.json`` at the end into the output folder. The scorer matches
predictions by ``.h5`` file name, so these files do not disturb it.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

import fetuskit
from evaluation.metrics import time_score
from fetuskit.arrays import to_pixels_hwc
from fetuskit.cases import Case, load_cases, resolve_path
from fetuskit.errors import CaseListError, FetusError
from fetuskit.io import ensure_output_dir, read_image, write_prediction
from fetuskit.labels import CLASS_MASK, NUM_CHD, NUM_CLASSES, VIEW_NAMES
from fetuskit.predict import UNKNOWN_VIEW, chd_to_label, predict_batch, probabilities_to_mask
from fetuskit.transforms import image_to_tensor, resize_probabilities
from fetuskit.weights_manifest import WeightsManifest, load_manifest, verify_checksums

logger = logging.getLogger(__name__)

# Size of the fallback mask when an input's own size cannot be read (the FETUS frame size).
FALLBACK_SIZE = (512, 512)
SETTINGS_NAME = "run_settings.json"
REPORT_NAME = "run_report.json"


class InferenceSetupError(RuntimeError):
    """The run cannot start: no inputs, no usable weights, or an unusable output folder or device."""


@dataclass(frozen=True)
class InferenceConfig:
    """Resolved settings of one run; relative paths are relative to the working directory.

    Attributes:
        out_dir: folder for ``<basename>.h5`` predictions and the run's JSON files.
        weights_dir: folder with ``manifest.json`` and the checkpoints it lists.
        data_json: case list, a JSON array of ``{"image": path}``; used unless ``input_dir`` is set.
        data_json_fallback: when ``data_json`` does not exist, process the ``.h5`` files in its
            folder instead, as the organisers' template expects of the default path. A case list
            the user names explicitly should be strict, so that a typo stops the run.
        input_dir: folder of ``.h5`` images to process instead of ``data_json``.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``.
        batch_size: images per forward pass.
        workers: threads that read and prepare images ahead of the network; 0 reads inline.
        overwrite: redo cases whose output file already exists instead of skipping them.
        refine: run the refiner when the manifest configures one.
        started_at: ``time.perf_counter()`` at process start, so the timing covers imports and
            model loading; None uses the moment the run starts.
    """

    out_dir: Path = Path("output")
    weights_dir: Path = Path("model_weights")
    data_json: Path = Path("data/valid.json")
    data_json_fallback: bool = True
    input_dir: Path | None = None
    device: str = "auto"
    batch_size: int = 8
    workers: int = 4
    overwrite: bool = False
    refine: bool = True
    started_at: float | None = None


@dataclass
class Ensemble:
    """Loaded members on one device, their averaging weights and the shared input side."""

    models: list[nn.Module]
    weights: list[float]
    input_size: int
    chd_thresholds: tuple[float, ...]
    device: torch.device


@dataclass
class _Prepared:
    case: Case
    image: np.ndarray  # (H, W) float32 in [0, 1]
    tensor: torch.Tensor  # (1, S, S) float32 in [0, 1]
    view: int | None  # 0-based view index


@dataclass
class _Unreadable:
    case: Case
    reason: str
    size: tuple[int, int]


@dataclass
class RunReport:
    """Outcome of a run, written as ``run_report.json``.

    ``mean_ms_per_image`` is the run's wall time from ``started_at`` (model loading included)
    divided by the cases handled in this run (predicted plus fallbacks). Skipped cases, whose
    outputs already existed, do not count.
    """

    total_cases: int = 0
    predicted: int = 0
    skipped_existing: int = 0
    fallbacks: list[dict[str, str]] = field(default_factory=list)
    missing_outputs: list[dict[str, str]] = field(default_factory=list)
    views_from_head: list[dict[str, Any]] = field(default_factory=list)
    refiner_failures: list[dict[str, str]] = field(default_factory=list)
    device: str = ""
    model_load_seconds: float = 0.0
    wall_seconds: float = 0.0
    mean_ms_per_image: float | None = None
    time_score: float | None = None

    @property
    def exit_code(self) -> int:
        """0 when every case has an output file, else 1."""
        return 1 if self.missing_outputs else 0


def run_inference(config: InferenceConfig) -> RunReport:
    """Predict every case of the configured input and write one ``.h5`` file per case.

    Returns:
        The run report, also written to ``<out_dir>/run_report.json``.

    Raises:
        InferenceSetupError: when the run cannot start, for example because the output folder
            contains the input images. The message explains what to do.
        ManifestError: when the weights manifest is missing or a checkpoint is missing or altered.
    """
    started_at = config.started_at if config.started_at is not None else time.perf_counter()
    if config.batch_size < 1:
        raise InferenceSetupError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.workers < 0:
        raise InferenceSetupError(f"--workers must be 0 or more, got {config.workers}")

    cases, source = resolve_cases(config)
    out_dir = _prepare_output_dir(config.out_dir)
    _check_inputs_outside(cases, out_dir)
    device = resolve_device(config.device)

    manifest = load_manifest(config.weights_dir)
    verify_checksums(manifest)
    load_start = time.perf_counter()
    ensemble = load_ensemble(manifest, device)
    refiner = _build_refiner(manifest, config.refine, device)
    report = RunReport(total_cases=len(cases), device=str(device))
    report.model_load_seconds = time.perf_counter() - load_start
    logger.info(
        "loaded %d ensemble member(s) on %s in %.2f s (input side %d px)",
        len(ensemble.models), device, report.model_load_seconds, ensemble.input_size,
    )

    _write_json(out_dir / SETTINGS_NAME, _settings(config, source, manifest, ensemble, refiner is not None))

    pending = []
    first_with_name: dict[str, Case] = {}
    for case in cases:
        first = first_with_name.setdefault(output_name(case), case)
        if first is not case:
            reason = (
                f"{case.image} has the same basename as {first.image}, so its prediction would overwrite "
                "that one; rename the file or predict it in a separate run"
            )
            logger.error("no output for %s: %s", case.image, reason)
            report.missing_outputs.append({"name": output_name(case), "reason": reason})
        elif not config.overwrite and _is_existing_file(out_dir / output_name(case)):
            report.skipped_existing += 1
        else:
            pending.append(case)
    if report.skipped_existing:
        logger.info(
            "skipping %d case(s) whose output already exists in %s (pass --overwrite to redo them)",
            report.skipped_existing, out_dir,
        )

    runner = _BatchRunner(ensemble, refiner, out_dir, report)
    with _progress(len(pending)) as advance:
        batch: list[_Prepared] = []
        for item in _read_ahead(pending, ensemble.input_size, config.workers, config.batch_size):
            if isinstance(item, _Unreadable):
                runner.write_fallback(item.case, item.size, item.reason)
                advance(1)
                continue
            batch.append(item)
            if len(batch) == config.batch_size:
                runner.run(batch)
                advance(len(batch))
                batch = []
        if batch:
            runner.run(batch)
            advance(len(batch))

    _finish_report(report, started_at)
    _write_json(out_dir / REPORT_NAME, asdict(report))
    _log_summary(report, out_dir)
    return report


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
    with a warning; without it, a missing ``data_json`` is an error.
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


def resolve_device(requested: str) -> torch.device:
    """Turn ``auto``, ``cpu`` or ``cuda`` into a torch device, checking that CUDA exists when requested."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise InferenceSetupError(
            "--device cuda requested but CUDA is not available; run the container with --gpus all, "
            "or pass --device cpu."
        )
    if requested not in ("cpu", "cuda"):
        raise InferenceSetupError(f"--device must be auto, cpu or cuda, got {requested!r}")
    return torch.device(requested)


def load_ensemble(manifest: WeightsManifest, device: torch.device) -> Ensemble:
    """Load every member of a checked manifest onto ``device`` in eval mode.

    The shared input side is the largest member input size. Members with a smaller size get
    the batch resized again inside :func:`fetuskit.predict.predict_batch`.
    """
    from fetuskit.models.checkpoint import load_checkpoint

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    models = []
    for member in manifest.members:
        path = manifest.checkpoint_path(member)
        try:
            model, _ = load_checkpoint(path, map_location=device, use=member.use)
        # Any failure to load a checksum-verified file means the weights folder is unusable.
        except Exception as error:  # noqa: BLE001
            raise InferenceSetupError(
                f"cannot load checkpoint {path}: {type(error).__name__}: {error}. Check that the code "
                "version matches the one that wrote the checkpoint."
            ) from error
        models.append(model.to(device).eval())
    # NOTE: mixed input sizes resize the prepared batch twice for the smaller members.
    input_size = max(int(model.input_size) for model in models)
    return Ensemble(
        models=models,
        weights=[member.weight for member in manifest.members],
        input_size=input_size,
        chd_thresholds=manifest.chd_thresholds,
        device=device,
    )


def _build_refiner(manifest: WeightsManifest, enabled: bool, device: torch.device) -> Any | None:
    """Build the manifest's refiner on ``device``, or return None when none is configured or enabled.

    A relative ``weights`` path in the refiner settings is taken relative to the manifest's folder.
    """
    if manifest.refiner is None:
        return None
    if not enabled:
        logger.info("refiner disabled by --no-refine")
        return None
    try:
        from fetuskit.refine import build_refiner
    except ImportError:
        logger.warning("the manifest configures a refiner, but fetuskit.refine.build_refiner is missing; skipping refinement")
        return None

    settings = dict(manifest.refiner)
    settings.setdefault("device", str(device))
    if settings.get("weights") and not Path(settings["weights"]).is_absolute():
        settings["weights"] = str(manifest.folder / settings["weights"])
    # NOTE: the manifest checksums cover the ensemble members only, not the refiner's weights.
    try:
        return build_refiner(settings)
    # Invalid settings or unreadable refiner weights mean the shipped weights folder is broken.
    except Exception as error:  # noqa: BLE001
        raise InferenceSetupError(
            f"cannot build the refiner configured in {manifest.folder / 'manifest.json'}: "
            f"{type(error).__name__}: {error}. Fix its \"refiner\" settings, or pass --no-refine."
        ) from error


def _prepare_output_dir(path: Path) -> Path:
    try:
        return Path(ensure_output_dir(path))
    except (FetusError, OSError) as error:
        raise InferenceSetupError(
            f"output folder {path} is not writable: {error}. Mount a writable folder at /ws/output "
            "or pass --out-dir DIR."
        ) from error


def _prepare(case: Case, size: int) -> _Prepared | _Unreadable:
    """Read and preprocess one case, turning every failure into an :class:`_Unreadable`."""
    try:
        loaded = read_image(case.image)
        tensor = image_to_tensor(loaded.image, size)
    # A corrupt file can fail in h5py, NumPy or torch with many exception types. Each of them
    # must become a fallback output instead of stopping the run.
    except Exception as error:  # noqa: BLE001
        reason = f"{type(error).__name__}: {error}"
        logger.error("cannot read %s: %s", case.image, reason)
        return _Unreadable(case, reason, _readable_size(Path(case.image)))

    view = loaded.view
    if view is None and getattr(case, "view_id", None) is not None:
        view = int(case.view_id) - 1
    return _Prepared(case, loaded.image, tensor, view)


def _readable_size(path: Path) -> tuple[int, int]:
    """Return (H, W) of a file's ``image`` dataset from its shape alone, else :data:`FALLBACK_SIZE`."""
    try:
        with h5py.File(path, "r") as handle:
            shape = tuple(handle["image"].shape)
    # Any failure here only means that the size is unknown.
    except Exception:  # noqa: BLE001
        return FALLBACK_SIZE
    # A zero-stride array of that shape lets the reader's own layout rules decide, without
    # reading any pixels.
    pixels, problem = to_pixels_hwc(np.broadcast_to(np.uint8(0), shape))
    if problem is not None:
        return FALLBACK_SIZE
    return int(pixels.shape[0]), int(pixels.shape[1])


def _read_ahead(
    cases: Sequence[Case], size: int, workers: int, batch_size: int
) -> Iterator[_Prepared | _Unreadable]:
    """Yield prepared cases in input order, reading up to two batches ahead in a thread pool."""
    if workers == 0:
        for case in cases:
            yield _prepare(case, size)
        return

    window = max(2 * batch_size, workers)
    remaining = iter(cases)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="read-ahead") as pool:
        # range comes first: zip stops on it without taking, and losing, one more case.
        queue: deque[Future] = deque(pool.submit(_prepare, case, size) for _, case in zip(range(window), remaining))
        while queue:
            result = queue.popleft().result()
            following = next(remaining, None)
            if following is not None:
                queue.append(pool.submit(_prepare, following, size))
            yield result


class _BatchRunner:
    """Predicts batches and writes their outputs, recording every outcome in the report."""

    def __init__(self, ensemble: Ensemble, refiner: Any | None, out_dir: Path, report: RunReport) -> None:
        self.ensemble = ensemble
        self.refiner = refiner
        self.out_dir = out_dir
        self.report = report

    def run(self, batch: list[_Prepared]) -> None:
        images = torch.stack([item.tensor for item in batch]).to(self.ensemble.device)
        views = torch.tensor([UNKNOWN_VIEW if item.view is None else item.view for item in batch], dtype=torch.long)
        try:
            prediction = predict_batch(self.ensemble.models, images, views.to(self.ensemble.device), self.ensemble.weights)
        # A batch can fail for reasons one image would not (CUDA out of memory) or because of
        # one bad image, so retry each image alone before falling back.
        except Exception as error:  # noqa: BLE001
            if len(batch) > 1:
                logger.warning("prediction failed for a batch of %d (%s); retrying one image at a time", len(batch), error)
                for item in batch:
                    self.run([item])
                return
            item = batch[0]
            logger.error("prediction failed for %s: %s", item.case.image, error)
            self.write_fallback(item.case, item.image.shape, f"prediction failed: {type(error).__name__}: {error}")
            return

        for index, item in enumerate(batch):
            view = int(prediction.views[index])
            if bool(prediction.view_from_head[index]):
                probability = float(prediction.view_probs[index, view])
                logger.info("%s: view unknown, view head predicts %s (p=%.3f)", item.case.image, VIEW_NAMES[view], probability)
                self.report.views_from_head.append(
                    {"name": output_name(item.case), "view": VIEW_NAMES[view], "probability": round(probability, 4)}
                )
            height, width = item.image.shape
            try:
                mask = self._mask(item, prediction.probs[index], view, height, width)
                label = chd_to_label(prediction.chd[index], view, self.ensemble.chd_thresholds)
            # Resizing to a very large input can run out of memory. One image must not stop the run.
            except Exception as error:  # noqa: BLE001
                logger.error("post-processing failed for %s: %s", item.case.image, error)
                reason = f"post-processing failed: {type(error).__name__}: {error}"
                self.write_fallback(item.case, item.image.shape, reason)
                continue
            if self._write(item.case, mask, label):
                self.report.predicted += 1

    def _mask(self, item: _Prepared, probs: torch.Tensor, view: int, height: int, width: int) -> np.ndarray:
        if self.refiner is None:
            return probabilities_to_mask(probs, height, width)
        probabilities = resize_probabilities(probs[None].float(), height, width)[0]
        coarse = probabilities.argmax(dim=0).to(torch.uint8).cpu().numpy()
        try:
            refined, _ = self.refiner.refine(item.image, coarse, probabilities.cpu().numpy(), view)
            refined = _checked_refined_mask(refined, (height, width), view)
        # The refiner is optional, so any failure in it keeps the network's own mask.
        except Exception as error:  # noqa: BLE001
            logger.warning("refiner failed for %s, keeping the network's mask: %s", item.case.image, error)
            self.report.refiner_failures.append({"name": output_name(item.case), "reason": f"{type(error).__name__}: {error}"})
            return coarse
        return refined

    def write_fallback(self, case: Case, size: tuple[int, int], reason: str) -> None:
        """Write an all-background mask of ``size`` (H, W) and a zero label for a case that failed."""
        mask = np.zeros(size, dtype=np.uint8)
        label = np.zeros(NUM_CHD, dtype=np.uint8)
        if self._write(case, mask, label):
            self.report.fallbacks.append({"name": output_name(case), "reason": reason})

    def _write(self, case: Case, mask: np.ndarray, label: np.ndarray) -> bool:
        try:
            write_prediction(self.out_dir, output_name(case), mask, label)
        # ValueError: a name that is no valid file name ("..", or with a NUL byte) or an invalid mask.
        except (FetusError, OSError, ValueError) as error:
            logger.error("cannot write the prediction for %s: %s", case.image, error)
            self.report.missing_outputs.append({"name": output_name(case), "reason": str(error)})
            return False
        return True


def _checked_refined_mask(refined: Any, shape: tuple[int, int], view: int) -> np.ndarray:
    """Check a refiner's mask and return it as (H, W) uint8.

    Raises:
        ValueError: the mask has another shape than ``shape``, is not integer, or contains a
            class that ``view`` does not allow.
    """
    mask = np.asarray(refined)
    if mask.shape != shape:
        raise ValueError(f"refined mask has shape {mask.shape}, expected the input's shape {shape}")
    if mask.dtype.kind not in "ui" or (mask.size and mask.max() >= NUM_CLASSES):
        raise ValueError(f"refined mask has dtype {mask.dtype} or values outside 0..{NUM_CLASSES - 1}")
    forbidden = sorted(set(np.unique(mask).tolist()) - set(np.flatnonzero(CLASS_MASK[view]).tolist()))
    if forbidden:
        classes = ", ".join(map(str, forbidden))
        raise ValueError(f"refined mask contains class {classes}, which view {VIEW_NAMES[view]} does not allow")
    return mask.astype(np.uint8)


class _progress:
    """Context manager returning ``advance(n)``: a rich progress bar on a terminal, log lines otherwise."""

    # Seconds between plain progress lines when stderr is not a terminal.
    LOG_INTERVAL_S = 10.0

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.bar: Any = None
        self.task: Any = None
        self.start = time.perf_counter()
        self.last_log = self.start

    def __enter__(self) -> Any:
        self.start = time.perf_counter()
        if sys.stderr.isatty() and self.total:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("predicting"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.bar.start()
            self.task = self.bar.add_task("predicting", total=self.total, rate="")
        return self.advance

    def advance(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.bar is not None:
            self.bar.update(self.task, advance=count, rate=f"{rate:.1f} img/s")
            return
        if self.done == self.total or now - self.last_log >= self.LOG_INTERVAL_S:
            self.last_log = now
            remaining = (self.total - self.done) / rate if rate > 0 else float("nan")
            # Cases that fell back count as handled here; the closing summary separates them.
            logger.info("handled %d/%d cases (%.1f img/s, about %.0f s left)", self.done, self.total, rate, remaining)

    def __exit__(self, *exc_info: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def _finish_report(report: RunReport, started_at: float) -> None:
    report.wall_seconds = time.perf_counter() - started_at
    handled = report.predicted + len(report.fallbacks) + len(report.missing_outputs)
    if handled:
        report.mean_ms_per_image = 1000.0 * report.wall_seconds / handled
        report.time_score = time_score(report.mean_ms_per_image)


def _log_summary(report: RunReport, out_dir: Path) -> None:
    logger.info(
        "done: %d predicted, %d fallback(s), %d skipped (existing), %d without output, of %d case(s); "
        "%.1f s wall, model loading %.2f s",
        report.predicted, len(report.fallbacks), report.skipped_existing, len(report.missing_outputs),
        report.total_cases, report.wall_seconds, report.model_load_seconds,
    )
    if report.mean_ms_per_image is not None:
        logger.info(
            "mean wall time %.1f ms per image including model loading (TimeScore %.1f)",
            report.mean_ms_per_image, report.time_score,
        )
    for entry in report.fallbacks:
        logger.warning("fallback output for %s: %s", entry["name"], entry["reason"])
    for entry in report.missing_outputs:
        logger.error("no output for %s: %s", entry["name"], entry["reason"])
    logger.info("report written to %s", out_dir / REPORT_NAME)


def _settings(
    config: InferenceConfig, source: str, manifest: WeightsManifest, ensemble: Ensemble, refiner_active: bool
) -> dict[str, Any]:
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in asdict(config).items()}
    settings.pop("started_at", None)
    return {
        "config": settings,
        "case_source": source,
        "device": str(ensemble.device),
        "input_size": ensemble.input_size,
        "member_input_sizes": [int(model.input_size) for model in ensemble.models],
        "refiner_active": refiner_active,
        "manifest": manifest.to_json(),
        "versions": {
            "fetuskit": fetuskit.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cuda": torch.version.cuda,
        },
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    temporary.replace(path)
