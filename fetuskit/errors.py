"""Exceptions raised when case files, case lists or output folders are invalid.

Every message names the path or value, what was expected and what to do next.
"""

from __future__ import annotations


class FetusError(Exception):
    """Base class of the errors that fetuskit raises for invalid input or output paths."""


class FetusFileError(FetusError, ValueError):
    """An HDF5 case file that is missing, unreadable or contains data of the wrong form."""


class CaseListError(FetusError, ValueError):
    """A case list (folder or JSON file) with one or more invalid entries; lists all of them."""


class OutputDirError(FetusError, OSError):
    """An output folder that cannot be created or written to."""
