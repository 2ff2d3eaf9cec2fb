"""Axial slices of a canonical CT with lung label outlines, for checking the lung labels by eye.

Lung window (level -600, width 1500); right lung (label 1) outlined in red, left lung (label 2) in
blue. The canonical layout puts the patient's right on the image's left (radiological view).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from node.synthetic.preview import outline, window, write_png

RIGHT_RGB = (255, 0, 0)
LEFT_RGB = (0, 90, 255)


def slice_rgb(hu2d: np.ndarray, lab2d: np.ndarray, level: float = -600.0, width: float = 1500.0) -> np.ndarray:
    g = window(hu2d, level, width)
    rgb = np.repeat(g[:, :, None], 3, axis=2)
    for lab, col in ((1, RIGHT_RGB), (2, LEFT_RGB)):
        rgb[outline(lab2d == lab)] = col
    return rgb


def render_slices(path: Path, hu: np.ndarray, labels: np.ndarray,
                  fractions: tuple[float, ...] = (0.1, 0.35, 0.6, 0.85, 0.97)) -> list[int]:
    """Write the axial slices at ``fractions`` of the labelled z range side by side; returns their z."""
    zs = np.flatnonzero(labels.any(axis=(1, 2)))
    if zs.size == 0:
        zs = np.arange(hu.shape[0])
    picks = [int(zs[0] + round(f * (zs[-1] - zs[0]))) for f in fractions]
    tiles = [slice_rgb(hu[z], labels[z]) for z in picks]
    gap = np.full((hu.shape[1], 4, 3), 255, dtype=np.uint8)
    row = []
    for t in tiles:
        row += [t, gap]
    write_png(Path(path), np.concatenate(row[:-1], axis=1))
    return picks
