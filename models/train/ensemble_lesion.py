"""Average lesion networks: score the mean of their probabilities by a plan, and build it as one ONNX graph.

    python -m models.train.ensemble_lesion score --cv DIR0 DIR1 --members M0 M1 [--phantoms 30] [--out R.json]
    python -m models.train.ensemble_lesion score --members M0 [--phantoms 30]   # the phantoms only, no folds
    python -m models.train.ensemble_lesion build --members M0 M1 --version 0.4.0 --out DIR/lesion_seg

Networks trained alike from different seeds make different mistakes; the mean of their softmax
outputs is usually better than either (the fold ensembles of nnU-Net). ``score`` measures that with
the figures of ``models/train/plans/lesion-ensemble-2026-11.json``:

* ``medseg_oof``: each ``--cv`` folder holds one seed's ``train_lesion --cv 5 --keep-fold-models``
  networks; every MedSeg training slice is predicted by each seed's fold network that did not see it,
  alone and averaged (infection Dice, mean over the 50 slices);
* ``synthetic_val``: the final networks (``--members``: folders with ``model.onnx``) alone and
  averaged on validation phantoms 200000+, the node's path with the true lung mask (pooled Dice).

``build`` joins the members' ``weights.pt`` into one graph, ``mean(softmax(net_i(x)))``, so the node
runs the ensemble as it runs any lesion model (one file, one manifest, argmax after it). Neither
command reads the MedSeg test split or the synthetic test series.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from models.train.data_lesion import GrayMap, phantom_volume, read_medseg_train
from models.train.eval_lesion import (
    DiceSum,
    clean_series_lesions,
    dice,
    gray_map,
    labels_from_probs,
    manifest_z_weights,
    medseg_placement,
    onnx_runner,
    oof_probs,
    phantom_series_probs,
    val_seeds,
)


def medseg_oof(cv_dirs: list[Path], gmap: GrayMap, size: int, log=print) -> dict[str, list[float]]:
    """Per-slice infection Dice of each seed alone (``seed<i>``) and of their mean (``ensemble``)."""
    items = {it.name: it for it in read_medseg_train()}
    runs = []
    for i, d in enumerate(cv_dirs):
        runs.append(oof_probs(d, gmap, size))
        log(f"  out-of-fold probabilities of {d} ({i + 1}/{len(cv_dirs)})")
    per: dict[str, list[float]] = {key: [] for key in [f"seed{i}" for i in range(len(runs))] + ["ensemble"]}
    for n, it in sorted(items.items()):
        where, shape = medseg_placement(it, size)
        for i, r in enumerate(runs):
            per[f"seed{i}"].append(dice(labels_from_probs(r[n], where, shape)[0], it.labels)["infection"])
        mean = np.mean([r[n] for r in runs], axis=0)
        per["ensemble"].append(dice(labels_from_probs(mean, where, shape)[0], it.labels)["infection"])
    return per


def synthetic_val(members: list[Path], n: int, log=print) -> dict[str, DiceSum]:
    """Pooled Dice of each final network alone (``seed<i>``) and of their mean over ``n`` validation phantoms."""
    from node.pipeline.infer import load_model

    models = [load_model(m, device="cpu", threads=2) for m in members]
    manifest = models[0].manifest
    sums = {f"seed{i}": DiceSum() for i in range(len(models))} | {"ensemble": DiceSum()}
    for j, (seed, kind) in enumerate(val_seeds(n)):
        hu, lungs, lesions, args = phantom_volume(seed, kind)
        outs = [phantom_series_probs(partial(m.run_batched, batch_size=16), hu, lungs, manifest) for m in models]
        placement = outs[0][1]
        weights = manifest_z_weights(manifest, args["slice_spacing_z_mm"])
        for key, probs in [(f"seed{i}", p) for i, (p, _) in enumerate(outs)] + [
                ("ensemble", np.mean([p for p, _ in outs], axis=0))]:
            pred = clean_series_lesions(labels_from_probs(probs, placement, hu.shape, weights), lungs, manifest,
                                        args["voxel_ml"])
            sums[key].add(pred, lesions)
        if (j + 1) % 10 == 0:
            log(f"  validation phantoms {j + 1}/{n}")
    return sums


def build(members: list[Path], out: Path, version: str, log=print) -> dict[str, Any]:
    """One ONNX graph averaging the members' softmax, with its model.yaml (``version``; members' training inside)."""
    import torch
    from torch import nn

    from models.train.train_lesion import manifest
    from models.train.unet2d import UNet2D, export_onnx, n_params
    from node.pipeline.manifest import file_sha256

    class MeanOfNets(nn.Module):
        def __init__(self, nets: list[UNet2D]) -> None:
            super().__init__()
            self.nets = nn.ModuleList(nets)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([net(x) for net in self.nets]).mean(0)

    yamls = [yaml.safe_load((Path(m) / "model.yaml").read_text(encoding="utf-8")) for m in members]
    size = int(yamls[0]["input"]["size"][0])
    if any(int(y["input"]["size"][0]) != size for y in yamls):
        raise SystemExit("the members have different input sizes")
    nets = []
    for m, y in zip(members, yamls):
        net = UNet2D(base=int(y["training"]["base_channels"]), depth=int(y["training"]["depth"]))
        net.load_state_dict(torch.load(Path(m) / "weights.pt", map_location="cpu"))
        nets.append(net.eval())
    ens = MeanOfNets(nets).eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "model.onnx"
    export_onnx(ens, onnx_path, size)  # type: ignore[arg-type]
    x = np.random.default_rng(0).random((8, 1, size, size), dtype=np.float32)
    with torch.no_grad():
        want = ens(torch.from_numpy(x)).numpy()
    err = float(np.abs(onnx_runner(onnx_path)(x) - want).max())
    if not err <= 1e-4:
        raise RuntimeError(f"ONNX export parity failed: max |onnxruntime - torch| = {err:.2e}")
    log(f"export parity: max |onnxruntime - torch| = {err:.2e}")
    training = {
        "ensemble": {"combine": "mean of the members' softmax outputs, in the graph",
                     "members": [{k: v for k, v in y["training"].items() if k not in ("history", "medseg_gray_map")}
                                 | {"val_phantom_grid_dice": y["metrics"]["val_phantom_grid_dice"]} for y in yamls]},
        "medseg_gray_map": yamls[0]["training"]["medseg_gray_map"],
        "parameters": n_params(ens),
    }
    data = manifest(size, file_sha256(onnx_path), training, {"onnx_parity_max_abs": float(f"{err:.3g}")},
                    version=version, description=(
                        f"{len(nets)} small 2D U-Nets, their probabilities averaged: ground-glass opacity and "
                        "consolidation on each axial slice of the lung box of a chest CT, at reduced in-plane size."))
    (out / "model.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score", help="out-of-fold MedSeg and validation-phantom Dice, each seed and their mean")
    s.add_argument("--cv", type=Path, nargs="+", default=[],
                   help="one folder of fold<i>.onnx/.json per seed (left out: the validation phantoms only)")
    s.add_argument("--members", type=Path, nargs="+", required=True, help="the seeds' final model folders")
    s.add_argument("--phantoms", type=int, default=30, help="validation phantoms (seeds 200000+)")
    s.add_argument("--out", type=Path, default=None, help="write the scores here (JSON)")
    b = sub.add_parser("build", help="one ONNX graph averaging the members, with its model.yaml")
    b.add_argument("--members", type=Path, nargs="+", required=True, help="final model folders with weights.pt")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--version", required=True, help="the model version to write into model.yaml (e.g. 0.4.0)")
    a = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    if a.cmd == "build":
        build(a.members, a.out, a.version, log)
        log(f"wrote {a.out}/model.onnx and model.yaml; measure it with python -m models.train.eval_lesion --model {a.out}")
        return 0
    t0 = time.perf_counter()
    gmap, size = gray_map(a.members[0])
    oof: dict[str, list[float]] = {}
    if a.cv:
        log(f"MedSeg out-of-fold: {len(a.cv)} seeds")
        oof = medseg_oof(a.cv, gmap, size, log)
    log(f"synthetic validation: {a.phantoms} phantoms, {len(a.members)} networks")
    syn = synthetic_val(a.members, a.phantoms, log)
    scores = {k: {"synthetic_val": round(s.dice()["infection"], 4)}
              | ({"medseg_oof": round(float(np.mean(oof[k])), 4)} if k in oof else {}) for k, s in syn.items()}
    for k, v in scores.items():
        medseg = f"MedSeg out-of-fold {v['medseg_oof']:.4f}  " if "medseg_oof" in v else ""
        log(f"{k:9s} {medseg}validation phantoms {v['synthetic_val']:.4f}")
    log(f"({time.perf_counter() - t0:.0f} s)")
    if a.out:
        a.out.write_text(json.dumps({"scores": scores, "medseg_oof_per_image": oof, "phantoms": a.phantoms,
                                     "cv": [str(d) for d in a.cv], "members": [str(m) for m in a.members]},
                                    indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
