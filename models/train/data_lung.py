"""2D training samples for the lung model (``models/lung_seg``): what the node feeds it, with labels.

A sample is one canonical axial slice (rows anterior -> posterior, columns patient right -> left),
windowed with the model's HU window to [0, 1] and resized to the model input size exactly as
``node.pipeline.preprocess.slices_input`` does (SimpleITK linear, centres aligned), together with a
label map resized with nearest neighbour: 0 background, 1 right lung, 2 left lung.

Sources:

* synthetic phantoms (``node.synthetic``): every seed draws kind, variant, kernel, noise, slice
  thickness, matrix and patient orientation (HFS/FFS, instance order); the series is written as
  DICOM and read back with ``node.pipeline.volume.load_volume``, so the canonical orientation is the
  node's own; the truth (``truth/truth.json``, ``lungs.nii.gz``) is matched to each canonical slice
  by SOP Instance UID;
* LIDC-IDRI-0001 (``/work/shared/data/lidc-idri-0001-ct.tar.xz``) with the classical labels of
  ``models.train.lung_labels.label_lungs``; skipped when absent. LIDC-IDRI-0002/0003 and the medseg
  test split are validation/test data and are never read here.

Augmentation (``augment``): intensity gain/offset and Gaussian noise, small in-plane scaling and
rotation about the image centre, and a left-right flip. A flipped image is a mirrored patient: what
was the right lung is now on the side where a left lung belongs, so the flip swaps labels 1 <-> 2.
"""

from __future__ import annotations

import json
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from node.pipeline.infer import window
from node.pipeline.preprocess import resize
from node.pipeline.volume import Volume, load_volume

LUNG_WINDOW = (-450.0, 1350.0)  # level, width: -1125 .. +225 HU (air .. soft tissue/vessels)
LIDC_0001 = Path("/work/shared/data/lidc-idri-0001-ct.tar.xz")
FORBIDDEN = ("lidc-idri-0002", "lidc-idri-0003", "medseg-covid-2d-test")


@dataclass
class SliceSet:
    """Samples: ``x`` float32 [N, H, W] in [0, 1], ``y`` uint8 [N, H, W] (0/1 right/2 left)."""

    x: np.ndarray
    y: np.ndarray
    source: list[str]

    def __len__(self) -> int:
        return int(self.x.shape[0])


def concat(sets: list[SliceSet]) -> SliceSet:
    sets = [s for s in sets if len(s)]
    if not sets:
        raise ValueError("no samples")
    return SliceSet(np.concatenate([s.x for s in sets]), np.concatenate([s.y for s in sets]),
                    [src for s in sets for src in s.source])


def to_samples(hu: np.ndarray, lungs: np.ndarray, size: int, name: str, *, level: float = LUNG_WINDOW[0],
               width: float = LUNG_WINDOW[1], every: int = 1) -> SliceSet:
    """Canonical volume + labels -> windowed slices at ``size`` x ``size`` as the node computes them."""
    idx = np.arange(0, hu.shape[0], max(1, every))
    hu = hu[idx]
    lungs = lungs[idx]
    target = (hu.shape[0], size, size)
    x = window(resize(hu, target, linear=True), level, width).astype(np.float32)
    y = resize(lungs.astype(np.uint8), target, linear=False).astype(np.uint8)
    return SliceSet(x, y, [f"{name}:{int(k)}" for k in idx])


def phantom_volume(seed: int, workdir: Path, *, slices: int = 48, matrix: int | None = None,
                   orientation: str | None = None, ffs_convention: str | None = None,
                   kind: str | None = None, variant: str | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, dict]:
    """One random phantom, written as DICOM and read back: (canonical hu, canonical lungs, params).

    ``orientation``/``ffs_convention`` force the patient position (evaluation of left/right on
    head-first and feet-first series), ``kind``/``variant`` the lesion pattern (extra pneumonia
    phantoms); the random draws are made either way, so the rest of the phantom is the same for a
    given seed.
    """
    from node.synthetic.dicom import SeriesOptions, write_series
    from node.synthetic.lesions import VARIANTS
    from node.synthetic.phantom import KERNELS, KINDS, THICKNESSES, PhantomSpec, make_phantom

    rng = np.random.default_rng(10_000 + seed)
    drawn_kind = str(rng.choice(KINDS))
    drawn_variant = str(rng.choice(VARIANTS[drawn_kind]))
    kind = kind or drawn_kind
    spec = PhantomSpec(
        kind=kind,  # type: ignore[arg-type]
        # a forced kind without a variant takes one from its own generator: the main draws stay put
        variant=variant or (drawn_variant if kind == drawn_kind
                            else str(np.random.default_rng(seed).choice(VARIANTS[kind]))),
        kernel=str(rng.choice(KERNELS)),  # type: ignore[arg-type]
        noise_hu=float(rng.uniform(5.0, 60.0)),
        slice_thickness_mm=float(rng.choice(THICKNESSES)),
        slices=slices,
        matrix=int(matrix or rng.choice([192, 256, 320])),
        seed=seed,
    )
    ph = make_phantom(spec)
    drawn_orientation = str(rng.choice(["HFS", "FFS"]))
    drawn_convention = str(rng.choice(["radiological", "mirrored"]))
    options = SeriesOptions(orientation=orientation or drawn_orientation,  # type: ignore[arg-type]
                            ffs_convention=ffs_convention or drawn_convention,  # type: ignore[arg-type]
                            instance_order=str(rng.choice(["head_to_feet", "feet_to_head"])),  # type: ignore[arg-type]
                            seed=seed, threads=1)
    out = Path(workdir) / f"phantom-{seed}"
    written = write_series(out, ph, options)
    vol = load_volume(list(written.files))
    truth = json.loads((written.truth_dir / "truth.json").read_text())  # type: ignore[operator]
    lab_img = sitk.ReadImage(str(written.truth_files["lungs"]))
    lab = sitk.GetArrayFromImage(lab_img)  # truth: [k, row, column] = pixel of sop_instance_uids[k]
    sop_to_index = truth["sop_to_index"]
    lungs = np.empty(vol.shape, dtype=np.uint8)
    for z, frame in enumerate(vol.frames):
        plane = lab[sop_to_index[frame.sop_instance_uid]]
        if vol.flip_rows:
            plane = plane[::-1, :]
        if vol.flip_cols:
            plane = plane[:, ::-1]
        lungs[z] = plane
    params = {"seed": seed, "kind": spec.kind, "variant": spec.variant, "kernel": spec.kernel,
              "orientation": options.orientation, "ffs_convention": options.ffs_convention, "matrix": spec.matrix}
    return vol.hu, lungs, params


def phantom_samples(seeds: list[int], size: int, *, slices: int = 48, matrix: int | None = None,
                    every: int = 1, patterns: Sequence[tuple[str, str]] = ()) -> SliceSet:
    """Samples from the phantoms of ``seeds`` (each rendered in a temporary folder, then deleted);
    ``patterns`` (kind, variant), when given, are forced on the seeds in turn."""
    sets = []
    with tempfile.TemporaryDirectory(prefix="lung-phantoms-") as tmp:
        for i, seed in enumerate(seeds):
            kind, variant = patterns[i % len(patterns)] if patterns else (None, None)
            hu, lungs, _ = phantom_volume(seed, Path(tmp), slices=slices, matrix=matrix, kind=kind, variant=variant)
            sets.append(to_samples(hu, lungs, size, f"phantom{seed}", every=every))
    return concat(sets)


def lidc_0001_volume(archive: Path = LIDC_0001) -> Volume:
    """The LIDC-IDRI-0001 series as the node loads it (training data; the validation series are refused)."""
    if any(f in str(archive).lower() for f in FORBIDDEN):
        raise ValueError(f"{archive} is validation/test data: never train on it")
    with tempfile.TemporaryDirectory(prefix="lidc-0001-") as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        return load_volume(sorted(Path(tmp).rglob("*.dcm")))


def lidc_0001_samples(size: int, *, archive: Path = LIDC_0001, every: int = 1) -> SliceSet | None:
    """LIDC-IDRI-0001 with classical labels, or None when the archive is absent."""
    if any(f in str(archive).lower() for f in FORBIDDEN):
        raise ValueError(f"{archive} is validation/test data: never train on it")
    if not Path(archive).is_file():
        return None
    from models.train.lung_labels import label_lungs

    vol = lidc_0001_volume(archive)
    lungs = label_lungs(vol.hu, vol.spacing_mm)
    return to_samples(vol.hu, lungs, size, "lidc0001", every=every)


def flip_lr(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror the patient left-right: columns reversed AND right/left labels swapped (1 <-> 2)."""
    xf = x[..., ::-1].copy()
    yf = y[..., ::-1].copy()
    swapped = yf.copy()
    swapped[yf == 1] = 2
    swapped[yf == 2] = 1
    return xf, swapped


def _affine(img: np.ndarray, scale: float, angle: float, linear: bool) -> np.ndarray:
    h, w = img.shape
    src = sitk.GetImageFromArray(img.astype(np.float32 if linear else np.uint8))
    t = sitk.Similarity2DTransform()
    t.SetCenter(((w - 1) / 2.0, (h - 1) / 2.0))
    t.SetScale(1.0 / scale)
    t.SetAngle(angle)
    interp = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    return sitk.GetArrayFromImage(sitk.Resample(src, src, t, interp, 0.0))


def augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, *, p_flip: float = 0.5,
            max_scale: float = 0.12, max_rot_deg: float = 10.0, noise: float = 0.03) -> tuple[np.ndarray, np.ndarray]:
    """One augmented copy of a 2D sample (x [H, W] in [0, 1], y [H, W] labels)."""
    if rng.random() < p_flip:
        x, y = flip_lr(x, y)
    if max_scale > 0 or max_rot_deg > 0:
        s = float(np.exp(rng.uniform(-max_scale, max_scale)))
        a = float(np.deg2rad(rng.uniform(-max_rot_deg, max_rot_deg)))
        x = _affine(x, s, a, linear=True)  # outside fills 0 = air/below window
        y = _affine(y, s, a, linear=False).astype(np.uint8)
    gain = rng.uniform(0.92, 1.08)
    offset = rng.uniform(-0.04, 0.04)
    x = x * gain + offset + rng.normal(0.0, rng.uniform(0.0, noise), size=x.shape)
    return np.clip(x, 0.0, 1.0).astype(np.float32), y


__all__ = ["LUNG_WINDOW", "SliceSet", "augment", "concat", "flip_lr", "lidc_0001_samples", "phantom_samples",
           "phantom_volume", "to_samples"]
