"""Convert folders of PNG images and binary PNG masks into FETUS 2026 case files.

Output layout, the same as the challenge data:

- ``DST/images/<stem>.h5``: ``image`` (512, 512, 3) uint8 RGB and ``view`` (1,) int32.
- ``DST/labels/<stem>_label.h5``: ``mask`` (512, 512) uint8 with classes 0..14 and ``label``
  (7,) uint8, all zeros because PNG masks carry no CHD diagnosis.
- ``DST/list.json``: a training list of ``{"image", "label", "view_id"}`` objects whose paths
  are relative to the folder that contains ``list.json``.

Geometry: each image is padded with black to a centred square (the odd pixel of an uneven
padding goes to the bottom or right), then resized to 512 x 512 with Pillow's
``Image.resize``. Images use ``Resampling.BILINEAR``: a triangle filter on pixel centres that
Pillow widens by the reduction factor when it shrinks, so downscaling is antialiased (unlike
``cv2.INTER_LINEAR``). Masks use ``Resampling.NEAREST``: output pixel x takes source pixel
``floor((x + 0.5) * in / out)``, the pixel-centre rule of ``cv2.INTER_NEAREST_EXACT`` and
torch's ``nearest-exact``. The padding, scale, original size, source file name and licence
are stored as attributes of the image file (``GEOMETRY_ATTRS`` plus ``source_file`` and
``licence``), so that ``to_original`` can map a prediction back to the original pixels.

Class map: ``name=class`` pairs in priority order. Where the masks of several entries
overlap, the entry listed first wins. FOCUS uses ``cardiac=5,thorax=7``: class 5 (heart)
inside the cardiac ellipse, class 7 (thoracic cavity) inside the thorax ellipse but outside
the heart, 0 elsewhere. FOCUS has no chamber, vessel or disease annotation, so its converted
files can only score classes 5 and 7, and their ``label`` vectors are all zeros.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image

from fetuskit.labels import CLASS_MASK, CLASS_NAMES, NUM_CHD, NUM_VIEWS

logger = logging.getLogger(__name__)

CANONICAL_SIZE = 512

FOCUS_CLASS_MAP = "cardiac=5,thorax=7"
FOCUS_MASK_PATTERN = "{stem}-{key}.png"
FOCUS_LICENCE = (
    "CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/). From FOCUS, doi:10.5281/zenodo.14597550, "
    "selected from FETAL_PLANES_DB (Burgos-Artizzu et al., Scientific Reports 10, 10200, 2020). "
    "Changed: padded to square, resized to 512x512, converted to HDF5, masks mapped to FETUS classes 5 and 7."
)

# Attributes of a converted image file that ``to_original`` reads.
GEOMETRY_ATTRS = (
    "pad_top",
    "pad_bottom",
    "pad_left",
    "pad_right",
    "scale",
    "original_height",
    "original_width",
)

_IMAGE_MODES_TO_RGB = {"L", "RGB", "RGBA", "LA", "P"}
_MASK_CHANNEL_MODES = {"1", "L", "P", "RGB", "RGBA", "LA"}


class ConversionError(ValueError):
    """Invalid conversion input. ``problems`` lists every bad file found, one message each."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        header = f"{len(self.problems)} problem(s) in the conversion input:"
        super().__init__("\n".join([header, *(f"  - {problem}" for problem in self.problems)]))


@dataclass(frozen=True)
class PadGeometry:
    """Placement of an (original_height, original_width) image on the square canonical grid.

    Padding is in original pixels; ``scale`` is canonical pixels per original pixel, that is
    ``size / (original side + padding)``.
    """

    pad_top: int
    pad_bottom: int
    pad_left: int
    pad_right: int
    scale: float
    original_height: int
    original_width: int

    @classmethod
    def for_size(cls, height: int, width: int, size: int = CANONICAL_SIZE) -> PadGeometry:
        """Centre an (height, width) image on a black square and scale the square to ``size``."""
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got height {height}, width {width}")
        side = max(height, width)
        pad_rows = side - height
        pad_cols = side - width
        return cls(
            pad_top=pad_rows // 2,
            pad_bottom=pad_rows - pad_rows // 2,
            pad_left=pad_cols // 2,
            pad_right=pad_cols - pad_cols // 2,
            scale=size / side,
            original_height=height,
            original_width=width,
        )

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> PadGeometry:
        """Read the geometry from HDF5 attributes (or any mapping) written by ``to_attrs``."""
        missing = [key for key in GEOMETRY_ATTRS if key not in attrs]
        if missing:
            raise KeyError(
                f"missing geometry attribute(s) {missing}; expected an image file written by "
                "fetuskit.convert (python -m train convert-png or convert-focus)"
            )
        return cls(
            pad_top=int(attrs["pad_top"]),
            pad_bottom=int(attrs["pad_bottom"]),
            pad_left=int(attrs["pad_left"]),
            pad_right=int(attrs["pad_right"]),
            scale=float(attrs["scale"]),
            original_height=int(attrs["original_height"]),
            original_width=int(attrs["original_width"]),
        )

    def to_attrs(self) -> dict[str, int | float]:
        return {key: getattr(self, key) for key in GEOMETRY_ATTRS}

    @property
    def side(self) -> int:
        """Side of the padded square, in original pixels."""
        return self.original_height + self.pad_top + self.pad_bottom

    @property
    def size(self) -> int:
        """Side of the canonical grid, in pixels."""
        return round(self.scale * self.side)


def pad_to_square(array: np.ndarray, geometry: PadGeometry) -> np.ndarray:
    """Pad an (H, W) or (H, W, C) array with the zeros that ``geometry`` sets; dtype is kept."""
    pad = [(geometry.pad_top, geometry.pad_bottom), (geometry.pad_left, geometry.pad_right)]
    pad += [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, mode="constant", constant_values=0)


def to_canonical_image(image: np.ndarray, geometry: PadGeometry) -> np.ndarray:
    """Pad and resize an (H, W, 3) uint8 image to (size, size, 3) uint8, bilinear (see module doc)."""
    square = Image.fromarray(pad_to_square(image, geometry))
    resized = square.resize((geometry.size, geometry.size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def to_canonical_mask(mask: np.ndarray, geometry: PadGeometry) -> np.ndarray:
    """Pad and resize an (H, W) uint8 label map to (size, size) uint8, nearest (see module doc)."""
    square = Image.fromarray(pad_to_square(np.asarray(mask, dtype=np.uint8), geometry))
    resized = square.resize((geometry.size, geometry.size), Image.Resampling.NEAREST)
    return np.asarray(resized, dtype=np.uint8)


def to_original(mask: np.ndarray, attrs: Mapping[str, Any] | PadGeometry) -> np.ndarray:
    """Map a canonical (size, size) label map back to the original (H, W) pixels.

    Args:
        mask: (size, size) integer label map on the canonical grid, such as a prediction.
        attrs: the attributes of the converted image file (``h5py`` ``attrs`` or a dict with
            ``GEOMETRY_ATTRS``), or a ``PadGeometry``.

    Returns:
        (original_height, original_width) uint8 label map, resized with Pillow's nearest
        neighbour (pixel-centre rule) to the padded square and then cropped.
    """
    geometry = attrs if isinstance(attrs, PadGeometry) else PadGeometry.from_attrs(attrs)
    expected = (geometry.size, geometry.size)
    if mask.shape != expected:
        raise ValueError(f"mask shape {mask.shape} does not match the converted image's grid {expected}")
    square = Image.fromarray(np.asarray(mask, dtype=np.uint8))
    full = np.asarray(square.resize((geometry.side, geometry.side), Image.Resampling.NEAREST))
    rows = slice(geometry.pad_top, geometry.pad_top + geometry.original_height)
    cols = slice(geometry.pad_left, geometry.pad_left + geometry.original_width)
    return full[rows, cols].copy()


def parse_class_map(text: str, view_id: int) -> tuple[tuple[str, int], ...]:
    """Parse ``"cardiac=5,thorax=7"`` into ``(("cardiac", 5), ("thorax", 7))``, in priority order.

    Raises:
        ValueError: on a malformed pair, a repeated name, a class outside 1..14 or a class
            that the view does not allow (``fetuskit.labels.CLASS_MASK``).
    """
    if not 1 <= view_id <= NUM_VIEWS:
        raise ValueError(f"view id {view_id} is invalid; expected 1..{NUM_VIEWS}")
    entries: list[tuple[str, int]] = []
    for pair in text.split(","):
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip().isdigit():
            raise ValueError(f"invalid class map entry {pair!r} in {text!r}; expected name=class, e.g. cardiac=5")
        class_id = int(value)
        if not 1 <= class_id < len(CLASS_NAMES):
            raise ValueError(f"class {class_id} for {key!r} is invalid; expected 1..{len(CLASS_NAMES) - 1}")
        if not CLASS_MASK[view_id - 1, class_id]:
            raise ValueError(f"class {class_id} ({CLASS_NAMES[class_id]}) is not allowed in view {view_id}")
        if key in dict(entries):
            raise ValueError(f"class map name {key!r} appears twice in {text!r}")
        entries.append((key, class_id))
    return tuple(entries)


@dataclass(frozen=True)
class ConvertConfig:
    """Settings of one PNG-to-FETUS conversion.

    Attributes:
        class_map: ``(mask name, class id)`` pairs in priority order: the first wins on overlap.
        mask_pattern: file name of a mask in the masks folder; ``{stem}`` is the image file's
            stem and ``{key}`` the mask name from ``class_map``.
        view_id: FETUS view id 1..4 written to every image file.
        size: side of the canonical grid, in pixels.
        licence: licence text stored with every image file; empty when unknown.
    """

    class_map: tuple[tuple[str, int], ...]
    mask_pattern: str = FOCUS_MASK_PATTERN
    view_id: int = 1
    size: int = CANONICAL_SIZE
    licence: str = ""


FOCUS_CONFIG = ConvertConfig(
    class_map=parse_class_map(FOCUS_CLASS_MAP, view_id=1),
    mask_pattern=FOCUS_MASK_PATTERN,
    view_id=1,
    licence=FOCUS_LICENCE,
)


def _read_image(path: Path) -> np.ndarray:
    """Read an 8-bit PNG as (H, W, 3) uint8 RGB; grayscale is copied to all three channels."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _read_binary_mask(path: Path, problems: list[str]) -> np.ndarray | None:
    """Read a binary PNG mask as (H, W) bool; append a message to ``problems`` when invalid.

    A mask is binary when its values are a subset of {0, 1} or of {0, 255}. Colour masks
    must have identical colour channels; an alpha channel is ignored.
    """
    with Image.open(path) as image:
        if image.mode not in _MASK_CHANNEL_MODES:
            problems.append(f"{path}: mask mode {image.mode!r} is not supported; expected an 8-bit binary PNG")
            return None
        values = np.asarray(image)
    if values.ndim == 3:
        colour = values[..., :3] if values.shape[-1] >= 3 else values[..., :1]
        if not (colour == colour[..., :1]).all():
            problems.append(f"{path}: mask channels differ; expected a gray mask or identical RGB channels")
            return None
        values = colour[..., 0]
    if values.dtype == bool:
        return values
    present = set(np.unique(values).tolist())
    if not (present <= {0, 1} or present <= {0, 255}):
        first_values = sorted(present)[:6]
        problems.append(f"{path}: mask is not binary, values {first_values}; expected only 0 and 255 (or 0 and 1)")
        return None
    return values > 0


@dataclass(frozen=True)
class _PngCase:
    stem: str
    image: Path
    masks: tuple[tuple[Path, int], ...]


def _find_cases(images_dir: Path, masks_dir: Path, config: ConvertConfig) -> list[_PngCase]:
    if not images_dir.is_dir():
        raise ConversionError([f"{images_dir}: images folder not found"])
    # Scanners and exports write both .png and .PNG; both are images.
    images = sorted(path for path in images_dir.iterdir() if path.suffix.lower() == ".png" and path.is_file())
    if not images:
        raise ConversionError([f"{images_dir}: no .png images found"])
    cases = []
    for image in images:
        masks = tuple(
            (masks_dir / config.mask_pattern.format(stem=image.stem, key=key), class_id)
            for key, class_id in config.class_map
        )
        cases.append(_PngCase(image.stem, image, masks))
    return cases


def _check_case(case: _PngCase) -> list[str]:
    """Return every problem of one case: missing masks, size mismatches and non-binary masks."""
    problems: list[str] = []
    with Image.open(case.image) as image:
        width, height = image.size
        if image.mode not in _IMAGE_MODES_TO_RGB:
            problems.append(f"{case.image}: image mode {image.mode!r} is not 8-bit; expected L, RGB, RGBA, LA or P")
    for mask_path, _ in case.masks:
        if not mask_path.is_file():
            problems.append(f"{mask_path}: mask not found for image {case.image.name}")
            continue
        with Image.open(mask_path) as mask:
            mask_width, mask_height = mask.size
        if (mask_height, mask_width) != (height, width):
            problems.append(
                f"{mask_path}: mask size {mask_height}x{mask_width} (HxW) does not match "
                f"image {case.image.name} size {height}x{width}"
            )
            continue
        _read_binary_mask(mask_path, problems)
    return problems


def paint_label_map(masks: Sequence[tuple[np.ndarray, int]]) -> np.ndarray:
    """Combine (H, W) bool masks into one (H, W) uint8 label map, the first mask winning overlaps."""
    label_map = np.zeros(masks[0][0].shape, dtype=np.uint8)
    for mask, class_id in reversed(masks):
        label_map[mask] = class_id
    return label_map


def _write_case(case: _PngCase, dst: Path, config: ConvertConfig) -> dict[str, Any]:
    image = _read_image(case.image)
    problems: list[str] = []
    masks = [(_read_binary_mask(path, problems), class_id) for path, class_id in case.masks]
    if problems:
        raise ConversionError(problems)
    label_map = paint_label_map(masks)
    geometry = PadGeometry.for_size(image.shape[0], image.shape[1], config.size)

    image_path = dst / "images" / f"{case.stem}.h5"
    label_path = dst / "labels" / f"{case.stem}_label.h5"
    canonical_image = to_canonical_image(image, geometry)
    with h5py.File(image_path, "w") as h5:
        # One chunk for the whole image: h5py's default chunks split the channel axis and
        # compress about twice as badly.
        h5.create_dataset(
            "image", data=canonical_image, chunks=canonical_image.shape, compression="gzip", compression_opts=9
        )
        h5.create_dataset("view", data=np.array([config.view_id], dtype=np.int32))
        h5.attrs.update(geometry.to_attrs())
        h5.attrs["source_file"] = case.image.name
        h5.attrs["licence"] = config.licence
    with h5py.File(label_path, "w") as h5:
        h5.create_dataset("mask", data=to_canonical_mask(label_map, geometry), compression="gzip")
        h5.create_dataset("label", data=np.zeros(NUM_CHD, dtype=np.uint8))
    return {
        "image": image_path.relative_to(dst).as_posix(),
        "label": label_path.relative_to(dst).as_posix(),
        "view_id": config.view_id,
    }


def convert_png_folder(images_dir: Path, masks_dir: Path, dst: Path, config: ConvertConfig) -> list[dict[str, Any]]:
    """Convert every ``*.png`` image of ``images_dir`` and its masks into FETUS files under ``dst``.

    Every case is checked before anything is written: a missing mask, a mask whose size
    differs from its image, or a non-binary mask raises one ``ConversionError`` that lists all
    bad files. Returns the training list that is also written to ``dst / "list.json"``.
    """
    cases = _find_cases(images_dir, masks_dir, config)
    problems = [problem for case in cases for problem in _check_case(case)]
    if problems:
        raise ConversionError(problems)

    (dst / "images").mkdir(parents=True, exist_ok=True)
    (dst / "labels").mkdir(parents=True, exist_ok=True)
    entries = []
    for case in cases:
        entries.append(_write_case(case, dst, config))
        logger.debug("converted %s", case.image)
    (dst / "list.json").write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
    logger.info("converted %d cases from %s into %s", len(entries), images_dir, dst)
    return entries


def convert_focus_split(split_dir: Path, dst: Path) -> list[dict[str, Any]]:
    """Convert one FOCUS split (``images/NNN.png``, ``annfiles_mask/NNN-cardiac.png``, ``-thorax.png``).

    The same as ``convert_png_folder`` with ``FOCUS_CONFIG``: class 5 in the cardiac mask,
    class 7 in the thorax mask outside the heart, view 1 (4CH) and the FOCUS licence text.
    """
    return convert_png_folder(split_dir / "images", split_dir / "annfiles_mask", dst, FOCUS_CONFIG)
