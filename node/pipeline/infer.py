"""Run ONNX models: provider choice, one cached session per model, manifest checks at load.

Sessions are expensive to build (graph optimisation, CUDA kernels), so each process builds one per
(model folder, device, threads) and keeps it (``get_model``). A session is thread-safe for ``run``.
The cache is per process: a forked worker starts with an empty one (onnxruntime sessions do not
survive ``fork``).

Provider choice (``inference.device``):

* ``cpu``: the CPU provider.
* ``auto``: CUDA when onnxruntime has the CUDA provider and GPU 0 initialises, else CPU, with the
  reason logged (a missing CUDA library is named).
* ``cuda`` / ``cuda:N``: the CUDA provider on GPU N, or a clear error at start-up: an operator who
  asked for the GPU must not get a silent 30x slower CPU node.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import onnxruntime as ort

from node.config import InferenceSettings
from node.errors import LungnodeError
from node.logs import kv
from node.pipeline.manifest import ONNX_FILE, ModelManifest, load_manifest

log = logging.getLogger(__name__)

# onnxruntime's own logger writes unstructured warnings to stderr (onnxruntime-gpu 1.31 prints "No
# registered plugin EP device found for 'CUDAExecutionProvider'" for every CUDA session, and then
# runs it on the GPU). Only its errors pass: which provider each model runs on is logged when it
# loads (event=model_loaded).
ort.set_default_logger_severity(3)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

#: Labels the diagnosis classifier must provide (any channel order; looked up by name).
DIAGNOSIS_LABELS = frozenset({"covid19", "other_pneumonia", "no_pneumonia"})

#: Size used for dynamic spatial axes when a dummy input is built (``models verify``): a multiple
#: of 32 so that U-Nets with 5 poolings accept it, small enough to run in milliseconds.
DYNAMIC_DIM = 64

#: A 79-byte ONNX model (opset 17, IR 8): y = Identity(x), float[1]. Used to find out whether the
#: CUDA provider really initialises, without touching a real model. Built with onnx.helper:
#: make_model(make_graph([make_node("Identity", ["x"], ["y"])], "probe", [x], [y])), ir_version=8.
_PROBE_MODEL = (
    b"\x08\x08\x12\x08lungnode:;\n\x10\n\x01x\x12\x01y\"\x08Identity\x12\x05probeZ\x0f\n\x01x\x12\n\n"
    b"\x08\x08\x01\x12\x04\n\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\x11"
)

Provider = str | tuple[str, dict[str, Any]]
Which = Literal["lung", "lesion", "diagnosis"]


class InferenceDeviceError(LungnodeError):
    """The configured device cannot be used (e.g. ``cuda:0`` without a working GPU)."""


class ModelLoadError(LungnodeError):
    """model.onnx cannot be loaded or does not match its manifest."""


def _cuda_library_problem() -> str | None:
    """A CUDA/cuDNN library the CUDA provider needs and cannot find (e.g. libcublasLt.so.13), else None.

    Checked before any session is tried, so that a CPU-only host with onnxruntime-gpu gets one clear
    log line from us instead of onnxruntime's multi-line error on every process start. Only a missing
    shared object counts; any other loader message is left to the real probe session to judge.
    """
    if not sys.platform.startswith("linux"):
        return None
    lib = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not lib.is_file():
        return None
    problem = _load_problem(lib)
    if problem and hasattr(ort, "preload_dlls"):
        # CUDA and cuDNN pip wheels (onnxruntime-gpu[cuda,cudnn], or a CUDA build of torch) are not on the
        # loader path; onnxruntime can load them from site-packages. Its own messages go to stdout: hidden.
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                ort.preload_dlls(directory="")
            except Exception:  # noqa: BLE001 - a failed preload leaves the original problem to report
                return problem
        problem = _load_problem(lib)
    return problem


def _load_problem(lib: Path) -> str | None:
    """The loader's message when ``lib`` needs a shared object it cannot find, else None."""
    try:
        ctypes.CDLL(str(lib), mode=os.RTLD_LAZY | os.RTLD_LOCAL)
    except OSError as exc:
        text = str(exc)
        return text if "cannot open shared object file" in text else None
    return None


def _parse_device(device: str) -> tuple[str, int]:
    if device in ("auto", "cpu"):
        return device, 0
    if device == "cuda":
        return "cuda", 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return "cuda", int(device[5:])
    raise InferenceDeviceError(f"inference.device {device!r} is not valid: use auto, cpu, cuda or cuda:N")


@lru_cache(maxsize=None)
def _probe_cuda(device_id: int) -> str | None:
    """None when a CUDA session initialises on this GPU, else why not (probed once per process)."""
    missing = _cuda_library_problem()
    if missing:
        return (
            f"CUDA libraries missing ({missing}); onnxruntime-gpu {ort.__version__} needs the CUDA and cuDNN "
            "versions listed on onnxruntime.ai (CUDA Execution Provider requirements)"
        )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            _PROBE_MODEL, options, providers=[(CUDA, {"device_id": device_id}), CPU], enable_fallback=0
        )
    except Exception as exc:  # noqa: BLE001 - any failure here means "no usable GPU"; the text is reported
        return f"creating a CUDA session on GPU {device_id} failed: {str(exc).splitlines()[0]}"
    if CUDA in session.get_providers():
        return None
    return (
        f"GPU {device_id} could not be initialised (onnxruntime's message above says why; check nvidia-smi, "
        "the driver and CUDA_VISIBLE_DEVICES)"
    )


def choose_providers(device: str) -> tuple[list[Provider], str]:
    """The onnxruntime providers for ``inference.device`` and a one-line reason for the log."""
    kind, device_id = _parse_device(device)
    if kind == "cpu":
        return [CPU], "CPU provider: device=cpu"
    has_cuda = CUDA in ort.get_available_providers()
    if not has_cuda:
        if kind == "auto":
            return [CPU], "CPU provider: device=auto and onnxruntime has no CUDA provider"
        raise InferenceDeviceError(
            f"inference.device is {device} but this onnxruntime ({ort.__version__}) has no CUDA provider: "
            "install onnxruntime-gpu instead of onnxruntime, or set inference.device to auto or cpu"
        )
    problem = _probe_cuda(device_id)
    if problem is None:
        providers: list[Provider] = [(CUDA, {"device_id": device_id}), CPU]
        return providers, f"CUDA provider selected: device={device} and CUDA available (GPU {device_id})"
    if kind == "auto":
        return [CPU], f"CPU provider: CUDA provider present but no GPU could be initialised: {problem}"
    raise InferenceDeviceError(
        f"inference.device is {device} but the CUDA provider cannot run on GPU {device_id}: {problem}. "
        "Fix the GPU set-up, or set inference.device to auto (falls back to CPU) or cpu"
    )


def window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map HU to float32 [0, 1] over [level - width/2, level + width/2], clipping outside (the models' input scale)."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    out = np.asarray(hu, dtype=np.float32).copy()
    out -= np.float32(level - width / 2.0)
    out *= np.float32(1.0 / width)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _dims(shape: list[Any]) -> list[int | None]:
    """onnxruntime shape (ints, symbolic names, None) -> ints or None for dynamic axes."""
    return [d if isinstance(d, int) and d > 0 else None for d in shape]


def _check_io(session: ort.InferenceSession, manifest: ModelManifest, onnx_path: Path) -> None:
    """Refuse a model whose tensors do not match its manifest, naming the tensor and what to fix."""
    inputs = session.get_inputs()
    spec = manifest.input
    if len(inputs) != 1:
        raise ModelLoadError(
            f"{onnx_path} has {len(inputs)} inputs {[i.name for i in inputs]}: the node feeds exactly one "
            f"(manifest input.name {spec.name!r}); export the model with a single input"
        )
    inp = inputs[0]
    if inp.name != spec.name:
        raise ModelLoadError(
            f"{onnx_path} input tensor is {inp.name!r} but the manifest's input.name is {spec.name!r}: "
            "correct input.name in model.yaml or re-export the model"
        )
    if inp.type != "tensor(float)":
        raise ModelLoadError(
            f"{onnx_path} input tensor {inp.name!r} is {inp.type}, the node feeds float32: re-export with a float input"
        )
    dims = _dims(inp.shape)
    if len(dims) != spec.rank:
        raise ModelLoadError(
            f"{onnx_path} input tensor {inp.name!r} has rank {len(dims)} but the manifest layout {spec.layout} "
            f"needs rank {spec.rank}: correct input.layout in model.yaml"
        )
    if dims[1] is not None and dims[1] != len(spec.channels):
        raise ModelLoadError(
            f"{onnx_path} input tensor {inp.name!r} has {dims[1]} channels but the manifest lists "
            f"{len(spec.channels)} ({spec.channels}): correct input.channels in model.yaml"
        )
    for axis, (have, want) in enumerate(zip(dims[2:], spec.size)):
        if have is not None and want is not None and have != want:
            raise ModelLoadError(
                f"{onnx_path} input tensor {inp.name!r} has spatial size {dims[2:]} but the manifest's input.size "
                f"is {spec.size} (axis {axis + 2}): correct input.size in model.yaml"
            )
        if have is not None and want is None:
            raise ModelLoadError(
                f"{onnx_path} input tensor {inp.name!r} has fixed spatial size {dims[2:]} but the manifest's "
                f"input.size {spec.size} says dynamic: write the fixed size into input.size"
            )
    outputs = {o.name: o for o in session.get_outputs()}
    out_spec = manifest.output
    if out_spec.name not in outputs:
        raise ModelLoadError(
            f"{onnx_path} has no output tensor {out_spec.name!r} (manifest output.name); its outputs are "
            f"{sorted(outputs)}: correct output.name in model.yaml"
        )
    out = outputs[out_spec.name]
    if out.type != "tensor(float)":
        raise ModelLoadError(
            f"{onnx_path} output tensor {out.name!r} is {out.type}, the node reads float32: re-export with a float output"
        )
    odims = _dims(out.shape)
    if len(odims) != manifest.output_rank:
        raise ModelLoadError(
            f"{onnx_path} output tensor {out.name!r} has rank {len(odims)} but a {manifest.task} model with input "
            f"layout {spec.layout} must give rank {manifest.output_rank}: check task and input.layout in model.yaml"
        )
    if odims[1] is not None and odims[1] != len(out_spec.labels):
        raise ModelLoadError(
            f"{onnx_path} output tensor {out.name!r} has {odims[1]} channels but the manifest lists "
            f"{len(out_spec.labels)} labels: correct output.labels in model.yaml"
        )


class Model:
    """One loaded model: its manifest and an onnxruntime session on the chosen provider."""

    def __init__(self, model_dir: Path, *, device: str = "auto", threads: int = 0) -> None:
        """Load and check the model; prefer ``get_model``/``load_model``, which cache the instance."""
        started = time.perf_counter()
        self.model_dir = Path(model_dir)
        self.manifest: ModelManifest = load_manifest(self.model_dir)
        self.device = device
        self.threads = threads or os.cpu_count() or 1
        providers, self.reason = choose_providers(device)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        onnx_path = self.model_dir / ONNX_FILE
        try:
            # enable_fallback=0: a provider failure must raise here, not silently switch to CPU.
            self.session = ort.InferenceSession(str(onnx_path), options, providers=providers, enable_fallback=0)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own pybind types; message is kept
            gpu_hint = " If it loads with inference.device=cpu, the GPU set-up is at fault." if len(providers) > 1 else ""
            raise ModelLoadError(
                f"cannot load {onnx_path}: {str(exc).splitlines()[0]}. The file is damaged or not a model that "
                f"onnxruntime {ort.__version__} can run: re-export it (opset 17 is known to work).{gpu_hint}"
            ) from exc
        self.provider: str = self.session.get_providers()[0]
        wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
        if self.provider != wanted:
            raise InferenceDeviceError(
                f"{onnx_path}: onnxruntime gave {self.provider} instead of {wanted} ({self.reason}); "
                "set inference.device to cpu, or fix the GPU set-up"
            )
        _check_io(self.session, self.manifest, onnx_path)
        self.input_name = self.manifest.input.name
        self.output_name = self.manifest.output.name
        #: IO binding on CUDA (input copied once, output bound to host memory); plain run on CPU.
        self.use_io_binding = self.provider == CUDA
        #: Pad every batch of a 2D model to the full batch size on CUDA (see ``run_batched``).
        self.pad_batches = self.provider == CUDA
        self.load_s = time.perf_counter() - started
        log.info(
            kv(
                "model_loaded",
                name=self.manifest.name,
                version=self.manifest.version,
                sha256=self.manifest.sha256[:12],
                provider=self.provider,
                reason=self.reason,
                threads=self.threads,
                load_s=f"{self.load_s:.3f}",
            )
        )

    def __repr__(self) -> str:
        return f"Model({self.manifest.name} {self.manifest.version}, {self.provider}, threads={self.threads})"

    @property
    def name(self) -> str:
        """The model's name (its folder name)."""
        return self.manifest.name

    def input_shape(self, batch: int = 1, dynamic: int = DYNAMIC_DIM) -> tuple[int, ...]:
        """A concrete input shape for ``batch`` items; dynamic spatial axes take ``dynamic``."""
        spec = self.manifest.input
        return (batch, len(spec.channels), *(dynamic if d is None else d for d in spec.size))

    def _check_input(self, x: np.ndarray) -> np.ndarray:
        spec = self.manifest.input
        if x.ndim != spec.rank:
            raise ValueError(f"{self.name} expects a rank-{spec.rank} {spec.layout} array, got shape {x.shape}")
        if x.shape[1] != len(spec.channels):
            raise ValueError(f"{self.name} expects {len(spec.channels)} channels {spec.channels}, got shape {x.shape}")
        for have, want in zip(x.shape[2:], spec.size):
            if want is not None and have != want:
                raise ValueError(f"{self.name} expects spatial size {spec.size}, got shape {x.shape}")
        return np.ascontiguousarray(x, dtype=np.float32)

    def run(self, x: np.ndarray) -> np.ndarray:
        """One forward pass over a whole batch: float32 [N, C, ...] in, the manifest's output tensor out."""
        x = self._check_input(x)
        if self.use_io_binding:
            binding = self.session.io_binding()
            binding.bind_cpu_input(self.input_name, x)
            binding.bind_output(self.output_name, "cpu")
            self.session.run_with_iobinding(binding)
            out = binding.copy_outputs_to_cpu()[0]
        else:
            out = self.session.run([self.output_name], {self.input_name: x})[0]
        return np.asarray(out, dtype=np.float32)

    def run_batched(
        self, slices: np.ndarray, batch_size: int, reduce: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> np.ndarray:
        """Run a 2D model over many slices ``batch_size`` at a time (bounded memory, same result as one batch).

        ``reduce`` turns each batch's output into what the caller keeps (a label map, say), so that the
        whole series' probabilities (hundreds of MB for 300 slices) are never held at once.

        On CUDA every run gets exactly ``batch_size`` slices, the last batch padded with zeros: cuDNN
        picks its convolution algorithms per input shape, and a series whose last batch is shorter
        would have them searched again on every series (measured on an H200: 0.35 s instead of
        0.07 s for 300 slices of 192 x 192 in batches of 64).
        """
        if self.manifest.input.layout != "NCHW":
            raise ValueError(f"{self.name} is a {self.manifest.input.layout} model: batch volumes with run()")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        slices = self._check_input(slices)
        n = slices.shape[0]
        if n == 0:
            raise ValueError(f"{self.name}: no slices to run")
        out: np.ndarray | None = None
        for start in range(0, n, batch_size):
            batch = slices[start : start + batch_size]
            count = batch.shape[0]
            if self.pad_batches and count < batch_size:
                batch = np.concatenate([batch, np.zeros((batch_size - count, *batch.shape[1:]), dtype=batch.dtype)])
            kept = self.run(batch)[:count]
            if reduce is not None:
                kept = reduce(kept)
            if out is None:
                if n <= batch_size:
                    return kept
                out = np.empty((n, *kept.shape[1:]), dtype=kept.dtype)
            out[start : start + count] = kept
        assert out is not None
        return out


_CACHE: dict[tuple[Path, str, int], Model] = {}
_CACHE_LOCK = threading.Lock()
_CACHE_PID = [os.getpid()]


def load_model(model_dir: Path, *, device: str = "auto", threads: int = 0) -> Model:
    """The process's Model for this folder, device and thread count, built on first use."""
    key = (Path(model_dir).resolve(), device, threads or os.cpu_count() or 1)
    with _CACHE_LOCK:
        if _CACHE_PID[0] != os.getpid():  # forked child: the parent's sessions are not usable here
            _CACHE.clear()
            _CACHE_PID[0] = os.getpid()
        model = _CACHE.get(key)
        if model is None:
            model = Model(key[0], device=device, threads=threads)
            _CACHE[key] = model
        return model


def clear_model_cache() -> None:
    """Forget every cached session (tests; a model folder replaced while the process runs)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def model_name(settings: InferenceSettings, which: Which) -> str:
    """The configured folder name for a model role."""
    names = {"lung": settings.lung_model, "lesion": settings.lesion_model, "diagnosis": settings.diagnosis_model}
    if which not in names:
        raise ValueError(f"unknown model role {which!r}: use lung, lesion or diagnosis")
    return names[which]


#: Output label names each role's model must have (the pipeline looks channels up by name).
ROLE_LABELS: dict[str, frozenset[str]] = {
    "lung": frozenset({"right_lung", "left_lung"}),
    "lesion": frozenset({"ground_glass_opacity", "consolidation"}),
    "diagnosis": DIAGNOSIS_LABELS,
}


def check_role(manifest: ModelManifest, which: Which) -> None:
    """Refuse a model configured for a role it cannot play (e.g. a segmentation model as diagnosis)."""
    setting = f"inference.{which}_model"
    want = "classification" if which == "diagnosis" else "segmentation"
    if manifest.task != want:
        raise ModelLoadError(
            f"{setting} is {manifest.name!r}, a {manifest.task} model, but the {which} step needs a {want} model: "
            f"point {setting} at the right model folder"
        )
    needed = ROLE_LABELS[which]
    if which != "diagnosis" and not needed <= set(manifest.output.label_names):
        raise ModelLoadError(
            f"{setting} is {manifest.name!r} with labels {manifest.output.label_names}, the {which} step needs "
            f"labels named {sorted(needed)}: correct output.labels in its model.yaml"
        )
    if which == "diagnosis" and set(manifest.output.label_names) != DIAGNOSIS_LABELS:
        raise ModelLoadError(
            f"{setting} is {manifest.name!r} with labels {manifest.output.label_names}, the diagnosis step needs "
            f"exactly {sorted(DIAGNOSIS_LABELS)}: correct output.labels in its model.yaml"
        )


def get_model(settings: InferenceSettings, which: Which) -> Model:
    """The cached Model configured for a role (lung, lesion or diagnosis), checked for that role."""
    model_dir = settings.models_dir / model_name(settings, which)
    model = load_model(model_dir, device=settings.device, threads=settings.threads)
    check_role(model.manifest, which)
    return model


def manifests_problem(settings: InferenceSettings) -> str | None:
    """Why a configured model folder cannot play its role (manifest, file hash, role), without loading the networks:
    what ``check-config`` can say in a second, with no GPU touched."""
    try:
        for role in ("lung", "lesion", "diagnosis"):
            check_role(load_manifest(settings.models_dir / model_name(settings, role)), role)
    except LungnodeError as exc:
        return str(exc)
    return None


def pairing_warnings(settings: InferenceSettings) -> list[str]:
    """The configured models that were trained and measured on the outputs of another model than the one configured
    in a role they read (``paired_with``; a site's drop-in lesion model under the shipped diagnosis model): they
    run, but their card's figures do not hold for this pair. Manifests only; a broken folder is
    ``manifests_problem``'s to report."""
    roles: tuple[Which, ...] = ("lung", "lesion", "diagnosis")
    try:
        manifests = {role: load_manifest(settings.models_dir / model_name(settings, role), check_hash=False)
                     for role in roles}
    except LungnodeError:
        return []
    out = []
    for role, m in manifests.items():
        for other, sha in (m.paired_with or {}).items():
            got = manifests[other]
            if got.sha256 != sha:
                out.append(f"the {role} model {m.name} {m.version} was trained and measured on the outputs of the "
                           f"{other} model with sha256 {sha[:12]}, but {got.name} {got.version} (sha256 "
                           f"{got.sha256[:12]}) is configured: its results may differ from its model card; measure "
                           f"this pair (models/{m.name}/CARD.md says how) or retrain it on this {other} model")
    return out


def models_problem(settings: InferenceSettings) -> str | None:
    """Why the configured models cannot run, or None when all three load."""
    try:
        for role in ("lung", "lesion", "diagnosis"):
            get_model(settings, role)
    except LungnodeError as exc:
        return str(exc)
    return None
