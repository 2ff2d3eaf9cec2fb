"""``lungnode models list|verify``: what models the node would use, and whether they really work.

``list`` reads every manifest and checks each model.onnx hash (no session). ``verify`` also builds
the onnxruntime session on the configured device and runs one dummy input of the manifest's input
shape, checking the output's shape and values (finite; probabilities where the manifest says
softmax or sigmoid). Exit status: 0 when everything checked is OK, 2 when anything is BAD.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO, cast

import numpy as np

from node.config import InferenceSettings
from node.errors import LungnodeError
from node.pipeline.infer import Model, Which, check_role, load_model, pairing_warnings
from node.pipeline.manifest import (
    MANIFEST_FILE,
    ONNX_FILE,
    ModelManifest,
    load_manifest,
)

#: Same rule as InferenceSettings.device (kept in sync by a unit test).
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"

EXIT_OK = 0
EXIT_BAD = 2

ROLES: tuple[tuple[str, str], ...] = (
    ("lung", "lung_model"),
    ("lesion", "lesion_model"),
    ("diagnosis", "diagnosis_model"),
)

EPILOG = """\
Models live in inference.models_dir, one folder per model: <name>/model.onnx and <name>/model.yaml
(the manifest: tensors, window, labels and codes, sha256 of model.onnx). The configuration names
the folder used for each role: inference.lung_model, inference.lesion_model, inference.diagnosis_model.
Exit status: 0 all OK, 2 any model BAD (the reason is printed on its line).
"""


@dataclass
class ModelStatus:
    """One row of the report."""

    name: str
    role: str = ""
    version: str = ""
    task: str = ""
    sha256: str = ""
    ok: bool = True
    detail: str = ""


def _roles(settings: InferenceSettings) -> dict[str, str]:
    """Folder name -> comma-separated roles it is configured for."""
    out: dict[str, list[str]] = {}
    for role, attr in ROLES:
        out.setdefault(getattr(settings, attr), []).append(role)
    return {name: ",".join(roles) for name, roles in out.items()}


def _candidates(settings: InferenceSettings, names: list[str]) -> list[str]:
    """The names asked for, else every model folder plus the configured names (a missing one is BAD)."""
    if names:
        return list(dict.fromkeys(names))
    found: list[str] = []
    if settings.models_dir.is_dir():
        found = sorted(
            p.name
            for p in settings.models_dir.iterdir()
            if p.is_dir() and ((p / MANIFEST_FILE).exists() or (p / ONNX_FILE).exists())
        )
    configured = [getattr(settings, attr) for _, attr in ROLES]
    return list(dict.fromkeys(found + configured))


def _from_manifest(status: ModelStatus, manifest: ModelManifest) -> None:
    status.version = manifest.version
    status.task = manifest.task
    status.sha256 = manifest.sha256[:12]


def _check_output(model: Model, x: np.ndarray, y: np.ndarray) -> str | None:
    """Why a dummy run's output is wrong, or None."""
    manifest = model.manifest
    n_labels = len(manifest.output.labels)
    want = (x.shape[0], n_labels) if manifest.task == "classification" else (x.shape[0], n_labels, *x.shape[2:])
    if tuple(y.shape) != want:
        return f"output {model.output_name!r} has shape {tuple(y.shape)} for input {tuple(x.shape)}, expected {want}"
    if not np.all(np.isfinite(y)):
        return f"output {model.output_name!r} holds NaN or infinity for a constant input"
    activation = manifest.output.activation
    if activation in ("softmax", "sigmoid") and (y.min() < -1e-4 or y.max() > 1 + 1e-4):
        return f"output.activation is {activation} but values span [{y.min():.3g}, {y.max():.3g}], not [0, 1]"
    if activation == "softmax":
        sums = y.sum(axis=1)
        if not np.allclose(sums, 1.0, atol=1e-3):
            return f"output.activation is softmax but channel sums span [{sums.min():.4g}, {sums.max():.4g}], not 1"
    return None


def _check_one(settings: InferenceSettings, name: str, role: str, *, run: bool) -> ModelStatus:
    status = ModelStatus(name=name, role=role)
    model_dir = settings.models_dir / name
    if not model_dir.is_dir():
        status.ok = False
        where = f" (configured as inference.{role.split(',')[0]}_model)" if role else ""
        status.detail = f"missing: no folder {model_dir}{where}"
        return status
    try:
        manifest = load_manifest(model_dir)
        _from_manifest(status, manifest)
        for one_role in filter(None, role.split(",")):
            check_role(manifest, cast(Which, one_role))
        if not run:
            status.detail = "manifest valid, sha256 matches"
            return status
        model = load_model(model_dir, device=settings.device, threads=settings.threads)
        x = np.full(model.input_shape(batch=1), 0.5, dtype=np.float32)
        started = time.perf_counter()
        try:
            y = model.run(x)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types; reported as the reason
            status.ok = False
            status.detail = f"running a dummy input of shape {list(x.shape)} failed: {str(exc).splitlines()[0]}"
            return status
        run_s = time.perf_counter() - started
        problem = _check_output(model, x, y)
        if problem:
            status.ok = False
            status.detail = problem
        else:
            status.detail = (
                f"{model.provider} threads={model.threads} load {model.load_s:.2f} s, "
                f"run {run_s:.3f} s on {list(x.shape)}"
            )
    except LungnodeError as exc:
        status.ok = False
        status.detail = str(exc).replace("\n", " ")
    return status


def _table(rows: list[ModelStatus]) -> str:
    header = ("NAME", "ROLE", "VERSION", "TASK", "SHA256", "STATUS")
    cells = [
        (r.name, r.role or "-", r.version or "-", r.task or "-", r.sha256 or "-", ("OK" if r.ok else "BAD") + "  " + r.detail)
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header[:-1])]
    lines = []
    for row in [header, *cells]:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row[:-1], widths)) + "  " + row[-1])
    return "\n".join(lines) + "\n"


def _device_arg(value: str) -> str:
    if not re.fullmatch(DEVICE_PATTERN, value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device: use auto, cpu, cuda or cuda:N")
    return value


def _threads_arg(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a thread count: use 0 (all cores) or a positive integer")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    """The ``lungnode models`` argument parser (its own --help)."""
    parser = argparse.ArgumentParser(
        prog="lungnode models",
        description="List and verify the ONNX models in inference.models_dir. Give the node's configuration with "
        "--config FILE (before or after the action, e.g. lungnode models verify --config /etc/lungnode/config.yaml); "
        "without it the embedded defaults are checked, which is not what a configured node runs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("list", help="read every manifest and check each model.onnx hash (fast, no session)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    configs = [parser, p]
    p = sub.add_parser(
        "verify",
        help="hash check, build the inference session, run one dummy input; exit 2 when any model is BAD",
    )
    configs.append(p)
    for with_config in configs:  # `lungnode models` reads it before the action or after it
        with_config.add_argument("--config", "-c", type=Path, metavar="FILE",
                                 help="YAML configuration (default: embedded defaults)")
    p.add_argument(
        "names", nargs="*", metavar="NAME", help="model folder names (default: all folders and the configured models)"
    )
    p.add_argument(
        "--device", type=_device_arg, help="override inference.device for this check: auto, cpu, cuda or cuda:N"
    )
    p.add_argument("--threads", type=_threads_arg, help="override inference.threads (0 = all cores)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def models_main(argv: list[str], settings: InferenceSettings, *, out: TextIO | None = None) -> int:
    """Run ``lungnode models ...`` with the effective inference settings; return the exit status."""
    stream = out if out is not None else sys.stdout
    args = build_parser().parse_args(argv)
    names: list[str] = []
    if args.action == "verify":
        names = args.names
        overrides = {k: v for k, v in (("device", args.device), ("threads", args.threads)) if v is not None}
        if overrides:
            settings = settings.model_copy(update=overrides)
    roles = _roles(settings)
    rows = [
        _check_one(settings, name, roles.get(name, ""), run=args.action == "verify")
        for name in _candidates(settings, names)
    ]
    pairing = pairing_warnings(settings)  # a warning, not a failure: the pair runs, its card's figures may not hold
    if args.json:
        report = {"models_dir": str(settings.models_dir), "models": [asdict(r) for r in rows],
                  "pairing_warnings": pairing}
        stream.write(json.dumps(report, indent=2) + "\n")
    else:
        stream.write(f"models_dir: {settings.models_dir}  device: {settings.device}\n")
        stream.write(_table(rows))
        stream.writelines(f"warning: {w}\n" for w in pairing)
    return EXIT_OK if rows and all(r.ok for r in rows) else EXIT_BAD


__all__ = ["ModelStatus", "build_parser", "models_main"]
