"""2D training samples for the lesion model (``models/lesion_seg``): lung-box slices with lesion labels.

A sample is one axial slice of the lung bounding box, windowed with the model's HU window to [0, 1]
and resized to the model input size as ``node.pipeline.preprocess.slices_input`` does, with a label
map (nearest neighbour): 0 background, 1 ground-glass opacity, 2 consolidation.

Sources:

* synthetic phantoms (``node.synthetic``): every seed draws kind (covid / pneumonia / normal), the
  variant, kernel, noise, slice thickness (1-5 mm), matrix (field of view) and anatomy; the box is
  the 3D lung box of the true lung mask with the node's margins (``lung_box``);
* MedSeg COVID-19 training slices (``/work/shared/data/medseg-covid-2d-train``): JPEG in a lung
  window without HU. ``GrayMap`` maps gray levels back to HU from two landmarks measured on the
  training images only (median over images of the histogram mode of lung parenchyma outside the
  lesion masks, and of the soft-tissue mode), taken as -860 HU and +30 HU. The slices are published
  already cropped to about the thorax, so the whole image is the box: a threshold lung mask (HU <
  -400) spanned the whole image on most slices and, where consolidation replaced aerated lung, cut
  about 10 % of the lesion pixels off. The medseg test split and LIDC-IDRI-0002/0003 are refused here;
* real lung without pneumonia (``real_negative_slices``): the lung-box slices of LIDC-IDRI-0001, all
  background, so real vessels, fissures, dependent density and nodules are seen as "no lesion" (MedSeg
  has no lesion-free slice, and the phantoms' confounders are synthetic).

Orientation: the node feeds canonical slices (anterior up, patient right on the left), the MedSeg
slices come rotated; ``dihedral`` augmentation (flips and 90-degree turns, no label change: lesion
classes do not depend on the side) makes the model indifferent to both. Scanner augmentation:
``augment`` from the lung pipeline (scale, rotation, gain/offset, noise; its right/left label swap is
off) plus blur or unsharp masking (reconstruction kernels) and correlated noise.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

from models.train.cache_files import save_npz_whole
from models.train.data_lung import LIDC_0001, LUNG_WINDOW, SliceSet, augment, concat, lidc_0001_volume, to_samples
from node.pipeline.infer import window
from node.pipeline.preprocess import lung_box, resize

SHARED = Path("/work/shared/data")
MEDSEG_TRAIN = SHARED / "medseg-covid-2d-train"
MEDSEG_TEST = SHARED / "medseg-covid-2d-test" / "MultiClassInfection-Test"
FORBIDDEN = ("lidc-idri-0002", "lidc-idri-0003", "medseg-covid-2d-test")
CACHE = Path("/tmp/lesion_cache")
LUNG_HU, TISSUE_HU = -860.0, 30.0  # landmark HU: aerated lung parenchyma, soft tissue (muscle/blood)
KIND_P = {"covid": 0.45, "pneumonia": 0.35, "normal": 0.20}


@dataclass(frozen=True)
class GrayMap:
    """Linear JPEG gray -> HU map through two landmarks (gray of lung parenchyma, gray of soft tissue)."""

    lung_gray: float
    tissue_gray: float

    @property
    def hu_per_gray(self) -> float:
        return (TISSUE_HU - LUNG_HU) / (self.tissue_gray - self.lung_gray)

    def to_hu(self, gray: np.ndarray) -> np.ndarray:
        return (LUNG_HU + (gray.astype(np.float32) - self.lung_gray) * self.hu_per_gray).astype(np.float32)

    def window_hu(self) -> tuple[float, float]:
        """The HU range that gray 0..255 covers (the JPEG's own window)."""
        return float(self.to_hu(np.array([0.0]))[0]), float(self.to_hu(np.array([255.0]))[0])


@dataclass(frozen=True)
class MedsegItem:
    """One MedSeg slice: name, gray image (uint8) and labels (0/1 GGO/2 consolidation)."""

    name: str
    gray: np.ndarray
    labels: np.ndarray


def _refuse_test(path: Path) -> None:
    if any(f in str(path).lower() for f in FORBIDDEN):
        raise ValueError(f"{path} is validation/test data: never train or tune on it")


def read_medseg(folder: Path, *, gt: str = "GT") -> list[MedsegItem]:
    """All ``Imgs/*.jpg`` with their ``{gt}/*.png`` labels, sorted by number."""
    imgs = sorted(Path(folder, "Imgs").glob("*.jpg"), key=lambda p: int(p.stem) if p.stem.isdigit() else p.stem)
    items = []
    for img in imgs:
        gray = np.asarray(Image.open(img).convert("L"), dtype=np.uint8)
        labels = np.asarray(Image.open(Path(folder, gt, img.stem + ".png")), dtype=np.uint8)
        if labels.shape != gray.shape:
            raise ValueError(f"{img}: image {gray.shape} and labels {labels.shape} differ")
        items.append(MedsegItem(img.stem, gray, labels))
    return items


def read_medseg_train(folder: Path = MEDSEG_TRAIN) -> list[MedsegItem]:
    """The 50 MedSeg training slices (refuses the test split)."""
    _refuse_test(folder)
    return read_medseg(folder)


def _smooth_hist(values: np.ndarray) -> np.ndarray:
    k = np.exp(-np.arange(-6, 7) ** 2 / 8.0)
    return np.convolve(np.bincount(values, minlength=256).astype(float), k / k.sum(), "same")


def calibrate(items: list[MedsegItem]) -> GrayMap:
    """Landmark grays from training images: parenchyma mode (non-lesion, gray < 130), tissue mode (140..250)."""
    lung, tissue = [], []
    for it in items:
        normal = it.gray[(it.labels == 0) & (it.gray < 130)]
        lung.append(float(np.argmax(_smooth_hist(normal)[:130])))
        tissue.append(140.0 + float(np.argmax(_smooth_hist(it.gray.ravel())[140:250])))
    return GrayMap(float(np.median(lung)), float(np.median(tissue)))


def medseg_input(gray: np.ndarray, gmap: GrayMap, size: int) -> np.ndarray:
    """Windowed model input [size, size] of one whole MedSeg image (gray -> HU -> window -> resize)."""
    hu = gmap.to_hu(gray)
    return window(resize(hu[None], (1, size, size), linear=True), *LUNG_WINDOW)[0].astype(np.float32)


def medseg_samples(items: list[MedsegItem], gmap: GrayMap, size: int) -> SliceSet:
    """Model-size samples of MedSeg slices (labels nearest)."""
    xs, ys = [], []
    for it in items:
        xs.append(medseg_input(it.gray, gmap, size))
        ys.append(resize(it.labels[None], (1, size, size), linear=False)[0].astype(np.uint8))
    return SliceSet(np.stack(xs), np.stack(ys), [f"medseg:{it.name}" for it in items])


def phantom_spec_args(seed: int, kind: str | None = None, *, slices: int | None = None,
                      matrix: int | None = None) -> dict:
    """Random phantom parameters of a seed: kind, matrix, slices, thickness 1-5 mm, noise (overrides win)."""
    from node.synthetic.phantom import THICKNESSES

    rng = np.random.default_rng(20_000 + seed)
    drawn = str(rng.choice(list(KIND_P), p=list(KIND_P.values())))
    args = {"kind": drawn, "slices": int(rng.integers(20, 33)), "matrix": int(rng.choice([192, 256, 320])),
            "slice_thickness_mm": float(rng.choice(THICKNESSES)), "noise_hu": float(rng.uniform(4.0, 60.0)),
            "seed": seed}
    overrides = {"kind": kind, "slices": slices, "matrix": matrix}
    return {**args, **{k: v for k, v in overrides.items() if v is not None}}


def phantom_volume(seed: int, kind: str | None = None, *, slices: int | None = None, matrix: int | None = None,
                   contiguous: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """One random phantom in canonical layout: (hu, lungs, lesions, spec args + voxel_ml and slice spacing).

    ``contiguous``: slices spaced at the slice thickness (a mid-lung slab when they are shorter than the
    chest) instead of spread over the whole chest."""
    from node.synthetic.phantom import PhantomSpec, make_phantom

    args = phantom_spec_args(seed, kind, slices=slices, matrix=matrix)
    if contiguous:
        args["slice_spacing_mm"] = args["slice_thickness_mm"]
    ph = make_phantom(PhantomSpec(**args))
    args["voxel_ml"] = float(np.prod(ph.spacing_mm)) / 1000.0
    args["slice_spacing_z_mm"] = float(ph.spacing_mm[0])
    return ph.hu, ph.lungs, ph.lesions, args


def phantom_lung_slices(seed: int, size: int, kind: str | None = None, *, slices: int | None = None,
                        matrix: int | None = None) -> SliceSet:
    """The slices of a phantom's 3D lung box that contain lung, at model size (cached on disk)."""
    spec = phantom_spec_args(seed, kind, slices=slices, matrix=matrix)
    key = hashlib.sha1(json.dumps([seed, size, kind, phantom_spec_args(seed)] + ([spec] if slices or matrix else [])
                                  ).encode()).hexdigest()[:12]
    path = CACHE / f"phantom-{seed}-{size}-{key}.npz"
    if path.is_file():
        z = np.load(path)
        return SliceSet(z["x"].astype(np.float32), z["y"], [f"phantom{seed}:{k}" for k in z["k"]])
    hu, lungs, lesions, _ = phantom_volume(seed, kind, slices=slices, matrix=matrix)
    box = lung_box(lungs > 0)
    keep = np.flatnonzero(lungs[box].any(axis=(1, 2)))
    s = to_samples(hu[box][keep], lesions[box][keep], size, f"phantom{seed}")
    CACHE.mkdir(parents=True, exist_ok=True)
    save_npz_whole(path, compressed=True, x=s.x.astype(np.float16), y=s.y, k=keep + box[0].start)
    return SliceSet(s.x, s.y, [f"phantom{seed}:{int(k)}" for k in keep + box[0].start])


def real_negative_slices(size: int, *, archive: Path = LIDC_0001) -> SliceSet:
    """LIDC-IDRI-0001's lung-box slices that contain lung (classical lung labels), every pixel background (cached).

    The box is the node's (``lung_box`` of the lungs, its margins), so the slices look as the node will feed them.
    """
    _refuse_test(archive)
    path = CACHE / f"lidc0001-negatives-{size}.npz"
    if path.is_file():
        z = np.load(path)
        return SliceSet(z["x"].astype(np.float32), z["y"], [f"lidc0001:{k}" for k in z["k"]])
    if not Path(archive).is_file():
        raise FileNotFoundError(f"{archive} is missing: train without --real-negatives")
    from models.train.lung_labels import label_lungs

    vol = lidc_0001_volume(archive)
    lungs = label_lungs(vol.hu, vol.spacing_mm) > 0
    box = lung_box(lungs)
    keep = np.flatnonzero(lungs[box].any(axis=(1, 2)))
    s = to_samples(vol.hu[box][keep], np.zeros_like(lungs[box][keep], dtype=np.uint8), size, "lidc0001")
    CACHE.mkdir(parents=True, exist_ok=True)
    save_npz_whole(path, compressed=True, x=s.x.astype(np.float16), y=s.y, k=keep + box[0].start)
    return SliceSet(s.x, s.y, [f"lidc0001:{int(k)}" for k in keep + box[0].start])


def training_phantom_seeds(seed: int, phantoms: int) -> range:
    """The phantoms ``train_lesion --seed S --phantoms N`` trains on: S*1000 .. S*1000+N-1 (one range per seed)."""
    return range(seed * 1000, seed * 1000 + phantoms)


def phantom_samples(seeds: list[int], size: int, log=None, *, slices: int | None = None,
                    matrix: int | None = None) -> SliceSet:
    """Samples from the phantoms of ``seeds`` (``slices`` / ``matrix``: overrides for small tests)."""
    sets = []
    for i, seed in enumerate(seeds):
        sets.append(phantom_lung_slices(seed, size, slices=slices, matrix=matrix))
        if log and (i + 1) % 10 == 0:
            log(f"  phantoms {i + 1}/{len(seeds)}")
    return concat(sets)


def epoch_indices(phantom: SliceSet, n_med: int, reps: int, n_ph: int, rng: np.random.Generator,
                  normal: np.ndarray | None = None, normal_share: float = 0.0, n_neg: int = 0,
                  negatives: int = 0) -> list[tuple[str, int]]:
    """One epoch: every MedSeg slice ``reps`` times, ``n_ph`` phantom slices (half with lesions), shuffled.

    ``n_neg`` draws of the ``negatives`` real lesion-free slices (source "n") join them; at 0 nothing is drawn.

    ``normal_share`` of the phantom slices come from ``normal`` (indices of slices of lesion-free series,
    whose confounders such as dependent atelectasis must stay unlabelled); the rest as before, half with
    lesions. At 0 the draws are those of earlier versions, so old recipes repeat bit for bit.
    """
    items = [("m", i) for i in range(n_med) for _ in range(reps)]
    if n_ph and len(phantom):
        n_norm = int(round(n_ph * normal_share)) if normal is not None and normal.size else 0
        rest = n_ph - n_norm
        has = np.flatnonzero(phantom.y.reshape(len(phantom), -1).max(1) > 0)
        pick = rng.choice(len(phantom), rest - rest // 2)
        if has.size:
            pick = np.concatenate([pick, rng.choice(has, rest // 2)])
        if n_norm and normal is not None:
            pick = np.concatenate([pick, rng.choice(normal, n_norm)])
        items += [("p", int(i)) for i in pick]
    if n_neg and negatives:
        items += [("n", int(i)) for i in rng.choice(negatives, n_neg)]
    return [items[i] for i in rng.permutation(len(items))]


def normal_slices(phantom: SliceSet) -> np.ndarray:
    """Indices of the phantom slices that belong to series of kind normal (sources ``phantom<seed>:<z>``)."""
    kinds: dict[int, str] = {}
    out = []
    for i, src in enumerate(phantom.source):
        seed = int(src.split(":")[0].removeprefix("phantom"))
        if seed not in kinds:
            kinds[seed] = str(phantom_spec_args(seed)["kind"])
        if kinds[seed] == "normal":
            out.append(i)
    return np.array(out, dtype=np.int64)


def dihedral(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random flip / 90-degree turn of image and labels together (orientation-free lesion classes)."""
    k = int(rng.integers(4))
    x, y = np.rot90(x, k), np.rot90(y, k)
    if rng.random() < 0.5:
        x, y = x[:, ::-1], y[:, ::-1]
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def random_crop(x: np.ndarray, y: np.ndarray, size: int, rng: np.random.Generator, p_lesion: float = 0.6
                ) -> tuple[np.ndarray, np.ndarray]:
    """A ``size`` square crop, centred near a lesion pixel with probability ``p_lesion`` (training cost /4).

    The network is fully convolutional: trained on crops, it runs on the whole lung box at inference.
    """
    h, w = y.shape
    if size >= min(h, w):
        return x, y
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    if rng.random() < p_lesion and y.any():
        ys, xs = np.nonzero(y)
        i = int(rng.integers(ys.size))
        cy, cx = int(ys[i]), int(xs[i])
    y0 = int(np.clip(cy - size // 2 + rng.integers(-size // 4, size // 4 + 1), 0, h - size))
    x0 = int(np.clip(cx - size // 2 + rng.integers(-size // 4, size // 4 + 1), 0, w - size))
    return x[y0:y0 + size, x0:x0 + size], y[y0:y0 + size, x0:x0 + size]


LUNG_X = float(window(np.float32(-400.0), *LUNG_WINDOW))  # -400 HU on the model's [0, 1] scale


def lung_region(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Where a lesion may sit in a windowed MedSeg slice: pixels below -400 HU, closed over vessels, plus the
    slice's own lesions. A coarse mask, only for placing pasted lesions.

    No outside-air step: the MedSeg crops are cut so close that the lungs touch the image border on most
    slices, and a border flood fill removed whole lungs."""
    air = sitk.GetImageFromArray((x < LUNG_X).astype(np.uint8))
    lung = sitk.GetArrayFromImage(sitk.BinaryMorphologicalClosing(air, [3, 3])).astype(bool)
    return lung | (y > 0)


def paste_lesions(x: np.ndarray, y: np.ndarray, xb: np.ndarray, yb: np.ndarray, rng: np.random.Generator,
                  inside: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """Copy the lesions of another real slice (``xb``, ``yb``, same size) into this one (lesion copy-paste).

    Why: 50 real slices hold few lesion shapes, positions and backgrounds; pasting real lesions (pixels and
    labels) into the lungs of other real slices makes new combinations without inventing texture. The source
    is flipped at random; a lesion component is pasted only if at least ``inside`` of it falls in this
    slice's lung region, and only there; its edge is feathered over about a pixel.
    """
    if rng.random() < 0.5:
        xb, yb = xb[::-1], yb[::-1]
    if rng.random() < 0.5:
        xb, yb = xb[:, ::-1], yb[:, ::-1]
    region = lung_region(x, y)
    comp = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray((yb > 0).astype(np.uint8))))
    keep = np.zeros(y.shape, dtype=bool)
    for c in range(1, int(comp.max()) + 1):
        m = comp == c
        if (m & region).sum() >= inside * m.sum():
            keep |= m & region
    if not keep.any():
        return x, y
    soft = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(keep.astype(np.float32)), 1.0))
    alpha = np.where(keep, 1.0, np.where(soft < 0.02, 0.0, np.clip(2.0 * soft, 0.0, 1.0))).astype(np.float32)
    x = (x * (1.0 - alpha) + xb * alpha).astype(np.float32)
    y = np.where(keep, yb, y).astype(y.dtype)
    return x, y


def _kernel(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Reconstruction-kernel look: Gaussian blur (smooth) or unsharp masking (sharp), or unchanged."""
    r = rng.random()
    if r < 0.4:
        return x
    img = sitk.GetImageFromArray(x.astype(np.float32))
    blurred = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, float(rng.uniform(0.5, 1.5))))
    if r < 0.7:
        return blurred
    return x + float(rng.uniform(0.3, 1.0)) * (x - blurred)


def _correlated_noise(shape: tuple[int, ...], rng: np.random.Generator, sigma: float) -> np.ndarray:
    img = sitk.GetImageFromArray(rng.standard_normal(shape).astype(np.float32))
    n = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, float(rng.uniform(0.6, 1.5))))
    return n * (sigma / max(float(n.std()), 1e-6))


def elastic_warp(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, mesh: int = 4, sigma_px: float = 4.0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random deformation (cubic B-spline on a ``mesh`` x ``mesh`` grid, control points moved by
    N(0, ``sigma_px``) pixels): image linear, labels nearest, outside filled with 0 (air).

    Why: 50 real slices hold few lung and lesion shapes; a smooth warp makes new ones from real texture, the
    augmentation the U-Net was first shown with on small data.
    """
    img = sitk.GetImageFromArray(x.astype(np.float32))
    t = sitk.BSplineTransformInitializer(img, [mesh, mesh], 3)
    t.SetParameters(rng.normal(0.0, sigma_px, len(t.GetParameters())).tolist())
    lab = sitk.GetImageFromArray(y.astype(np.uint8))
    xw = sitk.GetArrayFromImage(sitk.Resample(img, img, t, sitk.sitkLinear, 0.0))
    yw = sitk.GetArrayFromImage(sitk.Resample(lab, lab, t, sitk.sitkNearestNeighbor, 0))
    return xw.astype(np.float32), yw.astype(y.dtype)


def gamma_contrast(x: np.ndarray, rng: np.random.Generator, max_log: float) -> np.ndarray:
    """``x ** g`` with log g uniform in +-``max_log``: a nonlinear change of contrast.

    Why: the MedSeg slices came through a lung-window JPEG whose gray-to-HU map is one estimate for all of
    them; faint ground glass sits where that map is least certain, and gain and offset alone keep its shape.
    """
    return np.clip(x, 0.0, 1.0) ** float(np.exp(rng.uniform(-max_log, max_log)))


def augment_lesion(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, crop: int = 0, elastic: float = 0.0,
                   gamma: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One augmented copy: crop, orientation, geometry, kernel, intensity and (correlated) noise.

    ``elastic``: probability of a smooth random warp; ``gamma``: the largest |log g| of a contrast change. At 0
    neither draws a random number, so earlier recipes repeat bit for bit.
    """
    if crop:
        x, y = random_crop(x, y, crop, rng)
    x, y = dihedral(x, y, rng)
    if elastic and rng.random() < elastic:
        x, y = elastic_warp(x, y, rng)
    if gamma:
        x = gamma_contrast(x, rng, gamma)
    x = _kernel(x, rng)
    if rng.random() < 0.3:
        x = x + _correlated_noise(x.shape, rng, float(rng.uniform(0.005, 0.03)))
    return augment(np.clip(x, 0.0, 1.0), y, rng, p_flip=0.0, max_scale=0.15, max_rot_deg=15.0, noise=0.02)


__all__ = ["CACHE", "GrayMap", "MEDSEG_TEST", "MEDSEG_TRAIN", "MedsegItem", "augment_lesion", "calibrate", "real_negative_slices",
           "dihedral", "elastic_warp", "epoch_indices", "gamma_contrast", "lung_region", "medseg_input", "medseg_samples", "normal_slices",
           "paste_lesions", "phantom_lung_slices",
           "phantom_samples", "phantom_spec_args", "phantom_volume", "random_crop", "read_medseg", "read_medseg_train",
           "training_phantom_seeds"]
