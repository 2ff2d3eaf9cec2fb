"""The analysis path for one series, in one readable function: ``analyse_series``.

    files ─► volume + geometry/HU checks ─► lung coverage ─► lung model ─► lesion model
          ─► diagnosis model ─► measurements + slice rule ─► Analysis (result.json)

A refusal at any check ends the path with status ``rejected`` and the reason; an unexpected error
with status ``failed``. Every step is timed.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np

from node import __version__
from node.config import InferenceSettings
from node.errors import one_line
from node.logs import error_reason, kv, redacted_traceback
from node.pipeline import postprocess as post
from node.pipeline.call import call_values
from node.pipeline.coverage import check_coverage
from node.pipeline.infer import CUDA, Model, get_model
from node.pipeline.preprocess import (
    Box,
    Placement,
    Pointwise,
    full_box,
    labels_in_box,
    lung_box,
    place_labels,
    slices_input,
    volume_input,
    windowed_volume,
)
from node.pipeline.slice_rule import SliceRuleResult, apply_slice_rule
from node.pipeline.volume import QAFlag, SeriesRefused, Volume, load_volume

log = logging.getLogger(__name__)

Status = Literal["ok", "rejected", "failed"]
Progress = Callable[[str], None]
NOT_FOR_CLINICAL_USE = "Results of reference models that are not cleared for clinical use."
RESULT_FILE = "result.json"


@dataclass
class Analysis:
    status: Status
    series_instance_uid: str
    reason: str | None = None
    qa: list[QAFlag] = field(default_factory=list)
    models: list[dict[str, str]] = field(default_factory=list)
    probabilities: dict[str, float] | None = None
    measurements: post.Measurements | None = None
    slice_rule: SliceRuleResult | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    volume: Volume | None = None
    lungs: np.ndarray | None = None  # canonical (z, y, x) label map, 1 right / 2 left
    lesions: np.ndarray | None = None  # canonical label map, 1 ground glass / 2 consolidation
    output_errors: list[str] = field(default_factory=list)  # DICOM outputs that could not be built ("seg: X")
    log_reason: str | None = None  # ``reason`` as a log line may show it, where that quotes an exception's message

    def result_json(self) -> dict[str, Any]:
        m = self.measurements.as_dict() if self.measurements else {}
        # output_errors only when there are some: result.json is written again after the outputs, and the
        # outputs' UIDs derive from this dict as it was before them (node.outputs.uids)
        errors = {"output_errors": list(self.output_errors)} if self.output_errors else {}
        called = {"probabilities": self.probabilities,
                  "slice_rule": self.slice_rule.as_dict() if self.slice_rule else None}
        return {
            "status": self.status,
            "reason": self.reason,
            "series_instance_uid": self.series_instance_uid,
            "qa": [{"code": f.code, "severity": f.severity, "reason": f.reason} for f in self.qa],
            "models": self.models,
            **called,
            "call": call_values(called),
            "lung_volume_ml": m.get("lung_volume_ml"),
            "lesion_volume_ml": m.get("lesion_volume_ml"),
            "involvement_percent": m.get("involvement_percent"),
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
            "software": {"name": "lungnode", "version": __version__},
            "disclaimer": NOT_FOR_CLINICAL_USE,
            **errors,
        }

    def write(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / RESULT_FILE
        path.write_text(json.dumps(self.result_json(), indent=2) + "\n", encoding="utf-8")
        return path


class _Timer:
    def __init__(self, timings: dict[str, float], progress: Progress | None) -> None:
        self.timings = timings
        self.progress = progress

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        if self.progress:
            self.progress(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = time.perf_counter() - t0


def first_argmax(probs: np.ndarray) -> np.ndarray:
    """``np.argmax(probs, axis=1)`` (first maximum wins), class by class: 3x faster on [N, C, H, W]."""
    best = probs[:, 0].copy()
    arg = np.zeros(best.shape, dtype=np.uint8)
    for c in range(1, probs.shape[1]):
        better = probs[:, c] > best
        arg[better] = c
        np.maximum(best, probs[:, c], out=best)
    return arg


def _label_map(probs: np.ndarray, model: Model, names: tuple[str, str]) -> np.ndarray:
    """Argmax over classes, renamed so that ``names[0]`` is 1 and ``names[1]`` is 2 (others 0)."""
    arg = first_argmax(probs)
    out = np.zeros(arg.shape, dtype=np.uint8)
    for value, name in enumerate(names, start=1):
        out[arg == model.manifest.output.label_index(name)] = value
    return out


def slice_batch(model: Model) -> int:
    """Slices per run of a 2D model: ``preprocessing.batch_size`` (16) on the CPU, where it bounds memory;
    ``preprocessing.cuda_batch_size`` (64) on the GPU, where each run has a fixed launch cost."""
    pre = model.manifest.preprocessing
    if model.provider == CUDA:
        return int(pre.get("cuda_batch_size", 64))
    return int(pre.get("batch_size", 16))


def warm_up(model: Model) -> None:
    """One run on zeros of the shape the analysis will give the model (a 2D model: one full batch), so that
    onnxruntime's first-run work is done before the first series, not during it. On an H200 (CUDA kernels,
    cuDNN's algorithm search) warming the three shipped models took 1.2-1.3 s, and the first series
    then took 2.1-2.2 s, as the next ones do, against 3.5-3.8 s without it."""
    batch = slice_batch(model) if model.manifest.input.layout == "NCHW" else 1
    model.run(np.zeros(model.input_shape(batch), dtype=np.float32))


#: Slices decided at a time after smoothing along z (bounds the float32 working copy).
SMOOTH_CHUNK = 32


def segment_on_grid(
    volume: Volume, model: Model, names: tuple[str, str], box: tuple[slice, slice, slice],
    smooth_z_sigma_mm: float = 0.0,
) -> tuple[np.ndarray, Placement]:
    """Run a 2D slice model over ``box``: its label map on the model's grid and where that grid sits.

    With ``smooth_z_sigma_mm`` the probabilities are averaged along z before the argmax
    (:func:`post.smooth_along_z`); they are then kept for the whole box, in float16 (66 MB for 300
    slices of 192 x 192 x 3), instead of being reduced batch by batch.
    """
    x, placement = slices_input(volume.hu, model.manifest, box)
    weights = post.z_weights(volume.spacing_mm[0], smooth_z_sigma_mm)
    if weights.size == 1:
        labels = model.run_batched(x, slice_batch(model), reduce=lambda probs: _label_map(probs, model, names))
        return labels, placement
    probs = model.run_batched(x, slice_batch(model), reduce=lambda p: p.astype(np.float16))
    return smoothed_label_map(probs, weights, model, names), placement


def smoothed_label_map(probs: np.ndarray, weights: np.ndarray, model: Model, names: tuple[str, str]) -> np.ndarray:
    """The label map of ``[N, C, H, W]`` probabilities averaged along z with ``weights``, a chunk at a time."""
    labels = np.empty((probs.shape[0], *probs.shape[2:]), dtype=np.uint8)
    for z0 in range(0, probs.shape[0], SMOOTH_CHUNK):
        z1 = min(probs.shape[0], z0 + SMOOTH_CHUNK)
        labels[z0:z1] = _label_map(post.smooth_along_z(probs, weights, z0, z1), model, names)
    return labels


def segment(volume: Volume, model: Model, names: tuple[str, str], box: tuple[slice, slice, slice]) -> np.ndarray:
    """Run a 2D slice model over ``box`` and return its label map on the whole volume."""
    labels, placement = segment_on_grid(volume, model, names, box)
    return place_labels(labels, placement, volume.shape)


def segment_lungs(volume: Volume, model: Model) -> np.ndarray:
    """Lung label map (1 right, 2 left) on the whole volume, cleaned as the manifest asks.

    The components are cleaned on the model's grid (a 192x192 grid has 7 times fewer voxels than a
    512x512 volume), then put back: nearest-neighbour resizing keeps components apart and whole.
    """
    labels, placement = segment_on_grid(volume, model, ("right_lung", "left_lung"), full_box(volume.shape))
    grid_voxel_ml = volume.voxel_ml * float(np.prod(volume.shape)) / float(np.prod(labels.shape))
    pp = model.manifest.postprocessing
    labels = post.clean_lungs(labels, keep=int(pp.get("keep_largest_components", 1)),
                              min_ml=float(pp.get("min_component_ml", 5.0)), voxel_ml=grid_voxel_ml)
    return place_labels(labels, placement, volume.shape)


def segment_lesions(volume: Volume, lungs: np.ndarray, model: Model, lungs_box: Box | None = None) -> np.ndarray:
    """Lesion label map (1 ground glass, 2 consolidation) inside the lungs, on the lung box (``lungs_box``
    where the caller has found it already) unless the manifest turns ``crop_to_lung_box`` off."""
    if not model.manifest.preprocessing.get("crop_to_lung_box", True):
        box = full_box(volume.shape)
    else:
        box = lung_box(lungs > 0) if lungs_box is None else lungs_box
    pp = model.manifest.postprocessing
    labels, placement = segment_on_grid(volume, model, ("ground_glass_opacity", "consolidation"), box,
                                        smooth_z_sigma_mm=float(pp.get("smooth_z_sigma_mm", 0.0)))
    min_ml = float(pp.get("min_component_ml", 0.1))
    # Cleaned on the box alone (the model saw nothing outside it): a third of a 512x512 volume's voxels.
    region = post.clean_lesions(labels_in_box(labels, placement), lungs[box], min_ml=min_ml, voxel_ml=volume.voxel_ml)
    out = np.zeros(volume.shape, dtype=np.uint8)
    out[box] = region
    return out


def classify(
    volume: Volume, lungs: np.ndarray, lesions: np.ndarray, model: Model, lungs_box: Box | None = None
) -> dict[str, float]:
    """Series-level probabilities from the 3D model on the lung box (``lungs_box`` where known)."""
    box = lung_box(lungs > 0) if lungs_box is None else lungs_box
    channels: list[np.ndarray] = []
    maps: list[Pointwise | None] = []  # windowed or thresholded after the resize's gather, on fewer voxels
    for name in model.manifest.input.channels:
        if name == "ct":
            channels.append(volume.hu)
            maps.append(lambda hu: windowed_volume(hu, model.manifest))
        elif name in ("lesion_map", "lung_map"):
            channels.append(lesions if name == "lesion_map" else lungs)
            maps.append(lambda labels: labels > 0)
        else:
            raise SeriesRefused("model_input", f"diagnosis model asks for an unknown input channel {name!r}")
    probs = model.run(volume_input(channels, model.manifest, box, maps))[0]
    return {name: round(float(probs[i]), 4) for i, name in enumerate(model.manifest.output.label_names)}


def _model_info(model: Model) -> dict[str, str]:
    m = model.manifest
    return {"name": m.name, "version": m.version, "sha256": m.sha256}


def analyse_series(
    paths: list[Path], settings: InferenceSettings, *, series_instance_uid: str, progress: Progress | None = None
) -> Analysis:
    """The whole analysis of one series; never raises for a bad series, it says why instead."""
    result = Analysis(status="ok", series_instance_uid=series_instance_uid)
    timer = _Timer(result.timings_s, progress)
    try:
        with timer.step("models"):
            lung_model = get_model(settings, "lung")
            lesion_model = get_model(settings, "lesion")
            diagnosis_model = get_model(settings, "diagnosis")
        result.models = [_model_info(m) for m in (lung_model, lesion_model, diagnosis_model)]
        with timer.step("volume"):
            volume = load_volume(paths)
        result.volume = volume
        result.qa.extend(volume.qa)
        with timer.step("coverage"):
            _, flags = check_coverage(volume)
        result.qa.extend(flags)
        with timer.step("lung_seg"):
            lungs = segment_lungs(volume, lung_model)
            box = lung_box(lungs > 0)  # both maps are empty outside it: the later steps work on it alone
        result.lungs = lungs
        with timer.step("lesion_seg"):
            lesions = segment_lesions(volume, lungs, lesion_model, box)
        result.lesions = lesions
        with timer.step("diagnosis"):
            result.probabilities = classify(volume, lungs, lesions, diagnosis_model, box)
        with timer.step("measure"):
            result.measurements = post.measure(lungs[box], lesions[box], volume.voxel_ml)
            _, dy, dx = volume.spacing_mm
            result.slice_rule = apply_slice_rule(lungs[box], lesions[box], pixel_mm2=dy * dx, rule=settings.slice_rule)
    except SeriesRefused as refused:
        result.status = "rejected"
        result.reason = refused.flag.reason
        result.qa.append(refused.flag)
        log.info(kv("series_rejected", series=series_instance_uid, code=refused.flag.code, reason=refused.flag.reason))
    except Exception as exc:  # a failure of this series must still give a result that says what happened
        result.status = "failed"
        result.reason = f"analysis failed: {one_line(exc)}"  # the job record, one line; not sent in the SR
        # The message may quote a header value (patient data): logged only where logging.include_phi allows.
        result.log_reason = f"analysis failed: {error_reason(exc)}"
        log.error(kv("series_failed", series=series_instance_uid, error=error_reason(exc)) + "\n"
                  + redacted_traceback(exc))
    result.timings_s["total"] = sum(v for k, v in result.timings_s.items() if k != "total")
    return result
