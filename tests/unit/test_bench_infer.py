"""bench/infer.py still runs: a tiny series on the CPU, one round, its JSON (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_infer_bench_runs_and_reports_steps_and_memory(tmp_path: Path) -> None:
    out = tmp_path / "infer.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "infer.py"), "--device", "cpu", "--rounds", "1", "--slices", "48",
         "--matrix", "128", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = json.loads(out.read_text())["results"]
    assert result["device"] == "cpu"
    steps = result["median_s"]
    assert all(steps[k] > 0 for k in ("volume", "lung_seg", "lesion_seg", "diagnosis", "reference_read"))
    assert steps["networks"] < steps["analysis"]
    memory = result["memory"]
    assert memory["volume_mb"] == round(48 * 128 * 128 * 2 / 2**20, 1)
    assert memory["peak_mb"] > memory["volume_mb"] and memory["ratio_to_volume"] > 1
    assert "memory: peak" in done.stdout
