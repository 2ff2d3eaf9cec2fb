#!/usr/bin/env python3
"""End to end: from the last CT image acknowledged by the node to the last result stored at the PACS.

Starts a private Orthanc (the PACS) and a node (``lungnode serve``, default settings but for its
ports, folders and the destination), then per round:

1. reference: dcmtk's storescu sends the 300-slice 512x512 series to Orthanc (one association,
   TCP_NODELAY) — the time Orthanc itself takes to receive that series;
2. storescu sends the same series, with new UIDs each round, to the node; when storescu returns,
   the last image has been acknowledged;
3. Orthanc's REST API is polled until the SEG, SR and key image of that series are stored there.

Printed: the seconds of step 3 (the figure for the targets: under 20 s on 2 CPU cores, under 3 s
with the CUDA provider), their ratio to step 1, and the step-by-step breakdown from the job's
recorded timings (series complete, volume, each model, outputs, send).

    .venv/bin/python bench/e2e.py [--rounds 2] [--slices 300] [--matrix 512] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402
import yaml  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from node.demo import NODE_AE, PACS_AE, RESULT_MODALITIES, _start_node, _wait_port, node_config  # noqa: E402
from node.orthanc import Modality, OrthancServer, free_port  # noqa: E402

STORESCU = "/usr/bin/storescu"


def make_series(out: Path, slices: int, matrix: int, seed: int = 5) -> list[Path]:
    from node.synthetic import PhantomSpec, SeriesOptions, make_phantom, write_series

    ph = make_phantom(PhantomSpec(kind="covid", slices=slices, matrix=matrix, seed=seed, slice_thickness_mm=1.0))
    return sorted(write_series(out, ph, SeriesOptions(seed=seed, write_truth=False, manufacturer="SYNTHETIC")).files)


def relabel(files: list[Path], out: Path) -> tuple[Path, str, str]:
    """A copy of the series with new study/series/instance UIDs (a new study for every round)."""
    out.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(out / f"IM{i:05d}.dcm", enforce_file_format=True)
    return out, study, series


def storescu(folder: Path, port: int, called: str) -> float:
    """Seconds for dcmtk's storescu to send every file of ``folder`` over one association."""
    t0 = time.perf_counter()
    subprocess.run([STORESCU, "-aet", PACS_AE, "-aec", called, "+sd", "+sp", "*.dcm", "127.0.0.1", str(port),
                    str(folder)], check=True, env=dict(os.environ, TCP_NODELAY="1"), capture_output=True)
    return time.perf_counter() - t0


def wait_results(pacs: OrthancServer, study_uid: str, timeout: float) -> float:
    """Block until the SEG, SR and key image series are in the study at Orthanc; monotonic time then."""
    deadline = time.monotonic() + timeout
    wanted = set(RESULT_MODALITIES)
    while time.monotonic() < deadline:
        found = pacs.post("/tools/find", {"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True})
        have = {s["MainDicomTags"].get("Modality") for s in found}
        if wanted <= have:
            return time.monotonic()
        time.sleep(0.05)
    raise SystemExit(f"results for study {study_uid} not in Orthanc after {timeout:g} s")


def job_timings(db: Path, series_uid: str) -> dict[str, Any]:
    """The job's recorded steps, plus the send: the last object sent after the job finished."""
    with sqlite3.connect(db) as con:
        row = con.execute("SELECT j.id, j.timings, j.finished_at FROM jobs j JOIN series s ON s.id = j.series_id "
                          "WHERE s.series_instance_uid = ? ORDER BY j.id DESC LIMIT 1", (series_uid,)).fetchone()
        if not row:
            return {}
        steps = json.loads(row[1]) if row[1] else {}
        sent = con.execute("SELECT MAX(sent_at) FROM outbox WHERE job_id = ?", (row[0],)).fetchone()[0]
    if sent and row[2]:
        from datetime import datetime

        steps["send"] = round((datetime.fromisoformat(sent) - datetime.fromisoformat(row[2])).total_seconds(), 3)
    return steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--matrix", type=int, default=512)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not Path(STORESCU).exists():
        sys.exit(f"{STORESCU} not found: install Debian's dcmtk (bash deploy/install.sh --test)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lungnode-bench-e2e-") as tmp:
        work = Path(tmp)
        print(f"generating a {args.slices}-slice {args.matrix}x{args.matrix} series...", file=sys.stderr, flush=True)
        files = make_series(work / "series", args.slices, args.matrix)
        node_port = free_port()
        pacs = OrthancServer(work / "orthanc", ae_title=PACS_AE, modalities={"lungnode": Modality(NODE_AE, node_port)})
        pacs.start()
        cfg = node_config(work, node_port=node_port, pacs=pacs)
        cfg["assembly"] = {}  # the node's defaults: complete 2 s after release, analysed once the study settled 5 s
        (work / "lungnode.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
        node = _start_node(work / "lungnode.yaml", work / "lungnode.log")
        try:
            _wait_port(node_port, node, work / "lungnode.log")
            time.sleep(5.0)  # workers load their models
            for r in range(args.rounds):
                ref_dir, _, _ = relabel(files, work / f"ref-{r}")
                ref_s = storescu(ref_dir, pacs.dicom_port, PACS_AE)
                node_dir, study_uid, series_uid = relabel(files, work / f"node-{r}")
                storescu(node_dir, node_port, NODE_AE)
                acked = time.monotonic()
                try:
                    done = wait_results(pacs, study_uid, args.timeout)
                except SystemExit:
                    print((work / "lungnode.log").read_text()[-6000:], file=sys.stderr)
                    raise
                e2e = done - acked
                rows.append({"e2e_s": round(e2e, 2), "orthanc_receive_s": round(ref_s, 2),
                             "ratio": round(e2e / ref_s, 2), "steps_s": job_timings(work / "lungnode.db", series_uid)})
                print(f"round {r + 1}: last ack -> last result at the PACS {e2e:.2f} s; Orthanc receiving the "
                      f"series {ref_s:.2f} s; ratio {e2e / ref_s:.2f}", file=sys.stderr, flush=True)
        finally:
            node.terminate()
            node.wait(timeout=60)
            pacs.stop()
    med = {k: round(statistics.median(r[k] for r in rows), 2) for k in ("e2e_s", "orthanc_receive_s", "ratio")}
    print(f"\nmedian of {args.rounds}: end to end {med['e2e_s']} s, Orthanc receive {med['orthanc_receive_s']} s, "
          f"ratio {med['ratio']}")
    print("steps of the last round (s):", json.dumps(rows[-1]["steps_s"]))
    if args.json:
        args.json.write_text(json.dumps({"rounds": rows, "median": med}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
