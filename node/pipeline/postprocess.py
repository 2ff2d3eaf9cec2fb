"""From model outputs to clean masks and the numbers a report needs.

Lung labels keep their largest connected components (``postprocessing.keep_largest_components``);
lesions are confined to the lungs and specks below ``min_component_ml`` are dropped. Volumes are in
millilitres; involvement is lesion volume over lung volume, per lung and overall.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from node.pipeline.preprocess import lung_box

RIGHT, LEFT = 1, 2  # lung label map values
GGO, CONSOLIDATION = 1, 2  # lesion label map values


def largest_components(mask: np.ndarray, n: int, min_voxels: int = 1) -> np.ndarray:
    """The ``n`` largest face-connected components of a boolean mask that have ``min_voxels`` or more.

    ``n <= 0`` keeps every component of at least ``min_voxels``. One labelling pass serves both rules.
    """
    if not mask.any() or (n <= 0 and min_voxels <= 1):
        return mask
    relabel = sitk.RelabelComponentImageFilter()
    relabel.SetSortByObjectSize(True)
    labels = relabel.Execute(sitk.ConnectedComponent(sitk.GetImageFromArray(np.asarray(mask, dtype=bool).view(np.uint8))))
    sizes = relabel.GetSizeOfObjectsInPixels()  # largest first
    kept = sum(1 for size in (sizes[:n] if n > 0 else sizes) if size >= min_voxels)
    if kept == len(sizes):
        return mask
    array = sitk.GetArrayViewFromImage(labels)
    return (array >= 1) & (array <= kept)


def keep_largest(mask: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` largest 3D connected components of a boolean mask (``n <= 0``: all)."""
    return largest_components(mask, n)


def drop_small(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Remove connected components smaller than ``min_voxels``."""
    return largest_components(mask, 0, min_voxels)


#: Neighbours reach 2.5 sigma along z; there a Gaussian weight is 4.4 % of the centre's.
Z_REACH_SIGMAS = 2.5


def z_weights(spacing_mm: float, sigma_mm: float) -> np.ndarray:
    """Gaussian weights of slices -K..K in mm (K = floor(2.5 sigma / spacing)); ``[1.0]`` when sigma is 0
    or the slices are further apart than the reach (a thick-slice series is left as it is)."""
    if sigma_mm <= 0 or spacing_mm <= 0:
        return np.ones(1)
    k = int(np.floor(Z_REACH_SIGMAS * sigma_mm / spacing_mm + 1e-9))
    d = np.arange(-k, k + 1) * spacing_mm
    return np.exp(-(d**2) / (2.0 * sigma_mm**2))


def smooth_along_z(probs: np.ndarray, weights: np.ndarray, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Slices ``start:stop`` of ``[N, C, H, W]`` class probabilities averaged with their neighbours'.

    A 2D model labels each slice alone, so where evidence is weak (the edge of ground glass, a noisy
    thin slice) a voxel's class can flip from one slice to the next; the neighbours' evidence steadies
    it. ``weights`` (odd in number, centre in the middle) come from :func:`z_weights`; within reach of
    either end of the series they are renormalised over the neighbours that exist, so each result is
    still a probability distribution. Float32 out, so a caller can keep ``probs`` in float16 and work
    through a series a few slices at a time.
    """
    n = probs.shape[0]
    stop = n if stop is None else stop
    if not 0 <= start <= stop <= n or weights.size % 2 != 1:
        raise ValueError(f"slices {start}:{stop} of {n} with {weights.size} weights: need 0 <= start <= stop <= n "
                         "and an odd number of weights")
    k = weights.size // 2
    out = np.zeros((stop - start, *probs.shape[1:]), dtype=np.float32)
    norm = np.zeros(stop - start, dtype=np.float32)
    for j, w in enumerate(weights):
        off = j - k
        lo, hi = max(start, -off), min(stop, n - off)  # slices i whose neighbour i + off exists
        if lo >= hi:
            continue
        out[lo - start : hi - start] += np.float32(w) * probs[lo + off : hi + off]
        norm[lo - start : hi - start] += np.float32(w)
    out /= norm[:, None, None, None]
    return out


def clean_lungs(labels: np.ndarray, *, keep: int, min_ml: float, voxel_ml: float) -> np.ndarray:
    """Per lung: its largest component(s), without specks."""
    out = np.zeros_like(labels, dtype=np.uint8)
    min_voxels = int(np.ceil(min_ml / voxel_ml))
    for value in (RIGHT, LEFT):
        out[largest_components(labels == value, keep, min_voxels)] = value
    return out


def clean_lesions(labels: np.ndarray, lungs: np.ndarray, *, min_ml: float, voxel_ml: float) -> np.ndarray:
    """Lesions inside the lungs only, without specks (worked on the lesions' bounding box)."""
    inside = np.where(lungs > 0, labels, 0).astype(np.uint8)
    present = inside > 0
    if not present.any():
        return inside
    box = lung_box(present, margin=(0, 0, 0))
    keep = largest_components(np.ascontiguousarray(present[box]), 0, int(np.ceil(min_ml / voxel_ml)))
    inside[box] *= keep
    return inside


@dataclass(frozen=True)
class Measurements:
    lung_ml: dict[str, float]  # right, left, total
    lesion_ml: dict[str, float]  # ggo, consolidation, total; right, left (lesions in each lung)
    involvement_percent: dict[str, float | None]  # right, left, total; None where that lung was not found

    def as_dict(self) -> dict[str, Mapping[str, float | None]]:
        return {
            "lung_volume_ml": self.lung_ml,
            "lesion_volume_ml": self.lesion_ml,
            "involvement_percent": self.involvement_percent,
        }


def measure(lungs: np.ndarray, lesions: np.ndarray, voxel_ml: float) -> Measurements:
    """Volumes (ml) and involvement (percent of each lung's volume) from the label maps."""
    right = lungs == RIGHT
    left = lungs == LEFT
    lesion = lesions > 0
    r_ml = np.count_nonzero(right) * voxel_ml
    l_ml = np.count_nonzero(left) * voxel_ml
    ggo_ml = np.count_nonzero(lesions == GGO) * voxel_ml
    cons_ml = np.count_nonzero(lesions == CONSOLIDATION) * voxel_ml
    r_les = np.count_nonzero(lesion & right) * voxel_ml
    l_les = np.count_nonzero(lesion & left) * voxel_ml

    def pct(part: float, whole: float) -> float | None:
        # No lung found (after a pneumonectomy, or missed by the model): the share is unknown, not 0 %.
        return round(100.0 * part / whole, 2) if whole > 0 else None

    return Measurements(
        lung_ml={"right": round(r_ml, 1), "left": round(l_ml, 1), "total": round(r_ml + l_ml, 1)},
        lesion_ml={"ggo": round(ggo_ml, 1), "consolidation": round(cons_ml, 1), "total": round(ggo_ml + cons_ml, 1),
                   "right": round(r_les, 1), "left": round(l_les, 1)},
        involvement_percent={"right": pct(r_les, r_ml), "left": pct(l_les, l_ml), "total": pct(r_les + l_les, r_ml + l_ml)},
    )
