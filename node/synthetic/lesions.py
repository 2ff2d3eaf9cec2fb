"""Lesion patterns per kind, and unlabelled confounders, with exact ground-truth fractions.

* ``covid``: bilateral, peripheral (subpleural), multifocal ground-glass blobs, lower-lobe and
  posterior predominance, optionally with consolidated cores or crazy paving (septal lines).
* ``pneumonia``: unilateral lobar or segmental consolidation bounded by the fissures, with a
  ground-glass rim where it does not meet a fissure and air bronchograms (airway lumens that stay
  air and are excluded from the lesion mask); or bronchopneumonia: clusters of centrilobular
  nodules (consolidated core, ground-glass halo) along the airway tree.
* ``normal``: clear lungs, possibly with confounders that are never labelled: small solid or
  calcified nodules, centrilobular or paraseptal emphysema, dependent atelectasis.

Smooth regions (blobs) are evaluated on the coarse grid; small nodules and emphysema holes are
tubes (spheres) rendered at full resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ._fields import NoiseField, lerp_, smoothstep, soft
from .anatomy import Anatomy, Mat, cage_point_sdf, lung_point_sdf, sample_in_lung
from .tubes import Grid, Tubes, TubeSet
from .vessels import TreeStyle, grow_tree, tree_to_tubes

F32 = np.float32
Arr = NDArray[Any]

VARIANTS: dict[str, tuple[str, ...]] = {
    "covid": ("ggo", "mixed", "crazy_paving"),
    "pneumonia": ("lobar", "segmental", "bronchopneumonia"),
    "normal": ("clear", "nodules", "emphysema", "atelectasis"),
}
_VARIANT_P: dict[str, tuple[float, ...]] = {
    "covid": (0.4, 0.4, 0.2),
    "pneumonia": (0.45, 0.25, 0.3),
    "normal": (0.4, 0.2, 0.2, 0.2),
}
LOBES = ("RUL", "RML", "RLL", "LUL", "LLL")


@dataclass
class Blob:
    """A noisy ellipsoid of lesion: GGO where the field > 0, consolidation where it exceeds ``cons_t``."""

    centre: NDArray[Any]
    axes: NDArray[Any]
    frame: NDArray[Any]  # rows are the unit axes
    amp: float
    ggo_hu: float
    cons_hu: float
    cons_t: float | None
    crazy: bool
    soft_mm: float
    side: str  # "r" or "l"
    lobe: str | None = None
    reticulation: float = 0.0  # HU of faint septal lines inside the ground glass (crazy paving uses 230)


@dataclass
class Atelectasis:
    """Dependent (posterior, basal) band of collapsed lung; not a lesion."""

    thickness: float
    hu: float
    z_top: float
    y_from: float  # Y (mm) where the posterior weighting starts


@dataclass
class LesionModel:
    """Everything the renderer needs for one phantom's lesions and confounders."""

    kind: str
    variant: str
    blobs: list[Blob]
    tubes: Tubes
    hu: dict[str, float]
    atelectasis: Atelectasis | None
    confounders: list[str]
    tex: NoiseField = field(repr=False)
    crazy: NoiseField = field(repr=False)
    shape_noise: NoiseField = field(repr=False)

    def describe(self) -> dict[str, object]:
        """JSON-friendly summary for truth.json."""
        return {
            "kind": self.kind,
            "variant": self.variant,
            "n_regions": len(self.blobs),
            "regions": [
                {"side": b.side, "lobe": b.lobe, "centre_mm": [round(float(v), 1) for v in b.centre],
                 "axes_mm": [round(float(v), 1) for v in b.axes], "consolidation": b.cons_t is not None,
                 "crazy_paving": b.crazy} for b in self.blobs
            ],
            "n_small_lesions": int(np.isin(self.tubes.mat, (Mat.LES_CONS,)).sum()),
            "confounders": self.confounders,
        }

    # ------------------------------------------------------------------ rendering
    def render(self, f: dict[str, Any], g: Grid, width: float) -> tuple[Arr, Arr, Arr]:
        """Return (parenchyma HU with lesions, GGO fraction, consolidation fraction) on the coarse grid.

        Fractions are relative to the voxel (already multiplied by the lung fraction), and the GGO
        fraction covers the consolidation too (consolidation is a subset of the lesion).
        """
        paren = f["paren"].copy()
        shape = paren.shape
        if self.atelectasis is not None:
            a = self.atelectasis
            Y = (g.y0 + np.arange(g.h) * g.px).astype(F32).reshape(1, g.h, 1)
            Z = g.z.astype(F32).reshape(-1, 1, 1)
            post = smoothstep(a.y_from, a.y_from + 45.0, Y)
            low = 1.0 - smoothstep(a.z_top - 25.0, a.z_top, Z)
            X = (g.x0 + np.arange(g.w) * g.px).astype(F32).reshape(1, 1, g.w)
            thick = F32(a.thickness) * np.clip(1.0 + 0.8 * self.shape_noise.grid(g.z, Y.ravel(), X.ravel()), 0.2, 2.0)
            for key in ("sdf_r", "sdf_l"):
                band = soft(-(f[key] + thick), 2.0) * post * low
                lerp_(paren, F32(a.hu), band)
        ggo = np.zeros(shape, dtype=F32)
        cons = np.zeros(shape, dtype=F32)
        if not self.blobs:
            return paren, ggo, cons
        xs = g.x0 + np.arange(g.w) * g.px
        ys = g.y0 + np.arange(g.h) * g.px
        lung = {"r": f["lung_r"], "l": f["lung_l"]}
        for b in self.blobs:
            reach = float(b.axes.max()) * (1.0 + b.amp) + 6.0
            lo, hi = b.centre - reach, b.centre + reach
            i0, i1 = np.searchsorted(xs, lo[0]), np.searchsorted(xs, hi[0])
            j0, j1 = np.searchsorted(ys, lo[1]), np.searchsorted(ys, hi[1])
            k0, k1 = np.searchsorted(g.z, lo[2]), np.searchsorted(g.z, hi[2])
            if i1 <= i0 or j1 <= j0 or k1 <= k0:
                continue
            sl = (slice(k0, k1), slice(j0, j1), slice(i0, i1))
            zz, yy, xx = g.z[k0:k1], ys[j0:j1], xs[i0:i1]
            dz = (zz - b.centre[2]).astype(F32).reshape(-1, 1, 1)
            dy = (yy - b.centre[1]).astype(F32).reshape(1, -1, 1)
            dx = (xx - b.centre[0]).astype(F32).reshape(1, 1, -1)
            q2 = np.zeros((k1 - k0, j1 - j0, i1 - i0), dtype=F32)
            for e, ax in zip(b.frame, b.axes):
                t = dx * F32(e[0]) + dy * F32(e[1]) + dz * F32(e[2])
                q2 += (t / F32(ax)) ** 2
            fld = 1.0 - np.sqrt(q2) + F32(b.amp) * self.shape_noise.grid(zz, yy, xx)
            scale = F32(float(b.axes.min()))
            inside = lung[b.side][sl]
            if b.lobe is not None:
                inside = inside * soft(self._lobe_sdf(f, sl, b.lobe), width)
            gf = soft(-fld * scale, b.soft_mm) * inside
            tex = self.tex.grid(zz, yy, xx)
            # heterogeneous haze; crazy paving adds a polygonal network of thickened septa
            level = F32(b.ggo_hu) + F32(65.0) * tex
            if b.crazy or b.reticulation > 0:
                lines = soft(np.abs(self.crazy.grid(zz, yy, xx)) - 0.1, 0.12) * F32(0.85)
                level = level + lines * F32(230.0 if b.crazy else b.reticulation)
            pv = paren[sl]
            lerp_(pv, level, gf)
            if b.cons_t is not None:
                cf = soft(-(fld - F32(b.cons_t)) * scale, 2.0) * inside
                lerp_(pv, F32(b.cons_hu) + F32(14.0) * tex, cf)
                np.maximum(cons[sl], cf, out=cons[sl])
            np.maximum(ggo[sl], gf, out=ggo[sl])
        np.maximum(ggo, cons, out=ggo)
        return paren, ggo, cons

    @staticmethod
    def _lobe_sdf(f: dict[str, Any], sl: tuple[slice, slice, slice], lobe: str) -> Arr:
        fiss = f["fiss"][sl]
        zhf = f["zhf"][sl]
        if lobe in ("RLL", "LLL"):
            return fiss.astype(F32)
        up = -fiss
        if lobe == "RML":
            return np.maximum(up, zhf).astype(F32)
        if lobe == "RUL":
            return np.maximum(up, -zhf).astype(F32)
        return up.astype(F32)


# ---------------------------------------------------------------------------- sampling

def lobe_of(anat: Anatomy, pts: NDArray[Any], right: bool) -> NDArray[np.str_]:
    """Lobe name of points known to lie in the given lung."""
    p = anat.prof(pts[:, 2].astype(F32))
    fiss = anat.fissure(pts[:, 1].astype(F32), pts[:, 2].astype(F32), p)
    lower = fiss < 0
    if right:
        mid = (~lower) & (pts[:, 2] < anat.z_hf)
        return np.where(lower, "RLL", np.where(mid, "RML", "RUL"))
    return np.where(lower, "LLL", "LUL")


def _frame(anat: Anatomy, c: NDArray[Any], right: bool) -> NDArray[Any]:
    """Orthonormal frame whose first axis is the outward pleural normal near ``c``."""
    h = 2.0
    offs = np.array([[h, 0, 0], [-h, 0, 0], [0, h, 0], [0, -h, 0], [0, 0, h], [0, 0, -h]])
    sr, sl = lung_point_sdf(anat, c + offs)
    sd = sr if right else sl
    grad = np.array([sd[0] - sd[1], sd[2] - sd[3], sd[4] - sd[5]])
    n = grad / max(float(np.linalg.norm(grad)), 1e-6)
    t1 = np.cross(n, [0.0, 0.0, 1.0])
    if np.linalg.norm(t1) < 1e-3:
        t1 = np.array([1.0, 0.0, 0.0])
    t1 /= np.linalg.norm(t1)
    t2 = np.cross(n, t1)
    return np.vstack([n, t1, t2])


def _weighted_pick(rng: np.random.Generator, pts: NDArray[Any], w: NDArray[Any], n: int) -> NDArray[Any]:
    if len(pts) == 0:
        return pts
    p = w / w.sum()
    idx = rng.choice(len(pts), size=min(n, len(pts)), replace=False, p=p)
    return pts[idx]


def sample_lesions(rng: np.random.Generator, anat: Anatomy, kind: str, variant: str | None, severity: float | None,
                   lo: tuple[float, float, float], hi: tuple[float, float, float], px: float = 1.0) -> LesionModel:
    """Draw the lesion pattern of ``kind`` (and confounders) for this anatomy."""
    if kind not in VARIANTS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(VARIANTS)}")
    if variant is None:
        variant = str(rng.choice(VARIANTS[kind], p=_VARIANT_P[kind]))
    elif variant not in VARIANTS[kind]:
        raise ValueError(f"variant {variant!r} is not one of {VARIANTS[kind]} for kind {kind!r}")
    hu = {
        "les_ggo": float(rng.uniform(-700, -520)),
        "les_cons": float(rng.uniform(-60, 45)),
        "nodule": float(rng.uniform(0, 70)),
        "calc_lung": float(rng.uniform(300, 900)),
        "emph": float(rng.uniform(-1000, -965)),
    }
    ts = TubeSet()
    blobs: list[Blob] = []
    if kind == "covid":
        blobs = _covid(rng, anat, variant, severity, hu)
    elif kind == "pneumonia":
        if variant == "bronchopneumonia":
            blobs = _broncho(rng, anat, ts, hu)
        else:
            blobs = _lobar(rng, anat, variant, severity, hu, ts)
    # confounders: the point of "normal" is to not be empty, but every kind may carry them
    conf: list[str] = []
    p_nod, p_emph, p_atel = 0.2, 0.15, 0.2
    if kind == "normal":
        p_nod = 1.0 if variant == "nodules" else 0.2
        p_emph = 1.0 if variant == "emphysema" else 0.1
        p_atel = 1.0 if variant == "atelectasis" else 0.2
    if rng.random() < p_nod:
        _nodules(rng, anat, ts)
        conf.append("nodules")
    if rng.random() < p_emph:
        _emphysema(rng, anat, ts)
        conf.append("emphysema")
    atel = None
    if rng.random() < p_atel:
        atel = Atelectasis(float(rng.uniform(2.0, 7.0)), float(rng.uniform(-450, -150)), float(anat.L * rng.uniform(0.2, 0.4)),
                           float(anat.Bp * rng.uniform(0.2, 0.45)))
        conf.append("atelectasis")
    return LesionModel(
        kind=kind, variant=variant, blobs=blobs, tubes=ts.freeze(), hu=hu, atelectasis=atel, confounders=conf,
        tex=NoiseField.create(rng, max(4.0, 1.5 * px), lo, hi), crazy=NoiseField.create(rng, max(5.0, 1.5 * px), lo, hi),
        shape_noise=NoiseField.create(rng, 9.0, lo, hi),
    )


def _covid(rng: np.random.Generator, anat: Anatomy, variant: str, severity: float | None, hu: dict[str, float]) -> list[Blob]:
    sev = float(np.exp(rng.uniform(np.log(0.03), np.log(0.45)))) if severity is None else float(severity)
    n = int(np.clip(round(3 + sev * 30 + rng.uniform(-1, 2)), 3, 16))
    blobs: list[Blob] = []
    sides = ["r", "l"] + [str(rng.choice(["r", "l"], p=[0.55, 0.45])) for _ in range(n - 2)]
    for side in sides:
        right = side == "r"
        cand = sample_in_lung(anat, rng, 200, right, depth=4.0, max_depth=22.0)
        # peripheral means under the costal pleura (chest wall), not along the mediastinum
        cand = cand[cage_point_sdf(anat, cand) > -24.0]
        if len(cand) == 0:
            continue
        # lower-lobe and posterior predominance
        w = (1.2 - cand[:, 2] / anat.L) ** 3.5 * (0.35 + np.clip((cand[:, 1] + anat.Ba) / (anat.Ba + anat.Bp), 0, 1)) ** 1.5
        c = _weighted_pick(rng, cand, w, 1)[0]
        size = (1.0 + 1.6 * sev) * (1.25 - 0.5 * float(np.clip(c[2] / anat.L, 0.0, 1.0)))
        axes = np.array([rng.uniform(9, 20), rng.uniform(16, 38) * size, rng.uniform(16, 42) * size])
        frame = _frame(anat, c, right)
        c = c + frame[0] * axes[0] * 0.35  # push toward the pleura: subpleural, truncated by it
        cons_t = None
        if variant == "mixed" and rng.random() < 0.75:
            cons_t = float(rng.uniform(0.2, 0.45))
        blobs.append(Blob(c, axes, frame, amp=float(rng.uniform(0.25, 0.45)), ggo_hu=hu["les_ggo"] + float(rng.uniform(-60, 60)),
                          cons_hu=hu["les_cons"], cons_t=cons_t, crazy=variant == "crazy_paving" and rng.random() < 0.8,
                          soft_mm=float(rng.uniform(2.5, 5.0)), side=side,
                          reticulation=float(rng.uniform(40.0, 110.0)) if rng.random() < 0.4 else 0.0))
    return blobs


def _lobar(rng: np.random.Generator, anat: Anatomy, variant: str, severity: float | None, hu: dict[str, float],
           ts: TubeSet) -> list[Blob]:
    right = bool(rng.random() < 0.6)
    side = "r" if right else "l"
    names = ("RUL", "RML", "RLL") if right else ("LUL", "LLL")
    wts = np.array([0.8, 0.6, 1.6] if right else [1.0, 1.6])
    lobe = str(rng.choice(names, p=wts / wts.sum()))
    tg = anat.vessel_targets[side]
    in_lobe = tg[lobe_of(anat, tg, right) == lobe]
    if len(in_lobe) < 5:
        in_lobe = tg
    cons_hu = hu["les_cons"]
    ggo_hu = float(rng.uniform(-620, -420))
    if variant == "lobar":
        c = in_lobe.mean(axis=0)
        spread = in_lobe.std(axis=0)
        frac = 1.0 if severity is None else float(np.clip(severity * 2.5, 0.4, 1.3))
        axes = np.clip(spread * rng.uniform(1.6, 2.4) * frac, 25.0, 140.0)
        blob = Blob(c, axes, np.eye(3), amp=float(rng.uniform(0.15, 0.3)), ggo_hu=ggo_hu, cons_hu=cons_hu,
                    cons_t=float(rng.uniform(0.12, 0.25)), crazy=False, soft_mm=3.0, side=side, lobe=lobe)
    else:
        # segmental: wedge abutting the pleura inside one lobe
        deep = in_lobe[lung_point_sdf(anat, in_lobe)[0 if right else 1] > -25.0]
        c = deep[rng.integers(len(deep))] if len(deep) else in_lobe[rng.integers(len(in_lobe))]
        frame = _frame(anat, c, right)
        axes = np.array([rng.uniform(22, 40), rng.uniform(20, 40), rng.uniform(20, 40)])
        blob = Blob(c + frame[0] * 8.0, axes, frame, amp=float(rng.uniform(0.2, 0.35)), ggo_hu=ggo_hu, cons_hu=cons_hu,
                    cons_t=float(rng.uniform(0.15, 0.3)), crazy=False, soft_mm=3.0, side=side, lobe=lobe)
    _bronchograms(rng, anat, blob, in_lobe, ts)
    return [blob]


def _bronchograms(rng: np.random.Generator, anat: Anatomy, blob: Blob, pts: NDArray[Any], ts: TubeSet) -> None:
    """Air-filled bronchi branching through a consolidation, entering from its hilar side."""
    rel = (pts - blob.centre) @ blob.frame.T / blob.axes
    inside = pts[(rel**2).sum(axis=1) < 0.6]
    if len(inside) < 8:
        return
    inside = inside[rng.permutation(len(inside))[: int(rng.integers(40, 120))]]
    hil = anat.hila["bronchus_r" if blob.side == "r" else "bronchus_l"]
    # entry point: the served region's point closest to the hilum, pulled back toward it
    entry = inside[np.argmin(np.linalg.norm(inside - hil, axis=1))]
    entry = entry + 0.35 * (hil - entry)
    style = TreeStyle(r_leaf=float(rng.uniform(0.7, 1.0)), gamma=0.4, r_max=float(rng.uniform(2.8, 4.0)), r_min=0.6,
                      reach=(0.5, 0.75))
    tree_to_tubes(grow_tree(rng, entry, inside, style), ts, int(Mat.AW_LUMEN), rng)


def _broncho(rng: np.random.Generator, anat: Anatomy, ts: TubeSet, hu: dict[str, float]) -> list[Blob]:
    sides = ["r"] if rng.random() < 0.55 else ["l"]
    if rng.random() < 0.3:
        sides = ["r", "l"]
    blobs: list[Blob] = []
    for side in sides:
        right = side == "r"
        tg = anat.vessel_targets[side]
        w = (1.3 - tg[:, 2] / anat.L) ** 2.5 + 1e-3
        k = int(rng.integers(2, 6))
        centres = _weighted_pick(rng, tg, w, k)
        for c in centres:
            radius = float(rng.uniform(18.0, 35.0))
            near = tg[np.linalg.norm(tg - c, axis=1) < radius]
            pick = near[rng.permutation(len(near))[: int(rng.integers(5, 18))]]
            for q in pick:
                rc = float(rng.uniform(1.8, 4.0))
                halo = rc + float(rng.uniform(1.5, 3.5))
                d = rng.normal(0, 1, 3)
                d = d / np.linalg.norm(d) * rng.uniform(2.0, 6.0)
                ts.add(q, q + d * 0.3, halo, halo, int(Mat.LES_GGO))
                ts.add(q, q + d * 0.3, rc, rc, int(Mat.LES_CONS))
                # tree-in-bud: a short branching twig
                ts.add(q, q + d, 1.2, 0.9, int(Mat.LES_CONS))
                ts.add(q + d, q + d + rng.normal(0, 2.5, 3), 0.9, 0.7, int(Mat.LES_CONS))
            if rng.random() < 0.6:
                frame = _frame(anat, c, right)
                axes = np.array([radius * 0.5, radius * 0.8, radius * 0.8])
                blobs.append(Blob(c, axes, frame, amp=0.35, ggo_hu=float(rng.uniform(-700, -560)), cons_hu=hu["les_cons"],
                                  cons_t=float(rng.uniform(0.35, 0.6)) if rng.random() < 0.5 else None, crazy=False,
                                  soft_mm=3.0, side=side))
    hu["les_ggo"] = float(rng.uniform(-600, -450))
    return blobs


def _nodules(rng: np.random.Generator, anat: Anatomy, ts: TubeSet) -> None:
    for _ in range(int(rng.integers(1, 6))):
        right = bool(rng.random() < 0.55)
        p = sample_in_lung(anat, rng, 1, right, depth=7.0)
        if len(p) == 0:
            continue
        c = p[0]
        if rng.random() < 0.25:
            r = float(rng.uniform(1.2, 3.0))
            ts.add(c, c + [0, 0, 0.2], r, r, int(Mat.CALC_LUNG))
        else:
            r = float(rng.uniform(2.0, 6.0))
            d = rng.normal(0, 0.6, 3)
            ts.add(c - d, c + d, r, r * rng.uniform(0.8, 1.1), int(Mat.NODULE))


def _emphysema(rng: np.random.Generator, anat: Anatomy, ts: TubeSet) -> None:
    upper = anat.L * 0.5
    for right in (True, False):
        cand = sample_in_lung(anat, rng, 200, right, depth=5.0)
        if len(cand) == 0:
            continue
        w = np.clip(cand[:, 2] - upper * 0.6, 1.0, None) ** 1.5
        for c in _weighted_pick(rng, cand, w, int(rng.integers(6, 22))):
            for _ in range(int(rng.integers(4, 16))):
                q = c + rng.normal(0, 7.0, 3)
                r = float(rng.uniform(1.3, 4.5))
                ts.add(q, q + rng.normal(0, 0.8, 3), r, r, int(Mat.EMPH))
        if rng.random() < 0.5:  # paraseptal bullae at the apex
            for c in sample_in_lung(anat, rng, int(rng.integers(2, 7)), right, depth=2.0, max_depth=8.0):
                if c[2] < anat.L * 0.7:
                    continue
                r = float(rng.uniform(4.0, 11.0))
                ts.add(c, c + rng.normal(0, 1.0, 3), r, r, int(Mat.EMPH))
