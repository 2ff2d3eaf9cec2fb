"""3D training cases for the diagnosis model (``models/diagnosis``): what the node feeds it, with a class.

The node's ``node.pipeline.runner.classify`` windows the whole HU volume, crops the lung box
(``preprocess.lung_box`` of the lung mask) and resizes every channel with SimpleITK linear
interpolation to ``input.size`` (D, H, W). ``model_input`` does exactly that with the same functions,
so training sees the tensors the node computes.

A case is cached on the model grid (``/tmp/diag_cache`` by default, one ``.npz`` per case):

* ``ct``: windowed CT in [0, 1] stored as uint8 (x 255; quantisation error <= 0.002);
* ``les``: the *truth* lesion mask resized linearly (fraction x 255), degraded at training time by
  ``degrade_lesions`` to look like a lesion model's output (the node feeds the lesion model's mask);
* ``lung``: the lung mask on the grid (used to place false-positive specks inside the lungs).

Sources:

* synthetic phantoms (``node.synthetic``), class by kind (covid -> covid19, pneumonia ->
  other_pneumonia, normal -> no_pneumonia), every variant in turn, with random severity, anatomy,
  kernel, noise, slice thickness (1-5 mm), slice count, matrix/FOV and lung-box margin; the phantom
  arrays are already in the node's canonical orientation (z feet -> head, y anterior -> posterior,
  x patient right -> left), which ``load_volume`` produces for any patient position;
* LIDC-IDRI-0001 as no_pneumonia, lungs by ``models.train.lung_labels.label_lungs``, several copies
  with different lung-box margins; its lesion map is the lesion model's output when one is given
  (``--lesion-model``): real false positives on a real CT. LIDC-IDRI-0002/0003 are validation only and never read here.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from node.pipeline.infer import window
from node.pipeline.preprocess import lung_box, resize

WINDOW = (-450.0, 1350.0)  # level, width
SIZE = (64, 256, 256)  # D, H, W
CHANNELS = ("ct", "lesion_map")
POOL = (2, 4, 4)  # the model's first, fixed step: 2x4x4 average pooling -> 32 x 64 x 64
CLASSES = ("covid19", "other_pneumonia", "no_pneumonia")
KIND_CLASS = {"covid": 0, "pneumonia": 1, "normal": 2}
CACHE = Path("/tmp/diag_cache")
LIDC_0001 = Path("/work/shared/data/lidc-idri-0001-ct.tar.xz")
FORBIDDEN = ("lidc-idri-0002", "lidc-idri-0003")
HELD_OUT_SEED0 = 500_000  # held-out phantom seeds start here; training seeds are 0..N-1


@dataclass
class Case:
    """One cached case on the model grid (uint8 arrays [D, H, W]) with its class index."""

    name: str
    ct: np.ndarray
    les: np.ndarray
    lung: np.ndarray
    label: int
    meta: dict[str, Any]
    ct_pooled: np.ndarray | None = None  # filled by training: pooled CT in [0, 1], computed once


def model_input(hu: np.ndarray, lungs: np.ndarray, lesion_map: np.ndarray, *, size: tuple[int, int, int] = SIZE,
                margin: tuple[int, int, int] = (2, 8, 8), lesion_linear: bool = True) -> np.ndarray:
    """[C, D, H, W] float32 (ct, lesion_map) as ``runner.classify`` builds it (same box, window, resize)."""
    box = lung_box(lungs > 0, margin)
    ct = resize(window(hu, *WINDOW)[box].astype(np.float32), size, linear=True)
    les = resize(lesion_map[box].astype(np.float32), size, linear=lesion_linear)
    return np.stack([ct, les]).astype(np.float32, copy=False)


def _grid_case(name: str, hu: np.ndarray, lungs: np.ndarray, lesions: np.ndarray, label: int,
               margin: tuple[int, int, int], meta: dict[str, Any]) -> Case:
    """Crop + resize one volume to the model grid and quantise to uint8 for the cache."""
    x = model_input(hu, lungs, (lesions > 0).astype(np.float32), margin=margin)
    box = lung_box(lungs > 0, margin)
    lung = resize((lungs[box] > 0).astype(np.uint8), SIZE, linear=False)
    q = np.round(x * 255.0).astype(np.uint8)
    return Case(name, q[0], q[1], lung.astype(np.uint8), label, meta)


def phantom_spec_for(seed: int) -> dict[str, Any]:
    """The PhantomSpec fields of a case: kind and variant in turn by seed, the rest drawn from it."""
    from node.synthetic.lesions import VARIANTS
    from node.synthetic.phantom import KERNELS, KINDS, THICKNESSES

    rng = np.random.default_rng(20_000 + seed)
    kind = KINDS[seed % 3]
    variants = VARIANTS[kind]
    severity = None if rng.random() < 0.5 else float(rng.uniform(0.05, 1.0))
    return {"kind": kind, "variant": variants[(seed // 3) % len(variants)], "kernel": str(rng.choice(KERNELS)),
            "noise_hu": float(rng.uniform(5.0, 60.0)), "slice_thickness_mm": float(rng.choice(THICKNESSES)),
            "slices": int(rng.integers(32, 73)), "matrix": int(rng.choice([192, 256])), "severity": severity,
            "seed": seed}


def _margin(rng: np.random.Generator) -> tuple[int, int, int]:
    """Random lung-box margin: the lung mask at run time comes from a model, so its box varies."""
    return int(rng.integers(0, 5)), int(rng.integers(2, 17)), int(rng.integers(2, 17))


def phantom_case(seed: int) -> Case:
    """Render the phantom of ``seed`` and bring it to the model grid."""
    from node.synthetic.phantom import PhantomSpec, make_phantom

    fields = phantom_spec_for(seed)
    ph = make_phantom(PhantomSpec(**fields))
    meta = {**fields, "lesion_ml": round(float(ph.volumes_ml.get("lesions", 0.0)), 1) if ph.volumes_ml else None,
            "source": "phantom"}
    return _grid_case(f"phantom{seed}", ph.hu, ph.lungs, ph.lesions, KIND_CLASS[fields["kind"]],
                      _margin(np.random.default_rng(30_000 + seed)), meta)


def read_dicom_archive(archive: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(canonical HU, spacing) of the CT series in a .tar.xz, read with the node's own loader."""
    from node.pipeline.volume import load_volume

    with tempfile.TemporaryDirectory(prefix="diag-ct-") as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        vol = load_volume(sorted(Path(tmp).rglob("*.dcm")))
    return vol.hu, vol.spacing_mm


def lesion_model_mask(hu: np.ndarray, lungs: np.ndarray, spacing: tuple[float, float, float],
                      model_dir: Path) -> np.ndarray:
    """The lesion mask the node's lesion model gives for this CT (its false positives, on a CT without pneumonia)."""
    from types import SimpleNamespace

    from node.pipeline import postprocess as post
    from node.pipeline.infer import load_model
    from node.pipeline.runner import segment

    model = load_model(model_dir, device="cpu", threads=2)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    vol = SimpleNamespace(hu=hu, shape=hu.shape, voxel_ml=voxel_ml)
    raw = segment(vol, model, ("ground_glass_opacity", "consolidation"), lung_box(lungs > 0))  # type: ignore[arg-type]
    min_ml = float(model.manifest.postprocessing.get("min_component_ml", 0.1))
    return post.clean_lesions(raw, lungs, min_ml=min_ml, voxel_ml=voxel_ml)


def lidc_0001_cases(copies: int, archive: Path = LIDC_0001, lesion_model: Path | None = None) -> list[Case]:
    """LIDC-IDRI-0001 (no pneumonia) with classical lung labels, ``copies`` lung-box margins; [] if absent.

    Its "truth" lesion map is empty, or, with ``lesion_model``, that model's output: real false
    positives on a real CT, which the classifier must learn to call no_pneumonia.
    """
    if any(f in str(archive).lower() for f in FORBIDDEN):
        raise ValueError(f"{archive} is validation data: never train on it")
    if not Path(archive).is_file():
        return []
    from models.train.lung_labels import label_lungs

    hu, spacing = read_dicom_archive(archive)
    lungs = label_lungs(hu, spacing)
    les = np.zeros_like(lungs) if lesion_model is None else lesion_model_mask(hu, lungs, spacing, lesion_model)
    meta = {"source": "LIDC-IDRI-0001", "lungs": "label_lungs",
            "lesions": "empty" if lesion_model is None else f"{lesion_model.name} {file_sha256_short(lesion_model)}",
            "lesion_ml": round(float((les > 0).sum()) * float(np.prod(spacing)) / 1000.0, 1)}
    rng = np.random.default_rng(40_000)
    return [_grid_case(f"lidc0001_{k}", hu, lungs, les, KIND_CLASS["normal"], _margin(rng), meta)
            for k in range(copies)]


def file_sha256_short(model_dir: Path) -> str:
    """First 12 hex digits of a model folder's model.onnx hash, to record which model made a map."""
    from node.pipeline.manifest import file_sha256

    return file_sha256(model_dir / "model.onnx")[:12]


def save_case(case: Case, cache: Path) -> Path:
    path = cache / f"{case.name}.npz"
    tmp = cache / f".{case.name}.tmp.npz"
    np.savez(tmp, ct=case.ct, les=case.les, lung=case.lung, label=np.int64(case.label),
             meta=np.array(json.dumps(case.meta)))
    tmp.rename(path)
    return path


def load_case(path: Path) -> Case:
    with np.load(path) as z:
        return Case(path.stem, z["ct"], z["les"], z["lung"], int(z["label"]), json.loads(str(z["meta"])))


def load_cases(cache: Path, names: list[str]) -> list[Case]:
    """Cached cases by name; a missing one is an error (run ``python -m models.train.data_diagnosis`` first)."""
    missing = [n for n in names if not (cache / f"{n}.npz").is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} cases not cached in {cache} (first: {missing[0]}); build the cache")
    return [load_case(cache / f"{n}.npz") for n in names]


def train_names(n: int) -> list[str]:
    return [f"phantom{s}" for s in range(n)]


def held_out_names(n: int) -> list[str]:
    return [f"phantom{s}" for s in range(HELD_OUT_SEED0, HELD_OUT_SEED0 + n)]


def build_cache(cache: Path, seeds: list[int], *, lidc_copies: int = 0, lesion_model: Path | None = None,
                log: Any = print) -> None:
    """Render every missing case into ``cache`` (restartable: existing files are kept)."""
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if lidc_copies and not all((cache / f"lidc0001_{k}.npz").is_file() for k in range(lidc_copies)):
        for case in lidc_0001_cases(lidc_copies, lesion_model=lesion_model):
            save_case(case, cache)
        log(f"LIDC-IDRI-0001: {lidc_copies} copies, {time.perf_counter() - t0:.0f} s")
    for i, seed in enumerate(seeds):
        if (cache / f"phantom{seed}.npz").is_file():
            continue
        save_case(phantom_case(seed), cache)
        if i % 10 == 0:
            log(f"cached phantom {seed} ({i + 1}/{len(seeds)}), {time.perf_counter() - t0:.0f} s")


# ---------------------------------------------------------------- lesion-map degradation (training only)

def _drop_small(mask: np.ndarray, rng: np.random.Generator, max_voxels: int, p: float) -> np.ndarray:
    """Miss each component smaller than ``max_voxels`` with probability ``p`` (a model misses small lesions)."""
    cc = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8))))
    sizes = np.bincount(cc.ravel())
    drop = [k for k in range(1, sizes.size) if sizes[k] < max_voxels and rng.random() < p]
    if not drop:
        return mask
    keep = np.ones(sizes.size, dtype=bool)
    keep[drop] = False
    return mask & keep[cc]


def _specks(shape: tuple[int, ...], lung: np.ndarray, rng: np.random.Generator, n: int,
            rmax: float) -> np.ndarray:
    """``n`` small ellipsoidal false positives centred inside the lungs."""
    out = np.zeros(shape, dtype=bool)
    flat = rng.integers(0, lung.size, 64 * n)  # rejection sampling: cheaper than listing every lung voxel
    flat = flat[lung.ravel()[flat] > 0][:n]
    for z, y, x in zip(*np.unravel_index(flat, shape)):
        r = rng.uniform(1.0, rmax)
        rz = int(round(r / 2))  # pooled voxels are about twice as long in z as in-plane
        ri = int(np.ceil(r))
        zs, ys, xs = (slice(max(0, c - e), min(n, c + e + 1)) for c, e, n in zip((z, y, x), (rz, ri, ri), shape))
        zz, yy, xx = np.ogrid[zs, ys, xs]
        out[zs, ys, xs] |= ((yy - y) ** 2 + (xx - x) ** 2) / r**2 + ((zz - z) / max(rz, 0.5)) ** 2 <= 1.0
    return out & (lung > 0)


def pool(x: np.ndarray, factor: tuple[int, int, int] = POOL) -> np.ndarray:
    """Block mean of a [D, H, W] array over ``factor``: the model's fixed AvgPool3d, done in numpy.

    Summed one axis at a time in integers for uint8/bool input (5x faster than one 6-axis mean).
    """
    d, h, w = x.shape
    a, b, c = factor
    acc = np.uint16 if x.dtype in (np.bool_, np.uint8) else np.float32
    s = x.reshape(d // a, a, h, w).sum(1, dtype=acc)
    s = s.reshape(d // a, h // b, b, w).sum(2, dtype=acc)
    s = s.reshape(d // a, h // b, w // c, c).sum(3, dtype=acc)
    return s.astype(np.float32) / np.float32(a * b * c)


def unpool(x: np.ndarray, factor: tuple[int, int, int] = POOL) -> np.ndarray:
    """Repeat each voxel over its 2x4x4 block: ``pool(unpool(x)) == x``, to feed a pooled map to the ONNX model."""
    for axis, f in enumerate(factor):
        x = np.repeat(x, f, axis=axis)
    return x


def _grey(x: np.ndarray, r: int) -> np.ndarray:
    """Grey dilation (r > 0) or erosion (r < 0) of a pooled fraction map, one voxel in-plane."""
    if r == 0:
        return x
    pad = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
    shifts = [pad[:, 1 + dy:1 + dy + x.shape[1], 1 + dx:1 + dx + x.shape[2]] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return np.max(shifts, axis=0) if r > 0 else np.min(shifts, axis=0)


def degrade_lesions(les: np.ndarray, lung: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Truth lesion fraction (uint8, model grid) -> the pooled lesion_map a lesion model's mask would give.

    Threshold at a random level and pool to 32x64x64, sometimes grow or shrink by one pooled voxel
    (a model's masks are too big or too small), miss small components, add false-positive specks
    inside the lungs. Returns float32 [D/2, H/4, W/4] in [0, 1], on the grid the network sees after its pooling.
    """
    frac = pool(les >= rng.uniform(0.3, 0.7) * 255)
    frac = _grey(frac, int(rng.choice([-1, 0, 0, 0, 1])))
    if frac.any() and rng.random() < 0.6:
        frac = frac * _drop_small(frac > 0, rng, max_voxels=int(rng.integers(2, 25)), p=float(rng.uniform(0.2, 0.8)))
    lung_p = pool(lung) > 0.5
    specks = _specks(frac.shape, lung_p, rng, int(rng.poisson(3)), rmax=1.5)
    if rng.random() < 0.2:  # an occasional larger false positive (vessel cluster, atelectasis, nodule)
        specks |= _specks(frac.shape, lung_p, rng, int(rng.integers(1, 3)), rmax=3.0)
    frac = np.maximum(frac, specks * np.float32(rng.uniform(0.3, 1.0)))
    return frac.astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the diagnosis training/held-out cache.")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--train", type=int, default=240, help="training phantoms (seeds 0..N-1)")
    ap.add_argument("--held-out", type=int, default=60, help="held-out phantoms (seeds 500000+)")
    ap.add_argument("--lidc-copies", type=int, default=8)
    ap.add_argument("--lesion-model", type=Path, default=None,
                    help="model folder whose output is LIDC-IDRI-0001's lesion map (e.g. models/lesion_seg)")
    a = ap.parse_args(argv)
    held = list(range(HELD_OUT_SEED0, HELD_OUT_SEED0 + a.held_out))
    log = lambda s: print(s, flush=True)  # noqa: E731
    build_cache(a.cache, held, log=log)
    build_cache(a.cache, list(range(a.train)), lidc_copies=a.lidc_copies, lesion_model=a.lesion_model, log=log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
