"""Evaluate the shipped diagnosis model (``models/diagnosis/model.onnx``) with onnxruntime, as the node runs it.

    python -m models.train.eval_diagnosis [--model models/diagnosis --held-out 60 --threads 2 --write-metrics]

Prints, from the ONNX model only (no torch):

* held-out synthetic phantoms (seeds 500000+, never trained or tuned on): per-class one-vs-rest AUC,
  accuracy and the confusion matrix, with the lesion_map channel (a) degraded truth like a lesion
  model's output (fixed seed; the headline numbers), (b) exact truth, (c) empty;
* real CT, LIDC-IDRI-0001 (seen in training), 0002 and 0003 (validation only): probabilities from
  ``node.pipeline.runner.classify`` with lung masks from ``models/lung_seg`` when it loads (else the
  classical ``lung_labels.label_lungs``) and lesion maps from ``models/lesion_seg`` when it loads
  (else empty); which one was used is printed;
* the three BTBDB tuberculosis CTs (neither class): probabilities with their coarse lesion masks as
  the lesion map, and with the lesion model's masks when it loads;
* with ``--chain N`` (needs ``models/lesion_seg``): the first N held-out phantoms re-rendered and run
  through the node's chain (lung model, lesion model, ``classify``): the lesion map is then a real
  lesion model's output;
* CPU seconds per series on ``--threads`` threads: the whole ``classify`` step and the model alone.

``--write-metrics`` writes these numbers into the ``metrics`` section of model.yaml (the sha256 of
model.onnx is unchanged: the manifest describes the same file).
"""

from __future__ import annotations

import argparse
import json
import tarfile
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import SimpleITK as sitk
import yaml

from models.train.data_diagnosis import CLASSES, Case, degrade_lesions, held_out_names, load_cases, unpool
from node.pipeline.infer import Model, load_model
from node.pipeline.runner import classify, segment_lesions, segment_lungs

MODELS = Path(__file__).resolve().parents[2] / "models"
DATA = Path("/work/shared/data")
LIDC = {f"LIDC-IDRI-000{k}": DATA / f"lidc-idri-000{k}-ct.tar.xz" for k in (1, 2, 3)}
TB_DIR = DATA / "btbdb-tb-chest-ct" / "data"


# ------------------------------------------------------------------ metrics

def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted half."""
    pos, neg = scores[positive], scores[~positive]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (pos.size * neg.size))


def confusion(truth: np.ndarray, pred: np.ndarray, k: int = 3) -> list[list[int]]:
    """Rows: true class, columns: predicted class, in CLASSES order."""
    m = np.zeros((k, k), dtype=int)
    for t, p in zip(truth, pred):
        m[t, p] += 1
    return m.tolist()


def summary(probs: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    pred = probs.argmax(1)
    aucs = {c: round(auc(probs[:, i], truth == i), 4) for i, c in enumerate(CLASSES)}
    return {"n": int(truth.size), "accuracy": round(float((pred == truth).mean()), 4), "auc_ovr": aucs,
            "auc_ovr_mean": round(float(np.mean(list(aucs.values()))), 4),
            "confusion_rows_true_cols_pred": confusion(truth, pred)}


# ------------------------------------------------------------------ held-out phantoms

def _lesion_channel(case: Case, mode: str, rng: np.random.Generator) -> np.ndarray:
    if mode == "degraded":
        return unpool(degrade_lesions(case.les, case.lung, rng))  # pooled by the model back to this map
    if mode == "truth":
        return (case.les >= 128).astype(np.float32)
    return np.zeros(case.les.shape, dtype=np.float32)


def held_out(model: Model, cases: list[Case], mode: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics over cached held-out phantoms (inputs already on the model grid) with one lesion-map mode."""
    rng = np.random.default_rng(123)
    probs, rows = [], []
    for c in cases:
        x = np.stack([c.ct.astype(np.float32) / 255.0, _lesion_channel(c, mode, rng)])[None]
        p = model.run(x)[0]
        probs.append(p)
        rows.append({"case": c.name, "variant": c.meta.get("variant"), "severity": c.meta.get("severity"),
                     "true": CLASSES[c.label], "pred": CLASSES[int(p.argmax())]})
    truth = np.array([c.label for c in cases])
    return summary(np.stack(probs), truth), rows


def held_out_node_chain(model: Model, seeds: list[int], lung_model: Model | None,
                        lesion_model: Model) -> dict[str, Any]:
    """Held-out phantoms re-rendered and run through the node's chain: lung model, lesion model, classify."""
    from models.train.data_diagnosis import KIND_CLASS, phantom_spec_for
    from node.synthetic.phantom import PhantomSpec, make_phantom

    probs, truth = [], []
    for seed in seeds:
        fields = phantom_spec_for(seed)
        ph = make_phantom(PhantomSpec(**fields))
        vol: Any = SimpleNamespace(hu=ph.hu, shape=ph.hu.shape, spacing_mm=ph.spacing_mm,
                              voxel_ml=float(np.prod(ph.spacing_mm)) / 1000.0)
        lungs = lungs_for(vol, lung_model)[0] if lung_model is not None else ph.lungs
        lesions, _ = lesions_for(vol, lungs, lesion_model)
        p = classify(vol, lungs, lesions, model)
        probs.append([p[c] for c in CLASSES])
        truth.append(KIND_CLASS[fields["kind"]])
    return {"seeds": [seeds[0], seeds[-1]], "lungs": _tag(lung_model) if lung_model is not None else "truth",
            "lesions": _tag(lesion_model), **summary(np.array(probs), np.array(truth))}


# ------------------------------------------------------------------ real CT

def _try_model(name: str, folder: Path | None = None) -> Model | None:
    """A sibling model folder if it is present and loads (hash checked), else None; a ``folder`` named by
    the caller must load."""
    if folder is not None:
        return load_model(folder, device="cpu", threads=2)
    try:
        return load_model(MODELS / name, device="cpu", threads=2)
    except Exception:  # noqa: BLE001 - absent or unfinished model: fall back and say so
        return None


def _tag(model: Model) -> str:
    """Which model made a mask: folder, version and short hash (sibling models change over time)."""
    m = model.manifest
    return f"models/{m.name} {m.version} sha256 {m.sha256[:12]}"


def lungs_for(vol: Any, lung_model: Model | None) -> tuple[np.ndarray, str]:
    """Lung mask as the node computes it (lung model + cleaning), or the classical labeller without it."""
    if lung_model is not None:
        return segment_lungs(vol, lung_model), _tag(lung_model)
    from models.train.lung_labels import label_lungs

    return label_lungs(vol.hu, vol.spacing_mm), "lung_labels.label_lungs"


def lesions_for(vol: Any, lungs: np.ndarray, lesion_model: Model | None) -> tuple[np.ndarray, str]:
    """Lesion mask as the node computes it, or an empty one without the lesion model."""
    if lesion_model is None:
        return np.zeros(vol.shape, dtype=np.uint8), "empty (no lesion model)"
    return segment_lesions(vol, lungs, lesion_model), _tag(lesion_model)


def _timed_classify(vol: Any, lungs: np.ndarray, lesions: np.ndarray, model: Model) -> tuple[dict[str, float], float]:
    t0 = time.process_time()
    probs = classify(vol, lungs, lesions, model)
    return probs, time.process_time() - t0


def lidc_volume(archive: Path) -> Any:
    from node.pipeline.volume import load_volume

    with tempfile.TemporaryDirectory(prefix="diag-eval-") as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        return load_volume(sorted(Path(tmp).rglob("*.dcm")))


def real_ct(model: Model, lung_model: Model | None, lesion_model: Model | None) -> dict[str, Any]:
    """Probabilities for each LIDC series present (all three are no pneumonia)."""
    out: dict[str, Any] = {}
    for name, archive in LIDC.items():
        if not archive.is_file():
            continue
        vol = lidc_volume(archive)
        lungs, lung_src = lungs_for(vol, lung_model)
        lesions, les_src = lesions_for(vol, lungs, lesion_model)
        probs, cpu = _timed_classify(vol, lungs, lesions, model)
        out[name] = {"probabilities": probs, "call": max(probs, key=lambda k: probs[k]), "lungs": lung_src,
                     "lesions": les_src, "lesion_ml": round(float((lesions > 0).sum() * vol.voxel_ml), 1),
                     "classify_cpu_s": round(cpu, 3)}
    return out


def nifti_volume(path: Path) -> tuple[Any, sitk.Image]:
    """A NIfTI CT in the node's canonical orientation (z inferior->superior, y A->P, x R->L)."""
    img = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")
    hu = np.round(sitk.GetArrayFromImage(img)).astype(np.int16)
    sx, sy, sz = img.GetSpacing()
    vol = SimpleNamespace(hu=hu, shape=hu.shape, spacing_mm=(sz, sy, sx), voxel_ml=sx * sy * sz / 1000.0)
    return vol, img


def tb_cases(model: Model, lung_model: Model | None, lesion_model: Model | None) -> dict[str, Any]:
    """Probabilities for the BTBDB TB CTs with their coarse masks, and with the lesion model's when present."""
    out: dict[str, Any] = {}
    for ct in sorted(TB_DIR.glob("*-128x128x64.nii.gz")):
        vol, _ = nifti_volume(ct)
        msk = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(ct).replace(".nii.gz", "-msk.nii.gz")), "LPS"))
        lungs, lung_src = lungs_for(vol, lung_model)
        coarse = ((msk > 0) & (lungs > 0)).astype(np.uint8)
        row: dict[str, Any] = {"lungs": lung_src, "lung_ml": round(float((lungs > 0).sum() * vol.voxel_ml), 1),
                               "with_coarse_tb_mask": classify(vol, lungs, coarse, model),
                               "coarse_lesion_ml": round(float(coarse.sum() * vol.voxel_ml), 1)}
        if lesion_model is not None:
            lesions, _ = lesions_for(vol, lungs, lesion_model)
            row["with_lesion_model"] = classify(vol, lungs, lesions, model)
        row["with_empty_lesion_map"] = classify(vol, lungs, np.zeros_like(lungs), model)
        out[ct.name.split("-")[0]] = row
    return out


def model_cpu_seconds(model: Model, repeats: int = 5) -> float:
    """Median CPU seconds of one model run (1 x 2 x 64 x 256 x 256) on the model's threads."""
    x = np.random.default_rng(0).random(model.input_shape(), dtype=np.float32)
    model.run(x)
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        model.run(x)
        times.append(time.process_time() - t0)
    return float(np.median(times))


def model_wall_seconds(model: Model, repeats: int = 5) -> float:
    x = np.random.default_rng(0).random(model.input_shape(), dtype=np.float32)
    model.run(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.run(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def evaluate(model_dir: Path, n_held_out: int, threads: int, cache: Path, chain: int = 0,
             lung_dir: Path | None = None) -> dict[str, Any]:
    model = load_model(model_dir, device="cpu", threads=threads)
    cases = load_cases(cache, held_out_names(n_held_out))
    res: dict[str, Any] = {"held_out_phantoms": {}}
    for mode in ("degraded", "truth", "empty") if cases else ():  # --held-out 0: the chain and real CT only
        metrics, rows = held_out(model, cases, mode)
        res["held_out_phantoms"][f"lesion_map_{mode}"] = metrics
        if mode == "degraded":
            res["held_out_errors"] = [r for r in rows if r["true"] != r["pred"]]
    lung_model, lesion_model = _try_model("lung_seg", lung_dir), _try_model("lesion_seg")
    if chain and lesion_model is not None:
        seeds = [int(n.removeprefix("phantom")) for n in held_out_names(chain)]
        res["held_out_phantoms"]["node_chain_lung_and_lesion_models"] = held_out_node_chain(
            model, seeds, lung_model, lesion_model)
    res["real_ct_no_pneumonia"] = real_ct(model, lung_model, lesion_model)
    res["tb_confounders"] = tb_cases(model, lung_model, lesion_model)
    res["cpu"] = {"threads": threads, "model_run_cpu_s": round(model_cpu_seconds(model), 3),
                  "model_run_wall_s": round(model_wall_seconds(model), 3)}
    return res


def write_metrics(model_dir: Path, res: dict[str, Any]) -> None:
    """Put the evaluation into model.yaml's metrics (keeps parity and every other section)."""
    path = model_dir / "model.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    old = data.get("metrics", {})
    held = res["held_out_phantoms"].get("lesion_map_degraded")
    cached = {  # without the cached held-out phantoms (--held-out 0) their figures stay as they were
        "held_out_synthetic": old.get("held_out_synthetic") if held is None else {
            "split": f"phantom seeds 500000..{500000 + held['n'] - 1}, lesion_map = degraded truth", **held},
        "held_out_synthetic_truth_lesion_map": res["held_out_phantoms"].get(
            "lesion_map_truth", old.get("held_out_synthetic_truth_lesion_map")),
        "held_out_synthetic_empty_lesion_map": res["held_out_phantoms"].get(
            "lesion_map_empty", old.get("held_out_synthetic_empty_lesion_map")),
    }
    data["metrics"] = {
        "onnx_parity_max_abs": old.get("onnx_parity_max_abs"),
        **cached,
        "held_out_synthetic_node_chain": res["held_out_phantoms"].get("node_chain_lung_and_lesion_models"),
        "real_ct_no_pneumonia": {k: {"call": v["call"], "probabilities": v["probabilities"], "lungs": v["lungs"],
                                     "lesions": v["lesions"]} for k, v in res["real_ct_no_pneumonia"].items()},
        "tb_confounders": res["tb_confounders"],
        "cpu": res["cpu"],
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    from models.train.data_diagnosis import CACHE

    ap = argparse.ArgumentParser(description="Evaluate models/diagnosis/model.onnx with onnxruntime.")
    ap.add_argument("--model", type=Path, default=MODELS / "diagnosis")
    ap.add_argument("--held-out", type=int, default=60,
                    help="cached held-out phantoms (0: skip them, no cache needed; the chain re-renders its own)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--chain", type=int, default=0,
                    help="also re-render this many held-out phantoms and run lung + lesion models + classify")
    ap.add_argument("--lung-model", type=Path, help="lung model folder for the chain (default: models/lung_seg)")
    ap.add_argument("--write-metrics", action="store_true")
    a = ap.parse_args(argv)
    res = evaluate(a.model, a.held_out, a.threads, a.cache, a.chain, a.lung_model)
    print(json.dumps(res, indent=1))
    if a.write_metrics:
        write_metrics(a.model, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
