"""Conversion and validation of the arrays stored in FETUS case files.

These functions work on arrays already read from a file. They return a problem message
instead of raising, so that ``fetuskit.io`` can wrap it in an error that names the file,
and a case-list checker can collect the problems of many files before raising once.
"""

from __future__ import annotations

import math

import numpy as np

from fetuskit.labels import NUM_CHD, NUM_CLASSES, NUM_VIEWS, VIEW_NAMES, view_index_from_name

# ITU-R BT.601 luma weights for R, G, B.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float64)

# A float image whose largest finite value exceeds this is on the 0..255 scale. It is 2.0,
# not 1.0, so that a [0, 1] image with interpolation overshoot (1.02) keeps its scale. On the
# 0..255 scale a maximum of 2.0 or less is a blank frame, which either reading leaves blank.
UNIT_SCALE_MAX = 2.0

# A 3-D image whose last axis has one of these sizes is read as (H, W, C).
CHANNELS_LAST_SIZES = (1, 3, 4)


def to_pixels_hwc(array: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """Bring an image array into (H, W) or (H, W, C) layout.

    Accepted layouts are (H, W), (H, W, 1), (H, W, 3), (H, W, 4) and (3, H, W). A 3-D
    shape whose last axis is 1, 3 or 4 is read as channels-last even if its first axis
    is 3, so a (3, H, 3) array is taken as (H=3, W=H, C=3).

    Returns:
        The array (a view, same dtype) and None, or None and a problem message.
    """
    if array.size == 0:
        return None, f"image has a zero-size axis (shape {array.shape})"
    if array.ndim == 2:
        return array, None
    if array.ndim == 3 and array.shape[-1] in CHANNELS_LAST_SIZES:
        return array, None
    if array.ndim == 3 and array.shape[0] == 3:
        return np.moveaxis(array, 0, -1), None
    return None, (
        f"image has unsupported shape {array.shape}; expected (H, W), (H, W, 1), (H, W, 3), "
        "(H, W, 4) or (3, H, W)"
    )


def scale_to_unit(pixels: np.ndarray) -> tuple[np.ndarray | None, int, int, str | None]:
    """Scale pixel values to float32 in [0, 1].

    The scaling runs in float64 and rounds to float32 once, so the same picture stored
    as uint8 x, uint16 x * 257, float x / 255 or float x gives identical values.

    uint8 is divided by 255 and uint16 by 65535. A float array whose largest finite value
    exceeds ``UNIT_SCALE_MAX`` (2.0) is taken to be on the 0..255 scale and divided by 255,
    otherwise it is taken as already in [0, 1]. So a float image on the 0..255 scale whose
    values are all 2 or less is read as [0, 1] data. Non-finite values (NaN, +-inf) become
    0. Values left outside [0, 1] are clipped.

    Returns:
        (scaled or None, count of non-finite values replaced, count of values clipped,
        problem message or None).
    """
    if pixels.dtype == np.uint8:
        return (pixels.astype(np.float64) / 255.0).astype(np.float32), 0, 0, None
    if pixels.dtype == np.uint16:
        return (pixels.astype(np.float64) / 65535.0).astype(np.float32), 0, 0, None
    if pixels.dtype.kind != "f":
        return None, 0, 0, (
            f"image has unsupported dtype {pixels.dtype}; expected uint8, uint16 or float "
            "in [0, 1] or [0, 255]"
        )

    values = pixels.astype(np.float64)
    finite = np.isfinite(values)
    non_finite = int(values.size - np.count_nonzero(finite))
    if non_finite:
        values = np.where(finite, values, 0.0)
    if values.max() > UNIT_SCALE_MAX:
        values = values / 255.0
    outside = int(np.count_nonzero((values < 0.0) | (values > 1.0)))
    if outside:
        values = np.clip(values, 0.0, 1.0)
    return values.astype(np.float32), non_finite, outside, None


def to_gray(values: np.ndarray) -> np.ndarray:
    """Convert (H, W) or (H, W, C) float32 values to (H, W) float32 gray.

    One channel is taken as it is, an alpha channel (C = 4) is dropped, and RGB is
    weighted with the BT.601 luma weights in float64. A pixel whose three channels are
    equal keeps that value exactly, which the weighted sum would not guarantee.
    """
    if values.ndim == 2:
        return values
    if values.shape[-1] == 1:
        return values[..., 0]
    rgb = values[..., :3]
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    weighted = (rgb.astype(np.float64) @ LUMA_WEIGHTS).astype(np.float32)
    equal = (red == green) & (green == blue)
    return np.where(equal, red, weighted)


def parse_view(value: object) -> tuple[int | None, str | None]:
    """Parse a stored view into the 0-based view index.

    Accepts a view id 1..4 as an integer, an integral float (2.0) or a digit string, or a
    view name such as "4CH" or "LVOT" (bytes or str, any case), in an array of any shape
    with exactly one element.

    Returns:
        (view index 0..3, None), or (None, reason) when the value is not a valid view.
    """
    array = np.asarray(value)
    if array.size != 1:
        return None, f"view has {array.size} values, expected one"
    item = array.reshape(()).item()

    if isinstance(item, bytes):
        try:
            item = item.decode("utf-8")
        except UnicodeDecodeError:
            return None, f"view {item!r} is not valid UTF-8 text"
    if isinstance(item, str):
        index = view_index_from_name(item)
        if index is not None:
            return index, None
        if item.strip().isdigit():
            item = int(item.strip())
        else:
            names = ", ".join(VIEW_NAMES)
            return None, f"unknown view name {item!r}, expected one of {names} or an id 1..{NUM_VIEWS}"

    if isinstance(item, bool):
        return None, f"view {item!r} is a boolean, expected an id 1..{NUM_VIEWS}"
    if isinstance(item, float):
        if not math.isfinite(item) or not item.is_integer():
            return None, f"view {item!r} is not an integral id 1..{NUM_VIEWS}"
        item = int(item)
    if isinstance(item, int):
        if 1 <= item <= NUM_VIEWS:
            return item - 1, None
        return None, f"view id {item} is outside 1..{NUM_VIEWS}"
    return None, f"view {item!r} has unsupported type {type(item).__name__}"


def to_class_mask(array: np.ndarray, expected_shape: tuple[int, int] | None) -> tuple[np.ndarray | None, str | None]:
    """Validate a label map and return it as (H, W) uint8 with values 0..14.

    (H, W, 1) and (1, H, W) are squeezed to (H, W). Integer, boolean and integral float
    dtypes are accepted. ``expected_shape`` is the image's (H, W), or None to skip that check.

    Returns:
        (mask, None), or (None, problem message).
    """
    mask = array
    if mask.ndim == 3 and 1 in (mask.shape[0], mask.shape[-1]):
        mask = mask.reshape(mask.shape[1:] if mask.shape[0] == 1 else mask.shape[:-1])
    if mask.ndim != 2:
        return None, f"mask has shape {array.shape}, expected (H, W)"
    if expected_shape is not None and mask.shape != tuple(expected_shape):
        return None, f"mask has shape {mask.shape}, expected the image's shape {tuple(expected_shape)}"
    if mask.dtype.kind not in "biuf":
        return None, f"mask has unsupported dtype {mask.dtype}, expected an integer dtype"
    if mask.dtype.kind == "f" and not (np.isfinite(mask).all() and np.all(mask == np.round(mask))):
        return None, "mask has non-integral or non-finite float values, expected class ids"
    if mask.size and (mask.min() < 0 or mask.max() > NUM_CLASSES - 1):
        found = f"{mask.min()}..{mask.max()}"
        return None, f"mask has values {found}, expected class ids 0..{NUM_CLASSES - 1}"
    return mask.astype(np.uint8), None


def to_label_vector(array: np.ndarray, binary: bool) -> tuple[np.ndarray | None, str | None]:
    """Validate a CHD label vector of 7 values.

    Any shape with 7 elements is flattened. With ``binary`` the values must be 0 or 1 and
    the result is uint8. Without it any finite real values (scores or probabilities) are
    accepted and the result is float64.

    Returns:
        (vector, None), or (None, problem message).
    """
    if array.size != NUM_CHD:
        return None, f"label has shape {array.shape}, expected ({NUM_CHD},)"
    if array.dtype.kind not in "biuf":
        return None, f"label has unsupported dtype {array.dtype}, expected numbers"
    vector = array.reshape(NUM_CHD).astype(np.float64)
    if not np.isfinite(vector).all():
        return None, "label has non-finite values"
    if not binary:
        return vector, None
    if not np.isin(vector, (0.0, 1.0)).all():
        return None, f"label has values {vector.tolist()}, expected 0 or 1 each"
    return vector.astype(np.uint8), None
