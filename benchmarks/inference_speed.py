"""Compare the speed of process.py's pipeline with a plain one-image-at-a-time loop.

    python benchmarks/inference_speed.py [--images DIR] [--weights DIR] [--device auto]

Both variants predict the same images with the same ensemble in one process and write
predictions to temporary folders. The plain loop reads an image, runs the ensemble on it
alone, resizes, thresholds and writes, then moves on. The pipeline is ``run_inference``
(batches, read-ahead threads). Model loading is timed separately and left out of both
figures, so the ratio shows what batching and read-ahead gain. The masks of both variants
must be identical, so the script also checks that the pipeline predicts what a plain loop does.

Without ``--weights`` it saves a tiny random ``timm-unet`` checkpoint with a manifest in a
temporary folder, so it runs before any trained weights exist.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from fetuskit.offline import configure_offline_environment  # noqa: E402

configure_offline_environment()

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fetuskit.cases import load_cases  # noqa: E402
from fetuskit.inference import InferenceConfig, load_ensemble, resolve_device, run_inference  # noqa: E402
from fetuskit.io import read_image, write_prediction  # noqa: E402
from fetuskit.predict import UNKNOWN_VIEW, chd_to_label, predict_batch, probabilities_to_mask  # noqa: E402
from fetuskit.transforms import image_to_tensor  # noqa: E402
from fetuskit.weights_manifest import load_manifest, verify_checksums, write_manifest  # noqa: E402

logger = logging.getLogger("inference_speed")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", type=Path, default=REPOSITORY / "test" / "data" / "focus12" / "images",
                        help="folder of .h5 images to predict")
    parser.add_argument("--weights", type=Path, default=None,
                        help="weights folder with manifest.json; default: a tiny random model made for this run")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the networks run")
    parser.add_argument("--batch-size", type=int, default=8, help="pipeline images per forward pass")
    parser.add_argument("--workers", type=int, default=4, help="pipeline read-ahead threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant; the median is reported")
    return parser.parse_args()


def make_tiny_weights(folder: Path) -> Path:
    from fetuskit.models import build_model, tiny_config
    from fetuskit.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model("timm-unet", **{**tiny_config("timm-unet"), "input_size": 128})
    save_checkpoint(folder / "tiny.pt", model, stage="benchmark")
    write_manifest(folder, ["tiny.pt"], provenance={"source": "random tiny model made by benchmarks/inference_speed.py"})
    return folder


def run_plain_loop(images_dir: Path, weights_dir: Path, device: torch.device, out_dir: Path) -> float:
    """Predict one image at a time with no read-ahead; return wall seconds, model loading excluded."""
    manifest = load_manifest(weights_dir)
    ensemble = load_ensemble(manifest, device)
    cases = load_cases(images_dir)
    _synchronize(device)
    start = time.perf_counter()
    for case in cases:
        loaded = read_image(case.image)
        batch = image_to_tensor(loaded.image, ensemble.input_size)[None].to(device)
        view = torch.tensor([UNKNOWN_VIEW if loaded.view is None else loaded.view], device=device)
        prediction = predict_batch(ensemble.models, batch, view, ensemble.weights)
        resolved = int(prediction.views[0])
        mask = probabilities_to_mask(prediction.probs[0], *loaded.image.shape)
        label = chd_to_label(prediction.chd[0], resolved, ensemble.chd_thresholds)
        write_prediction(out_dir, case.name, mask, label)
    _synchronize(device)
    return time.perf_counter() - start


def run_pipeline(images_dir: Path, weights_dir: Path, device: str, out_dir: Path, batch_size: int, workers: int) -> float:
    """Run ``run_inference``; return its wall seconds with model loading taken out."""
    config = InferenceConfig(
        out_dir=out_dir, weights_dir=weights_dir, input_dir=images_dir, device=device,
        batch_size=batch_size, workers=workers, overwrite=True,
    )
    report = run_inference(config)
    return report.wall_seconds - report.model_load_seconds


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def masks_equal(first: Path, second: Path) -> bool:
    for path in sorted(first.glob("*.h5")):
        with h5py.File(path, "r") as a, h5py.File(second / path.name, "r") as b:
            if not np.array_equal(a["mask"][()], b["mask"][()]):
                logger.error("masks differ for %s", path.name)
                return False
    return True


def main() -> int:
    arguments = parse_arguments()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = resolve_device(arguments.device)
    count = len(load_cases(arguments.images))

    with tempfile.TemporaryDirectory(prefix="fetuskit-speed-") as scratch:
        scratch_dir = Path(scratch)
        weights_dir = arguments.weights or make_tiny_weights(scratch_dir)
        verify_checksums(load_manifest(weights_dir))
        plain_dir, pipeline_dir = scratch_dir / "plain", scratch_dir / "pipeline"
        plain_dir.mkdir()

        # One untimed run of each variant pays the one-off costs (imports, cuDNN autotuning).
        run_plain_loop(arguments.images, weights_dir, device, plain_dir)
        run_pipeline(arguments.images, weights_dir, str(device), pipeline_dir, arguments.batch_size, arguments.workers)
        plain = [run_plain_loop(arguments.images, weights_dir, device, plain_dir) for _ in range(arguments.repeats)]
        pipeline = [
            run_pipeline(arguments.images, weights_dir, str(device), pipeline_dir, arguments.batch_size, arguments.workers)
            for _ in range(arguments.repeats)
        ]
        identical = masks_equal(plain_dir, pipeline_dir)

    plain_ms = 1000.0 * statistics.median(plain) / count
    pipeline_ms = 1000.0 * statistics.median(pipeline) / count
    print(f"images: {count} from {arguments.images}; device: {device}; weights: {arguments.weights or 'tiny random model'}")
    print(f"plain loop: {plain_ms:.1f} ms per image (median of {arguments.repeats}, model loading excluded)")
    print(f"pipeline:   {pipeline_ms:.1f} ms per image (batch {arguments.batch_size}, {arguments.workers} read-ahead threads)")
    print(f"speed-up:   {plain_ms / pipeline_ms:.2f}x")
    print(f"identical masks: {identical}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
