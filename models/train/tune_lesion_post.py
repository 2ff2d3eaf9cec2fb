"""Choose the lesion model's post-processing on out-of-fold predictions, by a plan written beforehand.

    python -m models.train.tune_lesion_post --plan models/train/plans/lesion-postprocess-2026-11.json \\
        --folds DIR --model models/lesion_seg [--phantoms 30] [--out results.json]

``DIR`` holds ``fold<i>.onnx`` and ``fold<i>.json`` from ``train_lesion --cv 5 --keep-fold-models``.
Each plan variant (a probability threshold and a placement, see :func:`decide`) is scored on

* ``medseg_oof``: the 50 MedSeg training slices, each predicted by the fold model that did not see it
  (infection Dice, mean over images), and
* ``synthetic_val``: validation phantoms 200000+ through the node's path with the shipped model
  (infection Dice pooled over series).

The plan's rule then picks a variant or keeps the baseline. Neither the MedSeg test split nor the
synthetic test series is read here.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.train.data_lesion import GrayMap, phantom_volume, read_medseg_train
from models.train.eval_lesion import (
    DiceSum,
    clean_series_lesions,
    dice,
    gray_map,
    medseg_placement,
    oof_probs,
    phantom_series_probs,
    val_seeds,
)
from node.pipeline.preprocess import Placement, place_labels, resize

Variant = tuple[float | None, str]  # (threshold, placement)


def decide(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """Labels (0 / 1 ground glass / 2 consolidation) from [N, 3, H, W] probabilities.

    ``threshold`` None: argmax. A number ``s``: lesion where 1 - p(background) > s, its class the
    larger of the two lesion probabilities (ties go to ground glass, as argmax does).
    """
    if threshold is None:
        return np.argmax(probs, axis=1).astype(np.uint8)
    lesion = 1.0 - probs[:, 0] > threshold
    return np.where(lesion, np.where(probs[:, 2] > probs[:, 1], 2, 1), 0).astype(np.uint8)


def place(probs: np.ndarray, threshold: float | None, placement: Placement, shape: tuple[int, int, int],
          how: str) -> np.ndarray:
    """Labels on the volume: decided on the model grid and put back (``nearest``), or decided after
    resizing the probabilities linearly to the image grid (``linear``, 32 slices at a time)."""
    if how == "nearest":
        return place_labels(decide(probs, threshold), placement, shape)
    region = tuple(s.stop - s.start for s in placement.box)
    out = np.zeros(shape, dtype=np.uint8)
    labels = np.empty(region, dtype=np.uint8)
    for z0 in range(0, probs.shape[0], 32):
        z1 = min(probs.shape[0], z0 + 32)
        fine = np.stack([resize(np.ascontiguousarray(probs[z0:z1, c]), (z1 - z0, region[1], region[2]), linear=True)
                         for c in (1, 2)], axis=1)
        full = np.concatenate([1.0 - fine.sum(axis=1, keepdims=True), fine], axis=1)
        labels[z0:z1] = decide(full, threshold)
    out[placement.box] = labels
    return out


def plan_variants(plan: dict[str, Any]) -> list[Variant]:
    v = plan["variants"]
    return [(t, p) for p in v["placement"] for t in v["threshold"]]


def name(v: Variant) -> str:
    return f"{'argmax' if v[0] is None else f'p>{v[0]}'}/{v[1]}"


def medseg_oof(folds: Path, variants: list[Variant], gmap: GrayMap, size: int, log=print) -> dict[str, list[float]]:
    """Per-image infection Dice of every variant, each image predicted by the fold model that did not see it."""
    probs = oof_probs(folds, gmap, size)
    log(f"  {folds}: out-of-fold probabilities of {len(probs)} slices")
    per: dict[str, list[float]] = {name(v): [] for v in variants}
    for it in read_medseg_train():
        where, shape = medseg_placement(it, size)
        for v in variants:
            per[name(v)].append(dice(place(probs[it.name], v[0], where, shape, v[1])[0], it.labels)["infection"])
    return per


def synthetic_val(model_dir: Path, variants: list[Variant], n: int, log=print) -> dict[str, DiceSum]:
    """Pooled Dice of every variant over ``n`` validation phantoms, the node's path with the true lungs."""
    from node.pipeline.infer import load_model

    model = load_model(model_dir, device="cpu", threads=2)
    sums = {name(v): DiceSum() for v in variants}
    for i, (seed, kind) in enumerate(val_seeds(n)):
        hu, lungs, lesions, args = phantom_volume(seed, kind)
        probs, placement = phantom_series_probs(lambda x: model.run_batched(x, 16), hu, lungs, model.manifest)
        for v in variants:
            pred = clean_series_lesions(place(probs, v[0], placement, hu.shape, v[1]), lungs, model.manifest,
                                        args["voxel_ml"])
            sums[name(v)].add(pred, lesions)
        if (i + 1) % 10 == 0:
            log(f"  validation phantoms {i + 1}/{n}")
    return sums


def choose(scores: dict[str, dict[str, float]], base: str, margin: float = 0.005) -> str:
    """The plan's rule: the best mean of the two metrics, adopted only by ``margin`` and with neither
    metric more than ``margin`` below the baseline's."""
    def mean(k: str) -> float:
        return (scores[k]["medseg_oof"] + scores[k]["synthetic_val"]) / 2.0

    best = max(scores, key=mean)
    ok = (mean(best) >= mean(base) + margin
          and all(scores[best][m] >= scores[base][m] - margin for m in ("medseg_oof", "synthetic_val")))
    return best if ok else base


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", type=Path, required=True)
    ap.add_argument("--folds", type=Path, required=True, help="folder with fold<i>.onnx / fold<i>.json")
    ap.add_argument("--model", type=Path, default=Path("models/lesion_seg"))
    ap.add_argument("--phantoms", type=int, default=30, help="validation phantoms (seeds 200000+)")
    ap.add_argument("--out", type=Path, default=None, help="write the scores and the choice here (JSON)")
    a = ap.parse_args(argv)
    plan = json.loads(a.plan.read_text(encoding="utf-8"))
    variants = plan_variants(plan)
    gmap, size = gray_map(a.model)
    t0 = time.perf_counter()
    print(f"MedSeg out-of-fold: {len(variants)} variants", flush=True)
    oof = medseg_oof(a.folds, variants, gmap, size, log=lambda s: print(s, flush=True))
    print(f"synthetic validation: {a.phantoms} phantoms", flush=True)
    syn = synthetic_val(a.model, variants, a.phantoms, log=lambda s: print(s, flush=True))
    scores = {k: {"medseg_oof": float(np.mean(oof[k])), "synthetic_val": syn[k].dice()["infection"]} for k in oof}
    base = name((plan["rule"]["baseline"]["threshold"], plan["rule"]["baseline"]["placement"]))
    picked = choose(scores, base)
    for k, s in scores.items():
        print(f"{k:16s} MedSeg OOF {s['medseg_oof']:.4f}  synthetic val {s['synthetic_val']:.4f}"
              f"{'  <- baseline' if k == base else ''}{'  <- picked' if k == picked else ''}")
    print(f"picked: {picked} ({time.perf_counter() - t0:.0f} s)")
    if a.out:
        a.out.write_text(json.dumps({"plan": str(a.plan), "scores": scores, "baseline": base, "picked": picked,
                                     "medseg_oof_per_image": oof, "phantoms": a.phantoms}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
