#!/usr/bin/env python3
"""Analysis speed: one 300-slice 512x512 chest CT through all three models, step by step.

Writes a synthetic COVID-19 series as DICOM, then runs the node's whole analysis path on it
(``node.pipeline.runner.analyse_series``: read the series, coverage, lung model, lesion model,
diagnosis model, measurements) on the CPU provider and, when onnxruntime has a working CUDA
provider, on the GPU. The first run of each provider is a warm-up (model load, graph optimisation,
CUDA kernels) and is reported apart; the figure is the median of the timed rounds. A last, untimed
round traces the analysis's peak memory (tracemalloc: numpy arrays and Python objects, not
onnxruntime's own arena), reported against the size of the int16 volume it reads.

Machines differ and are noisy, so every round also times a reference step in the same process:
reading the same series into a volume (``load_volume``, pydicom decoding into int16), which every
analysis must do anyway. The ratio "analysis / series read" is the figure to compare across
machines; the seconds are the figure for the targets (CPU, 2 cores: under 20 s; CUDA: under 1 s).

    .venv/bin/python bench/infer.py [--rounds 3] [--slices 300] [--matrix 512] [--threads 0]
                                    [--device cpu|cuda|both] [--models DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.config import InferenceSettings  # noqa: E402
from node.pipeline import infer  # noqa: E402
from node.pipeline.infer import CUDA, choose_providers, clear_model_cache  # noqa: E402
from node.pipeline.runner import analyse_series  # noqa: E402
from node.pipeline.volume import load_volume  # noqa: E402

STEPS = ("models", "volume", "coverage", "lung_seg", "lesion_seg", "diagnosis", "measure")
NETWORK = {"lung_seg": "lung_seg", "lesion_seg": "lesion_seg", "diagnosis": "diagnosis"}  # step -> model name

#: Seconds spent inside Model.run per model name (onnxruntime itself, host<->GPU copies included),
#: so that each step can be split into network and pre/post-processing.
_network_s: dict[str, float] = {}
_plain_run = infer.Model.run


def _timed_run(self: infer.Model, x: Any) -> Any:
    t0 = time.perf_counter()
    try:
        return _plain_run(self, x)
    finally:
        _network_s[self.name] = _network_s.get(self.name, 0.0) + time.perf_counter() - t0


infer.Model.run = _timed_run  # type: ignore[method-assign]


def make_series(out: Path, slices: int, matrix: int, seed: int = 11) -> list[Path]:
    from node.synthetic import PhantomSpec, SeriesOptions, make_phantom, write_series

    phantom = make_phantom(PhantomSpec(kind="covid", slices=slices, matrix=matrix, seed=seed, slice_thickness_mm=1.0))
    written = write_series(out, phantom, SeriesOptions(transfer_syntax="explicit", seed=seed, write_truth=False))
    return sorted(written.files)


def one_round(files: list[Path], settings: InferenceSettings) -> dict[str, float]:
    """Seconds of the reference read and of each analysis step, for one pass."""
    t0 = time.perf_counter()
    load_volume(files)
    read_s = time.perf_counter() - t0
    _network_s.clear()
    result = analyse_series(files, settings, series_instance_uid="bench")
    if result.status != "ok":
        raise SystemExit(f"analysis did not succeed: {result.status}: {result.reason}")
    out = {"reference_read": read_s, **{k: result.timings_s.get(k, 0.0) for k in STEPS}}
    out["analysis"] = result.timings_s["total"]
    for step, name in NETWORK.items():
        out[f"{step}_network"] = _network_s.get(name, 0.0)
    out["networks"] = sum(out[f"{step}_network"] for step in NETWORK)
    return out


def memory_round(files: list[Path], settings: InferenceSettings) -> dict[str, float]:
    """Peak memory of one analysis as traced by tracemalloc (numpy arrays and Python objects; onnxruntime's
    own arena is not seen), against the canonical int16 volume it reads: the ratio to compare."""
    tracemalloc.start()
    try:
        result = analyse_series(files, settings, series_instance_uid="bench")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    if result.volume is None:
        raise SystemExit(f"analysis did not succeed: {result.status}: {result.reason}")
    volume_mb = result.volume.hu.nbytes / 2**20
    return {"peak_mb": round(peak / 2**20, 1), "volume_mb": round(volume_mb, 1),
            "ratio_to_volume": round(peak / result.volume.hu.nbytes, 2)}


def bench_device(files: list[Path], device: str, args: argparse.Namespace) -> dict[str, Any]:
    settings = InferenceSettings(device=device, threads=args.threads,
                                 **({"models_dir": args.models} if args.models else {}))
    clear_model_cache()
    print(f"[{device}] warm-up run (model load, graph optimisation)...", file=sys.stderr, flush=True)
    warm = one_round(files, settings)
    rounds = []
    for r in range(args.rounds):
        rounds.append(one_round(files, settings))
        print(f"[{device}] round {r + 1}/{args.rounds}: analysis {rounds[-1]['analysis']:.2f} s "
              f"(series read {rounds[-1]['reference_read']:.2f} s)", file=sys.stderr, flush=True)
    med = {k: round(statistics.median(r[k] for r in rounds), 3) for k in rounds[0]}
    steady = round(med["analysis"] - med["models"], 3)
    print(f"[{device}] memory round (tracemalloc, untimed)...", file=sys.stderr, flush=True)
    return {"device": device, "threads": args.threads or os.cpu_count(), "warmup_s": round(warm["analysis"], 3),
            "median_s": med, "analysis_without_model_load_s": steady,
            "ratio_to_series_read": round(steady / med["reference_read"], 2),
            "memory": memory_round(files, settings)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--matrix", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime CPU threads (0: all cores)")
    ap.add_argument("--device", choices=("cpu", "cuda", "both"), default="both",
                    help="both: CPU, and CUDA when a GPU is usable (default)")
    ap.add_argument("--models", type=Path, help="models folder (default: the shipped models/)")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    args = ap.parse_args()

    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else ["cpu"]
    if args.device == "both":
        providers, reason = choose_providers("auto")
        if providers[0] == CUDA or (isinstance(providers[0], tuple) and providers[0][0] == CUDA):
            devices.append("cuda")
        else:
            print(f"no CUDA run: {reason}", file=sys.stderr)
    results = []
    with tempfile.TemporaryDirectory(prefix="lungnode-bench-infer-") as tmp:
        print(f"generating a {args.slices}-slice {args.matrix}x{args.matrix} series...", file=sys.stderr, flush=True)
        files = make_series(Path(tmp) / "series", args.slices, args.matrix)
        for device in devices:
            results.append(bench_device(files, device, args))
    for res in results:
        med = res["median_s"]
        print(f"\n{res['device']} ({res['threads']} threads), median of {args.rounds} rounds, seconds:")
        for k in ("volume", "coverage", "lung_seg", "lesion_seg", "diagnosis", "measure"):
            net = f"   (network {med[k + '_network']:.3f})" if k in NETWORK else ""
            print(f"  {k:<11} {med[k]:7.3f}{net}")
        print(f"  {'total':<11} {res['analysis_without_model_load_s']:7.3f}   (first run with model load: "
              f"{res['warmup_s']:.2f} s)")
        print(f"  {'networks':<11} {med['networks']:7.3f}   (the three models' onnxruntime runs, copies included)")
        print(f"  reference: series read {med['reference_read']:.3f} s; ratio analysis / read = "
              f"{res['ratio_to_series_read']}")
        mem = res["memory"]
        print(f"  memory: peak {mem['peak_mb']:.0f} MB traced (numpy and Python; not onnxruntime's arena), "
              f"{mem['ratio_to_volume']} times the {mem['volume_mb']:.0f} MB int16 volume")
    if args.json:
        args.json.write_text(json.dumps({"slices": args.slices, "matrix": args.matrix, "results": results}, indent=2)
                             + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
