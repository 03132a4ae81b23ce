"""Time the fast segmentation scorer against the full-image reference on synthetic cases.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/score_speed.py [--cases 200] [--size 512]``

Each case is a 512 x 512 label map with a few overlapping ellipses of several classes, and a
prediction made by shifting, growing and shrinking them and adding a stray blob. Both
implementations score the same cases in one run, and the script exits non-zero if any
score differs by more than 1e-9.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.metrics import segmentation_scores, segmentation_scores_reference  # noqa: E402


def ellipse(shape: tuple[int, int], centre: tuple[float, float], axes: tuple[float, float], angle: float) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    dy = rows - centre[0]
    dx = cols - centre[1]
    along = dx * np.cos(angle) + dy * np.sin(angle)
    across = -dx * np.sin(angle) + dy * np.cos(angle)
    return (along / axes[1]) ** 2 + (across / axes[0]) ** 2 <= 1.0


def synthetic_case(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (prediction, ground truth) (size, size) uint8 label maps."""
    shape = (size, size)
    gt = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    classes = rng.choice(np.arange(1, 15), size=rng.integers(3, 7), replace=False)
    for class_id in classes:
        centre = rng.uniform(0.2 * size, 0.8 * size, size=2)
        axes = rng.uniform(0.03 * size, 0.15 * size, size=2)
        angle = rng.uniform(0, np.pi)
        gt[ellipse(shape, tuple(centre), tuple(axes), angle)] = class_id
        if rng.random() < 0.9:
            shift = rng.normal(0, 3, size=2)
            scale = rng.uniform(0.85, 1.15, size=2)
            pred[ellipse(shape, tuple(centre + shift), tuple(axes * scale), angle + rng.normal(0, 0.1))] = class_id
    stray = ellipse(shape, tuple(rng.uniform(0, size, size=2)), (4.0, 6.0), 0.0)
    pred[stray] = rng.integers(1, 15)
    return pred, gt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200, help="number of synthetic cases")
    parser.add_argument("--size", type=int, default=512, help="side of each square label map in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the synthetic cases")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    cases = [synthetic_case(rng, args.size) for _ in range(args.cases)]

    start = time.perf_counter()
    fast = [segmentation_scores(pred, gt) for pred, gt in cases]
    fast_seconds = time.perf_counter() - start

    start = time.perf_counter()
    reference = [segmentation_scores_reference(pred, gt) for pred, gt in cases]
    reference_seconds = time.perf_counter() - start

    max_difference = 0.0
    for fast_scores, reference_scores in zip(fast, reference):
        if not np.array_equal(fast_scores.counted, reference_scores.counted):
            print("counted classes differ between fast and reference")
            return 1
        counted = reference_scores.counted
        for metric in ("dice", "nsd"):
            difference = np.abs(getattr(fast_scores, metric)[counted] - getattr(reference_scores, metric)[counted])
            max_difference = max(max_difference, float(difference.max(initial=0.0)))

    classes_scored = sum(int(scores.counted.sum()) for scores in reference)
    print(f"cases: {args.cases} of {args.size} x {args.size}, classes scored: {classes_scored}")
    print(f"fast:      {fast_seconds:8.3f} s  ({1000 * fast_seconds / args.cases:7.2f} ms per case)")
    print(f"reference: {reference_seconds:8.3f} s  ({1000 * reference_seconds / args.cases:7.2f} ms per case)")
    print(f"speed-up:  {reference_seconds / fast_seconds:8.1f}x")
    print(f"max |fast - reference|: {max_difference:.3g}")
    return 0 if max_difference <= 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
