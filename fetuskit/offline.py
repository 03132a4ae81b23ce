"""Process environment for offline runs as an arbitrary user.

The container runs as the host's UID with no network, and only the output folder and /tmp
are writable. Library caches default to ``$HOME/.cache`` and may try downloads, so
:func:`configure_offline_environment` points every cache at a temporary folder and switches
the Hugging Face libraries to offline mode. Call it before importing torch, timm or transformers.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Cache variables read by torch.hub, Hugging Face, matplotlib and XDG-aware libraries.
_CACHE_VARIABLES = ("TORCH_HOME", "HF_HOME", "MPLCONFIGDIR", "XDG_CACHE_HOME")

# Hugging Face libraries read these at import time and then never contact the Hub.
_OFFLINE_VARIABLES = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def configure_offline_environment() -> Path:
    """Point unset cache variables at a temporary folder and force Hugging Face offline mode.

    Variables that are already set are kept. ``HOME`` is replaced by the temporary folder only
    when it is unset or not writable (as for ``docker run -u UID:GID`` with no home).

    Returns:
        The cache root, ``<tempdir>/fetuskit-cache-<uid>``, created if missing.
    """
    uid = os.getuid() if hasattr(os, "getuid") else 0
    root = Path(tempfile.gettempdir()) / f"fetuskit-cache-{uid}"
    root.mkdir(parents=True, exist_ok=True)

    for name in _CACHE_VARIABLES:
        if not os.environ.get(name):
            path = root / name.lower()
            path.mkdir(exist_ok=True)
            os.environ[name] = str(path)
    for name, value in _OFFLINE_VARIABLES.items():
        os.environ.setdefault(name, value)

    home = os.environ.get("HOME")
    if not home or not os.access(home, os.W_OK):
        os.environ["HOME"] = str(root)
    return root
