"""``lungnode serve`` as a whole: a series sent with dcmtk is received, assembled, claimed by a
worker process the node started, analysed with (tiny, real) ONNX models, and its result recorded."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import onnxruntime
import pytest
import yaml
from pydicom.uid import generate_uid

from node.pipeline.infer import _probe_cuda
from tests.conftest import NodeFactory
from tests.helpers.dcmtk import storescu
from tests.helpers.faults import phantom, synth_series
from tests.helpers.net import free_port
from tests.helpers.node_proc import run_cli
from tests.helpers.onnx_models import make_models_dir
from tests.helpers.series import make_series
from tests.helpers.wait import wait_until


def test_serve_runs_workers_that_analyse_a_received_series(node_factory: NodeFactory, tmp_path: Path) -> None:
    models = make_models_dir(tmp_path / "models")
    node = node_factory(settings={
        "inference": {"models_dir": str(models), "device": "cpu", "threads": 1},
        "workers": {"count": 1, "poll_interval_s": 0.2},
        "selection": {"min_slices": 10},
    })
    node.wait_for_log(r"event=workers_started count=1", timeout=30)
    node.wait_for_log(r"event=worker_ready worker=\S+ provider=CPUExecutionProvider models_s=\d+\.\d\d", timeout=30)
    series = make_series(tmp_path / "ct", slices=40, matrix=96)
    assert storescu(node.port, series.folder).returncode == 0

    def finished() -> dict[str, object] | None:
        jobs = node.jobs(series.series_uid)
        return jobs[0] if jobs and jobs[0]["state"] in ("done", "rejected", "failed") else None

    job = wait_until(finished, timeout=90, what="the job to finish")
    assert job["state"] == "done", job
    assert job["attempts"] == 1
    result = json.loads((node.spool_dir / "results" / f"job-{job['id']}" / "result.json").read_text())
    assert result["status"] == "ok"
    assert result["series_instance_uid"] == series.series_uid
    assert set(result["probabilities"]) == {"covid19", "other_pneumonia", "no_pneumonia"}
    assert [m["name"] for m in result["models"]] == ["lung_seg", "lesion_seg", "diagnosis"]
    assert json.loads(job["timings"])["total"] > 0
    recent = node.status()["recent"]  # the day's turnaround, as `lungnode status` and its metrics give it
    assert recent["finished"]["done"] == 1 and recent["analysis_s"]["count"] == 1
    assert recent["analysis_s"]["max"] == round(json.loads(job["timings"])["total"], 2)
    assert recent["last_image_to_result_s"]["max"] >= recent["analysis_s"]["max"]

    # An operator has it analysed again (after a model update, say): the running node takes it up.
    first_finish = job["finished_at"]
    again = run_cli("reanalyse", str(job["id"]), "--config", node.config_path)
    assert again.returncode == 0 and f"job {job['id']} (done) is queued again" in again.stdout, again.stderr
    rerun = wait_until(lambda: (j := finished()) is not None and j["finished_at"] != first_finish and j,
                       timeout=90, what="the reanalysis to finish")
    assert rerun["state"] == "done" and rerun["attempts"] == 1
    assert run_cli("reanalyse", str(job["id"] + 99), "--config", node.config_path).returncode == 2


def test_retention_runs_at_start_so_a_restart_with_fewer_days_frees_space_now(node_factory: NodeFactory) -> None:
    """The disk-full error says to lower retention.received_days; the restart that applies it must free the space at
    once, not after check_interval_s (an hour by default)."""
    from node.db.models import JobState
    from node.db.session import make_engine, make_sessionmaker, upgrade_schema
    from node.receive.spool import Spool
    from tests.unit.test_retention import _series_with_job

    node = node_factory(settings={"retention": {"received_days": 1, "check_interval_s": 3600}}, start=False)
    engine = make_engine(node.db_url)
    upgrade_schema(engine)
    uid, _ = _series_with_job(make_sessionmaker(engine), Spool(node.spool_dir, min_free_bytes=0), age_days=2,
                              job_state=JobState.done, sends=[])
    engine.dispose()
    node.start()
    node.wait_for_log(rf"event=series_purged series={uid}", timeout=15)
    assert node.spool_files(uid) == []


def test_a_series_the_pacs_sends_again_after_retention_is_stored_and_analysed_again(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    models = make_models_dir(tmp_path / "models")
    node = node_factory(settings={
        "inference": {"models_dir": str(models), "device": "cpu", "threads": 1},
        "workers": {"count": 1, "poll_interval_s": 0.2},
        "selection": {"min_slices": 10},
        "retention": {"received_days": 8 / 86400, "check_interval_s": 0.5},  # images kept 8 s after analysis
    })
    node.wait_for_log(r"event=workers_started count=1", timeout=30)
    series = make_series(tmp_path / "ct", slices=40, matrix=96)
    uid = series.series_uid

    def job_done(revision: int) -> dict[str, object] | None:
        jobs = [j for j in node.jobs(uid) if j["revision"] == revision]
        return jobs[0] if jobs and jobs[0]["state"] in ("done", "rejected", "failed") else None

    assert storescu(node.port, series.folder).returncode == 0
    assert wait_until(lambda: job_done(1), timeout=90, what="revision 1's job")["state"] == "done"
    node.wait_for_log(rf"event=series_purged series={uid} files=40", timeout=60)
    assert node.spool_files(uid) == []
    refused = run_cli("reanalyse", str(node.jobs(uid)[0]["id"]), "--config", node.config_path)
    assert refused.returncode != 0 and "send the series from the PACS again" in refused.stderr

    # The radiologist has the PACS send the study again: every image is held again (a series is not purged while
    # it is received or analysed), and revision 2 is analysed from them.
    assert storescu(node.port, series.folder).returncode == 0
    assert len(node.spool_files(uid)) == 40
    node.wait_for_log(rf"event=series_restored series={uid} revision=2", timeout=10)
    job = wait_until(lambda: job_done(2), timeout=90, what="revision 2's job")
    assert job["state"] == "done", job
    result = json.loads((node.spool_dir / "results" / f"job-{job['id']}" / "result.json").read_text())
    assert result["status"] == "ok" and result["series_instance_uid"] == uid
    assert [i["purged_at"] for i in node.instances(uid)] == [None] * 40
    assert node.count("instances") == 40, "the rows are the instances' history: updated, not added"
    trace = run_cli("status", "--series", uid, "--config", node.config_path)
    assert "received again after retention deleted its images" in trace.stdout, trace.stdout
    # where the result is, and what "done" alone does not say (its QA flags)
    result_json = node.spool_dir / "results" / f"job-{job['id']}" / "result.json"
    assert f"result {result_json}\n" in trace.stdout, trace.stdout
    for flag in (q for q in result["qa"] if q["severity"] == "flag"):
        assert f"QA flag {flag['code']}: {flag['reason']}" in trace.stdout


def test_a_study_sent_series_by_series_gets_one_result_for_its_best_series(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    """The PACS sends the thick series, then, in a second association after the first one's release grace, the
    thin sharp one: the first series waits for its study to settle, so the two are compared before either is
    analysed, and only the best one's results are made."""
    models = make_models_dir(tmp_path / "models")
    node = node_factory(settings={
        "inference": {"models_dir": str(models), "device": "cpu", "threads": 1},
        "workers": {"count": 1, "poll_interval_s": 0.2},
        "selection": {"min_slices": 10},
        "assembly": {"release_grace_s": 0.5, "study_settle_s": 5.0},
    })
    node.wait_for_log(r"event=workers_started count=1", timeout=30)
    study_uid = generate_uid()
    thick = synth_series(tmp_path / "thick", phantom(slices=24, matrix=64, seed=5, slice_thickness_mm=5.0,
                                                     kernel="smooth"), study_instance_uid=study_uid, series_number=2)
    thin = synth_series(tmp_path / "thin", phantom(slices=24, matrix=64, seed=5, slice_thickness_mm=1.25,
                                                   kernel="sharp"), study_instance_uid=study_uid, series_number=3)
    assert storescu(node.port, *thick.files).returncode == 0
    node.wait_complete(thick.series_uid)  # complete, its job queued: a worker would take it now without the rule
    time.sleep(1.0)
    assert node.jobs(thick.series_uid)[0]["state"] == "queued", "waits for the study to settle"
    assert storescu(node.port, *thin.files).returncode == 0

    def finished(uid: str) -> dict[str, object] | None:
        jobs = node.jobs(uid)
        return jobs[0] if jobs and jobs[0]["state"] in ("done", "rejected", "failed") else None

    thin_job = wait_until(lambda: finished(thin.series_uid), timeout=90, what="the thin series' job")
    thick_job = wait_until(lambda: finished(thick.series_uid), timeout=90, what="the thick series' job")
    assert (thin_job["state"], thick_job["state"]) == ("done", "rejected"), (thin_job, thick_job)
    assert thin.series_uid in str(thick_job["error"])


def test_serve_without_models_keeps_receiving_says_why_and_starts_once_they_are_fixed(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    models = tmp_path / "no-models"
    node = node_factory(settings={"inference": {"models_dir": str(models)},
                                  "workers": {"count": 1, "models_recheck_s": 1}})
    match = node.wait_for_log(r"event=analysis_disabled reason=\"([^\"]+)\"", timeout=30)
    assert "does not exist" in match.group(1)
    # the fix it names checks this node's models, not the embedded defaults
    assert f'fix="lungnode models --config {node.config_path} verify;' in node.log
    series = make_series(tmp_path / "ct", slices=4, matrix=32)
    assert storescu(node.port, series.folder).returncode == 0
    node.wait_complete(series.series_uid)
    assert [j["state"] for j in node.jobs(series.series_uid)] == ["queued"]
    # the on-call person sees it without reading the log: the listener answers, the queue only grows
    status = run_cli("status", "--config", node.config_path)
    assert re.search(r"ANALYSIS DISABLED since \S+: model folder .* does not exist", status.stdout), status.stdout
    metrics = run_cli("status", "--metrics", "--config", node.config_path).stdout
    assert "lungnode_analysis_enabled 0" in metrics and "lungnode_listener_up 1" in metrics
    # the administrator installs the models: the running node finds them and analyses, without a restart; its
    # diagnosis model was measured with another lesion model than this folder's, which runs with a warning
    staging = make_models_dir(tmp_path / "staging")
    manifest = yaml.safe_load((staging / "diagnosis" / "model.yaml").read_text(encoding="utf-8"))
    manifest["paired_with"] = {"lesion": "ab" * 32}
    (staging / "diagnosis" / "model.yaml").write_text(yaml.safe_dump(manifest), encoding="utf-8")
    staging.rename(models)
    node.wait_for_log(r"event=analysis_enabled", timeout=30)
    assert re.search(r"WARNING .*event=model_pairing problem=\"the diagnosis model .* abababababab", node.log)
    job = wait_until(lambda: (j := node.jobs(series.series_uid)) and j[0]["state"] not in ("queued", "running")
                     and j[0], timeout=120, what="the waiting job to be analysed")
    assert job["state"] in ("done", "rejected"), job
    assert "ANALYSIS DISABLED" not in run_cli("status", "--config", node.config_path).stdout
    assert "lungnode_analysis_enabled 1" in run_cli("status", "--metrics", "--config", node.config_path).stdout


@pytest.mark.parametrize("problem", ["gpu", "port", "ledger"])
def test_serve_that_cannot_start_says_why_in_its_log_and_exits_2(tmp_path: Path, problem: str) -> None:
    """A GPU named in inference.device that is not there, a port already taken, or a ledger that fails when start-up
    reconciliation writes to it (here a table renamed away; a full disk did it in the field, with a traceback and
    exit 1): exit 2 at once, with the reason on stderr and as event=node_start_failed in the log file (where
    systemd users look)."""
    if problem == "gpu" and "CUDAExecutionProvider" in onnxruntime.get_available_providers() and _probe_cuda(0) is None:
        pytest.skip("a GPU answers here: device cuda works")
    log_file = tmp_path / "node.log"
    settings = {
        "dicom": {"bind_address": "127.0.0.1", "port": free_port()},
        "storage": {"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path / 'db.sqlite'}",
                    "min_free_disk_mb": 0},
        "logging": {"file": str(log_file)},
        "workers": {"count": 1},
        "inference": {"device": "cuda" if problem == "gpu" else "cpu"},
    }
    if problem == "ledger":
        import sqlite3

        from node.db.session import open_database

        open_database(settings["storage"]["database_url"]).dispose()
        with sqlite3.connect(tmp_path / "db.sqlite") as db:
            db.execute("ALTER TABLE associations RENAME TO associations_away")
    with socket.socket() as taken:
        if problem == "port":
            taken.bind(("127.0.0.1", settings["dicom"]["port"]))
            taken.listen()
        cfg = tmp_path / "config.yaml"
        cfg.write_text(yaml.safe_dump(settings), encoding="utf-8")
        proc = run_cli("serve", "--config", cfg, timeout=60)
    assert proc.returncode == 2, proc.stderr
    expected = {"gpu": "inference.device is cuda but", "port": "cannot listen on 127.0.0.1",
                "ledger": "the database could not be brought up to date at start (no such table"}[problem]
    assert expected in proc.stderr
    if problem == "port":
        assert "another service (another node, a DICOM server) is using the port" in proc.stderr
    line = next(ln for ln in log_file.read_text().splitlines() if "event=node_start_failed" in ln)
    assert "ERROR" in line and expected in line


def test_sighup_keeps_the_node_running_and_a_moved_log_file_is_reopened(node_factory: NodeFactory,
                                                                         tmp_path: Path) -> None:
    """logrotate moves the log file, then sends SIGHUP by habit: the node must neither die (the default action,
    which systemd's Restart=on-failure does not restart) nor write on into the moved file."""
    import signal

    log_file = tmp_path / "logs" / "lungnode.log"
    node = node_factory(settings={"logging": {"file": str(log_file)}})
    wait_until(lambda: log_file.is_file() and "event=node_ready" in log_file.read_text(), timeout=10,
               what="node_ready in logging.file")
    log_file.rename(log_file.with_name("lungnode.log.1"))
    node.send_signal(signal.SIGHUP)
    wait_until(lambda: log_file.is_file() and "event=signal_received signal=SIGHUP" in log_file.read_text(),
               timeout=10, what="the SIGHUP line in a new log file")
    assert node.running
    series = make_series(tmp_path / "ct", slices=3, matrix=32)
    assert storescu(node.port, series.folder).returncode == 0
    node.wait_complete(series.series_uid)  # the ledger says so first; the log line follows the commit
    wait_until(lambda: "event=series_complete" in log_file.read_text(), timeout=10, what="series_complete in the "
               "reopened log file")
    assert "event=series_complete" not in log_file.with_name("lungnode.log.1").read_text()


def test_a_backlog_is_analysed_most_urgent_first(node_factory: NodeFactory, tmp_path: Path) -> None:
    """Three series wait while no worker runs (maintenance): one from a research archive (rule: low), one from the
    PACS (C-STORE Priority MEDIUM) and one the PACS sent with Priority HIGH. Once workers start they take the
    HIGH one first, then MEDIUM, then low; the log and `lungnode status` say which was which."""
    from tests.helpers.scu import send_files

    models = make_models_dir(tmp_path / "models")
    node = node_factory(settings={
        "assembly": {"priority_by_caller": {"RESEARCH": "low"}},
        "inference": {"models_dir": str(models), "device": "cpu", "threads": 1},
        "selection": {"min_slices": 10},
    })
    low, medium, high = (make_series(tmp_path / name, slices=12, matrix=64) for name in ("low", "medium", "high"))
    assert storescu(node.port, low.folder, calling="RESEARCH").returncode == 0
    assert storescu(node.port, medium.folder).returncode == 0
    sent = send_files(node.port, sorted(high.folder.rglob("*.dcm")), priority=0x0001)
    assert [s.status for s in sent] == [0] * 12
    for series in (low, medium, high):
        node.wait_complete(series.series_uid)
    assert [node.jobs(s.series_uid)[0]["priority"] for s in (low, medium, high)] == [-1, 0, 1]
    assert [r["priority"] for r in node.query("SELECT priority FROM associations ORDER BY id")] == [None, None, 1]
    wait_until(lambda: node.log.count("event=series_complete") == 3, timeout=10, what="three series_complete lines")
    assert f"series={high.series_uid} revision=1 instances=12" in node.log
    assert "priority=high" in node.wait_for_log(r"event=association_released assoc=3 .*").group(0)
    assert "priority=low" in node.wait_for_log(rf"event=series_complete series={low.series_uid} .*").group(0)
    listing = run_cli("status", "--config", node.config_path).stdout
    assert "queued high" in listing and "queued low" in listing
    # each series by its number and description, as the PACS lists it, before its UID
    assert re.search(rf"#\d+ queued high +1 Synthetic chest CT \(phantom\)  {high.series_uid}", listing), listing
    waiting = run_cli("status", "--queue", "--config", node.config_path)
    assert waiting.returncode == 0, waiting.stderr
    lines = waiting.stdout.splitlines()
    assert lines[0].startswith("queue: 3 waiting, 0 running")
    assert [line.split()[2] for line in lines[2:]] == ["high", "medium", "low"]
    assert [line.split()[-1] for line in lines[2:]] == [high.series_uid, medium.series_uid, low.series_uid]
    as_json = json.loads(run_cli("status", "--queue", "--json", "--config", node.config_path).stdout)
    assert [j["priority"] for j in as_json["queued"]] == ["high", "medium", "low"]
    assert all(j["waiting_s"] >= 0 and not j["settling"] for j in as_json["queued"])
    mixed = run_cli("status", "--queue", "--metrics", "--config", node.config_path)
    assert mixed.returncode == 2 and "--queue lists the whole queue" in mixed.stderr
    metrics = run_cli("status", "--metrics", "--config", node.config_path).stdout
    for p in ("high", "medium", "low"):
        assert f'lungnode_queued_jobs{{priority="{p}"}} 1' in metrics.splitlines()

    node.stop()
    node.reconfigure({"workers": {"count": 1, "poll_interval_s": 0.2}})
    node.start()

    def started() -> list[str] | None:
        rows = [(node.jobs(s.series_uid)[0], s.series_uid) for s in (low, medium, high)]
        if any(job["state"] not in ("done", "rejected", "failed") for job, _ in rows):
            return None
        return [uid for job, uid in sorted(rows, key=lambda r: (r[0]["started_at"], r[0]["id"]))]
    assert wait_until(started, timeout=120, what="the three jobs to finish") == [
        high.series_uid, medium.series_uid, low.series_uid]
