"""Join several diagnosis networks into one model folder: the mean of their probabilities, one ONNX graph.

    python -m models.train.ensemble_diagnosis --members DIR [DIR ...] --out OUT/diagnosis [--version 0.2.0]

Each ``DIR`` is a ``train_diagnosis --out`` folder (``weights.pt`` and ``model.yaml``). One training run of the
small 3D classifier moves a lot with its seed (validation accuracy 0.70 to 0.93 for one recipe), so the node can
run the mean of several seeds instead: each member is 45 k parameters and about 0.01 s per series on the CPU.
The node sees an ordinary model folder (same input, output and manifest schema); ``torch_from_onnx`` reads the
members back from the ONNX file for the parity test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from models.train.data_diagnosis import CHANNELS, SIZE
from models.train.train_diagnosis import DiagNet, MeanOfNets, export_onnx, parity, write_manifest
from node.pipeline.manifest import file_sha256


def load_member(folder: Path) -> tuple[DiagNet, dict[str, Any]]:
    """A trained member (eval mode) and its manifest's training section."""
    training = yaml.safe_load((folder / "model.yaml").read_text(encoding="utf-8"))["training"]
    net = DiagNet(len(CHANNELS), int(training["base_channels"]))
    net.load_state_dict(torch.load(folder / "weights.pt", map_location="cpu", weights_only=True))
    return net.eval(), training


def build(members: list[Path], out: Path, version: str, paired_lesion_model: Path | None = None,
          tol: float = 1e-4) -> dict[str, Any]:
    """Write ``out``/model.onnx and model.yaml for the mean of ``members``; returns the training section.
    ``paired_lesion_model``: the lesion model whose chain maps the members learnt from (``paired_with``)."""
    nets, trainings = zip(*(load_member(m) for m in members))
    model = MeanOfNets(list(nets)).eval()
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(model, out / "model.onnx")
    err = parity(model, out / "model.onnx", list(np.random.default_rng(0).random((2, len(CHANNELS), *SIZE),
                                                                               dtype=np.float32)), tol)
    first = dict(trainings[0])
    training = {
        **{k: first[k] for k in ("data", "validation", "epochs", "batch", "lr", "base_channels", "label_smoothing",
                                 "lesion_map", "augmentation", "torch") if k in first},
        "ensemble": {"how": "mean of the members' softmax probabilities, one ONNX graph",
                     "members": [{"seed": t["seed"], "onnx_sha256": file_sha256(m / "model.onnx"),
                                  "val_accuracy_last_epoch": t["validation"]["accuracy_last_epoch"]}
                                 for m, t in zip(members, trainings)]},
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(sum(float(t["seconds"]) for t in trainings), 1),
    }
    training["validation"] = {k: v for k, v in training["validation"].items() if k != "accuracy_last_epoch"}
    paired = {"lesion": file_sha256(paired_lesion_model / "model.onnx")} if paired_lesion_model else None
    write_manifest(out, training, {"onnx_parity_max_abs": float(f"{err:.3g}")}, version, paired)
    return training


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=Path, nargs="+", required=True, help="train_diagnosis --out folders")
    ap.add_argument("--out", type=Path, required=True, help="the model folder to write (named diagnosis)")
    ap.add_argument("--version", default="0.2.0")
    ap.add_argument("--paired-lesion-model", type=Path, default=None,
                    help="the lesion model folder whose chain maps the members learnt from (written as paired_with: "
                         "the node warns when the diagnosis model runs beside another)")
    a = ap.parse_args(argv)
    training = build(a.members, a.out, a.version, a.paired_lesion_model)
    print(json.dumps(training["ensemble"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
