"""`lungnode status` text on a real SQLite ledger: a refused, failed or superseded job shows its reason; sizes read
as people read them; a pipe closed early is no error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import Job, JobState, Series, SeriesOrigin, SeriesState, Study
from node.db.status import render_storage, render_text, summary
from tests.helpers.prometheus import assert_prometheus_text


def test_a_job_that_did_not_finish_well_shows_why(sessions: sessionmaker[Session]) -> None:
    reasons = {JobState.rejected: "not axial: slices are 90 degrees off the axial plane",
               JobState.failed: "DICOM outputs not built: seg: ValueError", JobState.done: None}
    with sessions.begin() as s:
        study = Study(study_instance_uid="1.2.3")
        for n, (state, error) in enumerate(reasons.items()):
            series = Series(study=study, series_instance_uid=f"1.2.3.{n}", modality="CT",
                            origin=SeriesOrigin.modality, state=SeriesState.complete)
            s.add(Job(series=series, revision=1, state=state, error=error))
    with sessions() as s:
        text = render_text(summary(s, limit=10))
    for state, error in reasons.items():
        if error:
            assert f": {error}" in text, text
    assert text.count(": ") >= 2 and "job #3:" not in text  # the done job has nothing to explain


def test_the_spool_line_reads_sizes_as_people_do() -> None:
    storage = {"spool_dir": "/var/lib/lungnode/spool", "images_bytes": 0, "disk_free_bytes": 37 * 2**30 + 2**29,
               "refuse_below_bytes": 10 * 2**20}
    line = render_storage(storage)
    assert "0 B of received images held" in line and "disk free 37.5 GiB (C-STORE refused below 10 MiB)" in line
    assert "LOW" not in line
    assert "LOW: C-STORE is being refused" in render_storage({**storage, "disk_free_bytes": 5 * 2**20})


def test_status_into_a_pipe_closed_early_ends_quietly(engine: Engine, tmp_path: Path) -> None:
    """`lungnode status | head -1`: the reader went away; no traceback after the lines it wanted."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"storage": {"database_url": str(engine.url),
                                                  "spool_dir": str(tmp_path / "spool")}}), encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "status", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before it writes a line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_the_analysis_state_is_recorded_on_change_and_read_by_index(sessions: sessionmaker[Session]) -> None:
    """Disabled, the same reason again (no new row), another reason, enabled: status reads the latest by the
    events' kind index, not by reading every event (the table grows with every association and job)."""
    from typing import Any

    from sqlalchemy import event, func, select

    from node.db.models import Event
    from node.db.status import analysis_state, record_analysis_state

    def record(problem: str | None) -> dict[str, Any]:
        with sessions.begin() as s:
            record_analysis_state(s, problem=problem)
        with sessions() as s:
            return analysis_state(s)

    with sessions() as s:
        assert analysis_state(s)["enabled"] is True, "no record: a node that never failed analyses"
    first = record("model folder /x does not exist")
    assert (first["enabled"], first["reason"]) == (False, "model folder /x does not exist") and first["since"]
    record("model folder /x does not exist")  # the same reason at the next check: no new row
    second = record("lesion model: sha256 mismatch")
    assert (second["enabled"], second["reason"]) == (False, "lesion model: sha256 mismatch")
    assert record(None)["enabled"] is True
    record(None)  # still enabled: no new row
    with sessions() as s:
        kinds = s.scalars(select(Event.kind).order_by(Event.id)).all()
        assert kinds == ["analysis_disabled", "analysis_disabled", "analysis_enabled"]
        assert s.scalar(select(func.count()).select_from(Event)) == 3
        assert analysis_state(s)["enabled"] is True

    engine = sessions.kw["bind"]
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, params: Any, _context: Any, _many: bool) -> None:
        seen.append((statement, params))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with sessions() as s:
            analysis_state(s)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    [(statement, params)] = seen
    with engine.connect() as conn:
        plan = " / ".join(row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params))
    assert "ix_events_kind" in plan, plan


def test_workers_are_listed_busy_idle_lost_or_stopped_and_none_alive_with_jobs_waiting_is_said(
        sessions: sessionmaker[Session]) -> None:
    """What each worker reported last, read against workers.lease_s: a killed one is lost once its lease would have
    run out, like its job; one that stopped cleanly says so; a day-old one is no longer listed."""
    import datetime as dt

    from node.db.models import utcnow
    from node.db.status import render_metrics
    from node.db.workers import register, report, workers_summary

    for name in ("a:1", "b:2", "c:3", "d:4", "e:5"):
        register(sessions, name, provider="CPUExecutionProvider")
    cpu = "CPUExecutionProvider"
    report(sessions, "a:1", provider=cpu, job_id=7)
    report(sessions, "c:3", provider=cpu, job_id=8)
    report(sessions, "d:4", provider=cpu, job_id=None, stopped=True)
    now = utcnow()
    with sessions() as s:
        listed = workers_summary(s, alive_s=120, now=now + dt.timedelta(seconds=60))
        assert [(w["name"], w["state"], w["job"]) for w in listed] == [
            ("a:1", "busy", 7), ("b:2", "idle", None), ("c:3", "busy", 8), ("d:4", "stopped", None),
            ("e:5", "idle", None)]
        later = workers_summary(s, alive_s=120, now=now + dt.timedelta(seconds=300))
        assert [w["state"] for w in later] == ["lost", "lost", "lost", "stopped", "lost"]
        assert workers_summary(s, alive_s=120, now=now + dt.timedelta(days=2)) == []

        data = summary(s, limit=10)
    data["workers"] = later
    data["counts"]["jobs"] = {"queued": 3}
    text = render_text(data)
    assert "workers: 4 lost, 1 stopped" in text and "NO WORKER ALIVE: 3 jobs wait" in text, text
    data["workers"] = listed
    text = render_text(data)
    assert "workers: 2 busy, 2 idle, 1 stopped" in text and "NO WORKER ALIVE" not in text, text
    assert "a:1" in text and "job #7" in text and "CPUExecutionProvider" in text
    assert "restart it" not in text
    listed[1]["version"] = "0.0.9"  # b:2, left running through an upgrade
    assert "version 0.0.9, not " in render_text(data).splitlines()[3]
    metrics = render_metrics(data, "0.1.0", listener_up=True).splitlines()
    assert 'lungnode_workers{state="busy"} 2' in metrics and 'lungnode_workers{state="lost"} 0' in metrics


def test_the_qa_flags_of_a_series_latest_result_are_listed(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    """A "done" analysed from part of the lungs says so in the list, not only in its trace and SR."""
    import json

    from node.receive.spool import results_path

    with sessions.begin() as s:
        study = Study(study_instance_uid="1.2.4")
        for n in range(2):
            series = Series(study=study, series_instance_uid=f"1.2.4.{n}", modality="CT",
                            origin=SeriesOrigin.modality, state=SeriesState.complete)
            s.add(Job(series=series, revision=1, state=JobState.done))
    flagged = results_path(tmp_path, 1)
    flagged.mkdir(parents=True)
    (flagged / "result.json").write_text(json.dumps({"status": "ok", "qa": [
        {"code": "partial_lung_coverage", "severity": "flag", "reason": "the lung apices are cut"},
        {"code": "slice_spacing", "severity": "info", "reason": "1.25 mm"}]}))
    with sessions() as s:
        text = render_text(summary(s, limit=10, spool_dir=tmp_path))
        assert "job #1 QA flags: partial_lung_coverage" in text and "slice_spacing" not in text, text
        assert "job #2 QA flags" not in text  # its result.json is not on this machine: nothing to say
        assert "QA flags" not in render_text(summary(s, limit=10))  # metrics: no spool reads
    for odd in ("[1, 2]", '{"qa": "partial"}', '{"qa": [{"severity": "flag"}, 3]}', "{"):
        (flagged / "result.json").write_text(odd)  # damaged or not ours: listed without flags, never a traceback
        with sessions() as s:
            assert "QA flags" not in render_text(summary(s, limit=10, spool_dir=tmp_path))


def test_a_worker_row_deleted_meanwhile_comes_back_and_a_restart_here_replaces_the_dead_one(
        sessions: sessionmaker[Session]) -> None:
    """A live worker is never unlisted; one that died on this machine and was replaced is not left as lost."""
    import os
    import subprocess

    from sqlalchemy import delete

    from node.db.jobs import this_machine
    from node.db.models import WorkerRecord
    from node.db.workers import register, report, workers_summary

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive, elsewhere = (f"{this_machine()}:{int(gone.stdout)}", f"{this_machine()}:{os.getpid()}",
                              f"other-machine:{int(gone.stdout)}")
    for name in (dead, elsewhere):
        register(sessions, name, provider=None)
    with sessions.begin() as s:
        s.execute(delete(WorkerRecord).where(WorkerRecord.name == elsewhere))
    report(sessions, elsewhere, provider="CUDAExecutionProvider", job_id=3)
    register(sessions, alive, provider="CPUExecutionProvider")
    with sessions() as s:
        listed = {w["name"]: (w["state"], w["job"], w["provider"]) for w in workers_summary(s, alive_s=120)}
    assert listed == {elsewhere: ("busy", 3, "CUDAExecutionProvider"), alive: ("idle", None, "CPUExecutionProvider")}


def test_the_last_day_s_turnaround_is_summed_up_in_status_and_metrics(sessions: sessionmaker[Session]) -> None:
    """Done jobs of the last 24 h: analysis time and last image to result (the series' wait to complete plus
    the job's own time), median, 90th percentile and max; older and unfinished jobs are left out."""
    import datetime as dt

    from node.db.models import utcnow
    from node.db.status import recent_jobs, render_metrics

    now = utcnow()
    jobs = [  # (state, finished hours ago, analysis total s, series complete s, job created -> finished s)
        *[(JobState.done, 1, float(a), 5.0, 10.0 + a) for a in range(1, 11)],  # analysis 1..10 s
        (JobState.rejected, 2, 0.5, 5.0, 3.0),
        (JobState.failed, 3, None, None, 4.0),
        (JobState.done, 30, 99.0, 5.0, 120.0),  # yesterday's: outside the window
        (JobState.running, None, None, None, None),
    ]
    with sessions.begin() as s:
        study = Study(study_instance_uid="1.2.9")
        for n, (state, ago, total, complete, took) in enumerate(jobs):
            series = Series(study=study, series_instance_uid=f"1.2.9.{n}", modality="CT",
                            origin=SeriesOrigin.modality, state=SeriesState.complete)
            finished = now - dt.timedelta(hours=ago) if ago is not None else None
            created = finished - dt.timedelta(seconds=took) if finished is not None and took is not None else now
            timings = {k: v for k, v in (("total", total), ("series_complete", complete)) if v is not None}
            s.add(Job(series=series, revision=1, state=state, created_at=created, finished_at=finished,
                      timings=timings or None))
    with sessions() as s:
        recent = recent_jobs(s, now=now)
        text = render_text(summary(s, limit=20))
        data = summary(s, limit=20)
    assert recent["finished"] == {"done": 10, "rejected": 1, "failed": 1}
    assert recent["analysis_s"] == {"count": 10, "median": 5.0, "p90": 9.0, "max": 10.0, "sum": 55.0}
    # last image to result = 5 s to complete + (10 + a) s in the queue, analysis and outputs: 16..25 s
    assert recent["last_image_to_result_s"] == {"count": 10, "median": 20.0, "p90": 24.0, "max": 25.0, "sum": 205.0}
    assert ("last 24 h: done 10, rejected 1, failed 1; analysis median 5.0 s (90 % 9.0 s, max 10.0 s); "
            "last image to result median 20.0 s (90 % 24.0 s, max 25.0 s)") in text
    text_format = render_metrics(data, "0.1.0", listener_up=True)
    assert_prometheus_text(text_format)
    metrics = text_format.splitlines()
    assert 'lungnode_jobs_finished_recent{state="done"} 10' in metrics
    assert "# TYPE lungnode_analysis_seconds summary" in metrics
    assert 'lungnode_analysis_seconds{quantile="0.9"} 9.0' in metrics and "lungnode_analysis_seconds_count 10" in metrics
    assert 'lungnode_last_image_to_result_seconds{quantile="1"} 25.0' in metrics
    assert "lungnode_last_image_to_result_seconds_sum 205.0" in metrics


def test_a_quiet_day_says_no_job_finished_and_keeps_the_summaries(sessions: sessionmaker[Session]) -> None:
    from node.db.status import render_metrics

    with sessions() as s:
        data = summary(s, limit=5)
    assert "last 24 h: no job finished" in render_text(data)
    assert_prometheus_text(render_metrics(data, "0.1.0", listener_up=True))
    metrics = render_metrics(data, "0.1.0", listener_up=True).splitlines()
    assert "lungnode_analysis_seconds_count 0" in metrics and "lungnode_analysis_seconds_sum 0" in metrics
    assert not any(line.startswith("lungnode_analysis_seconds{") for line in metrics)


def test_a_job_queued_again_for_reanalysis_waits_from_now(sessions: sessionmaker[Session]) -> None:
    """After `lungnode reanalyse`, the oldest-queued metric (an alert on a job waiting too long) and the job's wait
    count from the requeue, not from the series' arrival days ago."""
    import datetime as dt

    from node.db.jobs import requeue_for_reanalysis
    from node.db.models import utcnow

    long_ago = utcnow() - dt.timedelta(days=3)
    with sessions.begin() as s:
        series = Series(study=Study(study_instance_uid="1.2.8"), series_instance_uid="1.2.8.1", modality="CT",
                        origin=SeriesOrigin.modality, state=SeriesState.complete)
        job = Job(series=series, revision=1, state=JobState.done, created_at=long_ago,
                  finished_at=long_ago + dt.timedelta(seconds=30))
        s.add(job)
    requeue_for_reanalysis(sessions, job.id)
    with sessions() as s:
        oldest = dt.datetime.fromisoformat(summary(s)["counts"]["oldest_queued_at"])
    assert abs((oldest - utcnow()).total_seconds()) < 60, oldest


def test_jobs_waiting_while_analysis_is_disabled_wait_for_the_models_not_for_a_dead_worker(
        sessions: sessionmaker[Session]) -> None:
    """Models missing: serve never started a worker, so "NO WORKER ALIVE ... event=worker_died" sent IT looking for
    a crash that did not happen."""
    from node.db.status import record_analysis_state

    with sessions.begin() as s:
        series = Series(study=Study(study_instance_uid="1.2.7"), series_instance_uid="1.2.7.1", modality="CT",
                        origin=SeriesOrigin.modality, state=SeriesState.complete)
        s.add(Job(series=series, revision=1, state=JobState.queued))
        record_analysis_state(s, problem="model folder /x/lung_seg does not exist")
    with sessions() as s:
        data = summary(s, limit=10)
    data["workers"] = []
    text = render_text(data)
    assert "ANALYSIS DISABLED" in text and "NO WORKER ALIVE" not in text and "worker_died" not in text, text
    assert "1 jobs wait for the models: serve starts no worker while analysis is disabled" in text, text
    data["analysis"] = {"enabled": True}
    assert "NO WORKER ALIVE: 1 jobs wait" in render_text(data)  # models fine and no worker: one did stop


def test_the_live_worker_comes_first_and_old_stopped_ones_are_counted(sessions: sessionmaker[Session]) -> None:
    """Every restart leaves a stopped row; listed by name, the one live worker was lost among ten stopped ones."""
    import datetime as dt

    from sqlalchemy import update

    from node.db.models import WorkerRecord, utcnow
    from node.db.status import render_workers
    from node.db.workers import register, report, workers_summary

    now = utcnow()
    for n in range(10):  # restarts, the latest (pid 109) a minute ago
        name = f"host:{100 + n}"
        register(sessions, name, provider="CPUExecutionProvider")
        report(sessions, name, provider="CPUExecutionProvider", job_id=None, stopped=True)
        with sessions.begin() as s:
            s.execute(update(WorkerRecord).where(WorkerRecord.name == name)
                      .values(seen_at=now - dt.timedelta(minutes=60 - 6 * n)))
    register(sessions, "host:9", provider="CPUExecutionProvider")  # sorts after them all as text
    with sessions() as s:
        workers = workers_summary(s, alive_s=120)
    assert len(workers) == 11
    lines = render_workers(workers, queued=0).splitlines()
    assert lines[0] == "workers: 1 idle, 10 stopped", lines
    assert lines[1].split()[:2] == ["host:9", "idle"], lines
    assert [line.split()[0] for line in lines[2:4]] == ["host:109", "host:108"], lines  # the latest stopped
    assert lines[4:] == ["  ... and 8 more stopped (lungnode status --json lists them)"], lines
