"""Analysis workers against a real SQLite ledger, real synthetic DICOM files and tiny real ONNX
models: in-process ``Worker.run_one`` for the outcomes, and ``lungnode worker`` subprocesses for
a worker killed mid-job and for two workers sharing one queue."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from node.app import WorkerPool
from node.config import (
    AssemblySettings,
    Config,
    InferenceSettings,
    SelectionSettings,
    StorageSettings,
    WorkerSettings,
)
from node.db.ingest import IngestLedger
from node.db.jobs import requeue_for_reanalysis, this_machine
from node.db.models import utcnow
from node.db.session import make_engine, make_sessionmaker, upgrade_schema
from node.db.workers import workers_summary
from node.pipeline.worker import EXIT_JOB_TIMED_OUT, FAIL_WAIT_S, Worker, results_dir
from node.receive.assembler import Assembler
from node.receive.inspect import inspect_instance
from tests.helpers.faults import FifoTrap, Synth, phantom, set_pixels, synth_series
from tests.helpers.node_proc import NODE_CMD, REPO, clean_env, query_sqlite
from tests.helpers.onnx_models import make_models_dir
from tests.helpers.wait import wait_until

RESULT_KEYS = {"status", "reason", "series_instance_uid", "qa", "models", "probabilities", "lung_volume_ml",
               "lesion_volume_ml", "involvement_percent", "timings_s"}
CLASSES = {"covid19", "other_pneumonia", "no_pneumonia"}


@dataclass
class Ledger:
    root: Path
    engine: Engine
    sessions: sessionmaker[Session]
    config: Config
    models_dir: Path

    @property
    def db_path(self) -> Path:
        return self.root / "ledger.sqlite"

    def add_series(self, s: Synth, files: list[Path] | None = None) -> None:
        """Record every instance as the SCP would (header read from the real file), received a minute ago: the
        study has settled (assembly.study_settle_s) by the time a worker looks."""
        ledger = IngestLedger(self.sessions)
        received = utcnow() - dt.timedelta(minutes=1)
        for path in files if files is not None else s.files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            header = inspect_instance(path, sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
                                      check_request=False)
            ledger.record_instance(header, path=path, size_bytes=path.stat().st_size, association_id=None,
                                   own_output=False, received_at=received)

    def complete(self) -> dict[str, int]:
        """Close every receiving series (quiet period over); returns SeriesInstanceUID -> job id."""
        assembler = Assembler(AssemblySettings(quiet_period_s=1.0, release_grace_s=0.0), self.sessions)
        assembler.complete_due(utcnow() + dt.timedelta(seconds=5))
        return {r["series_instance_uid"]: r["id"] for r in self.query(
            "SELECT jobs.id, series.series_instance_uid FROM jobs JOIN series ON series.id = jobs.series_id")}

    def query(self, sql: str, *params: Any) -> list[sqlite3.Row]:
        return query_sqlite(self.db_path, sql, *params)

    def job(self, job_id: int) -> dict[str, Any]:
        return dict(self.query("SELECT * FROM jobs WHERE id = ?", job_id)[0])

    def events(self, job_id: int) -> list[str]:
        return [r["kind"] for r in self.query("SELECT kind FROM events WHERE job_id = ? ORDER BY id", job_id)]

    def result(self, job_id: int) -> dict[str, Any]:
        return json.loads((results_dir(self.config, job_id) / "result.json").read_text())

    def env(self, **extra: str) -> dict[str, str]:
        """Environment configuration for a ``lungnode worker`` subprocess on this ledger."""
        w = self.config.workers
        return clean_env({
            "LUNGNODE_STORAGE__DATABASE_URL": self.config.storage.database_url,
            "LUNGNODE_STORAGE__SPOOL_DIR": str(self.config.storage.spool_dir),
            "LUNGNODE_INFERENCE__MODELS_DIR": str(self.models_dir),
            "LUNGNODE_INFERENCE__DEVICE": "cpu",
            "LUNGNODE_INFERENCE__THREADS": "1",
            "LUNGNODE_WORKERS__LEASE_S": str(w.lease_s),
            "LUNGNODE_WORKERS__POLL_INTERVAL_S": str(w.poll_interval_s),
            "LUNGNODE_WORKERS__MAX_JOB_S": str(w.max_job_s),
            "LUNGNODE_SELECTION__MIN_SLICES": str(MIN_SLICES),
            "LUNGNODE_LOGGING__LEVEL": "INFO",
            **extra,
        })


MIN_SLICES = 10


def make_ledger(root: Path, *, lease_s: float = 120.0, max_job_s: float = 1800.0) -> Ledger:
    root.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{root / 'ledger.sqlite'}"
    engine = make_engine(url)
    upgrade_schema(engine)
    models = make_models_dir(root / "models")
    config = Config(
        storage=StorageSettings(spool_dir=root / "spool", database_url=url, min_free_disk_mb=0),
        inference=InferenceSettings(models_dir=models, device="cpu", threads=1),
        workers=WorkerSettings(lease_s=lease_s, poll_interval_s=0.05, max_attempts=3, max_job_s=max_job_s),
        selection=SelectionSettings(min_slices=MIN_SLICES),  # the small test series have fewer than 40
    )
    return Ledger(root, engine, make_sessionmaker(engine), config, models)


@pytest.fixture
def ledgers(tmp_path: Path) -> Iterator[Callable[..., Ledger]]:
    """``ledgers(lease_s=...)``: a fresh ledger under tmp_path/node (engines disposed at teardown)."""
    made: list[Ledger] = []

    def make(**kwargs: Any) -> Ledger:
        made.append(make_ledger(tmp_path / "node", **kwargs))
        return made[-1]

    yield make
    for led in made:
        led.engine.dispose()


@pytest.fixture
def ledger(ledgers: Callable[..., Ledger]) -> Ledger:
    """A ledger with the default (long) lease; shadows the conftest IngestLedger fixture on purpose."""
    return ledgers()


def chest(root: Path, name: str, **spec: Any) -> Synth:
    spec.setdefault("slices", 40)
    spec.setdefault("matrix", 64)
    spec.setdefault("seed", 1)
    return synth_series(root / "incoming" / name, phantom(**spec))


class WorkerProc:
    """``lungnode worker`` as a subprocess, logging to a file."""

    def __init__(self, led: Ledger, name: str) -> None:
        self.log_path = led.root / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([*NODE_CMD, "worker"], env=led.env(), cwd=REPO, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        self.name = f"{this_machine()}:{self.proc.pid}"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_until(lambda: "event=worker_ready" in self.log or self.proc.poll() is not None, timeout=timeout,
                   what="event=worker_ready")
        assert self.proc.poll() is None, f"worker exited {self.proc.returncode}:\n{self.log}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=20)


@pytest.fixture
def workers() -> Iterator[list[WorkerProc]]:
    procs: list[WorkerProc] = []
    yield procs
    for w in procs:
        w.kill()


# -- in-process outcomes -----------------------------------------------------------------------
def test_run_one_analyses_a_queued_series(ledger: Ledger, tmp_path: Path) -> None:
    s = chest(tmp_path, "covid")
    ledger.add_series(s)
    [job_id] = ledger.complete().values()
    assert ledger.job(job_id)["state"] == "queued"

    worker = Worker(ledger.config, name="test-worker")
    assert worker.run_one() is True
    job = ledger.job(job_id)
    assert job["state"] == "done", job
    assert job["attempts"] == 1 and job["worker"] == "test-worker" and job["error"] is None
    assert ledger.events(job_id) == ["series_complete", "job_started", "job_done"]
    assert set(json.loads(job["timings"])) >= {"volume", "coverage", "lung_seg", "lesion_seg", "diagnosis", "total"}

    result = ledger.result(job_id)
    assert RESULT_KEYS <= set(result)
    assert result["status"] == "ok" and result["reason"] is None
    assert result["series_instance_uid"] == s.series_uid
    assert set(result["probabilities"]) == CLASSES
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
    assert [m["name"] for m in result["models"]] == ["lung_seg", "lesion_seg", "diagnosis"]
    assert all(len(m["sha256"]) == 64 for m in result["models"])
    assert set(result["lung_volume_ml"]) == {"right", "left", "total"}
    assert set(result["lesion_volume_ml"]) == {"ggo", "consolidation", "total", "right", "left"}
    assert set(result["involvement_percent"]) == {"right", "left", "total"}
    assert result["lung_volume_ml"]["total"] > 0
    assert {q["code"] for q in result["qa"]} <= {"slice_gap"}  # a clean chest: no refusal, no partial coverage
    assert result["timings_s"]["total"] > 0

    assert worker.run_one() is False  # the queue is empty now
    worker.engine.dispose()


def test_refused_series_ends_rejected_with_its_reason(ledger: Ledger, tmp_path: Path) -> None:
    tall = phantom(slices=60, matrix=64, seed=3, margin_below_mm=300.0, margin_above_mm=10.0)
    s = synth_series(tmp_path / "incoming" / "abdomen", tall)
    lungs_from = int(np.nonzero(tall.lungs.reshape(60, -1).any(axis=1))[0][0])
    abdomen = s.files_of_indices(range(lungs_from - 1))  # the series stops below the lungs
    ledger.add_series(s, abdomen)
    [job_id] = ledger.complete().values()

    worker = Worker(ledger.config, name="w")
    assert worker.run_one()
    job = ledger.job(job_id)
    assert job["state"] == "rejected"
    assert "do not cover the lungs" in job["error"]
    result = ledger.result(job_id)
    assert result["status"] == "rejected" and result["reason"] == job["error"]
    assert result["qa"][-1]["code"] == "no_lung_coverage" and result["qa"][-1]["severity"] == "refuse"
    assert result["probabilities"] is None and result["lung_volume_ml"] is None
    assert ledger.events(job_id)[-1] == "job_rejected"
    worker.engine.dispose()


def test_a_job_whose_files_vanished_fails_and_the_worker_goes_on(ledger: Ledger, tmp_path: Path) -> None:
    gone, good = chest(tmp_path, "gone"), chest(tmp_path, "good", seed=2)
    ledger.add_series(gone)
    ledger.add_series(good)
    jobs = ledger.complete()
    for path in gone.files[:3]:
        path.unlink()  # e.g. purged by hand while queued
    worker = Worker(ledger.config, name="w")
    assert worker.run_one() and worker.run_one()
    failed, done = ledger.job(jobs[gone.series_uid]), ledger.job(jobs[good.series_uid])
    assert failed["state"] == "failed" and "FileNotFoundError" in failed["error"]
    assert ledger.events(failed["id"])[-1] == "job_failed"
    assert done["state"] == "done"
    worker.engine.dispose()


def coronal_reformat(s: Synth, out: Path) -> list[Path]:
    """The phantom resliced as a coronal series (CT Image Storage, IOP [1,0,0, 0,0,-1])."""
    ph = s.phantom
    template = pydicom.dcmread(s.files[0])
    series_uid = generate_uid()
    dz, dy, dx = ph.spacing_mm
    x0, y0, z0 = ph.origin_mm
    top = z0 + (ph.hu.shape[0] - 1) * dz
    out.mkdir(parents=True)
    paths = []
    for j in range(ph.hu.shape[1]):
        ds = pydicom.dcmread(s.files[0])
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = "COR 4mm"
        ds.InstanceNumber = j + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.ImagePositionPatient = [x0, y0 + j * dy, top]
        ds.PixelSpacing = [dz, dx]
        ds.SliceThickness = f"{dy:.3f}"
        stored = ph.hu[::-1, j, :].astype(np.int32) - int(float(template.RescaleIntercept))
        set_pixels(ds, np.clip(stored, 0, 4095).astype(np.uint16))
        path = out / f"COR{j + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_worker_applies_the_selection_rules(ledger: Ledger, tmp_path: Path) -> None:
    s = chest(tmp_path, "axial")
    coronal = coronal_reformat(s, tmp_path / "incoming" / "coronal")
    ledger.add_series(s, coronal)
    [job_id] = ledger.complete().values()
    worker = Worker(ledger.config, name="w")
    assert worker.run_one()
    worker.engine.dispose()
    job = ledger.job(job_id)
    assert job["state"] == "rejected", job
    assert "not axial" in (job["error"] or "")


def test_only_the_best_series_of_a_study_is_analysed(ledger: Ledger, tmp_path: Path) -> None:
    study_uid = generate_uid()
    thin = synth_series(tmp_path / "incoming" / "thin",
                        phantom(slices=40, matrix=64, seed=5, slice_thickness_mm=1.25, kernel="sharp"),
                        study_instance_uid=study_uid, series_number=3)
    thick = synth_series(tmp_path / "incoming" / "thick",
                         phantom(slices=40, matrix=64, seed=5, slice_thickness_mm=5.0, kernel="smooth"),
                         study_instance_uid=study_uid, series_number=2)
    ledger.add_series(thin)
    ledger.add_series(thick)
    jobs = ledger.complete()
    worker = Worker(ledger.config, name="w")
    assert worker.run_one() and worker.run_one()
    worker.engine.dispose()
    thick_job, thin_job = ledger.job(jobs[thick.series_uid]), ledger.job(jobs[thin.series_uid])
    assert thin_job["state"] == "done", thin_job
    assert thick_job["state"] == "rejected", thick_job
    assert thin.series_uid in thick_job["error"] and "preferred" in thick_job["error"]
    assert ledger.result(jobs[thick.series_uid])["qa"][-1]["code"] == "selection_not_best"


# -- worker processes --------------------------------------------------------------------------
def test_worker_killed_mid_job_is_requeued_and_finishes_once(tmp_path: Path, ledgers: Callable[..., Ledger],
                                                             workers: list[WorkerProc]) -> None:
    led = ledgers(lease_s=2.0)
    s = chest(tmp_path, "slow")
    led.add_series(s)
    [job_id] = led.complete().values()
    trap = FifoTrap(s.files[len(s.files) // 2])  # reading this file blocks the worker mid-job

    first = WorkerProc(led, "first")
    workers.append(first)
    running = wait_until(lambda: (j := led.job(job_id))["state"] == "running" and j, timeout=30,
                         what="the first worker to claim the job")
    assert running["worker"] == first.name and running["attempts"] == 1
    # it is stuck reading the series, keeping its lease alive with heartbeats
    t0 = led.job(job_id)["heartbeat_at"]
    wait_until(lambda: led.job(job_id)["heartbeat_at"] != t0, timeout=5, what="a heartbeat")
    assert first.proc.poll() is None

    os.kill(first.proc.pid, signal.SIGKILL)
    assert first.proc.wait(timeout=10) == -signal.SIGKILL
    trap.release()
    assert led.job(job_id)["state"] == "running"  # nobody noticed yet
    with led.sessions() as session:  # status: lost once it has not reported for the lease
        wait_until(lambda: workers_summary(session, alive_s=led.config.workers.lease_s)[0]["state"] == "lost",
                   timeout=10, what="the killed worker to be listed as lost")

    second = WorkerProc(led, "second")
    workers.append(second)
    final = wait_until(lambda: (j := led.job(job_id))["state"] not in ("queued", "running") and j, timeout=40,
                       what="the job to be requeued and finished")
    assert final["state"] == "done", (final, second.log)
    assert final["attempts"] == 2 and final["worker"] == second.name
    assert led.events(job_id) == ["series_complete", "job_started", "job_requeued", "job_started", "job_done"]
    started = [r["message"] for r in led.query(
        "SELECT message FROM events WHERE job_id = ? AND kind = 'job_started' ORDER BY id", job_id)]
    assert started == [f"attempt 1 on {first.name}", f"attempt 2 on {second.name}"]
    outputs = list((led.config.storage.spool_dir / "results").rglob("result.json"))
    assert outputs == [results_dir(led.config, job_id) / "result.json"]
    assert led.result(job_id)["status"] == "ok"
    assert "job_stalled" in second.log
    assert second.stop() == 0


def test_a_job_that_hangs_past_max_job_s_fails_with_where_it_hung_and_its_worker_exits(
        tmp_path: Path, ledgers: Callable[..., Ledger], workers: list[WorkerProc]) -> None:
    led = ledgers(lease_s=1.0, max_job_s=3.0)
    s = chest(tmp_path, "hangs")
    led.add_series(s)
    [job_id] = led.complete().values()
    trap = FifoTrap(s.files[0])  # reading this file blocks the worker for good: nobody writes to the pipe
    stuck = WorkerProc(led, "stuck")
    workers.append(stuck)
    wait_until(lambda: led.job(job_id)["state"] == "running", timeout=30, what="the worker to claim the job")
    beat = led.job(job_id)["heartbeat_at"]
    wait_until(lambda: led.job(job_id)["heartbeat_at"] != beat, timeout=5, what="a heartbeat (the job looks alive)")
    with led.sessions() as session:  # what `lungnode status` says of it meanwhile: busy with the job, on the CPU
        [seen] = workers_summary(session, alive_s=led.config.workers.lease_s)
    assert (seen["name"], seen["state"], seen["job"], seen["provider"]) == (
        stuck.name, "busy", job_id, "CPUExecutionProvider"), seen

    assert stuck.proc.wait(timeout=30) == EXIT_JOB_TIMED_OUT, stuck.log
    job = led.job(job_id)
    assert job["state"] == "failed" and "workers.max_job_s (3 s)" in job["error"], job
    assert f"lungnode reanalyse {job_id}" in job["error"]
    [line] = [x for x in stuck.log.splitlines() if "event=job_timed_out job=" in x]
    assert "ERROR" in line and "dcmread" in line, line  # where it hung: reading the trapped file
    assert led.events(job_id)[-1] == "job_failed"
    with led.sessions() as session:  # it ended mid-job: lost once not heard from for the lease (until replaced)
        wait_until(lambda: [w["state"] for w in workers_summary(session, alive_s=led.config.workers.lease_s)] == [
            "lost"], timeout=10, what="the ended worker to be listed as lost")

    trap.release()  # the file is readable again: the job runs again when asked, and finishes
    assert "queued" in requeue_for_reanalysis(led.sessions, job_id)
    again = WorkerProc(led, "again")
    workers.append(again)
    final = wait_until(lambda: (j := led.job(job_id))["state"] not in ("queued", "running") and j, timeout=60,
                       what="the job run again to finish")
    assert final["state"] == "done", (final, again.log)


def test_a_hung_job_ends_its_worker_at_max_job_s_even_when_the_database_will_not_take_the_failure(
        tmp_path: Path, ledgers: Callable[..., Ledger], workers: list[WorkerProc]) -> None:
    """The ledger is locked (another writer holding it; on PostgreSQL, a row lock the stuck job holds): heartbeats
    wait on it, the failure cannot be recorded, and still the worker ends at the limit, after a bounded wait. The
    job, still running under the ended worker's name, goes back to the queue and is run again."""
    led = ledgers(lease_s=1.0, max_job_s=3.0)
    s = chest(tmp_path, "hangs-locked")
    led.add_series(s)
    [job_id] = led.complete().values()
    trap = FifoTrap(s.files[0])
    stuck = WorkerProc(led, "stuck")
    workers.append(stuck)
    wait_until(lambda: led.job(job_id)["state"] == "running", timeout=30, what="the worker to claim the job")
    writer = sqlite3.connect(led.db_path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # nobody else writes until it ends (the node's busy timeout is 30 s)
    try:
        t0 = time.monotonic()
        assert stuck.proc.wait(timeout=40) == EXIT_JOB_TIMED_OUT, stuck.log
        took = time.monotonic() - t0
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert took < 3.0 + FAIL_WAIT_S + 5, f"it waited {took:.0f} s for the database, not the bounded {FAIL_WAIT_S:g}"
    assert "event=job_timed_out job=" in stuck.log
    assert led.job(job_id)["state"] == "running"  # its failure was never recorded

    trap.release()
    again = WorkerProc(led, "again")
    workers.append(again)
    final = wait_until(lambda: (j := led.job(job_id))["state"] not in ("queued", "running") and j, timeout=60,
                       what="the job to be found gone, queued again and finished")
    assert final["state"] == "done" and final["attempts"] == 2, (final, again.log)
    assert f"event=job_stalled job={job_id} worker={stuck.name}" in again.log


def test_two_workers_never_run_the_same_job(tmp_path: Path, ledgers: Callable[..., Ledger],
                                            workers: list[WorkerProc]) -> None:
    led = ledgers()
    series = []
    for i in range(10):
        s = chest(tmp_path, f"s{i}", matrix=48, seed=1 + i % 3)
        led.add_series(s)
        series.append(s)
    a, b = WorkerProc(led, "a"), WorkerProc(led, "b")
    workers.extend([a, b])
    a.wait_ready()
    b.wait_ready()
    jobs = led.complete()  # all ten become queued at once, with both workers polling
    assert len(jobs) == 10

    def all_final() -> bool:
        return all(r["state"] in ("done", "rejected", "failed") for r in led.query("SELECT state FROM jobs"))

    wait_until(all_final, timeout=60, interval=0.1, what="all ten jobs finished")
    rows = [dict(r) for r in led.query("SELECT * FROM jobs ORDER BY id")]
    assert [r["state"] for r in rows] == ["done"] * 10, rows
    assert all(r["attempts"] == 1 for r in rows)
    started = led.query("SELECT job_id, count(*) AS n FROM events WHERE kind = 'job_started' GROUP BY job_id")
    assert sorted(r["job_id"] for r in started) == sorted(jobs.values())
    assert all(r["n"] == 1 for r in started)
    assert not led.query("SELECT * FROM events WHERE kind = 'job_requeued'")
    by_worker = {r["worker"] for r in rows}
    assert by_worker == {a.name, b.name}, "both workers should have taken part"
    for s in series:
        assert led.result(jobs[s.series_uid])["series_instance_uid"] == s.series_uid
    assert a.stop() == 0 and b.stop() == 0
    assert "job_result_dropped" not in a.log + b.log


def test_selection_reads_a_ct_image_of_a_series_with_a_stray_image(tmp_path: Path) -> None:
    """A stray MR image filed first in a CT series must not make selection call the series MR: the analysis is
    what refuses the mix, with its reason (mixed_modalities) and an SR."""
    from node.pipeline.worker import _series_header
    from tests.helpers.series import make_series, write_mr_image

    series = make_series(tmp_path / "ct", slices=2, matrix=32)
    mr = write_mr_image(tmp_path / "mr" / "mr.dcm").files[0]
    header = _series_header([mr, *series.files])
    assert (header.modality, header.series_instance_uid, header.slice_count) == ("CT", series.series_uid, 3)
    assert _series_header([mr]).modality == "MR"


def test_a_worker_that_dies_at_start_is_restarted_after_a_growing_wait(
    ledger: Ledger, caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker that cannot open the ledger dies at once: restarted every 2 s, it would load the models again and
    again and take the CPU the listener needs. The wait doubles while it keeps dying young."""
    data = ledger.config.model_dump(mode="json")
    data["storage"]["database_url"] = "sqlite:////proc/lungnode-absent/ledger.sqlite"  # its folder cannot be made
    data["workers"]["count"] = 1
    pool = WorkerPool(Config.model_validate(data))
    caplog.set_level("INFO", logger="node.app")
    pool.start()
    try:
        def died_twice() -> bool:
            pool.watch()
            return caplog.text.count("event=worker_died") >= 2

        wait_until(died_twice, timeout=60, interval=0.1, what="the worker dead, restarted, dead again")
    finally:
        pool.stop()
    assert re.findall(r"event=worker_died .*restart_in_s=(\S+)", caplog.text)[:2] == ["2", "4"], caplog.text
