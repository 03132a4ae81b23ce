"""FETUS 2026 inference entry point, run with no arguments inside the container.

Reads the case list ``./data/valid.json`` (a JSON array of ``{"image": path}``) and writes one
``<basename>.h5`` prediction per image to ``./output``, both relative to the working directory
(``/ws`` in the container). All logic lives in ``fetuskit.inference``; ``--help`` lists the options.
"""

from __future__ import annotations

import time

STARTED_AT = time.perf_counter()

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# The package sits next to this file; the container runs this script by absolute path from /ws.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fetuskit.offline import configure_offline_environment  # noqa: E402

configure_offline_environment()

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "model_weights"
DEFAULT_DATA_JSON = Path("data/valid.json")

logger = logging.getLogger("process")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults in the help, except None, whose meaning the option's own help explains."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Predict FETUS 2026 segmentation masks and CHD labels, one .h5 file per input image.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--data-json", type=Path, default=None,
                        help="case list, a JSON array of {\"image\": path}; default: data/valid.json, and "
                             "when that default is missing, the .h5 files in data/ (or data/images/) are "
                             "processed instead, as the challenge container expects. A list named here must exist")
    parser.add_argument("--input", type=Path, default=None, metavar="DIR",
                        help="folder of .h5 images to process instead of --data-json")
    parser.add_argument("--out-dir", type=Path, default=Path("output"),
                        help="folder for the <basename>.h5 predictions, run_settings.json and run_report.json")
    parser.add_argument("--weights", type=Path, default=None, metavar="DIR",
                        help="folder with manifest.json and the checkpoints it lists; default: the "
                             "model_weights folder next to process.py")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the networks run; auto uses CUDA when available")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=4,
                        help="threads that read images ahead of the network; 0 reads in the main thread")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo cases whose output file already exists instead of skipping them "
                             "(skipping lets a stopped run resume)")
    parser.add_argument("--no-refine", action="store_true",
                        help="skip the refiner even when the weights manifest configures one")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run inference and return the exit status: 0 every case has an output, 1 some lack one, 2 no start."""
    arguments = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from fetuskit.inference import InferenceConfig, InferenceSetupError, run_inference
    from fetuskit.weights_manifest import ManifestError

    config = InferenceConfig(
        out_dir=arguments.out_dir,
        weights_dir=arguments.weights or DEFAULT_WEIGHTS,
        data_json=arguments.data_json or DEFAULT_DATA_JSON,
        data_json_fallback=arguments.data_json is None,
        input_dir=arguments.input,
        device=arguments.device,
        batch_size=arguments.batch_size,
        workers=arguments.workers,
        overwrite=arguments.overwrite,
        refine=not arguments.no_refine,
        started_at=STARTED_AT,
    )
    try:
        report = run_inference(config)
    except (InferenceSetupError, ManifestError) as error:
        logger.error("cannot start: %s", error)
        return 2
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
