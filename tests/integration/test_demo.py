"""``lungnode demo`` end to end: Orthanc and a node start, the synthetic CT goes round, results come back."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from node.orthanc import have_orthanc
from tests.helpers.node_proc import REPO, clean_env

pytestmark = pytest.mark.skipif(not have_orthanc(), reason="Orthanc is not installed (Debian package orthanc)")


def test_demo_prints_where_the_results_are_and_stops_cleanly(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "demo", "--dir", str(tmp_path / "demo"), "--slices", "48", "--matrix", "256",
         "--exit", "--timeout", "300"],
        capture_output=True, text=True, timeout=420, env=clean_env(), cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"study in Orthanc's web viewer: http://127\.0\.0\.1:\d+/app/explorer\.html#study\?uuid=\S+", out)
    for kind in ("seg", "sr", "key_image", "kos"):
        assert re.search(rf"^  {kind}\s+instance [0-9a-f-]+", out, re.M), (kind, out)
    assert "not cleared for clinical use" in out and out.rstrip().endswith("stopped.")
    # What the demo did stays readable in its folder: the node's config and log, Orthanc's storage.
    demo = tmp_path / "demo"
    assert (demo / "lungnode.yaml").is_file() and "event=job_done" in (demo / "lungnode.log").read_text()
