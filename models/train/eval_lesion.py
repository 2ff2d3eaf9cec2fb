"""Evaluate a lesion model folder with onnxruntime, the way the node runs it.

    python -m models.train.eval_lesion --model models/lesion_seg [--phantoms 6] [--threads 2] [--update-manifest]

Prints (and with ``--update-manifest`` writes into model.yaml ``metrics``, which the sha256 does not
cover):

* held-out synthetic series (seeds 200000+, two of each kind, disjoint from training seeds):
  the node's path (``slices_input`` on the 3D box of the true lung mask, argmax, ``place_labels``,
  ``clean_lesions``) and Dice at the phantom's own resolution for ground glass, consolidation and
  infection (their union), pooled over all series;
* the MedSeg 48-slice test split: gray -> HU with the calibration stored in model.yaml, whole image
  as the box, argmax put back with nearest neighbour; infection Dice as the mean over images (as
  published by Inf-Net) and pooled over all pixels, and GGO / consolidation Dice;
* CPU time of onnxruntime for 300 lung-box slices at the model size on ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from models.train.data_lesion import MEDSEG_TEST, GrayMap, MedsegItem, medseg_input, phantom_volume, read_medseg
from node.pipeline.postprocess import clean_lesions
from node.pipeline.preprocess import Placement, full_box, lung_box, place_labels, slices_input

VAL_SEED0 = 200_000
VAL_KINDS = ("covid", "pneumonia", "normal")
Runner = Callable[[np.ndarray], np.ndarray]  # [N, 1, H, W] float32 -> [N, 3, H, W] probabilities


def val_seeds(n: int) -> list[tuple[int, str]]:
    """Held-out phantom seeds with their kind (balanced over kinds, disjoint from training seeds)."""
    return [(VAL_SEED0 + i, VAL_KINDS[i % 3]) for i in range(n)]


class DiceSum:
    """Pooled Dice: sums of intersections and sizes over many images, per label and for the union."""

    def __init__(self) -> None:
        self.inter = np.zeros(3)
        self.size = np.zeros(3)

    def add(self, pred: np.ndarray, truth: np.ndarray) -> None:
        for i, (p, t) in enumerate(_masks(pred, truth)):
            self.inter[i] += float((p & t).sum())
            self.size[i] += float(p.sum() + t.sum())

    def dice(self) -> dict[str, float]:
        d = np.where(self.size > 0, 2.0 * self.inter / np.maximum(self.size, 1.0), 1.0)
        return {"ggo": float(d[0]), "consolidation": float(d[1]), "infection": float(d[2])}


def _masks(pred: np.ndarray, truth: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(pred == 1, truth == 1), (pred == 2, truth == 2), (pred > 0, truth > 0)]


def dice(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice of one image or volume (1.0 where both are empty)."""
    d = DiceSum()
    d.add(pred, truth)
    return d.dice()


def labels_from_probs(probs: np.ndarray, placement: Placement, shape: tuple[int, int, int]) -> np.ndarray:
    """Argmax on the model grid, put back into the volume with nearest neighbour (as the node does)."""
    return place_labels(np.argmax(probs, axis=1).astype(np.uint8), placement, shape)


def medseg_predict(run: Runner, item: MedsegItem, gmap: GrayMap, size: int) -> np.ndarray:
    """Label map of one MedSeg image at its own resolution."""
    x = medseg_input(item.gray, gmap, size)[None, None]
    shape = (1, *item.gray.shape)
    return labels_from_probs(run(x), Placement(full_box(shape), (1, size, size)), shape)[0]


def medseg_metrics(run: Runner, items: list[MedsegItem], gmap: GrayMap, size: int) -> dict[str, float]:
    """Mean-over-images and pooled Dice on MedSeg slices."""
    pooled = DiceSum()
    per_image = []
    for it in items:
        pred = medseg_predict(run, it, gmap, size)
        pooled.add(pred, it.labels)
        per_image.append(dice(pred, it.labels))
    p = pooled.dice()
    return {"infection_dice_mean": _mean(per_image, "infection"), "infection_dice_global": p["infection"],
            "ggo_dice_mean": _mean(per_image, "ggo"), "ggo_dice_global": p["ggo"],
            "consolidation_dice_mean": _mean(per_image, "consolidation"),
            "consolidation_dice_global": p["consolidation"], "images": len(items)}


def _mean(rows: list[dict[str, float]], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def phantom_series_labels(run: Runner, hu: np.ndarray, lungs: np.ndarray, manifest: Any,
                          voxel_ml: float) -> np.ndarray:
    """The node's lesion step on a phantom with its true lung mask: box, model, placement, cleaning."""
    box = lung_box(lungs > 0)
    x, placement = slices_input(hu, manifest, box)
    raw = labels_from_probs(run(x), placement, hu.shape)
    min_ml = float(manifest.postprocessing.get("min_component_ml", 0.1))
    return clean_lesions(raw, lungs, min_ml=min_ml, voxel_ml=voxel_ml)


def phantom_metrics(run: Runner, manifest: Any, n: int, log=print) -> dict[str, Any]:
    """Pooled Dice over ``n`` held-out phantoms (regenerated from their seeds)."""
    pooled = DiceSum()
    for seed, kind in val_seeds(n):
        hu, lungs, lesions, args = phantom_volume(seed, kind)
        pred = phantom_series_labels(run, hu, lungs, manifest, args["voxel_ml"])
        pooled.add(pred, lesions)
        d = dice(pred, lesions)
        log(f"  phantom {seed} {kind} {args['slice_thickness_mm']} mm matrix {args['matrix']}: "
            f"GGO {d['ggo']:.3f} consolidation {d['consolidation']:.3f} infection {d['infection']:.3f}")
    p = pooled.dice()
    return {"ggo_dice": p["ggo"], "consolidation_dice": p["consolidation"], "infection_dice": p["infection"],
            "series": n, "seeds": [VAL_SEED0, VAL_SEED0 + n - 1]}


def cpu_seconds(model: Any, n: int = 300) -> tuple[float, float]:
    """Wall time and process CPU time of ``n`` lung-box slices at the model size through ``run_batched``.

    On a shared machine the wall time depends on the other jobs; CPU time / threads is what the
    model costs on otherwise idle cores.
    """
    size = model.manifest.input.size
    x = np.random.default_rng(0).random((n, 1, size[0], size[1]), dtype=np.float32)
    batch = int(model.manifest.preprocessing.get("batch_size", 16))
    model.run_batched(x[:batch], batch)  # warm-up
    c0, t0 = time.process_time(), time.perf_counter()
    model.run_batched(x, batch)
    return time.perf_counter() - t0, time.process_time() - c0


def _r(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def evaluate(model_dir: Path, *, phantoms: int = 6, threads: int = 2, log=print) -> dict[str, Any]:
    """All metrics of a model folder (see module doc)."""
    from node.pipeline.infer import load_model

    model = load_model(model_dir, device="cpu", threads=threads)
    m = model.manifest
    size = int(m.input.size[0])  # type: ignore[arg-type]
    batch = int(m.preprocessing.get("batch_size", 16))

    def run(x: np.ndarray) -> np.ndarray:
        return model.run_batched(x, batch)

    out: dict[str, Any] = {}
    log(f"held-out phantoms ({phantoms}):")
    out["synthetic_heldout"] = _r(phantom_metrics(run, m, phantoms, log))
    log(f"  pooled: {out['synthetic_heldout']}")
    cal = (m.training or {}).get("medseg_gray_map")
    if cal and MEDSEG_TEST.is_dir():
        gmap = GrayMap(float(cal["lung_gray"]), float(cal["tissue_gray"]))
        out["medseg_test"] = _r(medseg_metrics(run, read_medseg(MEDSEG_TEST), gmap, size))
        log(f"MedSeg test split: {out['medseg_test']}")
    wall, cpu = cpu_seconds(model)
    load = os.getloadavg()[0]
    out["cpu_onnxruntime_300_slices"] = {"threads": threads, "size": size, "wall_s": round(wall, 2),
                                         "cpu_s": round(cpu, 2), "load_average_1min": round(load, 1)}
    log(f"onnxruntime CPU, {threads} threads, 300 slices {size}x{size}: wall {wall:.2f} s, process CPU {cpu:.2f} s "
        f"(load average {load:.1f} on {os.cpu_count()} cores)")
    return out


def update_manifest(model_dir: Path, results: dict[str, Any]) -> None:
    """Write the measured metrics into model.yaml (keeps what training wrote, e.g. the CV figure)."""
    path = Path(model_dir) / "model.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["metrics"] = {**(data.get("metrics") or {}), **results}
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path("models/lesion_seg"))
    ap.add_argument("--phantoms", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--update-manifest", action="store_true")
    ap.add_argument("--cv", type=Path, default=None, help="cv.json of train_lesion --cv to store beside the metrics")
    a = ap.parse_args(argv)
    results = evaluate(a.model, phantoms=a.phantoms, threads=a.threads, log=lambda s: print(s, flush=True))
    if a.cv is not None:
        cv = json.loads(a.cv.read_text(encoding="utf-8"))
        results["medseg_train_cv"] = {"folds": len(cv["folds"]), **cv["mean"],
                                      "per_fold_infection_dice_mean": [f["infection_dice_mean"] for f in cv["folds"]]}
        print(f"MedSeg train {len(cv['folds'])}-fold CV: {results['medseg_train_cv']}")
    if a.update_manifest:
        update_manifest(a.model, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
