"""Numeric building blocks for the phantom: signed distances, soft masks, smooth noise, resampling.

Everything works on float32 numpy arrays that broadcast: a chunk of slices is evaluated as
``Z`` shaped (n, 1, 1), ``Y`` shaped (1, h, 1) and ``X`` shaped (1, 1, w), so one call renders
many slices without Python loops. Distances are in millimetres; negative inside a shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

F32 = np.float32
Arr = NDArray[Any]
Scalar = float | np.floating[Any]
Num = Scalar | NDArray[Any]


def soft(sdf: Arr, width: Scalar) -> Arr:
    """Partial-volume fraction of a shape from its signed distance (linear ramp ``width`` mm wide)."""
    out = np.multiply(sdf, -1.0 / width, dtype=F32)
    out += 0.5
    np.clip(out, 0.0, 1.0, out=out)
    return out


def lerp_(base: Arr, value: Num, weight: Arr) -> None:
    """In place ``base += (value - base) * weight`` (alpha compositing of one material)."""
    base += (value - base) * weight


def ellipse_sdf(x: Arr, y: Arr, a: Num, b: Num) -> Arr:
    """Approximate signed distance to an axis-aligned ellipse centred at 0 (exact on the axes).

    Uses the radial distance to the boundary, ``|p| (1 - 1/q)`` with ``q`` the normalised radius:
    accurate near the boundary for moderate eccentricity, which is all the soft masks need.
    """
    u = x * (1.0 / np.asarray(a, dtype=F32))
    v = y * (1.0 / np.asarray(b, dtype=F32))
    q = np.sqrt(u * u + v * v)
    np.maximum(q, F32(1e-6), out=q)
    r = np.sqrt(x * x + y * y) + F32(1e-3)  # the offset keeps the exact centre strongly inside
    out = r - r / q
    return out.astype(F32, copy=False)


def smax(a: Arr, b: Num, k: float) -> Arr:
    """Smooth maximum (intersection of SDFs) with blend radius ``k`` mm."""
    h = np.clip(k - np.abs(a - b), 0.0, None) / k
    return (np.maximum(a, b) + h * h * (k * 0.25)).astype(F32, copy=False)


def smin(a: Arr, b: Num, k: float) -> Arr:
    """Smooth minimum (union of SDFs) with blend radius ``k`` mm."""
    h = np.clip(k - np.abs(a - b), 0.0, None) / k
    return (np.minimum(a, b) - h * h * (k * 0.25)).astype(F32, copy=False)


def smoothstep(e0: float, e1: float, x: Num) -> Arr:
    """Hermite step from 0 at ``e0`` to 1 at ``e1``."""
    t = np.clip((np.asarray(x, dtype=F32) - e0) / (e1 - e0), 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(F32, copy=False)


def _bspline_weights(pos: NDArray[Any], n: int) -> NDArray[Any]:
    """Dense (len(pos), n) cubic B-spline interpolation matrix for lattice coordinates ``pos``."""
    i0 = np.floor(pos).astype(np.int64)
    t = pos - i0
    w = np.zeros((pos.size, n), dtype=np.float32)
    rows = np.arange(pos.size)
    coeffs = (
        (1 - t) ** 3 / 6.0,
        (3 * t**3 - 6 * t**2 + 4) / 6.0,
        (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6.0,
        t**3 / 6.0,
    )
    for off, c in zip((-1, 0, 1, 2), coeffs):
        idx = np.clip(i0 + off, 0, n - 1)
        np.add.at(w, (rows, idx), c.astype(np.float32))
    return w


@dataclass
class NoiseField:
    """Smooth Gaussian random field: white noise on a coarse lattice, cubic B-spline interpolated.

    Evaluating on an axis-aligned grid is separable, so it costs a few small matrix products per
    slice instead of a trilinear lookup per voxel; scattered points use the same weights.
    """

    lattice: NDArray[Any]  # (nz, ny, nx)
    origin: tuple[float, float, float]  # (z, y, x) mm of lattice node 0
    step: float  # mm

    @classmethod
    def create(
        cls,
        rng: np.random.Generator,
        step: float,
        lo: tuple[float, float, float],
        hi: tuple[float, float, float],
    ) -> "NoiseField":
        """Lattice covering the box ``lo``..``hi`` (z, y, x mm) with a margin, unit variance output."""
        shape = tuple(int(np.ceil((h - l) / step)) + 5 for l, h in zip(lo, hi))
        lat = rng.standard_normal(shape, dtype=np.float32)
        # cubic B-spline interpolation of white noise has variance ~ (0.55)^3; renormalise.
        lat *= F32(1.0 / 0.55**3) ** 0.5
        origin = (lo[0] - 2 * step, lo[1] - 2 * step, lo[2] - 2 * step)
        return cls(lat, origin, step)

    def grid(self, z: NDArray[Any], y: NDArray[Any], x: NDArray[Any]) -> Arr:
        """Values on the tensor grid (len z, len y, len x)."""
        nz, ny, nx = self.lattice.shape
        wz = _bspline_weights((np.asarray(z) - self.origin[0]) / self.step, nz)
        wy = _bspline_weights((np.asarray(y) - self.origin[1]) / self.step, ny)
        wx = _bspline_weights((np.asarray(x) - self.origin[2]) / self.step, nx)
        # restrict to the lattice rows that are touched, to keep the products small
        zs = np.nonzero(wz.any(axis=0))[0]
        ys = np.nonzero(wy.any(axis=0))[0]
        xs = np.nonzero(wx.any(axis=0))[0]
        lat = self.lattice[zs[0] : zs[-1] + 1, ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]
        wz = wz[:, zs[0] : zs[-1] + 1]
        wy = wy[:, ys[0] : ys[-1] + 1]
        wx = wx[:, xs[0] : xs[-1] + 1]
        t = np.tensordot(wz, lat, axes=(1, 0))  # (n, ny, nx)
        t = np.matmul(wy[None], t)  # (n, h, nx)
        return np.matmul(t, wx.T[None]).astype(F32, copy=False)

    def points(self, z: NDArray[Any], y: NDArray[Any], x: NDArray[Any]) -> Arr:
        """Values at scattered points (equal-length 1-D arrays)."""
        nz, ny, nx = self.lattice.shape
        out = np.zeros(np.asarray(z).shape, dtype=np.float32)
        cz = (np.asarray(z) - self.origin[0]) / self.step
        cy = (np.asarray(y) - self.origin[1]) / self.step
        cx = (np.asarray(x) - self.origin[2]) / self.step

        def parts(c: NDArray[Any], n: int) -> list[tuple[NDArray[np.int64], NDArray[Any]]]:
            i0 = np.floor(c).astype(np.int64)
            t = c - i0
            ws = ((1 - t) ** 3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6, (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6, t**3 / 6)
            return [(np.clip(i0 + o, 0, n - 1), w) for o, w in zip((-1, 0, 1, 2), ws)]

        for iz, wz in parts(cz, nz):
            for iy, wy in parts(cy, ny):
                for ix, wx in parts(cx, nx):
                    out += (wz * wy * wx * self.lattice[iz, iy, ix]).astype(F32)
        return out


def upsample2(a: Arr) -> Arr:
    """Bilinear 2x in-plane upsampling of (n, h, w) -> (n, 2h, 2w), pixel centres aligned."""
    n, h, w = a.shape
    t = np.empty((n, 2 * h, w), dtype=F32)
    d = (a[:, 1:] - a[:, :-1]) * F32(0.25)
    t[:, 0::2] = a
    t[:, 1::2] = a
    t[:, 2::2] -= d
    t[:, 1:-1:2] += d
    out = np.empty((n, 2 * h, 2 * w), dtype=F32)
    d = (t[:, :, 1:] - t[:, :, :-1]) * F32(0.25)
    out[:, :, 0::2] = t
    out[:, :, 1::2] = t
    out[:, :, 2::2] -= d
    out[:, :, 1:-1:2] += d
    return out


def blur121(a: Arr, passes: int = 1) -> Arr:
    """In-plane binomial [1,2,1]/4 blur of (n, h, w), repeated ``passes`` times (sigma ~ 0.7 px each)."""
    out = a
    for _ in range(passes):
        tmp = out.copy()
        tmp[:, 1:-1, :] *= 0.5
        tmp[:, 1:-1, :] += 0.25 * (out[:, :-2, :] + out[:, 2:, :])
        res = tmp.copy()
        res[:, :, 1:-1] *= 0.5
        res[:, :, 1:-1] += 0.25 * (tmp[:, :, :-2] + tmp[:, :, 2:])
        out = res
    return out
