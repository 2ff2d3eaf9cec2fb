"""Phantom specification and volume rendering (HU volume plus exact lung and lesion labels).

Rendering, per chunk of output slices:

1. each output slice is a slab ``slice_thickness_mm`` thick, sampled at a few sub-slice positions
   (partial volume along z) that are averaged at the end;
2. smooth anatomy and lesion fields are evaluated on a coarse in-plane grid (2x coarser for
   sub-millimetre pixels) and bilinearly upsampled;
3. tubes (vessels, airways, ribs, great vessels, small lesions) are stamped at full resolution and
   composited inside or outside the lungs by material;
4. labels are the majority of the averaged partial-volume fractions, so they match the HU exactly;
5. the reconstruction kernel (edge softness, unsharp masking for sharp kernels) and CT-like noise
   with a kernel-dependent noise power spectrum are applied.

Arrays are indexed (z, y, x): z from feet to head, y from anterior to posterior, x from the
patient's right to the patient's left, i.e. the standard axial display of a head-first-supine scan.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from ._fields import blur121, lerp_, upsample2
from .anatomy import LUNG_ORDER, OUTSIDE_ORDER, Anatomy, Mat, sample_anatomy
from .lesions import VARIANTS, LesionModel, sample_lesions
from .tubes import Grid, Tubes, stamp

log = logging.getLogger(__name__)

Kind = Literal["covid", "pneumonia", "normal"]
Kernel = Literal["smooth", "standard", "sharp"]
KINDS: tuple[str, ...] = ("covid", "pneumonia", "normal")
KERNELS: tuple[str, ...] = ("smooth", "standard", "sharp")
THICKNESSES = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
F32 = np.float32
HU_MIN, HU_MAX = -1024, 3071


@dataclass(frozen=True)
class PhantomSpec:
    """What to render. ``None`` fields are drawn at random from ``seed`` (and recorded in ``Phantom.params``).

    The series spans the lungs plus ``margin_above_mm``/``margin_below_mm``; without
    ``slice_spacing_mm`` the spacing is chosen so that ``slices`` cover exactly that range, with it
    the range is centred on the lungs (and may cut them when too short).
    """

    kind: Kind = "normal"
    slices: int = 64
    matrix: int = 256
    pixel_spacing_mm: float | None = None
    slice_spacing_mm: float | None = None
    slice_thickness_mm: float | None = None
    seed: int = 0
    margin_above_mm: float | None = None
    margin_below_mm: float | None = None
    variant: str | None = None
    kernel: Kernel | None = None
    noise_hu: float | None = None
    contrast: bool | None = None
    severity: float | None = None
    fov_circle: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.variant is not None and self.variant not in VARIANTS[self.kind]:
            raise ValueError(f"variant for {self.kind!r} must be one of {VARIANTS[self.kind]}, got {self.variant!r}")
        if self.kernel is not None and self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if not 1 <= self.slices <= 2000:
            raise ValueError("slices must be between 1 and 2000")
        if not 32 <= self.matrix <= 1024:
            raise ValueError("matrix must be between 32 and 1024")
        for name in ("pixel_spacing_mm", "slice_spacing_mm", "slice_thickness_mm"):
            v = getattr(self, name)
            if v is not None and not 0.1 <= v <= 20.0:
                raise ValueError(f"{name} must be between 0.1 and 20 mm")
        if self.noise_hu is not None and not 0.0 <= self.noise_hu <= 200.0:
            raise ValueError("noise_hu must be between 0 and 200")
        if self.severity is not None and not 0.0 < self.severity <= 1.0:
            raise ValueError("severity must be in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy."""
        return asdict(self)


@dataclass
class Phantom:
    """A rendered phantom: HU volume and labels, indexed (z, y, x) as described in the module doc.

    ``lungs``: 0 background, 1 right lung, 2 left lung (patient sides; column 0 is the patient's
    right). ``lesions``: 0 none, 1 ground-glass, 2 consolidation; always inside ``lungs``.
    ``origin_mm`` is the LPS position (x, y, z) of voxel [0, 0, 0]; ``spacing_mm`` is (z, y, x).
    """

    hu: NDArray[np.int16]
    lungs: NDArray[np.uint8]
    lesions: NDArray[np.uint8]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    spec: PhantomSpec
    volumes_ml: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def z_positions_mm(self) -> NDArray[Any]:
        """LPS z of each slice (array order, feet to head)."""
        return self.origin_mm[2] + np.arange(self.hu.shape[0]) * self.spacing_mm[0]


def _noise_bank(rng: np.random.Generator, n: int, h: int, w: int, px: float, kernel: str) -> NDArray[Any]:
    """Unit-variance noise slices with a CT-like (ramp times apodisation) noise power spectrum."""
    fc = {"smooth": 0.28, "standard": 0.45, "sharp": 0.85}[kernel]  # cycles/mm
    white = rng.standard_normal((n, h, w), dtype=np.float32)
    fy = np.fft.fftfreq(h, d=px)[:, None]
    fx = np.fft.rfftfreq(w, d=px)[None, :]
    f = np.sqrt(fy * fy + fx * fx)
    amp = np.sqrt(f * np.exp(-((f / fc) ** 2)) + 1e-3 * fc).astype(np.float32)
    out = np.fft.irfft2(np.fft.rfft2(white) * amp, s=(h, w)).astype(np.float32)
    out /= out.std(axis=(1, 2), keepdims=True)
    return out


@dataclass
class _Plan:
    spec: PhantomSpec
    anat: Anatomy
    les: LesionModel
    tubes: Tubes
    values: dict[int, float]
    z_out: NDArray[Any]  # anatomical Z of output slices
    offsets: NDArray[Any]  # sub-slice offsets within a slab
    x0: float
    y0: float
    px: float
    n: int
    factor: int
    width: float
    width_lr: float
    kernel: str
    sharpen: float
    noise_hu: float
    bank: NDArray[Any]
    noise_pick: NDArray[np.int64]
    circle: NDArray[np.bool_] | None


def _resolve(spec: PhantomSpec) -> tuple[_Plan, dict[str, Any]]:
    ra = np.random.default_rng([spec.seed, 11])
    rr = np.random.default_rng([spec.seed, 22])
    rl = np.random.default_rng([spec.seed, 33, KINDS.index(spec.kind)])
    scale = float(ra.uniform(0.86, 1.12))
    lung_h = float(np.clip(245.0 * scale * ra.uniform(0.9, 1.1), 185.0, 310.0))
    above = spec.margin_above_mm if spec.margin_above_mm is not None else float(rr.uniform(5.0, 45.0))
    below = spec.margin_below_mm if spec.margin_below_mm is not None else float(rr.uniform(10.0, 70.0))
    total = lung_h + above + below
    n = spec.slices
    if spec.slice_spacing_mm is not None:
        spacing = float(spec.slice_spacing_mm)
    else:
        spacing = total / max(n - 1, 1)
    cover = spacing * (n - 1)
    if spec.slice_spacing_mm is None or cover >= total:
        z_lo = -below - max(cover - total, 0.0) / 2.0
    else:
        z_lo = (lung_h + above - below) / 2.0 - cover / 2.0
    z_out = z_lo + np.arange(n) * spacing
    if spec.slice_thickness_mm is not None:
        thick = float(spec.slice_thickness_mm)
    else:
        cands = [t for t in THICKNESSES if t >= spacing * 0.99] or list(THICKNESSES)
        thick = float(rr.choice(cands))
    half_w = 150.0 * scale + 30.0
    if spec.pixel_spacing_mm is not None:
        px = float(spec.pixel_spacing_mm)
    else:
        fov = float(np.clip(2.0 * half_w * rr.uniform(1.05, 1.3), 280.0, 500.0))
        px = fov / spec.matrix
    fov = px * spec.matrix
    kernel = spec.kernel if spec.kernel is not None else str(rr.choice(KERNELS, p=[0.35, 0.35, 0.3]))
    if spec.noise_hu is not None:
        noise = float(spec.noise_hu)
    else:
        lo, hi = {"smooth": (5.0, 25.0), "standard": (7.0, 32.0), "sharp": (12.0, 40.0)}[kernel]
        noise = float(np.exp(rr.uniform(np.log(lo), np.log(hi))))
    circle = spec.fov_circle if spec.fov_circle is not None else bool(rr.random() < 0.5)
    m = spec.matrix
    factor = 2 if (px < 1.0 and m % 2 == 0 and m >= 256) else 1
    psf = {"smooth": 1.5, "standard": 1.0, "sharp": 0.7}[kernel]
    width = max(px, psf)
    width_lr = max(width, 1.15 * px * factor)
    sharpen = float(rr.uniform(0.6, 1.3)) if kernel == "sharp" else 0.0
    h_target = max(1.25, min(px, 2.5))
    n_sub = int(np.clip(round(thick / h_target), 1, 4))
    offsets = ((np.arange(n_sub) + 0.5) / n_sub - 0.5) * thick
    # field of view centre: the body, slightly off-centre, table toward the bottom
    xc = float(rr.uniform(-12.0, 12.0))
    yc = float(rr.uniform(5.0, 35.0)) * scale
    x0 = xc - fov / 2.0 + px / 2.0
    y0 = yc - fov / 2.0 + px / 2.0
    zlo_box = min(float(z_out[0]) - thick, 0.0) - 30.0
    zhi_box = max(float(z_out[-1]) + thick, lung_h) + 30.0
    box_lo = (zlo_box, y0 - 30.0, x0 - 30.0)
    box_hi = (zhi_box, y0 + fov + 30.0, x0 + fov + 30.0)
    t0 = time.perf_counter()
    anat = sample_anatomy(ra, px=px, contrast=spec.contrast,
                          lo=box_lo, hi=box_hi, scale=scale, lung_height=lung_h)
    les = sample_lesions(rl, anat, spec.kind, spec.variant, spec.severity, box_lo, box_hi, px=px)
    log.debug("anatomy %d tubes, lesions %d tubes in %.2fs", len(anat.tubes), len(les.tubes), time.perf_counter() - t0)
    tubes = Tubes.concat([anat.tubes, les.tubes])
    values = _material_values(anat, les)
    if not anat.contrast:
        # unenhanced: arteries and veins have the same density, render them as one material
        values[Mat.VEIN] = values[Mat.ARTERY]
        mat = tubes.mat.copy()
        mat[mat == int(Mat.VEIN)] = int(Mat.ARTERY)
        tubes = Tubes(tubes.p0, tubes.p1, tubes.r0, tubes.r1, mat)
    rn = np.random.default_rng([spec.seed, 44])
    n_bank = int(min(6, max(2, n)))
    bank = _noise_bank(rn, n_bank, m, m, px, kernel) if noise > 0 else np.zeros((1, m, m), np.float32)
    pick = np.column_stack([rn.integers(0, len(bank), n), rn.integers(0, m, n), rn.integers(0, m, n), rn.integers(0, 4, n)])
    circ = None
    if circle:
        yy, xx = np.mgrid[0:m, 0:m]
        c = (m - 1) / 2.0
        circ = ((yy - c) ** 2 + (xx - c) ** 2) > (m / 2.0) ** 2
    z_shift = float(rr.uniform(-420.0, -180.0))
    y_shift = 0.0
    plan = _Plan(spec, anat, les, tubes, values, z_out, offsets, x0, y0, px, n, factor, width, width_lr, kernel, sharpen,
                 noise, bank, pick, circ)
    params: dict[str, Any] = {
        "kind": spec.kind,
        "variant": les.variant,
        "kernel": kernel,
        "noise_hu": round(noise, 2),
        "contrast": bool(anat.contrast),
        "slice_thickness_mm": thick,
        "slice_spacing_mm": spacing,
        "pixel_spacing_mm": px,
        "fov_mm": fov,
        "fov_circle": circle,
        "margin_above_mm": round(above, 1),
        "margin_below_mm": round(below, 1),
        "lung_height_mm": round(lung_h, 1),
        "body_scale": round(scale, 3),
        "sub_slices": n_sub,
        "render_factor": factor,
        "table": anat.table is not None,
        "breasts": anat.breasts is not None,
        "z_shift_mm": z_shift,
        "lesions": les.describe(),
        "n_tubes": len(tubes),
        # anatomical landmarks in LPS mm (for QA and tests)
        "landmarks_lps_mm": {
            "carina": [round(anat.x_t, 2), round(anat.y_t + y_shift, 2), round(anat.z_car + z_shift, 2)],
            "lung_apex_z": round(anat.L + z_shift, 2),
            "lung_base_z": round(z_shift, 2),
            "right_dome_z": round(anat.z_top_r + z_shift, 2),
            "left_dome_z": round(anat.z_top_l + z_shift, 2),
        },
    }
    return plan, params


def _material_values(anat: Anatomy, les: LesionModel) -> dict[int, float]:
    h = anat.hu
    return {
        Mat.ARTERY: h["artery"], Mat.VEIN: h["vein"], Mat.AW_WALL: h["trachea_wall"] - 20.0, Mat.AW_LUMEN: -990.0,
        Mat.BONE_CORTEX: h["bone_cortex"], Mat.BONE_MARROW: h["marrow"], Mat.CARTILAGE: h["cartilage"],
        Mat.AORTA: h["aorta"], Mat.PULM_ART: h["pulm_art"], Mat.SYS_VEIN: h["sys_vein"], Mat.SOFT: h["soft"],
        Mat.TRACHEA_WALL: h["trachea_wall"], Mat.TRACHEA_AIR: -1000.0, Mat.LES_GGO: les.hu["les_ggo"],
        Mat.LES_CONS: les.hu["les_cons"], Mat.NODULE: les.hu["nodule"], Mat.EMPH: les.hu["emph"], Mat.CALC: h["calc"],
        Mat.PULM_VEIN_MED: h["pulm_vein"], Mat.CALC_LUNG: les.hu["calc_lung"], Mat.THYROID: h["thyroid"],
    }


def _box(b: list[int]) -> tuple[slice, slice, slice]:
    return slice(b[0], b[1]), slice(b[2], b[3]), slice(b[4], b[5])


def _render_chunk(plan: _Plan, k0: int, k1: int, hu_out: NDArray[np.int16], lungs_out: NDArray[np.uint8],
                  les_out: NDArray[np.uint8]) -> NDArray[np.int64]:
    """Render output slices k0..k1 into the output arrays; returns joint label counts (lungs * 3 + lesions)."""
    m = plan.spec.matrix
    n_sub = plan.offsets.size
    zf = (plan.z_out[k0:k1, None] + plan.offsets[None, :]).ravel()
    nf = zf.size
    f = plan.factor
    g_lr = Grid(zf, plan.x0 + (f - 1) * plan.px / 2.0, plan.y0 + (f - 1) * plan.px / 2.0, plan.px * f, m // f, m // f)
    fields = plan.anat.render(g_lr, plan.width_lr)
    paren, ggo_lr, cons_lr = plan.les.render(fields, g_lr, plan.width_lr)
    lk, cy, cx = fields["win"]
    hu_lr = fields["hu"]
    shape = (nf, m, m)
    lung_r = np.zeros(shape, F32)
    lung_l = np.zeros(shape, F32)
    ggo = cons = None
    has_win = lk.stop > lk.start
    if has_win:
        lw = (lk, cy, cx)
        lr, ll = fields["lung_r"][lw], fields["lung_l"][lw]
        hv = hu_lr[lw]
        lerp_(hv, paren[lw], lr + ll)
        hu_lr[lw] = hv
        W = (lk, slice(cy.start * f, cy.stop * f), slice(cx.start * f, cx.stop * f))
        has_les = bool(ggo_lr[lw].any())
        if f == 2:
            lung_r[W] = upsample2(lr)
            lung_l[W] = upsample2(ll)
        else:
            lung_r[W] = lr
            lung_l[W] = ll
        if has_les:
            ggo = np.zeros(shape, F32)
            cons = np.zeros(shape, F32)
            ggo[W] = upsample2(ggo_lr[lw]) if f == 2 else ggo_lr[lw]
            cons[W] = upsample2(cons_lr[lw]) if f == 2 else cons_lr[lw]
    hu = upsample2(hu_lr) if f == 2 else hu_lr
    g = Grid(zf, plan.x0, plan.y0, plan.px, m, m)
    # materials that can appear in this chunk
    zmin, zmax = float(zf.min()), float(zf.max())
    t = plan.tubes
    rmax = np.maximum(t.r0, t.r1) + plan.width
    near = (np.minimum(t.p0[:, 2], t.p1[:, 2]) - rmax <= zmax) & (np.maximum(t.p0[:, 2], t.p1[:, 2]) + rmax >= zmin)
    mats = set(int(v) for v in np.unique(t.mat[near]))
    st = {mm: np.zeros(shape, dtype=F32) for mm in mats}
    boxes = stamp(t.select(near), g, plan.width, st)
    lung = lung_r + lung_l
    for mm in LUNG_ORDER:
        if int(mm) in boxes:
            bx = _box(boxes[int(mm)])
            hv = hu[bx]
            lerp_(hv, F32(plan.values[mm]), st[int(mm)][bx] * lung[bx])
            hu[bx] = hv
    for mm in OUTSIDE_ORDER:
        if int(mm) in boxes:
            bx = _box(boxes[int(mm)])
            hv = hu[bx]
            lerp_(hv, F32(plan.values[mm]), st[int(mm)][bx] * (1.0 - lung[bx]))
            hu[bx] = hv
    # lesion fractions (of the voxel); airway lumen carved out (air bronchograms are not lesion)
    small_g = boxes.get(int(Mat.LES_GGO))
    small_c = boxes.get(int(Mat.LES_CONS))
    if small_g is not None or small_c is not None:
        if ggo is None or cons is None:
            ggo = np.zeros(shape, F32)
            cons = np.zeros(shape, F32)
        for mm, dst in ((Mat.LES_CONS, (cons, ggo)), (Mat.LES_GGO, (ggo,))):
            if int(mm) in boxes:
                bx = _box(boxes[int(mm)])
                v = st[int(mm)][bx] * lung[bx]
                for d in dst:
                    np.maximum(d[bx], v, out=d[bx])
    if ggo is not None and cons is not None:
        np.maximum(ggo, cons, out=ggo)
        if int(Mat.AW_LUMEN) in boxes:
            bx = _box(boxes[int(Mat.AW_LUMEN)])
            keep = 1.0 - st[int(Mat.AW_LUMEN)][bx]
            ggo[bx] *= keep
            cons[bx] *= keep
    nk = k1 - k0
    if n_sub > 1:
        hu = hu.reshape(nk, n_sub, m, m).mean(axis=1)
        lung_r = lung_r.reshape(nk, n_sub, m, m).mean(axis=1)
        lung_l = lung_l.reshape(nk, n_sub, m, m).mean(axis=1)
        if ggo is not None and cons is not None:
            ggo = ggo.reshape(nk, n_sub, m, m).mean(axis=1)
            cons = cons.reshape(nk, n_sub, m, m).mean(axis=1)
    lsum = lung_r + lung_l
    lungs = np.where(lsum >= 0.5, np.where(lung_r >= lung_l, 1, 2), 0).astype(np.uint8)
    if ggo is not None and cons is not None:
        les = np.where(cons >= 0.5, 2, np.where(ggo >= 0.5, 1, 0)).astype(np.uint8)
        les[lungs == 0] = 0
    else:
        les = np.zeros((nk, m, m), np.uint8)
    if plan.sharpen > 0:
        hu = hu + F32(plan.sharpen) * (hu - blur121(hu, 2))
    if plan.noise_hu > 0:
        for i in range(nk):
            b, dy, dx, flip = plan.noise_pick[k0 + i]
            nz = np.roll(plan.bank[b], (int(dy), int(dx)), axis=(0, 1))
            if flip & 1:
                nz = nz[::-1]
            if flip & 2:
                nz = nz[:, ::-1]
            hu[i] += F32(plan.noise_hu) * nz
    if plan.circle is not None:
        hu[:, plan.circle] = HU_MIN
        lungs[:, plan.circle] = 0
        les[:, plan.circle] = 0
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    hu_out[k0:k1] = np.rint(hu).astype(np.int16)
    lungs_out[k0:k1] = lungs
    les_out[k0:k1] = les
    return np.bincount((lungs * np.uint8(3) + les).ravel(), minlength=9).astype(np.int64)


def make_phantom(spec: PhantomSpec) -> Phantom:
    """Render the phantom described by ``spec`` (deterministic for a given spec)."""
    t0 = time.perf_counter()
    plan, params = _resolve(spec)
    t1 = time.perf_counter()
    m, n = spec.matrix, spec.slices
    hu = np.empty((n, m, m), np.int16)
    lungs = np.empty((n, m, m), np.uint8)
    les = np.empty((n, m, m), np.uint8)
    per_fine = m * m
    chunk = max(1, int(2_400_000 // (per_fine * plan.offsets.size)))
    ranges = [(k, min(n, k + chunk)) for k in range(0, n, chunk)]
    counts = np.zeros(9, np.int64)
    # numpy is memory bound here; measured on 2 cores, threads made rendering slower, so default to one
    workers = max(1, min(len(ranges), int(os.environ.get("LUNGNODE_SYNTH_THREADS", "1"))))
    if workers == 1:
        for k0, k1 in ranges:
            counts += _render_chunk(plan, k0, k1, hu, lungs, les)
    else:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            for fut in [ex.submit(_render_chunk, plan, k0, k1, hu, lungs, les) for k0, k1 in ranges]:
                counts += fut.result()
    t2 = time.perf_counter()
    spacing = (float(params["slice_spacing_mm"]), plan.px, plan.px)
    vox_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    c = counts.reshape(3, 3)  # [lung label, lesion label]
    volumes = {
        "right_lung": c[1].sum() * vox_ml,
        "left_lung": c[2].sum() * vox_ml,
        "lungs": c[1:].sum() * vox_ml,
        "ground_glass": c[:, 1].sum() * vox_ml,
        "consolidation": c[:, 2].sum() * vox_ml,
        "lesions": c[:, 1:].sum() * vox_ml,
        "lesions_right_lung": c[1, 1:].sum() * vox_ml,
        "lesions_left_lung": c[2, 1:].sum() * vox_ml,
    }
    volumes = {k: round(float(v), 3) for k, v in volumes.items()}
    origin = (plan.x0, plan.y0 + 0.0, float(plan.z_out[0]) + float(params["z_shift_mm"]))
    log.info("phantom %s/%s seed=%d %dx%dx%d rendered in %.2fs (plan %.2fs)", spec.kind, params["variant"], spec.seed,
             n, m, m, t2 - t0, t1 - t0)
    return Phantom(hu, lungs, les, spacing, origin, spec, volumes, params, {"plan": t1 - t0, "render": t2 - t1})
