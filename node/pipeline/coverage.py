"""Does the series cover the lungs? A quick classical estimate, before any model runs.

Air-density voxels (below -400 HU) inside the body, minus the air around the patient, at a
quarter of the in-plane resolution, give a rough lung mask; SimpleITK keeps its large connected
components. That is enough to refuse an abdomen-only or head series with a reason, and to flag a
chest CT whose field of view cuts through the lungs at the top or bottom, independent of any model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from node.pipeline.volume import QAFlag, SeriesRefused, Volume

AIR_THRESHOLD_HU = -400
#: Less than this much air-density tissue inside the body is no lung field.
MIN_LUNG_ML = 400.0
#: A lung cross-section on the first/last slice above this share of the largest one: cut off.
EDGE_AREA_SHARE = 0.15


@dataclass(frozen=True)
class Coverage:
    lung_ml: float
    first_lung_slice: int
    last_lung_slice: int
    cut_at_bottom: bool
    cut_at_top: bool


def estimate_lungs(volume: Volume, step: int = 4) -> np.ndarray:
    """Rough lung mask at (z, y/step, x/step)."""
    small = volume.hu[:, ::step, ::step]
    air = small < AIR_THRESHOLD_HU
    inside = air & ~_outside_body(air)
    comps = sitk.RelabelComponent(
        sitk.ConnectedComponent(sitk.GetImageFromArray(inside.astype(np.uint8))), sortByObjectSize=True
    )
    labels3d = sitk.GetArrayFromImage(comps)
    voxel_ml = volume.voxel_ml * step * step
    keep = np.zeros_like(inside)
    for label in (1, 2):  # two lungs, or one connected air region
        region = labels3d == label
        if region.sum() * voxel_ml >= MIN_LUNG_ML / 4:
            keep |= region
    return keep


def _outside_body(air: np.ndarray) -> np.ndarray:
    """Air connected to the image border within its own slice: the air around the patient.

    One labelling of the whole stack with an empty slice between neighbours (so no component crosses
    from one slice to the next) instead of one call per slice: the same components, without the
    per-call cost that grows with SimpleITK's thread count.
    """
    z, h, w = air.shape
    spaced = np.zeros((2 * z - 1, h, w), dtype=np.uint8)
    spaced[::2] = air
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(spaced)))[::2]
    border = np.concatenate([labels[:, 0].ravel(), labels[:, -1].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()])
    touches = np.zeros(int(labels.max()) + 1, dtype=bool)  # by component label: a lookup, not np.isin's sort
    touches[border] = True
    touches[0] = False
    return touches[labels]


def check_coverage(volume: Volume) -> tuple[Coverage, list[QAFlag]]:
    """Refuse a series without lungs; flag one that cuts them at the top or bottom."""
    lungs = estimate_lungs(volume)
    step_ml = volume.voxel_ml * 16
    lung_ml = float(lungs.sum() * step_ml)
    if lung_ml < MIN_LUNG_ML:
        raise SeriesRefused(
            "no_lung_coverage",
            f"the images do not cover the lungs (about {lung_ml:.0f} ml of lung-density tissue found, "
            f"at least {MIN_LUNG_ML:.0f} ml expected): is this a chest CT?",
        )
    area = lungs.sum(axis=(1, 2))
    present = np.nonzero(area)[0]
    first, last = int(present[0]), int(present[-1])
    peak = float(area.max())
    cut_bottom = first == 0 and area[0] > EDGE_AREA_SHARE * peak
    cut_top = last == len(area) - 1 and area[-1] > EDGE_AREA_SHARE * peak
    flags = []
    if cut_bottom or cut_top:
        where = " and ".join(w for w, cut in (("the bases", cut_bottom), ("the apices", cut_top)) if cut)
        flags.append(QAFlag("partial_lung_coverage", "flag",
                            f"the lungs extend beyond the scanned range at {where}: volumes are underestimated"))
    return Coverage(lung_ml, first, last, cut_bottom, cut_top), flags
