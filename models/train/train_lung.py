"""Train the lung model and write a node model folder: ``DIR/model.onnx`` + ``DIR/model.yaml``.

    python -m models.train.train_lung --out DIR [--epochs N --seed S --phantoms K --size 192 --base 8]

Data: ``--phantoms`` random phantoms for training (seeds 0..K-1) and ``--val-phantoms`` held-out
phantoms (seeds 100000+...) for validation, plus LIDC-IDRI-0001 with classical labels unless
``--no-lidc`` (see ``models.train.data_lung``). Seeds fix the data, initialisation, augmentation and
batch order; torch runs with deterministic algorithms. Every epoch prints the loss and the mean
right/left lung Dice on the validation phantoms. Export: ONNX opset 17, dynamic batch, softmax in
the graph; onnxruntime and torch must agree to 1e-4 on a validation batch, else the run fails.

Default size 192 x 192 with base 8 (76 k parameters): onnxruntime on 2 CPU threads takes about
2.8 s per 300 slices (measured; base 12 takes 4.5 s at 192, too slow for the 10 s budget).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.nn import functional as F

from models.train.data_lung import LUNG_WINDOW, SliceSet, augment, concat, lidc_0001_samples, phantom_samples
from models.train.metrics import dice_per_label
from models.train.unet2d import UNet2D, export_onnx, n_params
from node.pipeline.manifest import file_sha256

VERSION = "0.3.0"
VAL_SEED0 = 100_000
#: Extra pneumonia phantoms (``--pneumonia-phantoms``): seeds from here, patterns in turn. Dense
#: consolidation against the chest wall has the chest wall's density; only such cases teach the model
#: that it is lung (0.2.0 kept 37 % of one lobar phantom's consolidation).
PNEUMONIA_SEED0 = 50_000
PNEUMONIA_PATTERNS = (("pneumonia", "lobar"), ("pneumonia", "segmental"), ("pneumonia", "lobar"),
                      ("pneumonia", "bronchopneumonia"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def predict(model: UNet2D, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """Softmax of ``x`` [N, H, W] in eval mode, on the model's device, as float32 numpy."""
    model.eval()
    dev = next(model.parameters()).device
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            outs.append(model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch, None])).to(dev)).cpu().numpy())
    return np.concatenate(outs)


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits, y)
    prob = torch.softmax(logits, 1)
    onehot = F.one_hot(y, 3).permute(0, 3, 1, 2).float()
    inter = (prob * onehot).sum((0, 2, 3))[1:]
    denom = (prob + onehot).sum((0, 2, 3))[1:]
    return ce + (1.0 - ((2 * inter + 1.0) / (denom + 1.0)).mean())


def manifest(size: int, sha: str, training: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "lung_seg",
        "version": VERSION,
        "sha256": sha,
        "task": "segmentation",
        "description": "Tiny 2D U-Net: right and left lung on each axial slice of a chest CT, at reduced in-plane size.",
        "intended_use": "Lung masks for measuring involvement in the lungnode reference pipeline; research and "
                        "demonstration only.",
        "not_for_clinical_use": True,
        "algorithm": {"name": "lungnode-lung-seg-unet2d", "version": VERSION, "family": "Artificial Intelligence"},
        "input": {"name": "ct", "layout": "NCHW", "size": [size, size],
                  "window": {"level": LUNG_WINDOW[0], "width": LUNG_WINDOW[1]}, "channels": ["ct"]},
        "output": {"name": "probs", "activation": "softmax", "labels": [
            {"index": 0, "name": "background"},
            {"index": 1, "name": "right_lung", "snomed": {"code": "3341006", "meaning": "Right lung", "scheme": "SCT"}},
            {"index": 2, "name": "left_lung", "snomed": {"code": "44029006", "meaning": "Left lung", "scheme": "SCT"}},
        ]},
        "preprocessing": {"crop_to_lung_box": False, "batch_size": 16},
        "postprocessing": {"keep_largest_components": 1, "min_component_ml": 5.0},
        "metrics": metrics,
        "training": training,
    }


def parity(model: UNet2D, onnx_path: Path, x: np.ndarray, tol: float = 1e-4) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"ct": x[:, None].astype(np.float32)})[0]
    ref = predict(model, x)
    err = float(np.abs(got - ref).max())
    if not err <= tol:
        raise RuntimeError(f"ONNX export parity failed: max |onnxruntime - torch| = {err:.2e} > {tol:g}")
    return err


def train(out: Path, *, epochs: int = 10, seed: int = 0, phantoms: int = 16, val_phantoms: int = 4, size: int = 192,
          base: int = 8, slices: int = 48, matrix: int | None = None, lidc: bool = True, batch: int = 16,
          lr: float = 3e-3, every: int = 1, pneumonia_phantoms: int = 0, lidc_every: int | None = None,
          lidc_repeat: int = 1, log=print) -> dict[str, Any]:
    seed_everything(seed)
    t0 = time.perf_counter()
    train_seeds = list(range(seed * 1000, seed * 1000 + phantoms))
    pneumonia_seeds = list(range(PNEUMONIA_SEED0 + seed * 1000, PNEUMONIA_SEED0 + seed * 1000 + pneumonia_phantoms))
    val_seeds = list(range(VAL_SEED0 + seed * 1000, VAL_SEED0 + seed * 1000 + val_phantoms))
    sets = [phantom_samples(train_seeds, size, slices=slices, matrix=matrix, every=every)]
    if pneumonia_seeds:
        sets.append(phantom_samples(pneumonia_seeds, size, slices=slices, matrix=matrix, every=every,
                                    patterns=PNEUMONIA_PATTERNS))
    lidc_set = lidc_0001_samples(size, every=lidc_every or every) if lidc else None
    if lidc_set is not None:
        sets.extend([lidc_set] * max(1, lidc_repeat))  # each copy augmented on its own every epoch
    data: SliceSet = concat(sets)
    val = phantom_samples(val_seeds, size, slices=slices, matrix=matrix, every=every)
    extra = f" + {pneumonia_phantoms} pneumonia" if pneumonia_seeds else ""
    log(f"data: {len(data)} training slices ({phantoms}{extra} phantoms{', LIDC-IDRI-0001' if lidc_set else ''}), "
        f"{len(val)} validation slices ({val_phantoms} phantoms), {time.perf_counter() - t0:.1f} s")

    model = UNet2D(base)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = max(1, epochs * ((len(data) + batch - 1) // batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    rng = np.random.default_rng(seed)
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        order = rng.permutation(len(data))
        total, n = 0.0, 0
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            pairs = [augment(data.x[k], data.y[k], rng) for k in idx]
            xb = torch.from_numpy(np.stack([p[0] for p in pairs])[:, None])
            yb = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))
            loss = _loss(model.logits(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            n += len(idx)
        pred = predict(model, val.x).argmax(1)
        d = dice_per_label(pred, val.y)
        history.append({"epoch": epoch, "loss": round(total / n, 4), "dice_right": round(d[1], 4),
                        "dice_left": round(d[2], 4)})
        log(f"epoch {epoch}/{epochs}: loss {total / n:.4f}, val Dice right {d[1]:.4f} left {d[2]:.4f}, "
            f"{time.perf_counter() - t0:.0f} s")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "model.onnx"
    export_onnx(model, onnx_path, size)
    err = parity(model, onnx_path, val.x[:16])
    log(f"export parity: max |onnxruntime - torch| = {err:.2e}")
    last = history[-1]
    training = {
        "data": {"phantoms": phantoms, "phantom_seeds": [train_seeds[0], train_seeds[-1]], "slices_per_phantom": slices,
                 "pneumonia_phantoms": pneumonia_phantoms,
                 "pneumonia_seeds": [pneumonia_seeds[0], pneumonia_seeds[-1]] if pneumonia_seeds else [],
                 "pneumonia_patterns": [v for _, v in PNEUMONIA_PATTERNS] if pneumonia_seeds else [],
                 "lidc_idri_0001": lidc_set is not None, "lidc_labels": "models.train.lung_labels.label_lungs",
                 "lidc_every_nth_slice": lidc_every or every, "lidc_repeat": max(1, lidc_repeat),
                 "slices": len(data), "every_nth_slice": every},
        "validation": {"phantoms": val_phantoms, "phantom_seeds": [val_seeds[0], val_seeds[-1]]},
        "seed": seed, "epochs": epochs, "batch": batch, "lr": lr, "base_channels": base, "parameters": n_params(model),
        "augmentation": "flip left-right with label swap, scale +-12%, rotation +-10 deg, gain/offset, noise",
        "torch": str(torch.__version__), "seconds": round(time.perf_counter() - t0, 1),
    }
    metrics = {"val_phantom_dice_right": last["dice_right"], "val_phantom_dice_left": last["dice_left"],
               "onnx_parity_max_abs": float(f"{err:.3g}")}
    (out / "model.yaml").write_text(yaml.safe_dump(manifest(size, file_sha256(onnx_path), training, metrics),
                                                   sort_keys=False), encoding="utf-8")
    torch.save(model.state_dict(), out / "weights.pt")
    return {"history": history, "parity": err, "model": model, "val": val}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phantoms", type=int, default=16)
    ap.add_argument("--val-phantoms", type=int, default=4)
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--base", type=int, default=8)
    ap.add_argument("--slices", type=int, default=48)
    ap.add_argument("--every", type=int, default=1, help="take every n-th slice")
    ap.add_argument("--pneumonia-phantoms", type=int, default=0,
                    help="extra pneumonia phantoms (lobar, segmental, lobar, bronchopneumonia in turn)")
    ap.add_argument("--no-lidc", action="store_true")
    ap.add_argument("--lidc-every", type=int, help="take every n-th LIDC-IDRI-0001 slice (default: --every)")
    ap.add_argument("--lidc-repeat", type=int, default=1, help="LIDC-IDRI-0001 slices this many times per epoch")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    train(a.out, epochs=a.epochs, seed=a.seed, phantoms=a.phantoms, val_phantoms=a.val_phantoms, size=a.size,
          base=a.base, slices=a.slices, lidc=not a.no_lidc, every=a.every,
          pneumonia_phantoms=a.pneumonia_phantoms, lidc_every=a.lidc_every, lidc_repeat=a.lidc_repeat,
          log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
