"""PNG previews of phantoms (lung window, optional label outlines) without an imaging dependency."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from .phantom import Phantom

LUNG_WINDOW = (-600.0, 1500.0)
MEDIASTINAL_WINDOW = (40.0, 400.0)


def window(hu: NDArray[np.integer] | NDArray[np.floating], level: float, width: float) -> NDArray[np.uint8]:
    """Map HU to 0..255 with a window level/width."""
    lo = level - width / 2.0
    return (np.clip((np.asarray(hu, dtype=np.float32) - lo) / width, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_png(path: Path, img: NDArray[np.uint8]) -> None:
    """Write an 8-bit grey (h, w) or RGB (h, w, 3) image as PNG."""
    img = np.ascontiguousarray(img)
    h, w = img.shape[:2]
    colour = 2 if img.ndim == 3 else 0
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


def outline(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """The boundary pixels of a 2D mask (4-neighbourhood)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def slice_rgb(ph: Phantom, z: int, level: float = LUNG_WINDOW[0], width: float = LUNG_WINDOW[1], labels: bool = False) -> NDArray[np.uint8]:
    """One axial slice as RGB, optionally with lung (green/blue) and lesion (yellow/red) outlines."""
    g = window(ph.hu[z], level, width)
    rgb = np.repeat(g[:, :, None], 3, axis=2)
    if labels:
        for lab, col in ((1, (0, 200, 0)), (2, (0, 120, 255))):
            rgb[outline(ph.lungs[z] == lab)] = col
        for lab, col in ((1, (255, 230, 0)), (2, (255, 40, 40))):
            rgb[outline(ph.lesions[z] == lab)] = col
    return rgb


def coronal_rgb(ph: Phantom, row: int | None = None, level: float = LUNG_WINDOW[0], width: float = LUNG_WINDOW[1]) -> NDArray[np.uint8]:
    """Coronal reformat (head at the top), stretched to square-ish physical proportions."""
    r = ph.hu.shape[1] // 2 if row is None else row
    img = window(ph.hu[::-1, r, :], level, width)
    rep = max(1, int(round(ph.spacing_mm[0] / ph.spacing_mm[2])))
    img = np.repeat(img, rep, axis=0)
    return np.repeat(img[:, :, None], 3, axis=2)


def save_overview(ph: Phantom, path: Path, fractions: tuple[float, ...] = (0.3, 0.5, 0.7), labels: bool = False) -> None:
    """Axial slices at the given fractions of the lung height side by side, plus a coronal view."""
    zs = np.nonzero(ph.lungs.reshape(ph.lungs.shape[0], -1).any(axis=1))[0]
    lo, hi = (int(zs[0]), int(zs[-1])) if zs.size else (0, ph.hu.shape[0] - 1)
    tiles = [slice_rgb(ph, int(round(lo + f * (hi - lo))), labels=labels) for f in fractions]
    cor = coronal_rgb(ph)
    h = max(t.shape[0] for t in tiles + [cor])
    pad = [np.pad(t, ((0, h - t.shape[0]), (0, 4), (0, 0))) for t in tiles + [cor]]
    write_png(path, np.concatenate(pad, axis=1))
