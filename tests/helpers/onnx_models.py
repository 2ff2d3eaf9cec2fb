"""Tiny real ONNX models with known outputs, built with the ``onnx`` helper API (no torch).

They exercise the real onnxruntime path (Conv, Softmax, ReduceMean, MatMul, shape arithmetic) in
milliseconds, and each has a NumPy reference so a test can check the numbers, not just the shapes.

* ``seg2d``: NCHW [N, 1, H, W] windowed CT -> [N, 3, H, W] softmax. A pixel darker than
  ``threshold`` (lung in the lesion/lung window) is class 1 in the left image half (column < W/2,
  the patient's right) and class 2 in the right half; anything brighter is class 0. H and W may be
  dynamic: the half is computed from the runtime width.
* ``cls3d``: NCDHW [N, C, D, H, W] -> [N, 3] softmax of ``mean(x) * [-6, 0, 6] + [3, 0, -3]``:
  a dark volume is class 0, mid-grey is uniform, a bright one class 2.

``make_seg2d(dir)`` / ``make_cls3d(dir)`` write ``model.onnx`` and a valid ``model.yaml`` (right
sha256) into ``dir``; ``overrides`` deep-merges into the manifest to build broken ones.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17; every onnxruntime >= 1.10 reads it

SEG_GAIN = 20.0  # logit slope around the threshold
SEG_MARGIN = 20.0  # logit penalty that keeps class 1 off the right half and class 2 off the left
CLS_W = np.array([-6.0, 0.0, 6.0], dtype=np.float32)
CLS_B = np.array([3.0, 0.0, -3.0], dtype=np.float32)

LUNG_WINDOW = {"level": -450.0, "width": 1350.0}
LESION_LABELS = [
    {"index": 0, "name": "background"},
    {"index": 1, "name": "ground_glass_opacity", "snomed": {"code": "1217294009", "meaning": "Ground glass opacity"}},
    {"index": 2, "name": "consolidation", "snomed": {"code": "95436008", "meaning": "Lung consolidation"}},
]

Dims = tuple[int | None, ...]


def _const(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value), name=name)


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lungnode-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def seg2d_model(
    *,
    input_name: str = "ct",
    output_name: str = "probs",
    size: Dims = (32, 32),
    threshold: float = 0.4,
    softmax: bool = True,
) -> onnx.ModelProto:
    """The 2D three-class segmentation model described in the module doc (raw logits if not softmax)."""
    h, w = size
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 1, h or "H", w or "W"])
    y = helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", 3, h or "H", w or "W"])
    k, m = SEG_GAIN, SEG_MARGIN
    inits = [
        _const("conv_w", np.array([k, -k, -k], dtype=np.float32).reshape(3, 1, 1, 1)),
        _const("conv_b", np.array([-k * threshold, k * threshold, k * threshold], dtype=np.float32)),
        _const("three", np.array(3, dtype=np.int64)),
        _const("zero", np.array(0, dtype=np.int64)),
        _const("one", np.array(1, dtype=np.int64)),
        _const("half", np.array(0.5, dtype=np.float32)),
        _const("pos_gain", np.array([[0.0], [-m], [m]], dtype=np.float32)),
        _const("pos_bias", np.array([[0.0], [0.0], [-m]], dtype=np.float32)),
        _const("pos_shape", np.array([1, 3, 1, -1], dtype=np.int64)),
    ]
    nodes = [
        helper.make_node("Conv", [input_name, "conv_w", "conv_b"], ["intensity"]),
        helper.make_node("Shape", [input_name], ["shape"]),
        helper.make_node("Gather", ["shape", "three"], ["width"], axis=0),
        helper.make_node("Range", ["zero", "width", "one"], ["cols"]),
        helper.make_node("Cast", ["cols"], ["cols_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["width"], ["width_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["width_f", "half"], ["mid"]),
        helper.make_node("GreaterOrEqual", ["cols_f", "mid"], ["is_right"]),
        helper.make_node("Cast", ["is_right"], ["right"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["right", "pos_gain"], ["pos_scaled"]),  # [W] x [3,1] -> [3,W]
        helper.make_node("Add", ["pos_scaled", "pos_bias"], ["pos_3w"]),
        helper.make_node("Reshape", ["pos_3w", "pos_shape"], ["pos"]),  # [1,3,1,W]
        helper.make_node("Add", ["intensity", "pos"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [output_name], axis=1)
        if softmax
        else helper.make_node("Identity", ["logits"], [output_name]),
    ]
    return _finish(helper.make_graph(nodes, "seg2d", [x], [y], initializer=inits))


def seg2d_reference(x: np.ndarray, threshold: float = 0.4) -> np.ndarray:
    """What seg2d_model computes, in NumPy (float64 then float32)."""
    x = np.asarray(x, dtype=np.float64)
    k, m = SEG_GAIN, SEG_MARGIN
    right = (np.arange(x.shape[-1]) >= x.shape[-1] * 0.5).astype(np.float64)
    z0 = k * (x[:, 0] - threshold)
    z1 = k * (threshold - x[:, 0]) - m * right
    z2 = k * (threshold - x[:, 0]) - m * (1.0 - right)
    z = np.stack([z0, z1, z2], axis=1)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def cls3d_model(
    *, input_name: str = "ct", output_name: str = "probs", size: Dims = (8, 16, 16), channels: int = 1
) -> onnx.ModelProto:
    """The 3D three-class classifier described in the module doc."""
    spatial = [d if d is not None else f"S{i}" for i, d in enumerate(size)]
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", channels, *spatial])
    y = helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", 3])
    inits = [_const("cls_w", CLS_W.reshape(1, 3)), _const("cls_b", CLS_B)]
    nodes = [
        helper.make_node("ReduceMean", [input_name], ["mean"], axes=[1, 2, 3, 4], keepdims=1),
        helper.make_node("Flatten", ["mean"], ["mean_2d"], axis=1),
        helper.make_node("MatMul", ["mean_2d", "cls_w"], ["scores"]),
        helper.make_node("Add", ["scores", "cls_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [output_name], axis=-1),
    ]
    return _finish(helper.make_graph(nodes, "cls3d", [x], [y], initializer=inits))


def cls3d_reference(x: np.ndarray) -> np.ndarray:
    """What cls3d_model computes, in NumPy."""
    mean = np.asarray(x, dtype=np.float64).reshape(x.shape[0], -1).mean(axis=1, keepdims=True)
    z = mean * CLS_W + CLS_B
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def seg2d_manifest(
    name: str, *, size: Dims = (32, 32), input_name: str = "ct", output_name: str = "probs"
) -> dict[str, Any]:
    """A valid manifest for seg2d_model (sha256 filled in by write_model_dir)."""
    return {
        "name": name,
        "version": "0.1.0",
        "sha256": "0" * 64,
        "task": "segmentation",
        "description": "Test model: thresholded lung window split by image half.",
        "intended_use": "Unit tests of the lungnode inference path only.",
        "not_for_clinical_use": True,
        "algorithm": {"name": "lungnode-test-seg2d", "version": "0.1.0", "family": "Artificial Intelligence"},
        "input": {
            "name": input_name,
            "layout": "NCHW",
            "size": list(size),
            "window": dict(LUNG_WINDOW),
            "channels": ["ct"],
        },
        "output": {
            "name": output_name,
            "activation": "softmax",
            "labels": [
                {"index": 0, "name": "background"},
                {"index": 1, "name": "right_lung", "snomed": {"code": "3341006", "meaning": "Right lung"}},
                {"index": 2, "name": "left_lung", "snomed": {"code": "44029006", "meaning": "Left lung"}},
            ],
        },
        "preprocessing": {"crop_to_lung_box": False},
        "postprocessing": {"keep_largest_components": 2, "min_component_ml": 5.0, "threshold": 0.5},
    }


def cls3d_manifest(
    name: str, *, size: Dims = (8, 16, 16), channels: int = 1, input_name: str = "ct", output_name: str = "probs"
) -> dict[str, Any]:
    """A valid manifest for cls3d_model with the diagnosis labels (codes are test placeholders)."""
    return {
        "name": name,
        "version": "0.1.0",
        "sha256": "0" * 64,
        "task": "classification",
        "description": "Test model: softmax of the mean intensity.",
        "intended_use": "Unit tests of the lungnode inference path only.",
        "not_for_clinical_use": True,
        "algorithm": {"name": "lungnode-test-cls3d", "version": "0.1.0"},
        "input": {
            "name": input_name,
            "layout": "NCDHW",
            "size": list(size),
            "spacing_mm": [5.0, 2.0, 2.0],
            "window": dict(LUNG_WINDOW),
            "channels": ["ct", "lesion_map"][:channels] if channels <= 2 else [f"c{i}" for i in range(channels)],
        },
        "output": {
            "name": output_name,
            "activation": "softmax",
            "labels": [
                {"index": 0, "name": "covid19", "snomed": {"code": "840539006", "meaning": "COVID-19"}},
                {"index": 1, "name": "other_pneumonia", "snomed": {"code": "233604007", "meaning": "Pneumonia"}},
                {"index": 2, "name": "no_pneumonia", "snomed": {"code": "260413007", "meaning": "None"}},
            ],
        },
        "metrics": {"test_auc": 1.0},
        "training": {"data": "none"},
    }


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in (nested dicts merged, everything else replaced)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def write_model_dir(
    directory: Path, model: onnx.ModelProto, manifest: dict[str, Any], *, fill_sha256: bool = True
) -> Path:
    """Write model.onnx and model.yaml (with model.onnx's sha256 unless fill_sha256 is False)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = model.SerializeToString()
    (directory / "model.onnx").write_bytes(data)
    manifest = copy.deepcopy(manifest)
    if fill_sha256:
        manifest["sha256"] = hashlib.sha256(data).hexdigest()
    (directory / "model.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return directory


def make_seg2d(
    directory: Path,
    *,
    size: Dims = (32, 32),
    input_name: str = "ct",
    output_name: str = "probs",
    softmax: bool = True,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """A model folder holding seg2d_model; the manifest's name is the folder's name (and says softmax)."""
    directory = Path(directory)
    manifest = seg2d_manifest(directory.name, size=size, input_name=input_name, output_name=output_name)
    model = seg2d_model(input_name=input_name, output_name=output_name, size=size, softmax=softmax)
    return write_model_dir(directory, model, deep_merge(manifest, overrides or {}))


def make_cls3d(
    directory: Path,
    *,
    size: Dims = (8, 16, 16),
    channels: int = 1,
    input_name: str = "ct",
    output_name: str = "probs",
    overrides: dict[str, Any] | None = None,
) -> Path:
    """A model folder holding cls3d_model; the manifest's name is the folder's name."""
    directory = Path(directory)
    manifest = cls3d_manifest(
        directory.name, size=size, channels=channels, input_name=input_name, output_name=output_name
    )
    model = cls3d_model(input_name=input_name, output_name=output_name, size=size, channels=channels)
    return write_model_dir(directory, model, deep_merge(manifest, overrides or {}))


def make_models_dir(root: Path) -> Path:
    """A models folder with the default names of InferenceSettings: lung_seg, lesion_seg, diagnosis."""
    root = Path(root)
    make_seg2d(root / "lung_seg")
    make_seg2d(root / "lesion_seg", size=(None, None), overrides={"output": {"labels": LESION_LABELS}})
    make_cls3d(root / "diagnosis")
    return root
