"""Segmentation metrics shared by training (with torch) and evaluation (without it)."""

from __future__ import annotations

import numpy as np


def dice_per_label(pred: np.ndarray, truth: np.ndarray, labels: tuple[int, ...] = (1, 2)) -> dict[int, float]:
    """Dice of each label value; 1.0 when a label is absent from both (nothing to find, nothing found)."""
    out = {}
    for lab in labels:
        p, t = pred == lab, truth == lab
        denom = p.sum() + t.sum()
        out[lab] = 1.0 if denom == 0 else float(2.0 * (p & t).sum() / denom)
    return out
