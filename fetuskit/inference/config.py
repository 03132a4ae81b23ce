"""Settings of one inference run and the error that stops a run before it starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
