"""The FETUS 2026 label tables: classes, views, CHD labels and what each view allows.

This module is the only place these tables are written down. Every other module imports
them from here.

View ids in files are 1..4; code uses the 0-based view index (``view_id - 1``).
"""

from __future__ import annotations

import numpy as np

NUM_CLASSES = 15
NUM_VIEWS = 4
NUM_CHD = 7

CLASS_NAMES: tuple[str, ...] = (
    "background",
    "left atrium",
    "left ventricle",
    "right atrium",
    "right ventricle",
    "heart",
    "descending aorta",
    "thoracic cavity",
    "ascending aorta",
    "main pulmonary artery",
    "left pulmonary artery",
    "right pulmonary artery",
    "superior vena cava",
    "aortic transverse arch",
    "trachea",
)

# Short names as they appear in FETUS material, indexed by the 0-based view index.
VIEW_NAMES: tuple[str, ...] = ("4CH", "LVOT", "RVOT", "3VT")

VIEW_LONG_NAMES: tuple[str, ...] = (
    "four-chamber",
    "left ventricular outflow tract",
    "right ventricular outflow tract",
    "three vessels and trachea",
)

CHD_NAMES: tuple[str, ...] = ("VSD", "AVV", "AH", "AS", "DORV", "PS", "RAA")

CHD_LONG_NAMES: tuple[str, ...] = (
    "ventricular septal defect",
    "atrioventricular valve stenosis or atresia",
    "aortic hypoplasia",
    "aortic valve stenosis",
    "double outlet right ventricle",
    "pulmonary valve stenosis",
    "right aortic arch",
)

# Segmentation classes each view may contain, by 0-based view index. Background is allowed
# everywhere.
VIEW_ALLOWED_CLASSES: tuple[tuple[int, ...], ...] = (
    (0, 1, 2, 3, 4, 5, 6, 7),
    (0, 1, 2, 4, 8),
    (0, 6, 8, 9, 10, 11, 12),
    (0, 9, 12, 13, 14),
)

# CHD labels the official scorer looks at in each view, by 0-based view index.
VIEW_ALLOWED_CHD: tuple[tuple[int, ...], ...] = (
    (0, 1),
    (0, 2, 3),
    (4, 5),
    (2, 5, 6),
)


def _allowed_matrix(allowed: tuple[tuple[int, ...], ...], width: int) -> np.ndarray:
    matrix = np.zeros((NUM_VIEWS, width), dtype=bool)
    for view, members in enumerate(allowed):
        matrix[view, list(members)] = True
    matrix.setflags(write=False)
    return matrix


CLASS_MASK: np.ndarray = _allowed_matrix(VIEW_ALLOWED_CLASSES, NUM_CLASSES)
"""(4, 15) bool, read-only: ``CLASS_MASK[v, c]`` is True when view index v allows class c."""

CHD_MASK: np.ndarray = _allowed_matrix(VIEW_ALLOWED_CHD, NUM_CHD)
"""(4, 7) bool, read-only: ``CHD_MASK[v, k]`` is True when view index v allows CHD label k."""


def view_index_from_name(name: str) -> int | None:
    """Return the 0-based view index for a name such as "4CH" or "lvot", or None if unknown."""
    key = name.strip().upper()
    for index, short in enumerate(VIEW_NAMES):
        if key == short:
            return index
    for index, long_name in enumerate(VIEW_LONG_NAMES):
        if key == long_name.upper():
            return index
    return None
