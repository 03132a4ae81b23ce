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

from fetuskit.inference.cases import output_name, resolve_cases
from fetuskit.inference.config import InferenceConfig, InferenceSetupError
from fetuskit.inference.ensemble import Ensemble, load_ensemble, resolve_device
from fetuskit.inference.reading import FALLBACK_SIZE
from fetuskit.inference.report import REPORT_NAME, SETTINGS_NAME, RunReport
from fetuskit.inference.runner import run_inference

__all__ = [
    "FALLBACK_SIZE",
    "REPORT_NAME",
    "SETTINGS_NAME",
    "Ensemble",
    "InferenceConfig",
    "InferenceSetupError",
    "RunReport",
    "load_ensemble",
    "output_name",
    "resolve_cases",
    "resolve_device",
    "run_inference",
]
