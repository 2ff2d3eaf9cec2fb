"""Score variants of the lesion step (post-processing settings) on the same network output.

A variant turns one series' network probabilities into the node's cleaned lesion map; every variant
of a tuning plan is applied to the probabilities of one network pass. Two places score them:

* :func:`score_phantoms`: synthetic series with exact truth (pooled Dice, lesion recall, false volume
  on the normal series);
* :class:`Chain`: a real series through the node's lung, lesion and diagnosis models (call,
  probabilities, lesion volume).

Used by ``tune_lesion_components`` (minimum component size) and ``tune_lesion_zsmooth`` (smoothing
along z).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from models.train.data_lesion import phantom_volume
from models.train.eval_diagnosis import MODELS
from models.train.eval_lesion import DiceSum, phantom_series_probs, val_seeds
from node.pipeline.preprocess import Placement

#: probabilities [N, 3, H, W] on the lung box, where they sit, the volume's shape, its lungs, the
#: series' facts (``voxel_ml``, ``slice_spacing_z_mm``) -> the cleaned lesion label map
Variant = Callable[[np.ndarray, Placement, tuple[int, int, int], np.ndarray, dict[str, Any]], np.ndarray]
RECALL_MIN_ML = 1.0
LABELS = ("background", "ground_glass_opacity", "consolidation")  # the label maps' 0, 1, 2


def truth_components(truth: np.ndarray, voxel_ml: float) -> tuple[np.ndarray, np.ndarray]:
    """Face-connected component labels of a truth lesion mask, and which labels are lesions of at least
    ``RECALL_MIN_ML`` (index 0, the background, never)."""
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray((truth > 0).astype(np.uint8))))
    big = np.bincount(labels.ravel()) * voxel_ml >= RECALL_MIN_ML
    big[0] = False
    return labels, big


def found(pred: np.ndarray, labels: np.ndarray, big: np.ndarray) -> int:
    """How many of the ``big`` truth lesions touch a predicted lesion voxel."""
    hit = np.bincount(labels[pred > 0].ravel(), minlength=big.size) > 0
    return int((big & hit).sum())


def score_phantoms(lesion_dir: Path, variants: Mapping[str, Variant], n: int, log=print,
                   volume: Callable[..., Any] = phantom_volume, what: str = "validation phantoms") -> dict[str, Any]:
    """Pooled infection Dice, lesion recall and false volume on the normal series of every variant, over
    ``n`` validation seeds (200000+) rendered by ``volume`` (a phantom or a slab of one)."""
    from node.pipeline.infer import load_model

    model = load_model(lesion_dir, device="cpu", threads=2)
    sums = {k: DiceSum() for k in variants}
    hits = {k: 0 for k in variants}
    false_ml = {k: 0.0 for k in variants}
    total = 0
    for i, (seed, kind) in enumerate(val_seeds(n)):
        hu, lungs, truth, args = volume(seed, kind)
        v = args["voxel_ml"]
        probs, placement = phantom_series_probs(lambda x: model.run_batched(x, 16), hu, lungs, model.manifest)
        labels, big = truth_components(truth, v)
        total += int(big.sum())
        for k, variant in variants.items():
            pred = variant(probs, placement, hu.shape, lungs, args)
            sums[k].add(pred, truth)
            hits[k] += found(pred, labels, big)
            if kind == "normal":
                false_ml[k] += float((pred > 0).sum() * v)
        if (i + 1) % 5 == 0:
            log(f"  {what} {i + 1}/{n}")
    return {k: {"infection_dice": round(sums[k].dice()["infection"], 4),
                "lesion_recall": round(hits[k] / total, 4) if total else None,
                "false_ml_normal_series": round(false_ml[k], 1)} for k in variants} | {"truth_components": total}


class Chain:
    """The node's lung, lesion and diagnosis models on a real series; the lesion network runs once and
    every variant is applied to its probabilities."""

    def __init__(self, lesion_dir: Path) -> None:
        from node.pipeline.infer import load_model

        self.lung = load_model(MODELS / "lung_seg", device="cpu", threads=2)
        self.lesion = load_model(lesion_dir, device="cpu", threads=2)
        self.diagnosis = load_model(MODELS / "diagnosis", device="cpu", threads=2)
        if self.lesion.manifest.output.label_names != list(LABELS):
            raise SystemExit(f"{lesion_dir}: the variants here take class index 1 for ground glass and 2 for "
                             f"consolidation; this model's labels are {self.lesion.manifest.output.label_names}")

    def volume(self, vol: Any, variants: Mapping[str, Variant]) -> dict[str, Any]:
        """Per variant: call, probabilities, lesion volume (``lesion_ml``) and the maps themselves
        (``lesions``, ``lungs``) for a caller that measures more."""
        from node.pipeline.preprocess import lung_box, slices_input
        from node.pipeline.runner import classify, segment_lungs, slice_batch

        lungs = segment_lungs(vol, self.lung)
        x, placement = slices_input(vol.hu, self.lesion.manifest, lung_box(lungs > 0))
        probs = self.lesion.run_batched(x, slice_batch(self.lesion))
        facts = {"voxel_ml": vol.voxel_ml, "slice_spacing_z_mm": float(vol.spacing_mm[0])}
        out: dict[str, Any] = {}
        for k, variant in variants.items():
            les = variant(probs, placement, vol.shape, lungs, facts)
            p = classify(vol, lungs, les, self.diagnosis)
            out[k] = {"call": max(p, key=lambda c: p[c]), "probabilities": p,
                      "lesion_ml": round(float((les > 0).sum() * vol.voxel_ml), 1), "lesions": les, "lungs": lungs}
        return out

    def series(self, name: str, variants: Mapping[str, Variant]) -> dict[str, Any]:
        """One LIDC series (no pneumonia: its lesion volume is false lesion), without the maps."""
        from models.train.eval_diagnosis import LIDC, lidc_volume

        rows = self.volume(lidc_volume(LIDC[name]), variants)
        return {k: {"call": r["call"], "probabilities": r["probabilities"], "false_lesion_ml": r["lesion_ml"]}
                for k, r in rows.items()}


def synthetic_test(lesion_dir: Path, setting: str, value: float, n: int, bar: float) -> dict[str, Any]:
    """The synthetic test series (seeds 230000+) with ``postprocessing[setting] = value``, judged on ``bar``."""
    from models.train.eval_lesion import phantom_test_metrics
    from node.pipeline.infer import load_model

    model = load_model(lesion_dir, device="cpu", threads=2)
    model.manifest.postprocessing[setting] = value
    res = phantom_test_metrics(lambda x: model.run_batched(x, 16), model.manifest, n, log=lambda s: print(s, flush=True))
    res["passed"] = res["infection_dice"] >= bar
    print(f"  synthetic test {res['infection_dice']:.4f} (bar {bar}): {'passed' if res['passed'] else 'failed'}")
    return res


def run_step(plan_path: Path, out: Path, step: str, chosen_key: str, *, select: Callable[[], dict[str, Any]],
             real_ct: Callable[[Any], dict[str, Any]], test: Callable[[Any], dict[str, Any]]) -> None:
    """One step of a tuning plan, results kept in ``out``: ``select`` picks ``chosen_key`` (or None);
    ``real-ct`` runs only after a choice, ``test`` only after ``real-ct`` passed, and only once."""
    results: dict[str, Any] = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {"plan": str(plan_path)}
    t0 = time.perf_counter()
    if step == "select":
        results["step_1_select"] = select()
    else:
        chosen = results.get("step_1_select", {}).get(chosen_key)
        if chosen is None:
            raise SystemExit("step 1 chose nothing (or has not run): the plan stops there")
        if step == "real-ct":
            results["step_2_real_ct"] = real_ct(chosen)
        else:
            if not results.get("step_2_real_ct", {}).get("passed"):
                raise SystemExit("step 2 has not passed: the test split is not read")
            if "step_3_test" in results:
                raise SystemExit("the test split was already scored for this plan: once only")
            results["step_3_test"] = test(chosen)
    results.setdefault("seconds", {})[step] = round(time.perf_counter() - t0, 1)
    out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
