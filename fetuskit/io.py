"""Read FETUS case files and write prediction files.

File layout: an image file contains the dataset ``image`` and usually ``view`` (id 1..4).
A label file contains ``mask`` (H, W) and ``label`` (7,). A prediction file contains
exactly ``mask`` (H, W) uint8 and ``label`` (7,) uint8. Every reading error is a FetusFileError
that names the file, the problem and what to do.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from fetuskit.arrays import parse_view, scale_to_unit, to_class_mask, to_gray, to_label_vector, to_pixels_hwc
from fetuskit.errors import FetusFileError, OutputDirError

logger = logging.getLogger(__name__)

_REGENERATE = "re-copy or regenerate the file"


# eq=False because comparing instances would compare arrays element-wise.
@dataclass(frozen=True, eq=False)
class CaseImage:
    """One image file in canonical form.

    Attributes:
        path: the file read.
        image: (H, W) float32 grayscale in [0, 1], at the file's own size.
        view: 0-based view index (file view id - 1), or None when the file has no valid view.
        view_reason: why ``view`` is None, or None when the view is known.
        attrs: the HDF5 attributes of the file's root group (for example padding or scale
            that another tool stored), with h5py's value types.
    """

    path: Path
    image: np.ndarray
    view: int | None
    view_reason: str | None
    attrs: dict


@contextmanager
def _open_h5(path: Path) -> Iterator[h5py.File]:
    try:
        exists = path.exists()
        is_dir = exists and path.is_dir()
        size = path.stat().st_size if exists else 0
    # pathlib reports a missing file as False but raises for other failures, such as a
    # name longer than the file system allows.
    except OSError as error:
        raise FetusFileError(
            f"{path}: cannot access the file ({error.strerror or error}); check the path and the case list"
        ) from error
    if not exists:
        raise FetusFileError(f"{path}: file not found; check the path and the case list")
    if is_dir:
        raise FetusFileError(f"{path}: is a folder, expected an HDF5 file; check the path")
    if size == 0:
        raise FetusFileError(f"{path}: file is empty (0 bytes); {_REGENERATE}")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise FetusFileError(
            f"{path}: not a readable HDF5 file, it may be truncated or of another format "
            f"({error}); {_REGENERATE}"
        ) from error
    with handle:
        yield handle


def _read_dataset(handle: h5py.File, key: str, path: Path, fix: str) -> np.ndarray:
    try:
        if key not in handle:
            found = ", ".join(sorted(handle.keys())) or "none"
            raise FetusFileError(f"{path}: missing dataset '{key}' (datasets found: {found}); {fix}")
        node = handle[key]
        if not isinstance(node, h5py.Dataset):
            raise FetusFileError(f"{path}: '{key}' is a {type(node).__name__}, expected a dataset; {fix}")
        return np.asarray(node[()])
    # h5py raises KeyError for a soft or external link whose target is missing.
    except (OSError, RuntimeError, KeyError) as error:
        raise FetusFileError(
            f"{path}: failed to read dataset '{key}', the file may be truncated or contain a broken "
            f"link ({error}); {_REGENERATE}"
        ) from error


def read_image(path: str | os.PathLike) -> CaseImage:
    """Read an image file into canonical form.

    Accepts the layouts (H, W), (H, W, 1), (H, W, 3), (H, W, 4) with alpha dropped, and
    (3, H, W), and the dtypes uint8, uint16 and float in [0, 1] or [0, 255] (see
    ``fetuskit.arrays.scale_to_unit``). The same picture in any of these forms gives the
    same array. NaN and infinite pixels become 0 with a logged warning.

    A missing or invalid ``view`` gives ``view=None`` with the reason in ``view_reason``
    and a logged warning. It does not raise.

    Raises:
        FetusFileError: the file is missing, inaccessible, empty, truncated or not HDF5,
            has no ``image`` dataset or a broken link in its place, or its image has an unsupported shape, a zero-size axis or
            an unsupported dtype.
    """
    path = Path(path)
    fix = "the file must contain an 'image' dataset of shape (H, W), (H, W, 1|3|4) or (3, H, W)"
    with _open_h5(path) as handle:
        raw = _read_dataset(handle, "image", path, fix)
        raw_view, view_reason = None, "the file has no 'view' dataset"
        if "view" in handle:
            try:
                raw_view = _read_dataset(handle, "view", path, fix)
            except FetusFileError as error:
                view_reason = str(error)
        try:
            attrs = dict(handle.attrs.items())
        except (OSError, RuntimeError) as error:
            raise FetusFileError(f"{path}: failed to read the file attributes ({error}); {_REGENERATE}") from error

    pixels, problem = to_pixels_hwc(raw)
    if problem is None:
        values, non_finite, clipped, problem = scale_to_unit(pixels)
    if problem is not None:
        raise FetusFileError(f"{path}: {problem}; {fix}")
    if non_finite:
        logger.warning("%s: replaced %d non-finite (NaN or infinite) pixel values with 0", path, non_finite)
    if clipped:
        logger.warning("%s: clipped %d pixel values outside the expected range", path, clipped)
    image = np.ascontiguousarray(to_gray(values), dtype=np.float32)

    view = None
    if raw_view is not None:
        view, view_reason = parse_view(raw_view)
    if view_reason is not None:
        logger.warning("%s: view unknown: %s", path, view_reason)
    return CaseImage(path=path, image=image, view=view, view_reason=view_reason, attrs=attrs)


def _read_mask_and_label(
    path: Path, image_shape: tuple[int, int], binary_label: bool, fix: str
) -> tuple[np.ndarray, np.ndarray]:
    with _open_h5(path) as handle:
        raw_mask = _read_dataset(handle, "mask", path, fix)
        raw_label = _read_dataset(handle, "label", path, fix)
    mask, problem = to_class_mask(raw_mask, tuple(image_shape))
    if problem is None:
        label, problem = to_label_vector(raw_label, binary=binary_label)
    if problem is not None:
        raise FetusFileError(f"{path}: {problem}; {fix}")
    return mask, label


def read_label(path: str | os.PathLike, image_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Read a ground-truth label file.

    Args:
        path: the ``<id>_label.h5`` file.
        image_shape: (H, W) of the matching image; the mask must have this shape.

    Returns:
        ``mask`` (H, W) uint8 with class ids 0..14 and ``label`` (7,) uint8 of 0/1.

    Raises:
        FetusFileError: unreadable file, missing ``mask`` or ``label``, or values or
            shapes other than the above.
    """
    fix = "regenerate the label file with 'mask' (H, W) class ids 0..14 and 'label' (7,) of 0/1"
    return _read_mask_and_label(Path(path), image_shape, binary_label=True, fix=fix)


def read_prediction(path: str | os.PathLike, image_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Read a prediction file for scoring.

    Returns:
        ``mask`` (H, W) uint8 with class ids 0..14 and ``label`` (7,) float64 as stored.
        The scorer binarises the label with ``> 0.5``, so probabilities are accepted.

    Raises:
        FetusFileError: as ``read_label``.
    """
    fix = "rerun the prediction so that the file holds 'mask' (H, W) uint8 at the image's size and 'label' (7,)"
    return _read_mask_and_label(Path(path), image_shape, binary_label=False, fix=fix)


def _check_output_name(name: str) -> None:
    separators = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    if not name or name in (".", "..") or any(sep in name for sep in separators):
        raise ValueError(
            f"invalid output file name {name!r}: expected a plain file name such as '1.h5' "
            "without a folder part; pass the folder as out_dir"
        )


def write_prediction(out_dir: str | os.PathLike, name: str, mask: np.ndarray, label: np.ndarray) -> Path:
    """Write a prediction file ``<out_dir>/<name>`` atomically and reproducibly.

    The file contains exactly the datasets ``mask`` (H, W) uint8 and ``label`` (7,) uint8.
    It is written to a temporary file in ``out_dir`` and moved into place with
    ``os.replace``, so a crash leaves either the old file or the new one, never a
    partial file. Dataset timestamps are off, so equal inputs give byte-identical files.

    Args:
        out_dir: an existing folder (see ``ensure_output_dir``).
        name: the input's basename, for example ``1.h5``; a name with a folder part is rejected.
        mask: (H, W) integer class ids 0..14 at the input image's size.
        label: 7 values of 0 or 1; binarise probabilities with ``> 0.5`` before.

    Raises:
        ValueError: invalid name, mask or label.
    """
    _check_output_name(name)
    mask_array, problem = to_class_mask(np.asarray(mask), expected_shape=None)
    if problem is None:
        label_array, problem = to_label_vector(np.asarray(label), binary=True)
    if problem is not None:
        raise ValueError(f"invalid prediction for {name}: {problem}")

    out_dir = Path(out_dir)
    target = out_dir / name
    # A short prefix keeps the temporary name valid when ``name`` is near the 255-byte limit.
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{name[:64]}.", suffix=".tmp", dir=out_dir)
    os.close(descriptor)
    temp_path = Path(temp_name)
    try:
        with h5py.File(temp_path, "w", libver="earliest", track_order=False) as handle:
            handle.create_dataset("mask", data=mask_array, track_times=False)
            handle.create_dataset("label", data=label_array, track_times=False)
        # mkstemp creates the file readable by its owner only.
        os.chmod(temp_path, 0o644)
        os.replace(temp_path, target)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return target


def ensure_output_dir(path: str | os.PathLike) -> Path:
    """Create the output folder if needed and check that files can be written to it.

    The check creates and removes a temporary file, because permission bits alone miss
    read-only mounts and ACLs.

    Raises:
        OutputDirError: the path exists but is not a folder, cannot be created, or is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{path}: exists and is not a folder; choose another output folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputDirError(
            f"{path}: failed to create the output folder ({error.strerror or error}); "
            "choose a writable location or fix the permissions"
        ) from error
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".write-check.", dir=path)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        raise OutputDirError(
            f"{path}: the output folder is not writable ({error.strerror or error}); "
            "mount it writable or choose another folder"
        ) from error
    return path
