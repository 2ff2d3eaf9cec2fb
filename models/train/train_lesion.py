"""Train the lesion model and write a node model folder: ``DIR/model.onnx`` + ``DIR/model.yaml``.

    python -m models.train.train_lesion --out DIR [--epochs N --seed S --phantoms K --size 192 --base 8]
    python -m models.train.train_lesion --out DIR --cv 5     # 5-fold cross-validation on MedSeg train only
    python -m models.train.train_lesion --out DIR --cv 5 --fold 3 --device cuda   # one fold, on a GPU

Data (``models.train.data_lesion``): ``--phantoms`` random phantoms (seeds 0..K-1; kinds covid /
pneumonia / normal and their variants) and the 50 MedSeg training slices, each repeated
``--medseg-reps`` times per epoch; an epoch also draws ``--phantom-slices`` phantom slices, half of
them with lesions. Validation every epoch: Dice on held-out phantoms (seeds 200000+) on the model
grid, and in cross-validation on the held-out MedSeg fold at the image's own resolution. The MedSeg
test split is never read here. Seeds fix data, initialisation, augmentation and batch order; on the
CPU a run repeats bit for bit, on CUDA (``--device cuda``) a few kernels (bilinear upsampling's
backward pass) are not deterministic, so a rerun agrees to training noise, not bit for bit.

Export: ONNX opset 17, dynamic batch, softmax in the graph; onnxruntime and torch must agree to
1e-4, else the run fails. ``models.train.eval_lesion`` measures the shipped metrics.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import yaml
from torch import nn
from torch.nn import functional as F

from models.train.data_lesion import (
    LUNG_HU,
    MEDSEG_TRAIN,
    TISSUE_HU,
    GrayMap,
    MedsegItem,
    augment_lesion,
    calibrate,
    epoch_indices,
    medseg_samples,
    normal_slices,
    paste_lesions,
    phantom_lung_slices,
    phantom_samples,
    read_medseg_train,
    real_negative_slices,
    training_phantom_seeds,
)
from models.train.data_lung import LUNG_WINDOW, SliceSet
from models.train.eval_lesion import DiceSum, fold_means, medseg_metrics, val_seeds
from models.train.train_lung import predict, seed_everything
from models.train.unet2d import UNet2D, export_onnx, n_params
from node.pipeline.manifest import file_sha256

VERSION = "0.3.0"
SNOMED = {
    "ground_glass_opacity": {"code": "1217294009", "meaning": "Ground glass opacity", "scheme": "SCT"},
    "consolidation": {"code": "95436008", "meaning": "Lung consolidation", "scheme": "SCT"},
}


# --dice modes, with the words the manifest uses for each
DICE_MODES = {"batch": "Dice over the batch", "image": "Dice per image", "lesion-image": "Dice per image with the class"}


def loss_fn(logits: torch.Tensor, y: torch.Tensor, dice: str = "batch") -> torch.Tensor:
    """Cross-entropy plus soft Dice of GGO, consolidation and infection (their union).

    ``dice``: "batch" pools the Dice over the batch. "image" takes it per sample and averages, which weighs
    small lesions as much as large ones, as the mean-over-images test metric does. "lesion-image" averages only
    the samples whose truth has the class: on a lesion-free crop the Dice is 0 or 1 by its smoothing alone, so
    there cross-entropy alone answers for false lesions.
    """
    if dice not in DICE_MODES:
        raise ValueError(f"unknown Dice mode {dice!r}: use one of {', '.join(DICE_MODES)}")
    ce = F.cross_entropy(logits, y)
    prob = torch.softmax(logits, 1)
    onehot = F.one_hot(y, 3).permute(0, 3, 1, 2).float()
    p = torch.stack([prob[:, 1], prob[:, 2], prob[:, 1] + prob[:, 2]], 1)
    t = torch.stack([onehot[:, 1], onehot[:, 2], onehot[:, 1] + onehot[:, 2]], 1)
    dims = (0, 2, 3) if dice == "batch" else (2, 3)
    score = (2 * (p * t).sum(dims) + 1.0) / ((p + t).sum(dims) + 1.0)
    if dice == "lesion-image":
        present = t.sum((2, 3)) > 0
        return ce + (1.0 - score[present].mean()) if present.any() else ce
    return ce + (1.0 - score.mean())


def grid_dice(model: UNet2D, val: SliceSet) -> dict[str, float]:
    """Pooled Dice on the model grid (fast per-epoch validation)."""
    d = DiceSum()
    d.add(predict(model, val.x).argmax(1), val.y)
    return d.dice()


def torch_runner(model: UNet2D):
    """A ``Runner`` over the torch model (eval mode)."""
    return lambda x: predict(model, x[:, 0])


def _sample(phantom: SliceSet, med: SliceSet, source: str, k: int, paste: float, rng: np.random.Generator,
            negatives: SliceSet | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Training pair ``k`` of MedSeg (``source`` "m"), the real lesion-free slices ("n") or the phantoms; with
    probability ``paste`` a MedSeg slice gets the lesions of another MedSeg training slice pasted in. At
    ``paste`` 0 no random number is drawn here, so earlier recipes repeat bit for bit."""
    if source == "n" and negatives is not None:
        return negatives.x[k], negatives.y[k]
    if source != "m":
        return phantom.x[k], phantom.y[k]
    if paste and len(med) > 1 and rng.random() < paste:
        j = int(rng.integers(len(med) - 1))
        j += j >= k
        return paste_lesions(med.x[k], med.y[k], med.x[j], med.y[j], rng)
    return med.x[k], med.y[k]


def fit(phantom: SliceSet, med: SliceSet, val: SliceSet, *, epochs: int, seed: int, base: int, batch: int,
        lr: float, reps: int, n_ph: int, crop: int = 0, depth: int = 3, init: Path | None = None,
        device: str = "cpu", normal_share: float = 0.0, dice: str = "batch", paste: float = 0.0,
        elastic: float = 0.0, gamma: float = 0.0, negatives: SliceSet | None = None, n_neg: int = 0, log=print,
        fold_eval=None) -> tuple[UNet2D, list[dict[str, Any]]]:
    """Train a U-Net (fresh, or from the ``init`` weights); per epoch log loss, held-out phantom Dice, fold metric.

    Augmentation runs on the CPU; only the network's steps go to ``device``. The model comes back on the CPU.
    """
    seed_everything(seed)
    model = UNet2D(base, depth=depth)
    if init is not None:
        model.load_state_dict(torch.load(init, map_location="cpu"))
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n_neg = n_neg if negatives is not None and len(negatives) else 0
    per_epoch = len(med) * reps + n_ph + n_neg
    steps = max(1, epochs * ((per_epoch + batch - 1) // batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    rng = np.random.default_rng(seed)
    history: list[dict[str, Any]] = []
    normal = normal_slices(phantom) if normal_share else None
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = epoch_indices(phantom, len(med), reps, n_ph, rng, normal, normal_share, n_neg,
                              0 if negatives is None else len(negatives))
        total, n = 0.0, 0
        for i in range(0, len(order), batch):
            pairs = [augment_lesion(*_sample(phantom, med, s, k, paste, rng, negatives), rng, crop, elastic, gamma)
                     for s, k in order[i:i + batch]]
            xb = torch.from_numpy(np.stack([p[0] for p in pairs])[:, None]).to(device)
            yb = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64)).to(device)
            loss = loss_fn(model.logits(xb), yb, dice)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(pairs)
            n += len(pairs)
        row: dict[str, Any] = {"epoch": epoch, "loss": round(total / n, 4)}
        row.update({f"val_phantom_{k}": round(v, 4) for k, v in grid_dice(model, val).items()})
        if fold_eval is not None and (epoch == epochs or epoch % 4 == 0):
            row["fold_infection_dice_mean"] = round(fold_eval(model)["infection_dice_mean"], 4)
        history.append(row)
        log(f"epoch {epoch}/{epochs}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "epoch")
            + f", {time.perf_counter() - t0:.0f} s")
    return model.cpu(), history


def whole_box_batchnorm(model: UNet2D, phantom: SliceSet, med: SliceSet, *, reps: int, n_ph: int, batch: int,
                        seed: int, device: str = "cpu", elastic: float = 0.0, gamma: float = 0.0) -> UNet2D:
    """A copy of ``model`` whose BatchNorm statistics are measured on whole lung boxes; its weights are unchanged.

    Training feeds 128-pixel crops (60 % centred on a lesion) and keeps running averages that follow the
    last ten or so batches, while the node feeds whole 192-pixel boxes. Here the statistics are measured
    once, with equal weight per batch, over one epoch's draw of the training mix (every MedSeg slice
    ``reps`` times and ``n_ph`` phantom slices), augmented as in training but not cropped. The draw has
    its own random stream, so training is unchanged.
    """
    tuned = copy.deepcopy(model).to(device)
    norms = [m for m in tuned.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    rng = np.random.default_rng(seed + 7_000_003)
    order = epoch_indices(phantom, len(med), reps, n_ph, rng)
    tuned.train()
    with torch.no_grad():
        for i in range(0, len(order), batch):
            xs = [augment_lesion(*_sample(phantom, med, s, k, 0.0, rng), rng, 0, elastic, gamma)[0]
                  for s, k in order[i:i + batch]]
            tuned(torch.from_numpy(np.stack(xs)[:, None]).to(device))
    for m in norms:
        m.momentum = 0.1
    return tuned.eval().cpu()


def flip_averaged(run):
    """A runner that averages the probabilities of each slice and its left-right mirror image."""
    return lambda x: 0.5 * (run(x) + run(np.ascontiguousarray(x[..., ::-1]))[..., ::-1])


def folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    """``k`` disjoint index sets covering 0..n-1 (fixed permutation)."""
    return np.array_split(np.random.default_rng(1234 + seed).permutation(n), k)


def cross_validate(items: list[MedsegItem], gmap: GrayMap, phantom: SliceSet, val: SliceSet, k: int,
                   cfg: dict[str, Any], log=print, keep: Path | None = None,
                   negatives: SliceSet | None = None) -> dict[str, Any]:
    """k-fold CV on the MedSeg training slices: train on k-1 folds (+ phantoms), score the held-out fold.

    ``cfg["fold"]`` > 0 runs that fold alone (parallel runs; ``sweep_lesion`` averages the folds' files).
    ``keep``: write each fold's network there as ``fold<i>.onnx`` (with the names of the slices it did not
    see in ``fold<i>.json``), so post-processing can be tuned on out-of-fold predictions.
    """
    size = cfg["size"]
    rows = []
    per_image_rows: dict[int, dict[str, dict[str, float]]] = {}
    for f, held in enumerate(folds(len(items), k, cfg["seed"])):
        if cfg["fold"] and f + 1 != cfg["fold"]:
            continue
        train_items = [it for i, it in enumerate(items) if i not in set(held.tolist())]
        test_items = [items[i] for i in held]
        log(f"fold {f + 1}/{k}: train {len(train_items)} MedSeg slices, held out {[it.name for it in test_items]}")
        med = medseg_samples(train_items, gmap, size)
        model, _ = fit(phantom, med, val, log=log, epochs=cfg["epochs"], seed=cfg["seed"], base=cfg["base"],
                       batch=cfg["batch"], lr=cfg["lr"], reps=cfg["reps"], n_ph=cfg["n_ph"], crop=cfg["crop"],
                       depth=cfg["depth"], init=cfg["init"], device=cfg["device"], normal_share=cfg["normal_share"],
                       dice=cfg["dice"], paste=cfg["paste"], elastic=cfg["elastic"], gamma=cfg["gamma"],
                       negatives=negatives, n_neg=cfg["real_negatives"], fold_eval=lambda m: medseg_metrics(torch_runner(m), test_items, gmap, size))
        tuned = whole_box_batchnorm(model, phantom, med, reps=cfg["reps"], n_ph=cfg["n_ph"], batch=cfg["batch"],
                                    seed=cfg["seed"], device=cfg["device"], elastic=cfg["elastic"],
                                    gamma=cfg["gamma"]) if cfg["bn_whole"] else None
        if keep is not None:
            export_onnx(model, keep / f"fold{f + 1}.onnx", size)
            if tuned is not None:
                export_onnx(tuned, keep / f"fold{f + 1}-bn-whole.onnx", size)
            (keep / f"fold{f + 1}.json").write_text(json.dumps({"held_out": [it.name for it in test_items]}),
                                                    encoding="utf-8")
        per_image: dict[str, float] = {}
        res = medseg_metrics(torch_runner(model), test_items, gmap, size, per_image)
        flipped = medseg_metrics(flip_averaged(torch_runner(model)), test_items, gmap, size)
        rows.append({"fold": f + 1, **{k2: round(v, 4) for k2, v in res.items()},
                     **{f"flip_averaged_{k2}": round(v, 4) for k2, v in flipped.items() if k2 != "images"}})
        per_image_rows[f + 1] = {"infection_dice": per_image}
        if tuned is not None:
            per_image_bn: dict[str, float] = {}
            res_bn = medseg_metrics(torch_runner(tuned), test_items, gmap, size, per_image_bn)
            rows[-1].update({f"bn_whole_{k2}": round(v, 4) for k2, v in res_bn.items() if k2 != "images"})
            per_image_rows[f + 1]["bn_whole_infection_dice"] = per_image_bn
        log(f"fold {f + 1}: {rows[-1]}")
    mean = fold_means(rows)
    log(f"{k}-fold CV mean: {mean}")
    return {"folds": rows, "mean": mean, "per_image": per_image_rows}


DESCRIPTION = ("Small 2D U-Net: ground-glass opacity and consolidation on each axial slice of the lung box of a chest "
               "CT, at reduced in-plane size.")


def manifest(size: int, sha: str, training: dict[str, Any], metrics: dict[str, Any], *, version: str = VERSION,
             description: str = DESCRIPTION) -> dict[str, Any]:
    """model.yaml content (validated by node.pipeline.manifest when the node loads it)."""
    labels: list[dict[str, Any]] = [{"index": 0, "name": "background"}]
    labels += [{"index": i, "name": name, "snomed": code} for i, (name, code) in enumerate(SNOMED.items(), start=1)]
    return {
        "name": "lesion_seg",
        "version": version,
        "sha256": sha,
        "task": "segmentation",
        "description": description,
        "intended_use": "Lesion masks inside the lungs for measuring pneumonia involvement in the lungnode reference "
                        "pipeline; research and demonstration only.",
        "not_for_clinical_use": True,
        "algorithm": {"name": "lungnode-lesion-seg-unet2d", "version": version, "family": "Artificial Intelligence"},
        "input": {"name": "ct", "layout": "NCHW", "size": [size, size],
                  "window": {"level": LUNG_WINDOW[0], "width": LUNG_WINDOW[1]}, "channels": ["ct"]},
        "output": {"name": "probs", "activation": "softmax", "labels": labels},
        "preprocessing": {"crop_to_lung_box": True, "batch_size": 16},
        "postprocessing": {"min_component_ml": 0.1},
        "metrics": metrics,
        "training": training,
    }


def parity(model: UNet2D, onnx_path: Path, x: np.ndarray, tol: float = 1e-4) -> float:
    """Max |onnxruntime - torch| on ``x`` [N, H, W]; raises above ``tol``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"ct": x[:, None].astype(np.float32)})[0]
    err = float(np.abs(got - predict(model, x)).max())
    if not err <= tol:
        raise RuntimeError(f"ONNX export parity failed: max |onnxruntime - torch| = {err:.2e} > {tol:g}")
    return err


def pretraining_summary(init: Path | str | None) -> dict[str, Any] | None:
    """What the ``init`` weights were trained on: the training section of their model.yaml, without history."""
    if init is None:
        return None
    path = Path(init).parent / "model.yaml"
    if not path.is_file():
        return {"weights": Path(init).name}
    done = yaml.safe_load(path.read_text(encoding="utf-8"))["training"]
    return {k: v for k, v in done.items() if k not in ("history", "medseg_gray_map")}


def load_data(cfg: dict[str, Any], log=print) -> tuple[list[MedsegItem], GrayMap | None, SliceSet, SliceSet]:
    """MedSeg training slices and their gray map (None without the data), training phantoms, held-out phantoms."""
    have = MEDSEG_TRAIN.is_dir()
    if (cfg["medseg"] or cfg["cv"]) and not have:
        raise FileNotFoundError(f"{MEDSEG_TRAIN} is missing: train with --no-medseg (phantoms only)")
    items = read_medseg_train() if cfg["medseg"] or cfg["cv"] else []
    gmap = calibrate(read_medseg_train()) if have else None
    seeds = list(training_phantom_seeds(cfg["seed"], cfg["phantoms"]))
    small = {"slices": cfg["slices"], "matrix": cfg["matrix"]}
    phantom = phantom_samples(seeds, cfg["size"], log=log, **small)
    val_sets = [phantom_lung_slices(s, cfg["size"], kind, **small) for s, kind in val_seeds(cfg["val_phantoms"])]
    val = SliceSet(np.concatenate([v.x for v in val_sets]), np.concatenate([v.y for v in val_sets]),
                   [s for v in val_sets for s in v.source])
    return items, gmap, phantom, val


def train(out: Path, *, epochs: int = 12, seed: int = 0, phantoms: int = 80, val_phantoms: int = 6, size: int = 192,
          base: int = 8, batch: int = 16, lr: float = 3e-3, reps: int = 6, n_ph: int = 240, crop: int = 96,
          medseg: bool = True, cv: int = 0, fold: int = 0, depth: int = 3, slices: int | None = None,
          matrix: int | None = None, init: Path | None = None, device: str = "cpu", keep_folds: bool = False,
          normal_share: float = 0.0, dice: str = "batch", paste: float = 0.0, elastic: float = 0.0,
          gamma: float = 0.0, real_negatives: int = 0, bn_whole: bool = False, log=print) -> dict[str, Any]:
    """Cross-validate (``cv`` > 0) or train, export and describe the model in ``out``.

    ``slices`` / ``matrix`` fix the phantoms' size (small, fast test runs); by default each seed draws them.
    ``keep_folds``: in cross-validation, also write each fold's network to ``out`` (``fold<i>.onnx``).
    ``real_negatives``: LIDC-IDRI-0001 lung-box slices (no pneumonia, all background) drawn per epoch.
    ``bn_whole``: BatchNorm statistics measured on whole lung boxes after training (``whole_box_batchnorm``);
    the network as trained is written beside it to ``out/last-epoch/lesion_seg`` (in CV, both are scored per fold).
    """
    cfg = dict(epochs=epochs, seed=seed, phantoms=phantoms, val_phantoms=val_phantoms, size=size, base=base,
               batch=batch, lr=lr, reps=reps, n_ph=n_ph, crop=crop, medseg=medseg, cv=cv, fold=fold, depth=depth,
               slices=slices, matrix=matrix, init=None if init is None else str(init), device=device,
               normal_share=normal_share, dice=dice, paste=paste, elastic=elastic, gamma=gamma,
               real_negatives=real_negatives, bn_whole=bn_whole)
    t0 = time.perf_counter()
    items, gmap, phantom, val = load_data(cfg, log)
    negatives = real_negative_slices(size) if real_negatives else None
    log(f"data: {len(phantom)} phantom slices ({phantoms} phantoms), {len(items)} MedSeg slices, "
        f"{len(val)} held-out phantom slices, gray map {gmap}"
        + (f", {len(negatives)} real lesion-free slices (LIDC-IDRI-0001)" if negatives is not None else "")
        + f", {time.perf_counter() - t0:.0f} s")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cv:
        assert gmap is not None
        res = cross_validate(items, gmap, phantom, val, cv, cfg, log, keep=out if keep_folds else None,
                             negatives=negatives)
        (out / (f"cv-fold{fold}.json" if fold else "cv.json")).write_text(json.dumps({"config": cfg, **res}, indent=2), encoding="utf-8")
        return res
    med = medseg_samples(items, gmap, size) if items and gmap else SliceSet(np.zeros((0, size, size), np.float32),
                                                                     np.zeros((0, size, size), np.uint8), [])
    model, history = fit(phantom, med, val, epochs=epochs, seed=seed, base=base, batch=batch, lr=lr, reps=reps,
                         n_ph=n_ph, crop=crop, depth=depth, init=init, device=device, normal_share=normal_share,
                         dice=dice, paste=paste, elastic=elastic, gamma=gamma, negatives=negatives,
                         n_neg=real_negatives, log=log)
    drawn = training_phantom_seeds(seed, phantoms)
    training = {
        "data": {"phantoms": phantoms, "phantom_seeds": [drawn[0], drawn[-1]],
                 "phantom_slices": len(phantom), "medseg_train_slices": len(items),
                 "medseg_source": "MedSeg COVID-19 CT segmentation (as redistributed by Inf-Net, Fan et al. 2020)",
                 **({"real_lesion_free_slices": len(negatives),
                     "real_lesion_free_source": "LIDC-IDRI-0001 lung box (TCIA, CC BY 3.0), all background"}
                    if negatives is not None else {})},
        "medseg_gray_map": None if gmap is None else {
            "lung_gray": gmap.lung_gray, "tissue_gray": gmap.tissue_gray, "lung_hu": LUNG_HU, "tissue_hu": TISSUE_HU,
            "jpeg_window_hu": [round(v, 1) for v in gmap.window_hu()]},
        "validation": {"phantoms": val_phantoms, "phantom_seeds": [val_seeds(val_phantoms)[0][0],
                                                                  val_seeds(val_phantoms)[-1][0]]},
        "pretraining": pretraining_summary(init),
        "seed": seed, "epochs": epochs, "batch": batch, "lr": lr, "medseg_reps_per_epoch": reps,
        "phantom_slices_per_epoch": n_ph, **({"normal_series_share": normal_share} if normal_share else {}),
        **({"medseg_lesion_paste_p": paste} if paste else {}),
        **({"real_lesion_free_slices_per_epoch": real_negatives} if real_negatives else {}),
        **({"elastic_warp_p": elastic} if elastic else {}), **({"gamma_max_abs_log": gamma} if gamma else {}),
        "train_crop": crop, "base_channels": base, "depth": depth,
        "parameters": n_params(model), "device": device,
        "loss": f"cross-entropy + soft Dice (GGO, consolidation, infection), {DICE_MODES[dice]}",
        "augmentation": "random crops (lesion-centred 60%), flips and 90-degree turns, scale +-15%, rotation +-15 deg, blur / unsharp masking, "
                        "gain/offset, white and correlated noise"
                        + (f"; MedSeg lesions pasted into other MedSeg slices (p {paste})" if paste else "")
                        + (f"; smooth B-spline warp (p {elastic})" if elastic else "")
                        + (f"; gamma contrast (|log g| <= {gamma})" if gamma else ""),
        "torch": str(torch.__version__), "seconds": round(time.perf_counter() - t0, 1), "history": history,
    }
    last = {"val_phantom_grid_dice": {k.removeprefix("val_phantom_"): v for k, v in history[-1].items()
                                      if k.startswith("val_phantom_")}}
    if not bn_whole:
        err = write_model_folder(out, model, size, val, training, last, log)
        return {"history": history, "parity": err, "model": model, "val": val}
    write_model_folder(out / "last-epoch" / "lesion_seg", model, size, val, training, last, log)
    tuned = whole_box_batchnorm(model, phantom, med, reps=reps, n_ph=n_ph, batch=batch, seed=seed, device=device,
                                elastic=elastic, gamma=gamma)
    training["batchnorm_statistics"] = ("measured after training on whole lung boxes: one epoch's draw of the "
                                        "training mix, augmented, not cropped, equal weight per batch")
    err = write_model_folder(out, tuned, size, val, training,
                             {"val_phantom_grid_dice": {k: round(v, 4) for k, v in grid_dice(tuned, val).items()},
                              "val_phantom_grid_dice_last_epoch":
                              last["val_phantom_grid_dice"]}, log)
    return {"history": history, "parity": err, "model": tuned, "val": val}


def write_model_folder(out: Path, model: UNet2D, size: int, val: SliceSet, training: dict[str, Any],
                       metrics: dict[str, Any], log=print) -> float:
    """``out``/model.onnx (parity-checked against torch), model.yaml and weights.pt; returns the parity error."""
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "model.onnx"
    export_onnx(model, onnx_path, size)
    err = parity(model, onnx_path, val.x[:16])
    log(f"export parity ({out.name}): max |onnxruntime - torch| = {err:.2e}")
    metrics = {**metrics, "onnx_parity_max_abs": float(f"{err:.3g}")}
    (out / "model.yaml").write_text(yaml.safe_dump(manifest(size, file_sha256(onnx_path), training, metrics),
                                                   sort_keys=False), encoding="utf-8")
    torch.save(model.state_dict(), out / "weights.pt")
    return err


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phantoms", type=int, default=80)
    ap.add_argument("--val-phantoms", type=int, default=6)
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--base", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--medseg-reps", type=int, default=6, help="times each MedSeg slice is seen per epoch")
    ap.add_argument("--phantom-slices", type=int, default=240, help="phantom slices per epoch")
    ap.add_argument("--crop", type=int, default=96, help="training crop (0: whole lung box)")
    ap.add_argument("--no-medseg", action="store_true")
    ap.add_argument("--cv", type=int, default=0, help="k-fold cross-validation on MedSeg train instead of training")
    ap.add_argument("--init", type=Path, default=None, help="start from these weights (phantom pre-training)")
    ap.add_argument("--fold", type=int, default=0, help="with --cv: run only this fold (1..k)")
    ap.add_argument("--depth", type=int, default=3, choices=(3, 4), help="U-Net resolution levels")
    ap.add_argument("--device", default="cpu", help="torch device for the network steps (cpu, cuda)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch and SimpleITK (0: their default)")
    ap.add_argument("--normal-share", type=float, default=0.0,
                    help="share of each epoch's phantom slices drawn from lesion-free (normal) series (0: none set apart)")
    ap.add_argument("--dice", choices=list(DICE_MODES), default="batch",
                    help="soft Dice pooled over the batch, per training sample, or per sample that has the class")
    ap.add_argument("--paste", type=float, default=0.0,
                    help="probability that a MedSeg training slice gets the lesions of another one pasted in (0: off)")
    ap.add_argument("--elastic", type=float, default=0.0,
                    help="probability of a smooth random (B-spline) warp of each training sample (0: off)")
    ap.add_argument("--gamma", type=float, default=0.0,
                    help="gamma contrast change of each training sample, |log gamma| up to this (0: off)")
    ap.add_argument("--real-negatives", type=int, default=0, metavar="N",
                    help="LIDC-IDRI-0001 lung-box slices (real CT without pneumonia, all background) drawn per epoch "
                         "(0: none; needs ../shared/data)")
    ap.add_argument("--bn-whole", action="store_true",
                    help="measure BatchNorm statistics on whole lung boxes after training (the network as trained "
                         "goes to OUT/last-epoch/lesion_seg; in CV both are scored)")
    ap.add_argument("--keep-fold-models", action="store_true",
                    help="with --cv: write each fold's network to --out as fold<i>.onnx (out-of-fold tuning)")
    a = ap.parse_args(argv)
    if a.fold and not 1 <= a.fold <= a.cv:
        ap.error(f"--fold {a.fold} needs --cv K with 1 <= fold <= K (got --cv {a.cv})")
    if a.threads:
        torch.set_num_threads(a.threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(a.threads)
    if a.device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS under seed_everything
    train(a.out, epochs=a.epochs, seed=a.seed, phantoms=a.phantoms, val_phantoms=a.val_phantoms, size=a.size,
          base=a.base, batch=a.batch, lr=a.lr, reps=a.medseg_reps, n_ph=a.phantom_slices, crop=a.crop, medseg=not a.no_medseg,
          cv=a.cv, fold=a.fold, depth=a.depth, init=a.init, device=a.device, keep_folds=a.keep_fold_models,
          normal_share=a.normal_share, dice=a.dice, paste=a.paste, elastic=a.elastic, gamma=a.gamma,
          real_negatives=a.real_negatives, bn_whole=a.bn_whole, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
