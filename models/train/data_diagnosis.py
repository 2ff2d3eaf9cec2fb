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

Chain maps (``--chain``, a second folder, ``/tmp/diag_chain`` by default): the lesion map the node's
own chain gives for the same case, on the same grid: ``models/lesion_seg`` run as the node runs it
(``runner.segment_lesions``) with lungs from ``runner.segment_lungs`` (``models/lung_seg``) or, for
phantoms with ``--chain-phantom-lungs truth``, the phantom's truth lungs (the lesion model is then run
on the truth lung box and cleaned inside the truth lungs). A phantom's chain file holds only ``les``
(the node's binary lesion mask resized linearly, fraction x 255) and is attached to the cached case
as ``Case.les_chain``; LIDC-IDRI-0001 chain copies are whole cases (lungs and lung box from the lung
model, as in the node; empty truth, the lesion model's false positives as ``les_chain``).

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

from models.train.cache_files import save_npz_whole
from node.pipeline.infer import window
from node.pipeline.preprocess import lung_box, resize

WINDOW = (-450.0, 1350.0)  # level, width
SIZE = (64, 256, 256)  # D, H, W
CHANNELS = ("ct", "lesion_map")
POOL = (2, 4, 4)  # the model's first, fixed step: 2x4x4 average pooling -> 32 x 64 x 64
CLASSES = ("covid19", "other_pneumonia", "no_pneumonia")
KIND_CLASS = {"covid": 0, "pneumonia": 1, "normal": 2}
CACHE = Path("/tmp/diag_cache")
CHAIN = Path("/tmp/diag_chain")
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
    les_chain: np.ndarray | None = None  # the node chain's lesion map on the same grid (uint8 fraction x 255)


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
    from node.pipeline.infer import load_model
    from node.pipeline.runner import segment_lesions

    model = load_model(model_dir, device="cpu", threads=2)
    return segment_lesions(_chain_volume(hu, spacing), lungs, model)


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
    return save_npz_whole(cache / f"{case.name}.npz", ct=case.ct, les=case.les, lung=case.lung,
                          label=np.int64(case.label), meta=np.array(json.dumps(case.meta)))


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


# ---------------------------------------------------------------- lesion maps from the node's own chain

def _chain_volume(hu: np.ndarray, spacing: tuple[float, float, float]) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(hu=hu, shape=hu.shape, spacing_mm=spacing, voxel_ml=float(np.prod(spacing)) / 1000.0)


def load_chain_models(lesion_model: Path, lung_model: Path | None) -> tuple[Any, Any]:
    """(lesion model, lung model or None) loaded as the node loads them (hash checked), 2 threads."""
    from node.pipeline.infer import load_model

    les = load_model(lesion_model, device="cpu", threads=2)
    return les, (load_model(lung_model, device="cpu", threads=2) if lung_model is not None else None)


def phantom_chain_map(seed: int, lesion_model: Any, lung_model: Any | None) -> tuple[np.ndarray, dict[str, Any]]:
    """The node chain's lesion map of phantom ``seed`` on the grid of its cached case (uint8 fraction x 255).

    Lungs from the lung model (``segment_lungs``) when one is given, else the phantom's truth lungs;
    lesions from ``segment_lesions``. The grid is the cached case's (truth lung box, same margin), so the
    map lines up with the cached CT channel.
    """
    from node.pipeline.runner import segment_lesions, segment_lungs
    from node.synthetic.phantom import PhantomSpec, make_phantom

    ph = make_phantom(PhantomSpec(**phantom_spec_for(seed)))
    vol = _chain_volume(ph.hu, ph.spacing_mm)
    lungs = segment_lungs(vol, lung_model) if lung_model is not None else ph.lungs
    lesions = segment_lesions(vol, lungs, lesion_model)
    box = lung_box(ph.lungs > 0, _margin(np.random.default_rng(30_000 + seed)))
    les = resize((lesions[box] > 0).astype(np.float32), SIZE, linear=True)
    meta = {"lungs": "model" if lung_model is not None else "truth",
            "chain_lesion_ml": round(float((lesions > 0).sum()) * vol.voxel_ml, 1),
            "truth_lesion_ml": round(float((ph.lesions > 0).sum()) * vol.voxel_ml, 1)}
    return np.round(np.clip(les, 0.0, 1.0) * 255.0).astype(np.uint8), meta


def lidc_0001_chain_cases(copies: int, lesion_model: Any, lung_model: Any, archive: Path = LIDC_0001) -> list[Case]:
    """LIDC-IDRI-0001 (no pneumonia) through the node's chain: lungs and lung box from the lung model,
    ``les_chain`` = the lesion model's mask (its false positives), empty truth; ``copies`` box margins."""
    if any(f in str(archive).lower() for f in FORBIDDEN):
        raise ValueError(f"{archive} is validation data: never train on it")
    if not Path(archive).is_file():
        return []
    from node.pipeline.runner import segment_lesions, segment_lungs

    hu, spacing = read_dicom_archive(archive)
    vol = _chain_volume(hu, spacing)
    lungs = segment_lungs(vol, lung_model)
    lesions = segment_lesions(vol, lungs, lesion_model)
    tag = lambda m: f"models/{m.manifest.name} {m.manifest.version} sha256 {m.manifest.sha256[:12]}"  # noqa: E731
    meta = {"source": "LIDC-IDRI-0001", "lungs": tag(lung_model),
            "lesions": f"truth empty; chain map {tag(lesion_model)}",
            "chain_lesion_ml": round(float((lesions > 0).sum()) * vol.voxel_ml, 1)}
    rng = np.random.default_rng(40_000)
    out = []
    for k in range(copies):
        margin = _margin(rng)
        case = _grid_case(f"lidc0001_{k}", hu, lungs, lesions, KIND_CLASS["normal"], margin, meta)
        case.les_chain, case.les = case.les, np.zeros_like(case.les)
        out.append(case)
    return out


def save_chain_case(case: Case, chain: Path) -> Path:
    """A whole chain case (LIDC): ``les`` is the empty truth, ``les_chain`` the lesion model's map."""
    if case.les_chain is None:
        raise ValueError(f"{case.name} has no chain lesion map")
    return save_npz_whole(chain / f"{case.name}.npz", ct=case.ct, les=case.les, les_chain=case.les_chain,
                          lung=case.lung, label=np.int64(case.label), meta=np.array(json.dumps(case.meta)))


def attach_chain(cases: list[Case], chain: Path) -> list[Case]:
    """Cases with the chain's lesion map where ``chain`` has one (whole LIDC chain cases replace theirs)."""
    out = []
    for case in cases:
        path = chain / f"{case.name}.npz"
        if not path.is_file():
            out.append(case)
            continue
        with np.load(path) as z:
            if "ct" in z:
                case = Case(case.name, z["ct"], z["les"], z["lung"], int(z["label"]), json.loads(str(z["meta"])))
            else:
                case.meta = {**case.meta, "chain": json.loads(str(z["meta"]))}
            case.les_chain = z["les_chain"] if "les_chain" in z else z["les"]
        out.append(case)
    return out


def build_chain(chain: Path, seeds: list[int], *, lesion_model: Path, lung_model: Path | None,
                phantom_lungs: str = "truth", lidc_copies: int = 0, log: Any = print) -> None:
    """Chain lesion maps for every phantom seed (and LIDC-IDRI-0001 copies) missing in ``chain`` (restartable)."""
    chain.mkdir(parents=True, exist_ok=True)
    les_model, lung = load_chain_models(lesion_model, lung_model)
    t0 = time.perf_counter()
    if lidc_copies and not all((chain / f"lidc0001_{k}.npz").is_file() for k in range(lidc_copies)):
        if lung is None:
            raise ValueError("LIDC-IDRI-0001 chain cases need the lung model (--chain-lung-model)")
        for case in lidc_0001_chain_cases(lidc_copies, les_model, lung):
            save_chain_case(case, chain)
        log(f"LIDC-IDRI-0001 chain: {lidc_copies} copies, {time.perf_counter() - t0:.0f} s")
    for i, seed in enumerate(seeds):
        path = chain / f"phantom{seed}.npz"
        if path.is_file():
            continue
        les, meta = phantom_chain_map(seed, les_model, lung if phantom_lungs == "model" else None)
        meta["lesion_model"] = f"{lesion_model.name} {file_sha256_short(lesion_model)}"
        save_npz_whole(path, les=les, meta=np.array(json.dumps(meta)))
        if i % 10 == 0:
            log(f"chain phantom {seed} ({i + 1}/{len(seeds)}), {time.perf_counter() - t0:.0f} s")


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
    ap.add_argument("--chain", action="store_true",
                    help="instead: the node chain's lesion maps for the training phantoms and LIDC-IDRI-0001")
    ap.add_argument("--chain-dir", type=Path, default=CHAIN)
    ap.add_argument("--chain-lesion-model", type=Path, default=Path("models/lesion_seg"))
    ap.add_argument("--chain-lung-model", type=Path, default=Path("models/lung_seg"))
    ap.add_argument("--chain-phantom-lungs", choices=("truth", "model"), default="truth",
                    help="lungs for the phantoms' lesion model run: truth (faster) or the lung model")
    ap.add_argument("--chain-first", type=int, default=0, help="first training seed of the chain maps")
    a = ap.parse_args(argv)
    log = lambda s: print(s, flush=True)  # noqa: E731
    if a.chain:
        build_chain(a.chain_dir, list(range(a.chain_first, a.train)), lesion_model=a.chain_lesion_model,
                    lung_model=a.chain_lung_model, phantom_lungs=a.chain_phantom_lungs, lidc_copies=a.lidc_copies,
                    log=log)
        return 0
    held = list(range(HELD_OUT_SEED0, HELD_OUT_SEED0 + a.held_out))
    build_cache(a.cache, held, log=log)
    build_cache(a.cache, list(range(a.train)), lidc_copies=a.lidc_copies, lesion_model=a.lesion_model, log=log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
