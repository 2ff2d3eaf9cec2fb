"""Cache files that parallel training and evaluation processes share: written whole, then renamed into place."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def save_npz_whole(path: Path, *, compressed: bool = False, **arrays: np.ndarray) -> Path:
    """Write ``arrays`` to ``path`` (.npz) under a name of this process, then rename it into place.

    A reader never sees half a file, and two processes writing the same entry never share a temporary file.
    """
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    (np.savez_compressed if compressed else np.savez)(tmp, **arrays)
    os.replace(tmp, path)
    return path
