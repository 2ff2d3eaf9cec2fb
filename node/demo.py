"""``lungnode demo``: the whole loop on one machine, with Orthanc as the hospital's PACS.

    Orthanc (PACS) ──C-STORE──► lungnode ──analysis──► SEG + SR + key images + KOS ──C-STORE──► Orthanc

1. starts a private Orthanc (Debian package) and a node (``lungnode serve``) on free local ports,
   each knowing the other, everything under one folder (``--dir``);
2. writes a synthetic COVID-19 chest CT and uploads it to Orthanc, as a scanner would;
3. asks Orthanc to send the study to the node (what a PACS routing rule does);
4. waits for the results to arrive back in Orthanc and prints where to look at them.

The node's configuration is written to ``DIR/lungnode.yaml`` and its log to ``DIR/lungnode.log``,
so what the demo did can be read and repeated. Ctrl-C stops both servers (``--exit`` stops them as
soon as the results are in).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from node import MANUFACTURER
from node.orthanc import Modality, OrthancServer, free_port

NODE_AE, PACS_AE = "LUNGNODE", "PACS"
RESULT_MODALITIES = {"SEG": "seg", "SR": "sr", "OT": "key_image", "KO": "kos"}


@dataclass
class DemoResult:
    study_id: str
    viewer_url: str
    results: dict[str, list[str]] = field(default_factory=dict)  # kind -> Orthanc instance ids
    seconds: float = 0.0


def _say(out: TextIO, text: str) -> None:
    print(text, file=out, flush=True)


def node_config(workdir: Path, *, node_port: int, pacs: OrthancServer) -> dict[str, Any]:
    """The node's configuration for the demo: only the keys that differ from the defaults."""
    return {
        "dicom": {"ae_title": NODE_AE, "bind_address": "127.0.0.1", "port": node_port,
                  "allowed_callers": [{"ae_title": PACS_AE, "host": "127.0.0.1"}]},
        "storage": {"spool_dir": str(workdir / "spool"), "database_url": f"sqlite:///{workdir / 'lungnode.db'}",
                    "min_free_disk_mb": 64},
        "assembly": {"quiet_period_s": 5.0, "release_grace_s": 1.0, "study_settle_s": 2.0},  # one series
        "destinations": [{"name": "pacs", "ae_title": PACS_AE, "host": "127.0.0.1", "port": pacs.dicom_port}],
    }


def write_study(outdir: Path, *, slices: int, matrix: int, seed: int) -> list[Path]:
    """A synthetic COVID-19 chest CT series (as a scanner would send it)."""
    from node.synthetic import PhantomSpec, SeriesOptions, make_phantom, write_series

    phantom = make_phantom(PhantomSpec(kind="covid", slices=slices, matrix=matrix, seed=seed))
    options = SeriesOptions(seed=seed, write_truth=False, manufacturer="SYNTHETIC", patient_id="DEMO-0001",
                            patient_name="DEMO^COVID", series_description="Chest CT lung kernel (synthetic)")
    return sorted(write_series(outdir, phantom, options).files)


def _result_instances(pacs: OrthancServer, study_id: str) -> dict[str, list[str]]:
    """Our outputs in the study at Orthanc, by kind (series of Manufacturer lungnode)."""
    found: dict[str, list[str]] = {}
    for series_id in pacs.get(f"/studies/{study_id}").get("Series", []):
        series = pacs.get(f"/series/{series_id}")
        instances = series.get("Instances", [])
        if not instances:
            continue
        tags = pacs.get(f"/instances/{instances[0]}/simplified-tags")
        if tags.get("Manufacturer") != MANUFACTURER:
            continue
        kind = RESULT_MODALITIES.get(series["MainDicomTags"].get("Modality", ""), "other")
        found.setdefault(kind, []).extend(instances)
    return found


def _start_node(config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).with_name("lungnode")
    cmd = [str(exe), "serve", "--config", str(config_path)] if exe.exists() else \
        [sys.executable, "-m", "node.cli", "serve", "--config", str(config_path)]
    with open(log_path, "ab") as logf:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _wait_port(port: int, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 120.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the node exited with {proc.returncode} at start; its log: {log_path}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise SystemExit(f"the node did not listen on port {port} within {timeout:g} s; its log: {log_path}")


def run_demo(workdir: Path | None = None, *, slices: int = 120, matrix: int = 512, seed: int = 1,
             keep_running: bool = True, timeout_s: float = 600.0, out: TextIO = sys.stdout) -> DemoResult:
    """Run the loop once; with ``keep_running`` wait for Ctrl-C before stopping the servers."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="lungnode-demo-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    node_port = free_port()
    pacs = OrthancServer(workdir / "orthanc", ae_title=PACS_AE, name="LUNGNODE-DEMO-PACS",
                         modalities={"lungnode": Modality(NODE_AE, node_port)})
    config_path, log_path = workdir / "lungnode.yaml", workdir / "lungnode.log"
    _say(out, f"demo folder: {workdir}")
    _say(out, "starting Orthanc (the PACS)...")
    pacs.start()
    node_proc: subprocess.Popen[bytes] | None = None
    try:
        config_path.write_text(yaml.safe_dump(node_config(workdir, node_port=node_port, pacs=pacs), sort_keys=False),
                               encoding="utf-8")
        _say(out, f"starting lungnode on port {node_port} (config {config_path}, log {log_path})...")
        node_proc = _start_node(config_path, log_path)
        _say(out, f"writing a synthetic COVID-19 chest CT ({slices} slices, {matrix}x{matrix})...")
        files = write_study(workdir / "scanner", slices=slices, matrix=matrix, seed=seed)
        _say(out, f"uploading {len(files)} images to Orthanc...")
        study_id = ""
        for path in files:
            study_id = str(pacs.upload(path)["ParentStudy"])
        _wait_port(node_port, node_proc, log_path)
        started = time.monotonic()
        _say(out, "Orthanc sends the study to lungnode (C-STORE)...")
        pacs.push("lungnode", [study_id])
        _say(out, "waiting for the results to come back (series complete, analysis, SEG/SR/key images/KOS, send)...")
        found: dict[str, list[str]] = {}
        while time.monotonic() - started < timeout_s:
            found = _result_instances(pacs, study_id)
            if all(k in found for k in RESULT_MODALITIES.values()):
                break
            if node_proc.poll() is not None:
                raise SystemExit(f"the node stopped ({node_proc.returncode}); its log: {log_path}")
            time.sleep(1.0)
        else:
            raise SystemExit(f"no complete results after {timeout_s:g} s (got {sorted(found)}); see {log_path} "
                             "and `lungnode status --config " + str(config_path) + "`")
        result = DemoResult(study_id=study_id, viewer_url=f"{pacs.url}/app/explorer.html#study?uuid={study_id}",
                            results=found, seconds=time.monotonic() - started)
        _say(out, f"\nresults are in Orthanc, {result.seconds:.1f} s after the push:")
        _say(out, f"  study in Orthanc's web viewer: {result.viewer_url}")
        for kind in RESULT_MODALITIES.values():
            for oid in found.get(kind, []):
                _say(out, f"  {kind:<10} instance {oid}  ({pacs.url}/instances/{oid})")
        key = found.get("key_image", [])
        if key:
            _say(out, f"  key image as PNG: {pacs.url}/instances/{key[0]}/preview")
        _say(out, "These are results of reference models, not cleared for clinical use.")
        if keep_running:
            _say(out, "\nOrthanc and lungnode keep running; press Ctrl-C to stop them.")
            try:
                while node_proc.poll() is None:
                    time.sleep(1.0)
            except KeyboardInterrupt:
                pass
        return result
    finally:
        if node_proc is not None and node_proc.poll() is None:
            node_proc.terminate()
            try:
                node_proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node_proc.kill()
        pacs.stop()
        _say(out, "stopped.")
