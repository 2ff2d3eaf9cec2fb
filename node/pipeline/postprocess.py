"""From model outputs to clean masks and the numbers a report needs.

Lung labels keep their largest connected components (``postprocessing.keep_largest_components``);
lesions are confined to the lungs and specks below ``min_component_ml`` are dropped. Volumes are in
millilitres; involvement is lesion volume over lung volume, per lung and overall.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

RIGHT, LEFT = 1, 2  # lung label map values
GGO, CONSOLIDATION = 1, 2  # lesion label map values


def keep_largest(mask: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` largest 3D connected components of a boolean mask."""
    if n <= 0 or not mask.any():
        return mask
    labels = sitk.GetArrayFromImage(
        sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8))), sortByObjectSize=True)
    )
    return (labels >= 1) & (labels <= n)


def drop_small(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Remove connected components smaller than ``min_voxels``."""
    if min_voxels <= 1 or not mask.any():
        return mask
    comps = sitk.RelabelComponent(
        sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8))), minimumObjectSize=int(min_voxels)
    )
    return sitk.GetArrayFromImage(comps) > 0


def clean_lungs(labels: np.ndarray, *, keep: int, min_ml: float, voxel_ml: float) -> np.ndarray:
    """Per lung: its largest component(s), without specks."""
    out = np.zeros_like(labels, dtype=np.uint8)
    for value in (RIGHT, LEFT):
        side = keep_largest(labels == value, keep)
        side = drop_small(side, int(np.ceil(min_ml / voxel_ml)))
        out[side] = value
    return out


def clean_lesions(labels: np.ndarray, lungs: np.ndarray, *, min_ml: float, voxel_ml: float) -> np.ndarray:
    """Lesions inside the lungs only, without specks."""
    inside = labels * (lungs > 0)
    keep = drop_small(inside > 0, int(np.ceil(min_ml / voxel_ml)))
    return (inside * keep).astype(np.uint8)


@dataclass(frozen=True)
class Measurements:
    lung_ml: dict[str, float]  # right, left, total
    lesion_ml: dict[str, float]  # ggo, consolidation, total
    involvement_percent: dict[str, float]  # right, left, total

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {
            "lung_volume_ml": self.lung_ml,
            "lesion_volume_ml": self.lesion_ml,
            "involvement_percent": self.involvement_percent,
        }


def measure(lungs: np.ndarray, lesions: np.ndarray, voxel_ml: float) -> Measurements:
    right = lungs == RIGHT
    left = lungs == LEFT
    lesion = lesions > 0
    r_ml = float(right.sum()) * voxel_ml
    l_ml = float(left.sum()) * voxel_ml
    ggo_ml = float((lesions == GGO).sum()) * voxel_ml
    cons_ml = float((lesions == CONSOLIDATION).sum()) * voxel_ml
    r_les = float((lesion & right).sum()) * voxel_ml
    l_les = float((lesion & left).sum()) * voxel_ml

    def pct(part: float, whole: float) -> float:
        return round(100.0 * part / whole, 2) if whole > 0 else 0.0

    return Measurements(
        lung_ml={"right": round(r_ml, 1), "left": round(l_ml, 1), "total": round(r_ml + l_ml, 1)},
        lesion_ml={"ggo": round(ggo_ml, 1), "consolidation": round(cons_ml, 1), "total": round(ggo_ml + cons_ml, 1)},
        involvement_percent={"right": pct(r_les, r_ml), "left": pct(l_les, l_ml), "total": pct(r_les + l_les, r_ml + l_ml)},
    )
