"""Evaluate a lung model folder the way the node runs it, and print the figures for its model card.

    python -m models.train.eval_lung [--model models/lung_seg] [--phantoms 6] [--json OUT]

* held-out phantoms (seeds from ``TEST_SEED0``, never used in training or its validation), each
  written three times: head-first, feet-first in the scanner's convention and feet-first mirrored;
  per-lung Dice against the exact truth, and a left/right check: each predicted lung must overlap
  its own truth lung more than the other one;
* LIDC-IDRI-0002 and 0003 (validation only, never in training): per-lung Dice against masks made
  by the same classical method as the training labels (``models.train.lung_labels.label_lungs``).

Speed is measured by ``bench/infer.py`` on a whole series, per step.

The model runs through ``node.pipeline.runner.segment_lungs``: the same DICOM reading, canonical
orientation, resizing and clean-up as in production.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset

from models.train.data_lung import phantom_volume
from models.train.metrics import dice_per_label
from node.pipeline.infer import Model, load_model
from node.pipeline.runner import segment_lungs
from node.pipeline.volume import Volume, load_volume

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
TEST_SEED0 = 200_000
POSITIONS = (("HFS", "radiological"), ("FFS", "radiological"), ("FFS", "mirrored"))
CONSOLIDATION_CASES = ((300001, "lobar"), (300002, "segmental"), (300003, "bronchopneumonia"), (300004, "lobar"))
#: A larger held-out set for choosing between lung models on consolidated lung (seeds never trained on).
CONSOLIDATION_SELECT = tuple((320_000 + i, v) for i, v in enumerate(
    ("lobar",) * 6 + ("segmental",) * 3 + ("bronchopneumonia",) * 3))


def _volume(hu: np.ndarray, spacing: tuple[float, float, float] = (2.0, 1.0, 1.0)) -> Volume:
    """A canonical volume from an array (already canonical: phantoms read back by load_volume)."""
    return Volume(hu=hu, spacing_mm=spacing, origin_lps=np.zeros(3), axes_lps=np.eye(3), frames=[],
                  flip_rows=False, flip_cols=False, reference=Dataset())


def swapped(pred: np.ndarray, truth: np.ndarray) -> bool:
    """True when a predicted lung overlaps the opposite truth lung more than its own."""
    for lab, other in ((1, 2), (2, 1)):
        p = pred == lab
        if p.any() and (p & (truth == other)).sum() > (p & (truth == lab)).sum():
            return True
    return False


def phantom_check(model: Model, seed: int, workdir: Path, *, slices: int = 48, matrix: int | None = None,
                  positions: tuple[tuple[str, str], ...] = POSITIONS) -> list[dict[str, Any]]:
    """Dice per lung and the swap check for one held-out phantom in each patient position."""
    rows = []
    for orientation, convention in positions:
        sub = workdir / f"{seed}-{orientation}-{convention}"
        hu, truth, params = phantom_volume(seed, sub, slices=slices, matrix=matrix, orientation=orientation,
                                           ffs_convention=convention)
        files = sorted((sub / f"phantom-{seed}").glob("*.dcm"))
        vol = load_volume(files)
        pred = segment_lungs(vol, model)
        d = dice_per_label(pred, truth)
        rows.append({"seed": seed, "kind": params["kind"], "position": f"{orientation}/{convention}",
                     "dice_right": round(d[1], 4), "dice_left": round(d[2], 4), "swapped": swapped(pred, truth)})
    return rows


def lidc_check(model: Model, archive: Path) -> dict[str, Any]:
    """Per-lung Dice on a real LIDC series against the classical reference masks."""
    from models.train.lung_labels import label_lungs

    with tempfile.TemporaryDirectory(prefix="lidc-eval-") as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        vol = load_volume(sorted(Path(tmp).rglob("*.dcm")))
    reference = label_lungs(vol.hu, vol.spacing_mm)
    t0 = time.perf_counter()
    pred = segment_lungs(vol, model)
    seconds = time.perf_counter() - t0
    d = dice_per_label(pred, reference)
    ml = vol.voxel_ml
    return {"series": archive.name.split("-ct")[0], "slices": vol.shape[0], "dice_right": round(d[1], 4),
            "dice_left": round(d[2], 4), "swapped": swapped(pred, reference), "seconds": round(seconds, 2),
            "volume_ml": {"right": round(float((pred == 1).sum()) * ml), "left": round(float((pred == 2).sum()) * ml)},
            "reference_ml": {"right": round(float((reference == 1).sum()) * ml),
                             "left": round(float((reference == 2).sum()) * ml)}}


def consolidation_inside(model: Model, seeds_variants: tuple[tuple[int, str], ...] = CONSOLIDATION_CASES,
                         ) -> list[dict[str, Any]]:
    """Share of the true consolidation that the lung mask holds, on pneumonia phantoms.

    The truth lungs include consolidated lung; a mask that leaves it out under-reports lesion volume
    and involvement (the node keeps lesions inside the lung mask only).
    """
    from node.synthetic.phantom import PhantomSpec, make_phantom

    rows = []
    for seed, variant in seeds_variants:
        ph = make_phantom(PhantomSpec(kind="pneumonia", variant=variant, slices=48, matrix=256, seed=seed))
        lungs = segment_lungs(_volume(ph.hu, ph.spacing_mm), model) > 0
        cons = ph.lesions == 2
        ml = float(np.prod(ph.spacing_mm)) / 1000.0
        rows.append({"seed": seed, "variant": variant,
                     "fraction_inside": round(float((lungs & cons).sum() / max(int(cons.sum()), 1)), 3),
                     "consolidation_ml": round(float(cons.sum()) * ml, 1),
                     "missed_ml": round(float((cons & ~lungs).sum()) * ml, 1)})
    return rows


def consolidation_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean share per phantom, and the share of all their consolidation together (big lobes weigh more)."""
    total = sum(r["consolidation_ml"] for r in rows)
    return {"mean": round(float(np.mean([r["fraction_inside"] for r in rows])), 3),
            "pooled": round(1.0 - sum(r["missed_ml"] for r in rows) / max(total, 1e-9), 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REPO / "models" / "lung_seg")
    ap.add_argument("--phantoms", type=int, default=6, help="held-out phantoms (x3 patient positions; 0: none)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime CPU threads")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--consolidation", choices=("card", "select"), default="card",
                    help="consolidation phantoms: the card's 4 (300001-300004) or the 12 for choosing a model "
                         "(320000-320011)")
    a = ap.parse_args(argv)
    model = load_model(a.model, device="cpu", threads=a.threads)
    out: dict[str, Any] = {"model": f"{model.manifest.name} {model.manifest.version}", "phantoms": [], "lidc": []}
    with tempfile.TemporaryDirectory(prefix="lung-eval-") as tmp:
        for i in range(a.phantoms):
            for row in phantom_check(model, TEST_SEED0 + i, Path(tmp)):
                print(json.dumps(row), flush=True)
                out["phantoms"].append(row)
    for name in ("lidc-idri-0002-ct.tar.xz", "lidc-idri-0003-ct.tar.xz"):
        if (SHARED / name).is_file():
            row = lidc_check(model, SHARED / name)
            print(json.dumps(row), flush=True)
            out["lidc"].append(row)
        else:
            print(f"skipped {name}: not in {SHARED}", file=sys.stderr)
    out["consolidation"] = consolidation_inside(
        model, CONSOLIDATION_CASES if a.consolidation == "card" else CONSOLIDATION_SELECT)
    for row in out["consolidation"]:
        print(json.dumps(row), flush=True)
    ph = out["phantoms"]
    out["summary"] = {
        **({"phantom_dice_right_mean": round(float(np.mean([r["dice_right"] for r in ph])), 4),
            "phantom_dice_left_mean": round(float(np.mean([r["dice_left"] for r in ph])), 4),
            "phantom_dice_min": round(float(min(min(r["dice_right"], r["dice_left"]) for r in ph)), 4)}
           if ph else {}),  # --phantoms 0: the LIDC series and the consolidation phantoms only
        "swaps": sum(r["swapped"] for r in ph) + sum(r["swapped"] for r in out["lidc"]),
        "consolidation_inside": consolidation_summary(out["consolidation"]),
    }
    print(json.dumps(out["summary"], indent=2))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
