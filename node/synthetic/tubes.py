"""Tapered line segments ("tubes") rendered into voxel chunks.

Vessels, airways, ribs, the aorta and the other tubular structures are lists of 3-D segments with
a radius at each end. Each segment is evaluated only inside its own bounding box, and segments
with similar box sizes are evaluated together in one broadcast numpy expression, so thousands of
small vessels cost a few vectorised passes rather than a Python loop over voxels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
from numpy.typing import NDArray

F32 = np.float32
_LADDER = np.array([1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024, 1536, 2048])
_BATCH_VOXELS = 1_500_000


@dataclass
class TubeSet:
    """Growable list of segments: endpoints (x, y, z) in mm, radii in mm and a material id."""

    p0: list[tuple[float, float, float]] = field(default_factory=list)
    p1: list[tuple[float, float, float]] = field(default_factory=list)
    r0: list[float] = field(default_factory=list)
    r1: list[float] = field(default_factory=list)
    mat: list[int] = field(default_factory=list)

    def add(self, a: NDArray[Any] | tuple[float, float, float], b: NDArray[Any] | tuple[float, float, float],
            ra: float, rb: float, material: int) -> None:
        """Append one segment from ``a`` (radius ``ra``) to ``b`` (radius ``rb``)."""
        self.p0.append((float(a[0]), float(a[1]), float(a[2])))
        self.p1.append((float(b[0]), float(b[1]), float(b[2])))
        self.r0.append(float(ra))
        self.r1.append(float(rb))
        self.mat.append(int(material))

    def polyline(self, pts: NDArray[Any], radii: NDArray[Any] | float, material: int) -> None:
        """Append consecutive segments through the (n, 3) points ``pts``."""
        r = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(pts),))
        for i in range(len(pts) - 1):
            self.add(pts[i], pts[i + 1], r[i], r[i + 1], material)

    def freeze(self) -> "Tubes":
        """Immutable array form used for rendering."""
        n = len(self.mat)
        return Tubes(
            np.asarray(self.p0, dtype=np.float64).reshape(n, 3),
            np.asarray(self.p1, dtype=np.float64).reshape(n, 3),
            np.asarray(self.r0, dtype=np.float64),
            np.asarray(self.r1, dtype=np.float64),
            np.asarray(self.mat, dtype=np.int16),
        )


@dataclass(frozen=True)
class Tubes:
    """Array form of a :class:`TubeSet`."""

    p0: NDArray[Any]
    p1: NDArray[Any]
    r0: NDArray[Any]
    r1: NDArray[Any]
    mat: NDArray[np.int16]

    def __len__(self) -> int:
        return int(self.mat.size)

    def select(self, mask: NDArray[np.bool_]) -> "Tubes":
        """Subset of segments."""
        return Tubes(self.p0[mask], self.p1[mask], self.r0[mask], self.r1[mask], self.mat[mask])

    @staticmethod
    def concat(parts: list["Tubes"]) -> "Tubes":
        """Join several tube arrays."""
        return Tubes(
            np.concatenate([p.p0 for p in parts]).reshape(-1, 3),
            np.concatenate([p.p1 for p in parts]).reshape(-1, 3),
            np.concatenate([p.r0 for p in parts]),
            np.concatenate([p.r1 for p in parts]),
            np.concatenate([p.mat for p in parts]).astype(np.int16),
        )

    def point_sdf(self, pts: NDArray[Any]) -> NDArray[Any]:
        """Signed distance of (n, 3) points to the union of all segments (brute force, for sampling)."""
        out = np.full(len(pts), np.inf)
        for a, b, ra, rb in zip(self.p0, self.p1, self.r0, self.r1):
            d = b - a
            t = np.clip(((pts - a) @ d) / max(float(d @ d), 1e-9), 0.0, 1.0)
            e = pts - (a + t[:, None] * d)
            out = np.minimum(out, np.sqrt((e * e).sum(axis=1)) - (ra + t * (rb - ra)))
        return out


@dataclass(frozen=True)
class Grid:
    """A chunk of voxels: slice positions ``z`` (mm, sorted), first pixel centre and pixel size."""

    z: NDArray[Any]
    x0: float
    y0: float
    px: float
    h: int
    w: int


def _ladder(n: NDArray[np.int64]) -> NDArray[np.int64]:
    return _LADDER[np.searchsorted(_LADDER, n)]


def _batches(tubes: Tubes, grid: Grid, margin: NDArray[Any]) -> Iterator[tuple[NDArray[np.int16], NDArray[np.int64], NDArray[Any], NDArray[Any]]]:
    """Yield (material, flat voxel index, signed distance, radius) for voxels near each segment."""
    if len(tubes) == 0 or grid.z.size == 0:
        return
    rmax = np.maximum(tubes.r0, tubes.r1) + margin
    lo = np.minimum(tubes.p0, tubes.p1) - rmax[:, None]
    hi = np.maximum(tubes.p0, tubes.p1) + rmax[:, None]
    i0 = np.clip(np.floor((lo[:, 0] - grid.x0) / grid.px).astype(np.int64), 0, grid.w)
    i1 = np.clip(np.ceil((hi[:, 0] - grid.x0) / grid.px).astype(np.int64) + 1, 0, grid.w)
    j0 = np.clip(np.floor((lo[:, 1] - grid.y0) / grid.px).astype(np.int64), 0, grid.h)
    j1 = np.clip(np.ceil((hi[:, 1] - grid.y0) / grid.px).astype(np.int64) + 1, 0, grid.h)
    k0 = np.searchsorted(grid.z, lo[:, 2], side="left")
    k1 = np.searchsorted(grid.z, hi[:, 2], side="right")
    keep = (i1 > i0) & (j1 > j0) & (k1 > k0)
    if not keep.any():
        return
    idx = np.nonzero(keep)[0]
    bk = _ladder(k1[idx] - k0[idx])
    bj = _ladder(j1[idx] - j0[idx])
    bi = _ladder(i1[idx] - i0[idx])
    keys = (bk * 4096 + bj) * 4096 + bi
    order = np.argsort(keys, kind="stable")
    idx, bk, bj, bi, keys = idx[order], bk[order], bj[order], bi[order], keys[order]
    starts = np.r_[0, np.nonzero(np.diff(keys))[0] + 1, keys.size]
    nz = grid.z.size
    for s, e in zip(starts[:-1], starts[1:]):
        sk, sj, si = int(bk[s]), int(bj[s]), int(bi[s])
        per = sk * sj * si
        step = max(1, _BATCH_VOXELS // per)
        for b0 in range(s, e, step):
            sel = idx[b0 : min(e, b0 + step)]
            yield _evaluate(tubes, grid, sel, k0[sel], j0[sel], i0[sel], sk, sj, si, nz)


def _evaluate(tubes: Tubes, grid: Grid, sel: NDArray[np.int64], k0: NDArray[np.int64], j0: NDArray[np.int64],
              i0: NDArray[np.int64], sk: int, sj: int, si: int, nz: int
              ) -> tuple[NDArray[np.int16], NDArray[np.int64], NDArray[Any], NDArray[Any]]:
    kk = k0[:, None] + np.arange(sk)
    jj = j0[:, None] + np.arange(sj)
    ii = i0[:, None] + np.arange(si)
    vk, vj, vi = kk < nz, jj < grid.h, ii < grid.w
    kk = np.minimum(kk, nz - 1)
    jj = np.minimum(jj, grid.h - 1)
    ii = np.minimum(ii, grid.w - 1)
    a = tubes.p0[sel]
    d = tubes.p1[sel] - a
    l2 = np.maximum((d * d).sum(axis=1), 1e-9)
    dx = (grid.x0 + ii * grid.px - a[:, :1]).astype(F32)
    dy = (grid.y0 + jj * grid.px - a[:, 1:2]).astype(F32)
    dz = (grid.z[kk] - a[:, 2:3]).astype(F32)
    dd = d.astype(F32)
    inv = (1.0 / l2).astype(F32)[:, None, None, None]
    t = (dz * dd[:, 2:3])[:, :, None, None] + (dy * dd[:, 1:2])[:, None, :, None] + (dx * dd[:, 0:1])[:, None, None, :]
    t *= inv
    np.clip(t, 0.0, 1.0, out=t)
    ex = dx[:, None, None, :] - t * dd[:, 0, None, None, None]
    dist2 = ex * ex
    ex = dy[:, None, :, None] - t * dd[:, 1, None, None, None]
    dist2 += ex * ex
    ex = dz[:, :, None, None] - t * dd[:, 2, None, None, None]
    dist2 += ex * ex
    r0 = tubes.r0[sel].astype(F32)[:, None, None, None]
    r1 = tubes.r1[sel].astype(F32)[:, None, None, None]
    rad = r0 + t * (r1 - r0)
    sdf = np.sqrt(dist2) - rad
    valid = vk[:, :, None, None] & vj[:, None, :, None] & vi[:, None, None, :]
    flat = (kk[:, :, None, None] * grid.h + jj[:, None, :, None]) * grid.w + ii[:, None, None, :]
    mats = np.broadcast_to(tubes.mat[sel][:, None, None, None], valid.shape)
    return mats[valid], flat[valid], sdf[valid], rad[valid]


def stamp(tubes: Tubes, grid: Grid, width: float, outputs: dict[int, NDArray[Any]]) -> dict[int, list[int]]:
    """Max-composite the partial-volume fraction of every segment into ``outputs[material]``.

    ``outputs`` arrays are (len(grid.z), h, w) float32 (several materials may share one array);
    materials without an array are skipped. Returns per material the touched box
    [k0, k1, j0, j1, i0, i1] (half-open) so callers can composite only there.
    """
    boxes: dict[int, list[int]] = {}
    if len(tubes) == 0:
        return boxes
    tubes = tubes.select(np.isin(tubes.mat, np.fromiter(outputs.keys(), dtype=np.int16)))
    margin = np.full(len(tubes), width)
    hw = grid.h * grid.w
    for mats, flat, sdf, _ in _batches(tubes, grid, margin):
        frac = np.clip(0.5 - sdf / width, 0.0, 1.0)
        hit = frac > 0
        if not hit.any():
            continue
        mats, flat, frac = mats[hit], flat[hit], frac[hit]
        for m in np.unique(mats):
            sel = mats == m
            fl = flat[sel]
            np.maximum.at(outputs[int(m)].reshape(-1), fl, frac[sel])
            k = fl // hw
            rem = fl - k * hw
            j = rem // grid.w
            i = rem - j * grid.w
            box = [int(k.min()), int(k.max()) + 1, int(j.min()), int(j.max()) + 1, int(i.min()), int(i.max()) + 1]
            old = boxes.get(int(m))
            if old is not None:
                box = [min(old[0], box[0]), max(old[1], box[1]), min(old[2], box[2]), max(old[3], box[3]),
                       min(old[4], box[4]), max(old[5], box[5])]
            boxes[int(m)] = box
    return boxes


def min_sdf(tubes: Tubes, grid: Grid, margin: float, out: NDArray[Any]) -> None:
    """Lower ``out`` (n, h, w) to the signed distance of the segment union where closer than ``margin``."""
    if len(tubes) == 0:
        return
    for _, flat, sdf, _ in _batches(tubes, grid, np.full(len(tubes), margin)):
        np.minimum.at(out.reshape(-1), flat, sdf)
