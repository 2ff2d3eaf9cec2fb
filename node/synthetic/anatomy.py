"""Random chest anatomy: parameters sampled per seed and evaluated slice by slice.

Coordinates are millimetres in DICOM patient space (LPS) relative to the centre of the thoracic
cage: X increases toward the patient's left, Y toward the back, Z toward the head, and Z = 0 is
the lowest point of the lungs (the posterior costophrenic recess); the lung apex is at Z = ``L``.

Large smooth structures (body, fat, muscle, cage, heart, spine, abdominal organs, lungs) are signed
distance fields evaluated on a coarse in-plane grid; thin tubular ones (ribs, vessels, airways,
aorta, trachea...) are :mod:`tubes` rendered at full resolution. Each lung is the thoracic cage
minus the mediastinum, cut below by a dome-shaped diaphragm and narrowed at the apex.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ._fields import (
    NoiseField,
    Scalar,
    ellipse_sdf,
    lerp_,
    smax,
    smin,
    smoothstep,
    soft,
)
from .tubes import Grid, Tubes, TubeSet, min_sdf
from .vessels import TreeStyle, airway_from_tree, grow_tree, tree_to_tubes

F32 = np.float32
Arr = NDArray[Any]
BIG = F32(1e3)


class Mat(IntEnum):
    """Tube materials; the order of :data:`LUNG_ORDER` / :data:`OUTSIDE_ORDER` is the paint order."""

    ARTERY = 1
    VEIN = 2
    AW_WALL = 3
    AW_LUMEN = 4
    BONE_CORTEX = 5
    BONE_MARROW = 6
    CARTILAGE = 7
    AORTA = 8
    PULM_ART = 9
    SYS_VEIN = 10
    SOFT = 11
    TRACHEA_WALL = 12
    TRACHEA_AIR = 13
    LES_GGO = 14
    LES_CONS = 15
    NODULE = 16
    EMPH = 17
    CALC = 18
    PULM_VEIN_MED = 19
    CALC_LUNG = 20
    THYROID = 21


# painted only inside the lungs (weighted by the lung fraction), in this order
LUNG_ORDER = (Mat.EMPH, Mat.LES_GGO, Mat.LES_CONS, Mat.NODULE, Mat.CALC_LUNG, Mat.VEIN, Mat.ARTERY, Mat.AW_WALL, Mat.AW_LUMEN)
# painted only outside the lungs, in this order
OUTSIDE_ORDER = (Mat.SOFT, Mat.THYROID, Mat.SYS_VEIN, Mat.PULM_VEIN_MED, Mat.PULM_ART, Mat.AORTA, Mat.TRACHEA_WALL,
                 Mat.TRACHEA_AIR, Mat.CARTILAGE, Mat.BONE_CORTEX, Mat.BONE_MARROW, Mat.CALC)


@dataclass
class Prof:
    """Per-slice shape parameters (arrays shaped like the Z passed in)."""

    u: Arr
    a_c: Arr
    b_ant: Arr
    b_post: Arr
    y_c: Arr
    a_b: Arr
    bb_ant: Arr
    bb_post: Arr
    y_back: Arr
    a_m: Arr
    bm_ant: Arr
    bm_post: Arr
    y_vb: Arr

    def sub(self, k: slice) -> "Prof":
        """The same profile restricted to slices ``k``."""
        return Prof(*(getattr(self, f)[k] for f in self.__dataclass_fields__))


@dataclass
class Anatomy:
    """All sampled anatomy of one phantom; :meth:`render` evaluates it on a chunk of slices."""

    L: float  # lung height (apex Z)
    A: float  # cage half-width at the bases
    Ba: float  # cage anterior half-depth
    Bp: float  # cage posterior half-depth
    fat_lat: float
    fat_ant: float
    fat_post: float
    wall_lat: float
    wall_ant: float
    wall_post: float
    shoulder: float
    belly: float
    back_flat: float
    r_vb: float
    vert_period: float
    vert_phase: float
    r_can: float
    kyphosis: float
    # diaphragm
    z_top_r: float
    z_top_l: float
    # heart
    heart: tuple[float, float, float, float, float, float, float]  # x, y, z, a, b, c, angle
    epi_fat: float
    # mediastinum
    x_t: float
    y_t: float
    r_tr: float
    z_car: float
    band: float
    # lobes
    fiss_post: float  # Z of the oblique fissure at the back
    fiss_ant: float  # Z of the oblique fissure at the front
    z_hf: float  # horizontal fissure Z
    fissure_hu: float
    # sternum / breasts / table
    sternum_w: float
    breasts: tuple[float, float, float, float, float] | None  # x, dy, z, ax, ay (az = ax)
    table: tuple[float, float, float] | None  # gap, curvature, thickness
    lung_mu: float
    lung_grad: float
    hu: dict[str, float]
    contrast: bool
    tubes: Tubes = field(repr=False)
    med: Tubes = field(repr=False)  # inflated mediastinal tubes, excluded from the lungs
    tex_a: NoiseField = field(repr=False)
    tex_b: NoiseField = field(repr=False)
    tex_c: NoiseField = field(repr=False)
    hila: dict[str, NDArray[Any]] = field(default_factory=dict, repr=False)
    airway_lumens: dict[str, list[tuple[NDArray[Any], NDArray[Any], float, float]]] = field(default_factory=dict, repr=False)
    vessel_targets: dict[str, NDArray[Any]] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ profiles
    def prof(self, Z: Arr) -> Prof:
        """Cage, body and spine outline parameters at heights ``Z``."""
        u = (np.asarray(Z, dtype=F32) / F32(self.L)).astype(F32)
        x = np.clip((u - 0.5) / 0.5, 0.0, 1.4)
        fw = np.clip(1.0 - 0.42 * x**1.6, 0.4, None) * (1.0 + 0.03 * np.clip(-u * 4.0, 0.0, 1.0))
        fd = 1.0 - 0.2 * x**1.5
        a_c = (self.A * fw).astype(F32)
        b_ant = (self.Ba * fd).astype(F32)
        b_post = (self.Bp * fd).astype(F32)
        y_c = (8.0 * x).astype(F32)
        sh = self.shoulder * smoothstep(0.6, 1.05, u)
        a_b = (self.A * (0.9 + 0.1 * fw) + self.wall_lat + self.fat_lat + sh).astype(F32)
        pect = 10.0 * smoothstep(0.45, 0.8, u) * (1.0 - smoothstep(1.05, 1.25, u))
        belly = self.belly * smoothstep(0.3, -0.25, u)
        bb_ant = (b_ant + self.wall_ant + pect + self.fat_ant + belly).astype(F32)
        bb_post = (b_post + self.wall_post + self.fat_post).astype(F32)
        y_back = (y_c + bb_post - self.back_flat).astype(F32)
        a_m = (a_b - self.fat_lat).astype(F32)
        bm_ant = (bb_ant - self.fat_ant - belly * 0.8).astype(F32)
        bm_post = (bb_post - self.fat_post).astype(F32)
        y_vb = (y_c + b_post - 0.9 * self.r_vb + self.kyphosis * np.sin(np.pi * np.clip(u, 0.0, 1.0))).astype(F32)
        return Prof(u, a_c, b_ant, b_post, y_c, a_b, bb_ant, bb_post, y_back, a_m, bm_ant, bm_post, y_vb)

    # ------------------------------------------------------------------ diaphragm
    def dome(self, X: Arr, Y: Arr, right: bool) -> tuple[Arr, Arr]:
        """Diaphragm height z_d(X, Y) and its in-plane slope magnitude for one side."""
        top = self.z_top_r if right else self.z_top_l
        xdc = -0.4 * self.A if right else 0.4 * self.A
        rx = 0.66 * self.A
        dy = Y - F32(0.05 * self.Ba)
        ry = np.where(dy > 0, F32(self.Bp * 0.95), F32(self.Ba * 1.15)).astype(F32)
        ga = np.where(dy > 0, F32(1.0), F32(0.75)).astype(F32)
        sx = (X - F32(xdc)) / F32(rx)
        sy = dy / ry
        s = sx * sx + ga * sy * sy
        # rounded dome falling steeply into the costophrenic recesses, a shallow shelf beyond
        t = np.clip(1.0 - s, 0.0, None)
        zd = F32(top) * t * np.sqrt(t) - F32(10.0) * np.clip(s - 1.0, 0.0, 0.6)
        fp = F32(1.5 * top) * np.sqrt(t) + F32(10.0) * (s > 1.0)
        gx = fp * 2.0 * sx / F32(rx)
        gy = fp * 2.0 * ga * sy / ry
        # central tendon: a plateau under the heart, so no lung lies between the domes and the heart
        zc = F32(0.92 * min(self.z_top_r, self.z_top_l))
        px_ = (X - F32(0.06 * self.A)) / F32(0.34 * self.A)
        py_ = (Y + F32(0.15 * self.Ba)) / F32(0.75 * self.Ba)
        pc = np.clip(1.0 - px_ * px_ - py_ * py_, 0.0, None)
        zp = zc * np.sqrt(pc)
        use = zp > zd
        gp = zc / np.maximum(np.sqrt(pc), F32(0.05)) * np.sqrt((px_ / F32(0.34 * self.A)) ** 2 + (py_ / F32(0.75 * self.Ba)) ** 2)
        g = np.sqrt(gx * gx + gy * gy)
        return np.where(use, zp, zd).astype(F32), np.where(use, gp, g).astype(F32)

    def fissure(self, Y: Arr, Z: Arr, p: Prof) -> Arr:
        """In-plane signed distance to the oblique fissure (negative on the lower-lobe side)."""
        y_ant = p.y_c - p.b_ant
        y_post = p.y_c + p.b_post
        t = np.clip((Y - y_ant) / (y_post - y_ant), 0.0, 1.0)
        zf = F32(self.fiss_ant) + t * F32(self.fiss_post - self.fiss_ant)
        slope = F32(max(abs(self.fiss_post - self.fiss_ant), 1.0)) / (y_post - y_ant)
        return ((Z - zf) / slope).astype(F32)

    # ------------------------------------------------------------------ lungs
    def lung_sdfs(self, X: Arr, Y: Arr, Z: Arr, p: Prof, tube_sdf: Arr | float, heart_sdf: Arr | None = None,
                  cage: Arr | None = None) -> tuple[Arr, Arr]:
        """Signed distances of the right and left lung (elementwise, broadcastable inputs)."""
        if cage is None:
            b = np.where(Y < p.y_c, p.b_ant, p.b_post)
            cage = ellipse_sdf(X, Y - p.y_c, p.a_c, b)
        if heart_sdf is None:
            heart_sdf = self.heart_sdf(X, Y, Z)
        med = np.minimum(heart_sdf - 2.5, tube_sdf)
        vb = ellipse_sdf(X, Y - p.y_vb, F32(self.r_vb * 1.1 + 4.0), F32(self.r_vb + 4.0))
        np.minimum(med, vb, out=med)
        # the posterior midline behind the vertebral body belongs to the spine
        np.minimum(med, np.maximum(np.abs(X) - F32(self.r_vb * 1.1 + 6.0), p.y_vb + F32(0.4 * self.r_vb) - Y), out=med)
        med = smin(med, np.abs(X - F32(self.x_t * 0.5)) - F32(self.band), 5.0)
        base = smax(cage, -med, 3.0)
        # apex: each lung narrows to a rounded tip at Z = L
        z0 = F32(0.66 * self.L)
        t = np.clip((Z - z0) / F32(self.L - 0.66 * self.L), 0.0, 1.0)
        k = (1.0 - t**1.8) ** 0.6  # bullet-shaped apex
        k = np.where(Z > z0, k, F32(1.0)).astype(F32)
        upper = bool(np.any(np.asarray(Z) > z0))
        out = []
        for right in (True, False):
            sgn = -1.0 if right else 1.0
            zd, g = self.dome(X, Y, right)
            d_dome = (zd - Z) / np.maximum(g, F32(0.35))
            s = np.maximum(base, d_dome)
            if upper:
                ap = ellipse_sdf(X - F32(sgn) * p.a_c * 0.5, Y - p.y_c - 0.15 * p.b_post,
                                 p.a_c * 0.58 * k + 0.5, (p.b_ant + p.b_post) * 0.52 * k + 0.5)
                s = np.maximum(s, np.where(Z > z0, ap, -BIG))
            s = np.maximum(s, F32(sgn) * -X + F32(1.0))
            out.append(s.astype(F32))
        return out[0], out[1]

    def heart_sdf(self, X: Arr, Y: Arr, Z: Arr) -> Arr:
        """In-plane signed distance of the heart outline (big outside its Z range)."""
        hx, hy, hz, ha, hb, hc, ang = self.heart
        k = np.sqrt(np.clip(1.0 - ((Z - F32(hz)) / F32(hc)) ** 2, 0.0, 1.0)).astype(F32)
        ca, sa = F32(math.cos(ang)), F32(math.sin(ang))
        dx = X - F32(hx)
        dy = Y - F32(hy)
        xr = ca * dx + sa * dy
        yr = -sa * dx + ca * dy
        d = ellipse_sdf(xr, yr, F32(ha) * k + 0.01, F32(hb) * k + 0.01)
        return np.where(k > 0.02, d, BIG).astype(F32)

    # ------------------------------------------------------------------ rendering
    def render(self, g: Grid, width: float) -> dict[str, Any]:
        """Evaluate the smooth fields on a (coarse) chunk grid.

        Returns ``hu`` (everything but lung parenchyma), ``lung_r``/``lung_l`` fractions, their signed
        distances ``sdf_r``/``sdf_l``, the parenchyma HU ``paren``, the fissure distance ``fiss``,
        the height above the horizontal fissure ``zhf`` and ``win`` (the (k, j, i) slices of the grid
        outside which there is no lung).
        """
        c = _Ctx(g)
        n = g.z.size
        Z, Y, X = c.Z, c.Y, c.X
        p = self.prof(Z)
        hu_ = self.hu
        shape = (n, g.h, g.w)
        hu = np.full(shape, F32(hu_["air"]), dtype=F32)
        w = F32(width)

        if self.table is not None:
            gap, curv, thick = self.table
            yt0 = float((p.y_c + p.bb_post).min()) + gap
            win = c.window(-220.0, 220.0, yt0 - curv * 220.0**2 - 3.0, float((p.y_c + p.bb_post).max()) + gap + thick + 3.0)
            if win is not None:
                sk, sy, sx = win
                Xs, Ys, ps = X[:, :, sx], Y[:, sy, :], p.sub(sk)
                ytop = ps.y_c + ps.bb_post + F32(gap) - F32(curv) * Xs * Xs
                side = np.abs(Xs) - F32(215.0)
                dtab = np.maximum(np.abs(Ys - ytop - F32(thick / 2)) - F32(thick / 2), side)
                shell = np.maximum(np.abs(np.abs(Ys - ytop - F32(thick / 2)) - F32(thick / 2)) - 1.2, side)
                hv = hu[sk, sy, sx]
                lerp_(hv, F32(hu_["table_core"]), soft(dtab, w))
                lerp_(hv, F32(hu_["table_shell"]), soft(shell, w))

        # ---- body wall
        ab = float(p.a_b.max()) + 3.0
        y_front = float((p.y_c - p.bb_ant).min()) - (self.breasts[4] + 10.0 if self.breasts else 0.0) - 3.0
        win = c.window(-ab, ab, y_front, float(p.y_back.max()) + 3.0)
        if win is None:
            return self._empty(shape)
        sk, sy, sx = win
        Xb, Yb = X[:, :, sx], Y[:, sy, :]
        hb = hu[:, sy, sx]
        bb = np.where(Yb < p.y_c, p.bb_ant, p.bb_post)
        body = smax(ellipse_sdf(Xb, Yb - p.y_c, p.a_b, bb), Yb - p.y_back, 18.0)
        br = None
        bax = 0.0
        if self.breasts is not None:
            bx, bdy, bz, bax, bay = self.breasts
            kb = np.sqrt(np.clip(1.0 - ((Z - F32(bz)) / F32(bax)) ** 2, 0.0, 1.0)).astype(F32)
            if float(kb.max()) > 0.02:
                ybr = p.y_c - p.bb_ant + F32(bdy)
                br = np.minimum(ellipse_sdf(Xb - F32(bx), Yb - ybr, F32(bax) * kb + 0.01, F32(bay) * kb + 0.01),
                                ellipse_sdf(Xb + F32(bx), Yb - ybr, F32(bax) * kb + 0.01, F32(bay) * kb + 0.01))
                br = np.where(kb > 0.02, br, BIG)
                body = smin(body, br, 14.0)
        body_f = soft(body, w)
        lerp_(hb, F32(hu_["fat"]), body_f)
        if br is not None:
            tex = self.tex_a.grid(g.z, Yb.ravel(), Xb.ravel())
            gland = soft(br + F32(0.45 * bax), 6.0) * np.clip(0.55 + 0.6 * tex, 0.0, 1.0)
            lerp_(hb, F32(hu_["gland"]), gland * body_f)
        lerp_(hb, F32(hu_["skin"]), soft(np.abs(body + 1.1) - 1.0, w))
        bm = np.where(Yb < p.y_c, p.bm_ant, p.bm_post)
        musc = smax(ellipse_sdf(Xb, Yb - p.y_c, p.a_m, bm), Yb - (p.y_back - F32(self.fat_post * 0.7)), 14.0)
        lerp_(hb, F32(hu_["muscle"]), soft(musc, w))
        b = np.where(Yb < p.y_c, p.b_ant, p.b_post)
        cage = ellipse_sdf(Xb, Yb - p.y_c, p.a_c, b)
        # intermuscular fat plane, axillary fat, scapulae
        lerp_(hb, F32(hu_["fat"]), soft(np.abs(cage - F32(self.wall_lat * 0.6 + 6.0)) - 0.9, w) * soft(musc + 3.0, w) * F32(0.7))
        ax_w = smoothstep(0.55, 0.75, p.u) * (1.0 - smoothstep(0.95, 1.1, p.u)) * F32(0.8)
        if float(ax_w.max()) > 0:
            axd = ellipse_sdf(np.abs(Xb) - (p.a_c + F32(0.5 * self.wall_lat + 12.0)), Yb - p.y_c + 0.1 * p.b_ant, F32(7.0), p.b_ant * 0.3)
            lerp_(hb, F32(hu_["fat"]), soft(axd, 3.0) * ax_w * soft(musc + 2.0, w))
        sc_w = smoothstep(0.45, 0.55, p.u) * (1.0 - smoothstep(1.0, 1.12, p.u))
        if float(sc_w.max()) > 0:
            off = F32(self.wall_lat * 0.8 + 8.0)
            plate = np.maximum(np.abs(cage - off) - 2.0, np.maximum(np.abs(Xb) - p.a_c * 0.95, p.a_c * 0.35 - np.abs(Xb)))
            plate = np.maximum(plate, p.y_c + 0.25 * p.b_post - Yb)
            lerp_(hb, F32(hu_["scapula"]), soft(plate, w) * sc_w)
        # inside the thoracic cage: mediastinal fat (muscle and fat at the thoracic inlet)
        inlet = smoothstep(1.0, 1.12, p.u)
        inside_hu = F32(hu_["med_fat"]) * (1.0 - inlet) + F32(0.5 * (hu_["muscle"] + hu_["fat"])) * inlet
        lerp_(hb, inside_hu + F32(10.0) * self.tex_b.grid(g.z, Yb.ravel(), Xb.ravel()), soft(cage, w))
        hu[:, sy, sx] = hb

        self._spine(hu, c, p, w)
        self._sternum(hu, c, p, w)
        # ---- cage window: heart, abdomen, lungs
        ac = float(p.a_c.max()) + 4.0
        cw = c.window(-ac, ac, float((p.y_c - p.b_ant).min()) - 4.0, float((p.y_c + p.b_post).max()) + 4.0)
        lung_r = np.zeros(shape, F32)
        lung_l = np.zeros(shape, F32)
        sdf_r = np.full(shape, BIG, F32)
        sdf_l = np.full(shape, BIG, F32)
        paren = np.zeros(shape, F32)
        fiss = np.broadcast_to(self.fissure(Y, Z, p), shape)
        zhf = np.broadcast_to(Z - F32(self.z_hf), shape)
        if cw is None:
            return {"hu": hu, "lung_r": lung_r, "lung_l": lung_l, "sdf_r": sdf_r, "sdf_l": sdf_l, "paren": paren,
                    "fiss": fiss, "zhf": zhf, "win": (slice(0, 0), slice(0, 0), slice(0, 0))}
        _, cy, cx = cw
        Xc, Yc = X[:, :, cx], Y[:, cy, :]
        cage_c = cage[:, cy.start - sy.start:cy.stop - sy.start, cx.start - sx.start:cx.stop - sx.start] if (
            cy.start >= sy.start and cx.start >= sx.start and cy.stop <= sy.stop and cx.stop <= sx.stop) else ellipse_sdf(
            Xc, Yc - p.y_c, p.a_c, np.where(Yc < p.y_c, p.b_ant, p.b_post))
        hc = hu[:, cy, cx]
        heart = np.full(hc.shape, BIG, F32)
        hwin = self._heart(hc, heart, c, cy, cx, p, w)
        _ = hwin
        self._abdomen(hc, c, cy, cx, p, cage_c, w)
        hu[:, cy, cx] = hc
        # lungs (only slices that can hold lung)
        lk = c.zwindow(-5.0, self.L + 2.0)
        if lk is not None:
            ps = p.sub(lk)
            Zs = Z[lk]
            gsub = Grid(g.z[lk], float(c.xs[cx.start]), float(c.ys[cy.start]), g.px, cy.stop - cy.start, cx.stop - cx.start)
            tsdf = np.full((gsub.z.size, gsub.h, gsub.w), BIG, dtype=F32)
            min_sdf(self.med, gsub, 6.0, tsdf)
            sr, sl = self.lung_sdfs(Xc, Yc, Zs, ps, tsdf, heart[lk], cage_c[lk])
            sdf_r[lk, cy, cx] = sr
            sdf_l[lk, cy, cx] = sl
            lung_r[lk, cy, cx] = soft(sr, w)
            lung_l[lk, cy, cx] = soft(sl, w)
            zz = g.z[lk]
            tex = self.tex_a.grid(zz, Yc.ravel(), Xc.ravel()) * F32(14.0) + self.tex_c.grid(zz, Yc.ravel(), Xc.ravel()) * F32(9.0)
            par = F32(self.lung_mu) + F32(self.lung_grad) * np.clip((Yc - ps.y_c) / ps.b_post, -1.0, 1.0) * 0.5 + tex
            if self.fissure_hu > 0:
                par += soft(np.abs(fiss[lk, cy, cx]) - 0.45, w) * F32(self.fissure_hu)
            paren[lk, cy, cx] = par
        return {"hu": hu, "lung_r": lung_r, "lung_l": lung_l, "sdf_r": sdf_r, "sdf_l": sdf_l, "paren": paren,
                "fiss": fiss, "zhf": zhf, "win": (lk if lk is not None else slice(0, 0), cy, cx)}

    @staticmethod
    def _empty(shape: tuple[int, int, int]) -> dict[str, Any]:
        z = np.zeros(shape, F32)
        big = np.full(shape, BIG, F32)
        return {"hu": np.full(shape, F32(-1000.0)), "lung_r": z, "lung_l": z, "sdf_r": big, "sdf_l": big, "paren": z,
                "fiss": big, "zhf": big, "win": (slice(0, 0), slice(0, 0), slice(0, 0))}

    def _spine(self, hu: Arr, c: "_Ctx", p: Prof, w: Scalar) -> None:
        h = self.hu
        r = F32(self.r_vb)
        ylo = float(p.y_vb.min()) - self.r_vb - 3.0
        yhi = float(p.y_vb.max()) + self.r_vb + 2 * self.r_can + 36.0
        win = c.window(-(self.r_can + 28.0), self.r_can + 28.0, ylo, yhi)
        if win is None:
            return
        _, sy, sx = win
        X, Y, Z = c.X[:, :, sx], c.Y[:, sy, :], c.Z
        hv = hu[:, sy, sx]
        vb = ellipse_sdf(X, Y - p.y_vb, r * 1.1, r)
        phase = np.mod(Z - F32(self.vert_phase), F32(self.vert_period))
        disc = (phase < F32(5.0)).astype(F32)
        lerp_(hv, F32(h["bone_cortex"] * 0.8) * (1 - disc) + F32(h["disc"]) * disc, soft(vb, w))
        lerp_(hv, F32(h["vb_marrow"]) * (1 - disc) + F32(h["disc"]) * disc, soft(vb + 1.8, w))
        yc = p.y_vb + r + F32(self.r_can + 1.5)
        can = ellipse_sdf(X, Y - yc, F32(self.r_can * 1.05), F32(self.r_can))
        arch = ellipse_sdf(X, Y - yc, F32(self.r_can + 5.5), F32(self.r_can + 5.0))
        spin = ellipse_sdf(X, Y - yc - F32(self.r_can + 14.0), F32(4.0), F32(15.0))
        trans = ellipse_sdf(np.abs(X) - F32(self.r_can + 13.0), Y - yc + 1.0, F32(12.0), F32(5.0))
        post = np.minimum(np.minimum(arch, spin), trans)
        lerp_(hv, F32(h["bone_post"]), soft(post, w))
        lerp_(hv, F32(h["cord"]), soft(can, w))
        hu[:, sy, sx] = hv

    def _sternum(self, hu: Arr, c: "_Ctx", p: Prof, w: Scalar) -> None:
        top = 0.93
        bottom = min(self.z_top_r, self.z_top_l) / self.L - 0.02
        sk = c.zwindow((bottom - 0.03) * self.L, (top + 0.03) * self.L)
        if sk is None:
            return
        ps = p.sub(sk)
        u = ps.u
        present = smoothstep(bottom - 0.02, bottom + 0.02, u) * (1.0 - smoothstep(top, top + 0.02, u))
        manub = smoothstep(0.74, 0.8, u)
        hw = F32(self.sternum_w) * (1.0 + 0.7 * manub)
        ht = F32(5.5) + 2.5 * manub
        ys = ps.y_c - ps.b_ant - ht - F32(1.5)
        win = c.window(-float(hw.max()) - 3.0, float(hw.max()) + 3.0, float(ys.min() - ht.max()) - 3.0, float(ys.max() + ht.max()) + 3.0)
        if win is None:
            return
        _, sy, sx = win
        X, Y = c.X[:, :, sx], c.Y[:, sy, :]
        hv = hu[sk, sy, sx]
        st = ellipse_sdf(X, Y - ys, hw, ht)
        st = np.where(present > 0.5, st, BIG)
        lerp_(hv, F32(self.hu["bone_cortex"] * 0.75), soft(st, w))
        lerp_(hv, F32(self.hu["marrow"]), soft(st + 1.6, w))
        hu[sk, sy, sx] = hv

    def _abdomen(self, hc: Arr, c: "_Ctx", cy: slice, cx: slice, p: Prof, cage: Arr, w: Scalar) -> None:
        h = self.hu
        zmax = max(self.z_top_r, self.z_top_l) + 2.0
        sk = c.zwindow(-1e4, zmax)
        if sk is None:
            return
        X, Y, Z = c.X[:, :, cx], c.Y[:, cy, :], c.Z[sk]
        ps = p.sub(sk)
        hv = hc[sk]
        cg = cage[sk]
        zr, _ = self.dome(X, Y, True)
        zl, _ = self.dome(X, Y, False)
        zd = np.where(X < 0, zr, zl)
        lerp_(hv, F32(h["muscle"]), soft(Z - zd, 2.0) * soft(cg + 1.0, w))  # diaphragm
        lerp_(hv, F32(h["abd_fat"]), soft(Z - zd + 5.0, 2.0) * soft(cg + 3.0, w))
        # liver: right of a line from the anterior left to the posterior right of the spine
        t = np.clip((Y - (ps.y_c - ps.b_ant)) / (ps.b_ant + ps.b_post), 0.0, 1.0)
        x_edge = F32(0.3 * self.A) * (1.0 - t) + (-F32(self.r_vb + 14.0)) * t
        liv = np.maximum(np.maximum(X - x_edge, cg + 4.0), Z - zd + 7.0)
        liver_hu = F32(h["liver"]) + F32(6.0) * self.tex_b.grid(c.zs[sk], Y.ravel(), X.ravel())
        lerp_(hv, liver_hu, soft(liv, 2.5))
        # stomach with an air cap (supine: air rises anteriorly), spleen, kidneys
        sx_, sy_, sz_ = 0.45 * self.A, -0.05 * self.Ba, self.z_top_l - 45.0
        ks = np.sqrt(np.clip(1.0 - ((Z - F32(sz_)) / F32(50.0)) ** 2, 0.0, 1.0)).astype(F32)
        if float(ks.max()) > 0.02:
            sto = ellipse_sdf(X - F32(sx_), Y - F32(sy_), F32(0.36 * self.A) * ks + 0.01, F32(0.42 * self.Ba) * ks + 0.01)
            sto = np.maximum(np.where(ks > 0.02, sto, BIG), Z - zd + 6.0)
            lerp_(hv, F32(h["muscle"]), soft(sto, w))
            lerp_(hv, F32(h["stomach"]), soft(sto + 3.0, w))
            if h["stomach_air"] > 0:
                lerp_(hv, F32(h["air"]), soft(np.maximum(sto + 3.0, Y - F32(sy_ - 0.12 * self.Ba)), w))
        kp = np.sqrt(np.clip(1.0 - ((Z - F32(self.z_top_l - 60.0)) / F32(55.0)) ** 2, 0.0, 1.0)).astype(F32)
        if float(kp.max()) > 0.02:
            spl = ellipse_sdf(X - F32(0.66 * self.A), Y - ps.y_c - 0.55 * ps.b_post, F32(0.2 * self.A) * kp + 0.01, F32(0.3 * self.Bp) * kp + 0.01)
            spl = np.maximum(np.where(kp > 0.02, spl, BIG), Z - zd + 6.0)
            lerp_(hv, F32(h["spleen"]), soft(spl, w))
        kk = np.sqrt(np.clip(1.0 - ((Z - F32(-75.0)) / F32(55.0)) ** 2, 0.0, 1.0)).astype(F32)
        if float(kk.max()) > 0.02:
            kid = ellipse_sdf(np.abs(X) - F32(self.r_vb + 42.0), Y - ps.y_vb, F32(26.0) * kk + 0.01, F32(22.0) * kk + 0.01)
            lerp_(hv, F32(h["kidney"]), soft(np.where(kk > 0.02, kid, BIG), w))
        hc[sk] = hv

    def _heart(self, hc: Arr, heart_out: Arr, c: "_Ctx", cy: slice, cx: slice, p: Prof, w: Scalar) -> bool:
        h = self.hu
        hx, hy, hz, ha, hb, hc_, ang = self.heart
        sk = c.zwindow(hz - hc_, hz + hc_)
        if sk is None:
            return False
        r = max(ha, hb) + 3.0
        ys, xs = c.ys[cy], c.xs[cx]
        j0, j1 = np.searchsorted(ys, hy - r), np.searchsorted(ys, hy + r)
        i0, i1 = np.searchsorted(xs, hx - r), np.searchsorted(xs, hx + r)
        if j1 <= j0 or i1 <= i0:
            return False
        X = c.X[:, :, cx][:, :, i0:i1]
        Y = c.Y[:, cy, :][:, j0:j1, :]
        Z = c.Z[sk]
        heart = self.heart_sdf(X, Y, Z)
        heart_out[sk, j0:j1, i0:i1] = heart
        hv = hc[sk, j0:j1, i0:i1]
        inside = soft(heart, w)
        lerp_(hv, F32(h["med_fat"]), inside)
        lerp_(hv, F32(h["pericard"]), soft(np.abs(heart + 0.6) - 0.7, w))
        tex = self.tex_a.grid(c.zs[sk], Y.ravel(), X.ravel())
        epi = F32(self.epi_fat) * (1.0 + 0.8 * tex)
        myo = heart + np.clip(epi, 0.5, None) + F32(1.0)
        lerp_(hv, F32(h["myocardium"]), soft(myo, w))
        if self.contrast:
            ca, sa = math.cos(ang), math.sin(ang)
            for (ox, oy, oz, sx, sy, sz) in ((0.22, 0.1, -0.05, 0.42, 0.42, 0.62), (-0.35, -0.3, -0.1, 0.38, 0.32, 0.6),
                                             (-0.55, 0.25, 0.15, 0.3, 0.35, 0.45), (0.05, 0.62, 0.4, 0.3, 0.28, 0.35)):
                cxx = hx + ha * (ox * ca - oy * sa)
                cyy = hy + hb * (ox * sa + oy * ca)
                czz = hz + hc_ * oz
                kc = np.sqrt(np.clip(1.0 - ((Z - F32(czz)) / F32(hc_ * sz)) ** 2, 0.0, 1.0)).astype(F32)
                if float(kc.max()) <= 0.02:
                    continue
                dx = X - F32(cxx)
                dy = Y - F32(cyy)
                ch = ellipse_sdf(F32(ca) * dx + F32(sa) * dy, -F32(sa) * dx + F32(ca) * dy, F32(ha * sx) * kc + 0.01, F32(hb * sy) * kc + 0.01)
                ch = np.maximum(np.where(kc > 0.02, ch, BIG), myo + 3.0)
                lerp_(hv, F32(h["blood_heart"]), soft(ch, w))
        hc[sk, j0:j1, i0:i1] = hv
        return True


class _Ctx:
    """Broadcastable coordinates of a chunk grid and helpers to cut windows out of it."""

    def __init__(self, g: Grid) -> None:
        self.zs = g.z
        self.ys = g.y0 + np.arange(g.h) * g.px
        self.xs = g.x0 + np.arange(g.w) * g.px
        self.Z = g.z.astype(F32).reshape(-1, 1, 1)
        self.Y = self.ys.astype(F32).reshape(1, -1, 1)
        self.X = self.xs.astype(F32).reshape(1, 1, -1)

    def window(self, xlo: float, xhi: float, ylo: float, yhi: float) -> tuple[slice, slice, slice] | None:
        i0, i1 = int(np.searchsorted(self.xs, xlo)), int(np.searchsorted(self.xs, xhi))
        j0, j1 = int(np.searchsorted(self.ys, ylo)), int(np.searchsorted(self.ys, yhi))
        if i1 <= i0 or j1 <= j0:
            return None
        return slice(0, self.zs.size), slice(j0, j1), slice(i0, i1)

    def zwindow(self, zlo: float, zhi: float) -> slice | None:
        k0, k1 = int(np.searchsorted(self.zs, zlo)), int(np.searchsorted(self.zs, zhi, side="right"))
        return slice(k0, k1) if k1 > k0 else None


# ---------------------------------------------------------------------------- sampling

def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def sample_anatomy(rng: np.random.Generator, *, px: float, contrast: bool | None, lo: tuple[float, float, float],
                   hi: tuple[float, float, float], scale: float | None = None, lung_height: float | None = None) -> Anatomy:
    """Draw one random patient. ``px`` (mm) sets how fine the vessel trees go; ``lo``/``hi`` (z, y, x) bound noise lattices."""
    s = scale if scale is not None else _u(rng, 0.86, 1.12)
    L = lung_height if lung_height is not None else float(np.clip(245.0 * s * _u(rng, 0.9, 1.1), 185.0, 310.0))
    A = 140.0 * s * _u(rng, 0.93, 1.07)
    Ba = 86.0 * s * _u(rng, 0.88, 1.12)
    Bp = 96.0 * s * _u(rng, 0.9, 1.1)
    obese = float(rng.beta(1.6, 3.0))
    fat_lat = 6.0 + 40.0 * obese
    fat_ant = 5.0 + 30.0 * obese
    fat_post = 4.0 + 22.0 * obese
    contrast = bool(rng.random() < 0.35) if contrast is None else contrast
    r_vb = 17.5 * s * _u(rng, 0.9, 1.1)
    r_tr = _u(rng, 7.5, 10.5) * s
    z_top_r = L * _u(rng, 0.22, 0.32)
    z_top_l = z_top_r - L * _u(rng, 0.01, 0.06)
    z_car = L * _u(rng, 0.58, 0.66)
    ha, hb, hc = 62.0 * s * _u(rng, 0.85, 1.2), 50.0 * s * _u(rng, 0.85, 1.15), 52.0 * s * _u(rng, 0.85, 1.15)
    heart = (0.16 * A + _u(rng, -6, 8), -0.33 * Ba + _u(rng, -5, 5), z_top_l + 0.55 * hc - 8.0, ha, hb, hc, math.radians(_u(rng, 25, 45)))
    female = rng.random() < 0.35
    breasts = None
    if female:
        bax = _u(rng, 45, 70) * s
        breasts = (0.45 * A + _u(rng, -5, 10), _u(rng, 12.0, 25.0), L * _u(rng, 0.28, 0.42), bax, _u(rng, 12.0, 32.0) * (0.6 + obese))
    hu = {
        "air": -1000.0,
        "fat": _u(rng, -115, -90),
        "gland": _u(rng, -20, 35),
        "skin": _u(rng, 20, 50),
        "muscle": _u(rng, 42, 58) + (12.0 if contrast else 0.0),
        "med_fat": _u(rng, -105, -75),
        "abd_fat": _u(rng, -110, -85),
        "bone_cortex": _u(rng, 750, 1150),
        "marrow": _u(rng, 150, 300),
        "vb_marrow": _u(rng, 200, 360),
        "bone_post": _u(rng, 400, 650),
        "scapula": _u(rng, 450, 800),
        "disc": _u(rng, 70, 110),
        "cord": _u(rng, 15, 35),
        "cartilage": _u(rng, 80, 180),
        "liver": _u(rng, 90, 125) if contrast else _u(rng, 48, 68),
        "spleen": _u(rng, 100, 130) if contrast else _u(rng, 40, 52),
        "kidney": _u(rng, 140, 200) if contrast else _u(rng, 28, 38),
        "stomach": _u(rng, 5, 30),
        "stomach_air": 1.0 if rng.random() < 0.7 else 0.0,
        "myocardium": _u(rng, 90, 120) if contrast else _u(rng, 40, 55),
        "blood_heart": _u(rng, 150, 320) if contrast else _u(rng, 35, 48),
        "pericard": _u(rng, 15, 40),
        "aorta": _u(rng, 160, 350) if contrast else _u(rng, 35, 50),
        "pulm_art": _u(rng, 150, 320) if contrast else _u(rng, 35, 50),
        "sys_vein": _u(rng, 130, 300) if contrast else _u(rng, 33, 48),
        "pulm_vein": _u(rng, 140, 300) if contrast else _u(rng, 35, 50),
        "soft": _u(rng, 25, 50),
        "thyroid": _u(rng, 80, 120) if not contrast else _u(rng, 120, 180),
        "trachea_wall": _u(rng, 10, 60),
        "esophagus": _u(rng, 30, 50),
        "calc": _u(rng, 300, 900),
        "table_core": _u(rng, -980, -850),
        "table_shell": _u(rng, 80, 300),
    }
    hu["artery"] = hu["pulm_art"] if contrast else _u(rng, 30, 60)
    hu["vein"] = hu["pulm_vein"] if contrast else _u(rng, 30, 55)
    table = (_u(rng, 0.0, 4.0), _u(rng, 0.0, 0.0012), _u(rng, 6, 22)) if rng.random() < 0.75 else None
    anat = Anatomy(
        L=L, A=A, Ba=Ba, Bp=Bp,
        fat_lat=fat_lat, fat_ant=fat_ant, fat_post=fat_post,
        wall_lat=_u(rng, 8, 14) * s, wall_ant=_u(rng, 8, 15) * s, wall_post=_u(rng, 45, 58) * s,
        shoulder=_u(rng, 0, 35) * s, belly=70.0 * obese * _u(rng, 0.5, 1.2), back_flat=_u(rng, 4, 16),
        r_vb=r_vb, vert_period=_u(rng, 23.0, 28.0) * L / 245.0, vert_phase=_u(rng, 0, 30), r_can=_u(rng, 6.5, 8.5),
        kyphosis=_u(rng, 0.0, 12.0),
        z_top_r=z_top_r, z_top_l=z_top_l, heart=heart, epi_fat=_u(rng, 1.5, 6.0) * (0.7 + obese),
        x_t=_u(rng, -4, 4), y_t=0.0, r_tr=r_tr, z_car=z_car, band=_u(rng, 1.2, 3.0),
        fiss_post=z_car + _u(rng, -15, 15), fiss_ant=_u(rng, 0.05, 0.2) * L, z_hf=z_car - _u(rng, 5, 35),
        fissure_hu=_u(rng, 0.0, 180.0) if rng.random() < 0.7 else 0.0,
        sternum_w=_u(rng, 12, 18) * s, breasts=breasts, table=table,
        lung_mu=_u(rng, -890, -845), lung_grad=_u(rng, 30, 90),
        hu=hu, contrast=contrast,
        tubes=TubeSet().freeze(), med=TubeSet().freeze(),
        # texture lattices no finer than the pixels can show (keeps small series fast)
        tex_a=NoiseField.create(rng, max(9.0, 2.5 * px), lo, hi), tex_b=NoiseField.create(rng, max(6.0, 2.0 * px), lo, hi),
        tex_c=NoiseField.create(rng, max(3.5, 1.5 * px), lo, hi),
    )
    # trachea sits in front of the oesophagus, which sits in front of the spine
    p_car = anat.prof(np.array([z_car], dtype=F32))
    anat.y_t = float(p_car.y_vb[0] - r_vb - 16.0 - r_tr)
    _build_tubes(anat, rng, px)
    return anat


def _cage_point(anat: Anatomy, theta: float, z: float, off: float, right: bool) -> NDArray[Any]:
    """Point on the cage outline at angle theta from the posterior midline, pushed ``off`` mm outward."""
    p = anat.prof(np.array([z], dtype=F32))
    a = float(p.a_c[0])
    b = float(p.b_post[0]) if math.cos(theta) >= 0 else float(p.b_ant[0])
    x = (a + off) * math.sin(theta)
    y = float(p.y_c[0]) + (b + off) * math.cos(theta)
    return np.array([-x if right else x, y, z])


def _lung_point_sdf(anat: Anatomy, pts: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
    X = pts[:, 0].astype(F32)
    Y = pts[:, 1].astype(F32)
    Z = pts[:, 2].astype(F32)
    p = anat.prof(Z)
    t = anat.med.point_sdf(pts).astype(F32) if len(anat.med) else np.full(len(pts), BIG, dtype=F32)
    r, l = anat.lung_sdfs(X, Y, Z, p, t)
    return r.astype(np.float64), l.astype(np.float64)


def lung_point_sdf(anat: Anatomy, pts: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
    """Signed distance of scattered (n, 3) points to the right and left lung."""
    return _lung_point_sdf(anat, pts)


def cage_point_sdf(anat: Anatomy, pts: NDArray[Any]) -> NDArray[Any]:
    """Signed distance of points to the inner chest wall (costal pleura), ignoring the mediastinum."""
    X = pts[:, 0].astype(F32)
    Y = pts[:, 1].astype(F32)
    p = anat.prof(pts[:, 2].astype(F32))
    b = np.where(Y < p.y_c, p.b_ant, p.b_post)
    return ellipse_sdf(X, Y - p.y_c, p.a_c, b).astype(np.float64)


def sample_in_lung(anat: Anatomy, rng: np.random.Generator, n: int, right: bool, depth: float = 0.0,
                   max_depth: float | None = None) -> NDArray[Any]:
    """``n`` uniform random points inside one lung, at least ``depth`` mm from its surface."""
    out: list[NDArray[Any]] = []
    got = 0
    x_lo, x_hi = (-anat.A - 5.0, 0.0) if right else (0.0, anat.A + 5.0)
    for _ in range(60):
        m = max(4 * (n - got), 64)
        pts = np.column_stack([rng.uniform(x_lo, x_hi, m), rng.uniform(-anat.Ba - 5.0, anat.Bp + 15.0, m), rng.uniform(0.0, anat.L, m)])
        sr, sl = _lung_point_sdf(anat, pts)
        sd = sr if right else sl
        ok = sd < -depth
        if max_depth is not None:
            ok &= sd > -max_depth
        out.append(pts[ok])
        got += int(ok.sum())
        if got >= n:
            break
    allp = np.concatenate(out) if out else np.zeros((0, 3))
    return allp[:n]


def _bezier(p0: NDArray[Any], p1: NDArray[Any], p2: NDArray[Any], n: int = 8) -> NDArray[Any]:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _build_tubes(anat: Anatomy, rng: np.random.Generator, px: float) -> None:
    """Ribs, great vessels, airways and the pulmonary vessel trees."""
    ts = TubeSet()
    med = TubeSet()
    L, A, s = anat.L, anat.A, anat.A / 128.0
    z_hi = L + 120.0
    z_lo = -160.0
    hx, hy, hz, ha, hb, hc, ang = anat.heart
    pc = anat.prof(np.array([anat.z_car], dtype=F32))
    y_vb = float(pc.y_vb[0])
    r_vb = anat.r_vb

    def both(a: NDArray[Any] | list[float], b: NDArray[Any] | list[float], r: float, rb: float, m: Mat, margin: float) -> None:
        ts.add(np.asarray(a), np.asarray(b), r, rb, int(m))
        med.add(np.asarray(a), np.asarray(b), r + margin, rb + margin, 0)

    def poly(pts: NDArray[Any], r: float, m: Mat, margin: float) -> None:
        for i in range(len(pts) - 1):
            both(pts[i], pts[i + 1], r, r, m, margin)

    # --- trachea and main bronchi
    xt, yt, rt = anat.x_t, anat.y_t, anat.r_tr
    top = np.array([xt, yt - 12.0, z_hi])
    car = np.array([xt, yt, anat.z_car])
    both(top, car, rt + 1.8, rt + 1.8, Mat.TRACHEA_WALL, 5.0)
    ts.add(top, car, rt, rt, int(Mat.TRACHEA_AIR))
    # --- oesophagus
    p_hi = anat.prof(np.array([z_hi], dtype=F32))
    eso = np.array([[xt + 4.0, float(p_hi.y_vb[0]) - r_vb - 7.0, z_hi],
                    [6.0, y_vb - r_vb - 7.0, anat.z_car],
                    [14.0, y_vb - r_vb - 10.0, anat.z_top_l + 10.0],
                    [0.35 * A, -0.05 * anat.Ba, anat.z_top_l - 40.0]])
    poly(eso, 6.5 * s, Mat.SOFT, 5.0)
    if rng.random() < 0.4:
        ts.add(eso[0], eso[1], 1.8, 1.8, int(Mat.TRACHEA_AIR))
    # --- aorta
    r_ao = _u(rng, 12.5, 16.5) * s
    z_arch = max(L * _u(rng, 0.68, 0.76), anat.z_car + 2.0 * r_ao)
    y_asc = hy - 0.35 * hb
    x_desc = r_vb * 0.8 + r_ao * 0.6 + 5.0
    y_desc = y_vb - 0.55 * r_vb
    root = np.array([hx - 0.45 * ha, hy - 0.1 * hb, hz + 0.3 * hc])
    a1 = np.array([-0.35 * r_ao - 8.0, y_asc, z_arch - r_ao])
    arch = _bezier(a1, np.array([0.0, 0.5 * (y_asc + y_desc) - 10.0, z_arch + 1.5 * r_ao]), np.array([x_desc, y_desc, z_arch - r_ao]), 9)
    pts = np.vstack([root, a1 + [0, 0, -0.01], arch[1:], [[x_desc - 2.0, y_desc + 2.0, anat.z_top_l - 10.0]],
                     [[x_desc * 0.4, y_vb - r_vb - 0.7 * r_ao, z_lo]]])
    poly(pts, r_ao, Mat.AORTA, 7.0)
    amid = arch[4]
    for dx, dy, r, lat in ((-0.4 * r_ao, -0.3 * r_ao, 6.0, -25.0), (0.05 * r_ao, 0.0, 4.2, 12.0), (0.4 * r_ao, 0.35 * r_ao, 5.0, 40.0)):
        b0 = amid + np.array([dx * 2.0, dy * 2.0, 0.0])
        both(b0, b0 + np.array([lat * 0.4, -6.0, 35.0]), r * s, r * s, Mat.AORTA, 5.0)
        both(b0 + np.array([lat * 0.4, -6.0, 35.0]), b0 + np.array([lat, -8.0, z_hi - z_arch]), r * s, r * s, Mat.AORTA, 5.0)
    # --- superior vena cava, brachiocephalic veins, azygos, inferior vena cava
    r_svc = _u(rng, 8.0, 11.0) * s
    x_svc = a1[0] - r_ao - r_svc - 3.0
    ra_pt = np.array([hx - 0.75 * ha, hy + 0.1 * hb, hz + 0.25 * hc])
    svc_top = np.array([x_svc, y_asc + 4.0, z_arch + 28.0])
    both(ra_pt, np.array([x_svc, y_asc + 4.0, z_arch - 20.0]), r_svc, r_svc, Mat.SYS_VEIN, 5.0)
    both(np.array([x_svc, y_asc + 4.0, z_arch - 20.0]), svc_top, r_svc, r_svc, Mat.SYS_VEIN, 5.0)
    both(svc_top, svc_top + np.array([-20.0, 0.0, z_hi - svc_top[2]]), 7.0 * s, 7.0 * s, Mat.SYS_VEIN, 2.0)
    lbv = np.array([45.0 * s, y_asc - 18.0, z_arch + 34.0])
    both(svc_top, lbv, 6.0 * s, 6.0 * s, Mat.SYS_VEIN, 2.0)
    both(lbv, lbv + np.array([20.0, 0.0, z_hi - lbv[2]]), 6.0 * s, 6.0 * s, Mat.SYS_VEIN, 2.0)
    az = [np.array([-6.0, y_vb - r_vb * 0.7, z_lo]), np.array([-8.0, y_vb - r_vb * 0.75, anat.z_car - 10.0]),
          np.array([x_svc + 2.0, y_vb - r_vb - 14.0, z_arch - 6.0]), np.array([x_svc, y_asc + 8.0, z_arch - 12.0])]
    for i in range(3):
        both(az[i], az[i + 1], 3.5 * s, 3.5 * s, Mat.SYS_VEIN, 1.5)
    ivc0 = np.array([hx - 0.55 * ha, hy + 0.35 * hb, hz - 0.55 * hc])
    both(ivc0, np.array([-22.0, y_vb - r_vb - 12.0, z_lo]), 11.0 * s, 11.0 * s, Mat.SYS_VEIN, 3.0)
    # --- lymph nodes, thyroid, coronary calcium
    for _ in range(int(rng.integers(1, 5))):
        c = car + np.array([_u(rng, -25, 25), _u(rng, -15, 20), _u(rng, -30, 30)])
        r = _u(rng, 3.0, 7.0)
        both(c, c + [0, 0, r * 0.6], r, r, Mat.SOFT, 2.0)
    for sgn in (-1.0, 1.0):
        c = np.array([xt + sgn * (rt + 11.0), yt - 8.0, L + 35.0])
        ts.add(c, c + [0, 0, 35.0], 9.0 * s, 9.0 * s, int(Mat.THYROID))
    if rng.random() < 0.3:
        for _ in range(int(rng.integers(1, 4))):
            c = np.array([hx + _u(rng, -0.6, 0.2) * ha, hy - _u(rng, 0.3, 0.9) * hb, hz + _u(rng, 0.0, 0.5) * hc])
            ts.add(c, c + rng.normal(0, 4.0, 3), 1.3, 1.0, int(Mat.CALC))

    # --- pulmonary trunk (the hilar branches are added once the hila are known)
    r_pt = _u(rng, 11.0, 14.0) * s
    pt0 = np.array([hx - 0.05 * ha, hy - 0.75 * hb, hz + 0.5 * hc])
    bif = np.array([14.0, y_asc + 0.8 * r_ao, anat.z_car - 12.0])
    both(pt0, bif, r_pt, r_pt, Mat.PULM_ART, 6.0)
    anat.med = med.freeze()

    # --- hila: where the main bronchi, pulmonary arteries and veins enter each lung
    z_hr = anat.z_car - 20.0
    z_hl = anat.z_car - 32.0
    xh = 0.26 * A + 8.0
    h_r = np.array([-xh, yt + 3.0, z_hr])
    h_l = np.array([xh + 6.0, yt + 6.0, z_hl])
    rb_r, rb_l = rt * 0.78, rt * 0.68
    both(car, h_r, rb_r + 1.5, rb_r + 1.5, Mat.TRACHEA_WALL, 2.0)
    ts.add(car, h_r, rb_r, rb_r, int(Mat.TRACHEA_AIR))
    both(car, h_l, rb_l + 1.5, rb_l + 1.5, Mat.TRACHEA_WALL, 2.0)
    ts.add(car, h_l, rb_l, rb_l, int(Mat.TRACHEA_AIR))
    xb_r, xb_l, y_h = -xh, xh + 6.0, yt
    r_pa = _u(rng, 8.5, 11.0) * s
    ha_r = np.array([xb_r - 2.0, y_h - 14.0, z_hr + 6.0])
    ha_l = np.array([xb_l + 2.0, y_h - 2.0, z_hl + 16.0])
    both(bif, np.array([-10.0, y_h - 12.0, z_hr + 8.0]), r_pa, r_pa, Mat.PULM_ART, 3.0)
    both(np.array([-10.0, y_h - 12.0, z_hr + 8.0]), ha_r, r_pa, r_pa * 0.9, Mat.PULM_ART, 3.0)
    both(bif, np.array([xb_l - 8.0, y_h - 4.0, z_hl + 24.0]), r_pa, r_pa * 0.9, Mat.PULM_ART, 3.0)
    both(np.array([xb_l - 8.0, y_h - 4.0, z_hl + 24.0]), ha_l, r_pa * 0.9, r_pa * 0.9, Mat.PULM_ART, 3.0)
    la = np.array([hx - 0.1 * ha, hy + 0.75 * hb, hz + 0.35 * hc])
    hv = {}
    for key, right, dz, dy in (("rs", True, -18.0, -14.0), ("ri", True, -48.0, 6.0), ("ls", False, -14.0, -12.0), ("li", False, -44.0, 8.0)):
        z = (z_hr if right else z_hl) + dz
        xb = la[0] - 30.0 if right else la[0] + 26.0
        hv[key] = np.array([xb, y_h + dy, z])
        both(la, hv[key], 6.5 * s, 6.0 * s, Mat.PULM_VEIN_MED, 2.0)
    anat.hila = {"bronchus_r": h_r, "bronchus_l": h_l, "artery_r": ha_r, "artery_l": ha_l, **{f"vein_{k}": v for k, v in hv.items()}}
    anat.med = med.freeze()

    # --- ribs and costal cartilages, clavicles
    _ribs(anat, ts, rng)

    # --- intrapulmonary trees
    r_min = max(0.3, 0.28 * px)
    n_t = int(np.clip(2200.0 * (0.7 / max(px, 0.35)), 300, 2400))
    for right, key in ((True, "r"), (False, "l")):
        vol_scale = 1.0 if right else 0.85
        tg = sample_in_lung(anat, rng, int(n_t * vol_scale), right, depth=4.0)
        anat.vessel_targets[key] = tg
        style = TreeStyle(r_leaf=_u(rng, 0.36, 0.44), gamma=_u(rng, 0.43, 0.48), r_max=r_pa * 0.55, r_min=r_min)
        nodes = grow_tree(rng, anat.hila[f"artery_{key}"], tg, style)
        tree_to_tubes(nodes, ts, int(Mat.ARTERY), rng)
        ref = np.array([0.3 if right else -0.3, 0.8, 0.5])
        anat.airway_lumens[key] = airway_from_tree(nodes, anat.hila[f"bronchus_{key}"], ref, ts, int(Mat.AW_WALL), int(Mat.AW_LUMEN),
                                                   r_min=max(0.9, 0.5 * px), ratio=_u(rng, 0.85, 1.05))
        tv = sample_in_lung(anat, rng, int(n_t * vol_scale * 0.8), right, depth=4.0)
        half = len(tv) // 2
        sup, inf = (("rs", "ri") if right else ("ls", "li"))
        order = np.argsort(tv[:, 2])
        vs = TreeStyle(r_leaf=style.r_leaf, gamma=style.gamma, r_max=5.0 * s, r_min=r_min)
        tree_to_tubes(grow_tree(rng, anat.hila[f"vein_{inf}"], tv[order[:half]], vs), ts, int(Mat.VEIN), rng)
        tree_to_tubes(grow_tree(rng, anat.hila[f"vein_{sup}"], tv[order[half:]], vs), ts, int(Mat.VEIN), rng)
    anat.tubes = ts.freeze()


def _ribs(anat: Anatomy, ts: TubeSet, rng: np.random.Generator) -> None:
    """Twelve rib pairs that slope down anteriorly, costal cartilages, clavicles."""
    L = anat.L
    period = anat.vert_period * _u(rng, 0.95, 1.08)
    z1 = L + _u(rng, -8.0, 6.0)
    r_rib = _u(rng, 4.0, 5.5) * anat.A / 128.0
    cortex = _u(rng, 1.2, 1.9)
    theta0 = 0.2
    for k in range(12):
        zk = z1 - k * period
        if k == 0:
            drop, t_end, cart = 14.0, 2.55, 0.35
        elif k < 7:
            drop, t_end, cart = _u(rng, 50, 75), 2.6, 0.35
        elif k < 10:
            drop, t_end, cart = _u(rng, 45, 65), 2.35 - 0.08 * (k - 7), 0.3
        else:
            drop, t_end, cart = 25.0, 1.2 if k == 10 else 0.9, 0.0
        for right in (True, False):
            thetas = np.linspace(theta0, t_end, 16)
            frac = (thetas - theta0) / (math.pi - theta0)
            zz = zk - drop * frac**1.25
            off = r_rib + 1.5
            pts = np.array([_cage_point(anat, float(t), float(z), off, right) for t, z in zip(thetas, zz)])
            # rib head and neck reach the vertebral body
            p0 = anat.prof(np.array([zk], dtype=F32))
            head = np.array([(-1.0 if right else 1.0) * (anat.r_vb + 1.0), float(p0.y_vb[0]) + 0.55 * anat.r_vb, zk + 3.0])
            pts = np.vstack([head, pts])
            for i in range(len(pts) - 1):
                ts.add(pts[i], pts[i + 1], r_rib, r_rib, int(Mat.BONE_CORTEX))
                ts.add(pts[i], pts[i + 1], r_rib - cortex, r_rib - cortex, int(Mat.BONE_MARROW))
            if cart > 0:
                end = pts[-1]
                ps = anat.prof(np.array([end[2]], dtype=F32))
                tgt_z = end[2] + (8.0 if k >= 6 else -4.0)
                st = np.array([(-1.0 if right else 1.0) * (anat.sternum_w + 4.0), float(ps.y_c[0] - ps.b_ant[0]) - 6.0, tgt_z])
                mid = 0.5 * (end + st) + np.array([0.0, -6.0, 0.0])
                for a, b in ((end, mid), (mid, st)):
                    ts.add(a, b, r_rib * 0.95, r_rib * 0.95, int(Mat.CARTILAGE))
    # clavicles
    zc = L + _u(rng, -5.0, 12.0)
    pcl = anat.prof(np.array([zc], dtype=F32))
    for sgn in (-1.0, 1.0):
        med_end = np.array([sgn * (anat.sternum_w + 8.0), float(pcl.y_c[0] - pcl.b_ant[0]) - 14.0, zc])
        lat_end = np.array([sgn * (float(pcl.a_c[0]) + 55.0), float(pcl.y_c[0]) - 5.0, zc + 18.0])
        mid = 0.5 * (med_end + lat_end) + np.array([0.0, -12.0, 0.0])
        for a, b in ((med_end, mid), (mid, lat_end)):
            ts.add(a, b, 6.5, 6.5, int(Mat.BONE_CORTEX))
            ts.add(a, b, 4.8, 4.8, int(Mat.BONE_MARROW))
