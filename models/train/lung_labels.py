"""Classical right/left lung labels for a chest CT: the documented method behind the training
labels of LIDC-IDRI-0001 and the reference masks of the validation scans.

``label_lungs(hu, spacing_mm)`` takes a CANONICAL volume (as ``node.pipeline.volume.load_volume``
returns it: axis 0 inferior -> superior, axis 1 anterior -> posterior, axis 2 patient right ->
left) and returns a uint8 map: 0 background, 1 right lung, 2 left lung. The mask is a clinical lung
mask: it includes the intrapulmonary vessels, bronchi and small nodules/lesions enclosed by lung,
and excludes the trachea and main bronchi, outside air, the table gap, bowel gas and the stomach.

Method (every parameter is a module constant, named in brackets):

1. Working grid. In-plane block averaging (``sitk.BinShrink``) by ``f = round(WORK_PIXEL_MM /
   pixel)`` (at least 1), so a 0.7 mm 512 matrix is processed at 256 x 256 (1.4 mm); slices are
   never merged. The block mean is also the noise smoothing; when the working pixel is finer than
   ``SMOOTH_BELOW_MM`` a 3 x 3 in-plane mean follows.
2. Air threshold: ``smoothed < AIR_HU`` (-320 HU).
3. Outside air: per axial slice, the air connected to the image border is removed
   (``sitk.BinaryFillhole`` of the non-air "body" per slice; candidates = air inside the filled
   body). This drops the air around the patient and the table gap when it opens to the border.
4. Airway: the trachea is seeded in the upper part of the candidates (top ``TRACHEA_SEARCH_FRAC``
   of the slices holding candidates) as the highest 2D component of ``smoothed < AIRWAY_HU``
   (-900 HU) with an area in ``TRACHEA_AREA_CM2`` whose centroid lies within
   ``TRACHEA_MIDLINE_FRAC`` of the body width from the body's mid-line. It is grown slice by
   slice downward: a slice keeps the components of ``smoothed < AIRWAY_HU`` that overlap the
   (one-pixel dilated) airway of the slice above; a component larger than ``LEAK_GROWTH`` times
   its parents and larger than ``LEAK_MIN_CM2`` is a leak into the lung and is not taken. The
   growth stops ``BRONCHI_BELOW_CARINA_MM`` below the carina (the first slice where the airway is
   two components), so the trachea and main bronchi are removed while the intrapulmonary airways
   remain lung. The airway, dilated by one pixel in-plane (its wall's partial-volume rim), is
   subtracted from the candidates. The same growth is also run upward from the seed so the larynx
   goes too.
5. Lung components: 3D connected components (face connectivity) of the candidates; the largest is
   kept, and the second largest when it has at least ``SECOND_LUNG_FRAC`` of the largest's volume.
   Other components (trachea remnants, bowel gas, stomach bubble, table gap) are dropped.
6. Right/left split: when one component holds both lungs (anterior/posterior junction), it is
   eroded in-plane (by k = 1, 2, ... ``MAX_SPLIT_EROSIONS`` pixels, read off one in-plane distance
   map) until its two largest
   components each hold at least ``SPLIT_MIN_FRAC`` of it; those are the seeds, and every voxel of
   the mask goes to the nearest seed (``sitk.SignedMaurerDistanceMap`` of each seed). If no split
   appears, the component is cut at the mid-line between the body's right and left edges.
   The component with the smaller mean x index is the right lung (axis 2 runs right -> left).
7. Per lung: morphological closing (ball of ``CLOSING_MM`` in-plane, one slice in z) then
   ``sitk.BinaryFillhole`` per axial slice, which brings in the vessels, airways and nodules
   enclosed by lung; holes larger than ``HOLE_MAX_CM2`` (8 cm^2, e.g. the liver/spleen dome seen
   through the lung base) stay out. Voxels claimed by both lungs keep their step-6 label.
8. Back to the input grid: each lung's indicator is resampled with linear interpolation
   (``sitk.Resample``, pixel centres aligned) and a voxel takes the lung whose value is >= 0.5;
   each lung then keeps its largest 3D component (26-connected).

Limits: nodules or consolidation touching the chest wall or mediastinum are only included up to
what the closing reaches (``CLOSING_MM``); dense consolidation filling a whole lobe up to the
pleura is not lung by this method (it is not air). Lungs that touch over a long junction are split
by distance to eroded seeds, which is accurate to a few millimetres at the junction.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

WORK_PIXEL_MM = 1.4
SMOOTH_BELOW_MM = 1.0
AIR_HU = -320.0
AIRWAY_HU = -900.0
TRACHEA_SEARCH_FRAC = 0.35
TRACHEA_AREA_CM2 = (0.3, 8.0)
TRACHEA_MIDLINE_FRAC = 0.15
LEAK_GROWTH = 2.5
LEAK_MIN_CM2 = 4.0
BRONCHI_BELOW_CARINA_MM = 30.0
SECOND_LUNG_FRAC = 0.15
MAX_SPLIT_EROSIONS = 12
SPLIT_MIN_FRAC = 0.1
CLOSING_MM = 6.0
HOLE_MAX_CM2 = 8.0


def _img(arr: np.ndarray, spacing_zyx: tuple[float, float, float]) -> sitk.Image:
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing((float(spacing_zyx[2]), float(spacing_zyx[1]), float(spacing_zyx[0])))
    return im


def _fill_slices(mask: np.ndarray, max_hole_px: float | None = None) -> np.ndarray:
    """2D hole filling of each axial slice; with ``max_hole_px`` only holes up to that area are filled."""
    out = mask.copy()
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        filled = sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(mask[z].astype(np.uint8)))) > 0
        if max_hole_px is not None:
            holes, n = _components2d(filled & ~mask[z])
            if n:
                big = np.flatnonzero(np.bincount(holes.ravel())[1:] > max_hole_px) + 1
                filled &= ~np.isin(holes, big)
        out[z] = filled
    return out


def _components2d(mask2d: np.ndarray) -> tuple[np.ndarray, int]:
    cc = sitk.ConnectedComponent(sitk.GetImageFromArray(mask2d.astype(np.uint8)), False)
    arr = sitk.GetArrayFromImage(cc)
    return arr, int(arr.max())


def _dilate2d(mask2d: np.ndarray) -> np.ndarray:
    out = mask2d.copy()
    out[1:, :] |= mask2d[:-1, :]
    out[:-1, :] |= mask2d[1:, :]
    out[:, 1:] |= mask2d[:, :-1]
    out[:, :-1] |= mask2d[:, 1:]
    return out


def _grow(seed2d: np.ndarray, z0: int, step: int, airway: np.ndarray, px_cm2: float, dz_mm: float,
          out: np.ndarray) -> None:
    """Slice-by-slice airway growth from ``seed2d`` at slice z0 in direction ``step`` (-1 down, +1 up)."""
    prev = seed2d
    out[z0] |= seed2d
    carina_z: int | None = None
    z = z0 + step
    while 0 <= z < airway.shape[0] and prev.any():
        labels, n = _components2d(airway[z])
        if n == 0:
            break
        near = _dilate2d(prev)
        hit = np.unique(labels[near & (labels > 0)])
        cur = np.zeros_like(prev)
        prev_lab, _ = _components2d(prev)
        for lab in hit:
            comp = labels == lab
            parents = np.unique(prev_lab[_dilate2d(comp) & (prev_lab > 0)])
            parent_area = sum(int(np.sum(prev_lab == p)) for p in parents)
            area = int(comp.sum())
            if area * px_cm2 > LEAK_MIN_CM2 and area > LEAK_GROWTH * max(parent_area, 1):
                continue  # leak into lung parenchyma
            cur |= comp
        if not cur.any():
            break
        out[z] |= cur
        if step < 0:
            if carina_z is None and _components2d(cur)[1] >= 2:
                carina_z = z
            if carina_z is not None and abs(carina_z - z) * dz_mm >= BRONCHI_BELOW_CARINA_MM:
                break
        prev = cur
        z += step


def _airway(cand: np.ndarray, smooth: np.ndarray, body_cols: np.ndarray, px_cm2: float,
            dz_mm: float) -> np.ndarray:
    """Trachea + main bronchi (+ larynx) as a boolean mask, empty when no trachea is found."""
    airway = cand & (smooth < AIRWAY_HU)
    out = np.zeros_like(cand)
    zs = np.flatnonzero(cand.any(axis=(1, 2)))
    if zs.size == 0:
        return out
    top, bottom = int(zs[-1]), int(zs[0])
    z_lim = top - int(np.ceil(TRACHEA_SEARCH_FRAC * (top - bottom + 1)))
    for z in range(top, z_lim, -1):
        cols = body_cols[z]
        if cols[1] <= cols[0]:
            continue
        mid, width = 0.5 * (cols[0] + cols[1]), float(cols[1] - cols[0])
        labels, n = _components2d(airway[z])
        best = None
        for lab in range(1, n + 1):
            comp = labels == lab
            area = comp.sum() * px_cm2
            if not TRACHEA_AREA_CM2[0] <= area <= TRACHEA_AREA_CM2[1]:
                continue
            cx = float(np.nonzero(comp)[1].mean())
            if abs(cx - mid) > TRACHEA_MIDLINE_FRAC * width:
                continue
            if best is None or abs(cx - mid) < best[0]:
                best = (abs(cx - mid), comp)
        if best is not None:
            _grow(best[1], z, -1, airway, px_cm2, dz_mm, out)
            _grow(best[1], z, +1, airway, px_cm2, dz_mm, out)
            break
    return out


def _bbox(mask: np.ndarray, margin: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    idx = np.nonzero(mask)
    return tuple(slice(max(0, int(i.min()) - m), int(i.max()) + m + 1) for i, m in zip(idx, margin))  # type: ignore[return-value]


def _split(mask: np.ndarray, body_mid: float) -> tuple[np.ndarray, np.ndarray]:
    """Split one component holding both lungs into two by erosion seeds and nearest-seed assignment.

    Erosion by k in-plane pixels is read off one in-plane distance map (z spacing set huge)."""
    total = int(mask.sum())
    box = _bbox(mask, (0, 1, 1))
    sub = mask[box]
    dimg = sitk.GetImageFromArray(sub.astype(np.uint8))
    dimg.SetSpacing((1.0, 1.0, 1e4))
    depth = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(dimg, insideIsPositive=True, squaredDistance=False,
                                                                useImageSpacing=True))
    seeds = None
    for k in range(1, MAX_SPLIT_EROSIONS + 1):
        cc = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray((depth > k).astype(np.uint8)), False),
                                   sortByObjectSize=True)
        arr = sitk.GetArrayFromImage(cc)
        if arr.max() >= 2:
            n1, n2 = int(np.sum(arr == 1)), int(np.sum(arr == 2))
            if min(n1, n2) >= SPLIT_MIN_FRAC * total:
                seeds = (arr == 1, arr == 2)
                break
    if seeds is None:  # no junction found: cut at the body mid-line
        x = np.arange(mask.shape[2])[None, None, :]
        return mask & (x < body_mid), mask & (x >= body_mid)
    d = [sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(sitk.GetImageFromArray(s.astype(np.uint8)),
                                                             insideIsPositive=False, squaredDistance=True,
                                                             useImageSpacing=False)) for s in seeds]
    a = np.zeros_like(mask)
    a[box] = sub & (d[0] <= d[1])
    return a, mask & ~a


def label_lungs(hu: np.ndarray, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """Right (1) / left (2) lung labels of a canonical (z, y, x) HU volume; see the module doc."""
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError("hu must be a 3D (z, y, x) volume")
    dz, dy, dx = (float(s) for s in spacing_mm)
    f = max(1, int(round(WORK_PIXEL_MM / max(min(dy, dx), 1e-3))))
    full = _img(hu.astype(np.float32), (dz, dy, dx))
    work = sitk.BinShrink(full, (f, f, 1)) if f > 1 else full
    wdx, wdy = work.GetSpacing()[0], work.GetSpacing()[1]
    if min(wdx, wdy) < SMOOTH_BELOW_MM:
        work = sitk.Mean(work, (1, 1, 0))
    smooth = sitk.GetArrayFromImage(work)
    px_cm2 = wdx * wdy / 100.0

    air = smooth < AIR_HU
    body = _fill_slices(~air)
    cand = air & body
    cols = np.where(body.any(axis=1))
    body_cols = np.zeros((body.shape[0], 2), dtype=np.int64)
    for z in range(body.shape[0]):
        xs = cols[1][cols[0] == z]
        if xs.size:
            body_cols[z] = (xs.min(), xs.max())

    airway = _airway(cand, smooth, body_cols, px_cm2, dz)
    if airway.any():
        cand &= ~np.stack([_dilate2d(a) for a in airway])

    cc = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(cand.astype(np.uint8)), False),
                               sortByObjectSize=True)
    comps = sitk.GetArrayFromImage(cc)
    sizes = np.bincount(comps.ravel())
    out_small = np.zeros(smooth.shape, dtype=np.uint8)
    if sizes.size >= 2:
        mid = float(np.median(body_cols[body_cols[:, 1] > body_cols[:, 0]].mean(axis=1))) if np.any(
            body_cols[:, 1] > body_cols[:, 0]) else smooth.shape[2] / 2.0
        if sizes.size >= 3 and sizes[2] >= SECOND_LUNG_FRAC * sizes[1]:
            a, b = comps == 1, comps == 2
        else:
            a, b = _split(comps == 1, mid)
        xa = np.nonzero(a)[2].mean() if a.any() else np.inf
        xb = np.nonzero(b)[2].mean() if b.any() else np.inf
        right, left = (a, b) if xa <= xb else (b, a)
        r_close = max(1, int(round(CLOSING_MM / min(wdx, wdy))))
        final = []
        for m in (right, left):
            if not m.any():
                final.append(m)
                continue
            box = _bbox(m, (2, r_close + 1, r_close + 1))
            closed = sitk.BinaryMorphologicalClosing(sitk.GetImageFromArray(m[box].astype(np.uint8)),
                                                     (r_close, r_close, 1))
            grown = m.copy()
            grown[box] |= _fill_slices(sitk.GetArrayFromImage(closed) > 0, HOLE_MAX_CM2 / px_cm2)
            final.append(grown)
        r, l_ = final
        out_small[r & ~left] = 1
        out_small[l_ & ~right & (out_small == 0)] = 2

    if f == 1:
        return _largest_per_label(out_small)
    ref = full
    probs = []
    for lab in (1, 2):
        ind = _img((out_small == lab).astype(np.float32), (dz, wdy, wdx))
        # BinShrink keeps the origin at the centre of the first block: align pixel centres
        ind.SetOrigin(work.GetOrigin())
        probs.append(sitk.GetArrayFromImage(sitk.Resample(ind, ref, sitk.Transform(), sitk.sitkLinear, 0.0)))
    p1, p2 = probs
    res = np.zeros(hu.shape, dtype=np.uint8)
    res[(p1 >= 0.5) & (p1 >= p2)] = 1
    res[(p2 >= 0.5) & (p2 > p1)] = 2
    return _largest_per_label(res)


def _largest_per_label(lab: np.ndarray) -> np.ndarray:
    """Keep the largest 3D component (26-connected) of each label: interpolation may leave islands."""
    out = np.zeros_like(lab)
    for k in (1, 2):
        m = lab == k
        if not m.any():
            continue
        cc = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(m.astype(np.uint8)), True),
                                   sortByObjectSize=True)
        out[sitk.GetArrayFromImage(cc) == 1] = k
    return out
