"""The job queue on a real SQLite ledger: an operator's reanalysis of a finished job, and when it is refused."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.db.jobs import JobQueue, requeue_for_reanalysis, this_machine
from node.db.models import Event, Job, JobState, Series, SeriesOrigin, SeriesState, Study, utcnow
from node.errors import LungnodeError


def _job(sessions: sessionmaker[Session], state: JobState, *, revision: int = 1, series_revision: int = 1,
         purged: bool = False) -> int:
    with sessions.begin() as s:
        series = Series(study=Study(study_instance_uid=generate_uid()), series_instance_uid=generate_uid(),
                        modality="CT", origin=SeriesOrigin.modality, state=SeriesState.complete,
                        revision=series_revision, purged_at=utcnow() if purged else None)
        job = Job(series=series, revision=revision, state=state, attempts=2, error="was refused")
        s.add(job)
        s.flush()
        return int(job.id)


@pytest.mark.parametrize("state", [JobState.done, JobState.rejected, JobState.failed])
def test_a_finished_job_is_queued_again_with_a_fresh_set_of_attempts(sessions: sessionmaker[Session],
                                                                     state: JobState) -> None:
    job_id = _job(sessions, state)
    assert f"job {job_id} ({state.value}) is queued again" in requeue_for_reanalysis(sessions, job_id)
    claimed = JobQueue(sessions, worker="w").claim()
    assert claimed is not None and (claimed.job_id, claimed.attempt) == (job_id, 1)
    with sessions() as s:
        row = s.get(Job, job_id)
        assert row is not None and row.error is None and row.state == JobState.running


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"state": JobState.queued}, "is queued already"),
    ({"state": JobState.running}, "is running already"),
    ({"state": JobState.done, "series_revision": 2}, "revision 2 has come since"),
    ({"state": JobState.done, "purged": True}, "deleted by the retention rule"),
])
def test_reanalysis_is_refused_with_the_reason(sessions: sessionmaker[Session], kwargs: dict, words: str) -> None:
    job_id = _job(sessions, **kwargs)
    with pytest.raises(LungnodeError, match=words):
        requeue_for_reanalysis(sessions, job_id)
    with pytest.raises(LungnodeError, match="there is no job"):
        requeue_for_reanalysis(sessions, job_id + 100)


def test_a_job_of_a_worker_process_gone_from_this_machine_is_requeued_at_once(sessions: sessionmaker[Session]) -> None:
    """After a node was killed and restarted its jobs went back to the queue only when the lease ran out (120 s)."""
    import os
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    host = this_machine()
    workers = {f"{host}:{dead_pid}": JobState.queued,  # its process is gone: back in the queue now
               f"{host}:{os.getpid()}": JobState.running,  # alive: left alone
               f"elsewhere:{dead_pid}": JobState.running,  # another machine's: its lease decides
               "custom-name": JobState.running}
    ids = {}
    for worker in workers:
        job_id = _job(sessions, JobState.done)
        with sessions.begin() as s:
            row = s.get(Job, job_id)
            assert row is not None
            row.state, row.worker, row.heartbeat_at, row.attempts = JobState.running, worker, utcnow(), 1
        ids[worker] = job_id
    assert JobQueue(sessions, worker="w", lease_s=120).requeue_stalled() == 1
    with sessions() as s:
        assert {w: s.get(Job, i).state for w, i in ids.items()} == workers  # type: ignore[union-attr]


def test_a_worker_in_a_container_is_named_for_its_pid_namespace() -> None:
    """Two containers with host networking share the hostname; their pids mean different processes."""
    from node.db.jobs import INIT_PID_NS, machine_name

    assert machine_name("pacs-ai", INIT_PID_NS) == "pacs-ai"  # not in a container: the name IT knows
    assert machine_name("pacs-ai", None) == "pacs-ai"
    assert machine_name("pacs-ai", 4026532301) != machine_name("pacs-ai", 4026532302)
    assert machine_name("pacs-ai", 4026532301).startswith("pacs-ai/")


def test_a_job_of_a_worker_in_another_pid_namespace_is_left_to_its_lease(sessions: sessionmaker[Session]) -> None:
    """Its pid, not alive here, may be alive in the other container: only the lease says it is gone."""
    import socket
    import subprocess
    import sys

    from node.db.jobs import machine_name

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    other = f"{machine_name(socket.gethostname(), 4026532999)}:{int(gone.stdout)}"  # this host, not this namespace
    job_id = _job(sessions, JobState.done)
    with sessions.begin() as s:
        row = s.get(Job, job_id)
        assert row is not None
        row.state, row.worker, row.heartbeat_at, row.attempts = JobState.running, other, utcnow(), 1
    assert JobQueue(sessions, worker="w", lease_s=120).requeue_stalled() == 0


def test_a_job_waits_until_its_study_has_settled(sessions: sessionmaker[Session]) -> None:
    """A PACS sending a study series by series: the first series' job is not claimed while another CT series of the
    study is still being received, nor until the study has had no image for study_settle_s, so the worker chooses
    the best series among all of them. Objects of other kinds arriving (results coming back) do not hold it."""
    import datetime as dt

    now = utcnow()
    with sessions.begin() as s:
        study = Study(study_instance_uid=generate_uid())
        first = Series(study=study, series_instance_uid=generate_uid(), modality="CT", origin=SeriesOrigin.modality,
                       state=SeriesState.complete, revision=1, last_received_at=now - dt.timedelta(seconds=60))
        second = Series(study=study, series_instance_uid=generate_uid(), modality="CT", origin=SeriesOrigin.modality,
                        state=SeriesState.receiving, revision=1, last_received_at=now - dt.timedelta(seconds=30))
        returned = Series(study=study, series_instance_uid=generate_uid(), modality="SR",
                          origin=SeriesOrigin.own_output, state=SeriesState.receiving, revision=1, last_received_at=now)
        other_study = Series(study=Study(study_instance_uid=generate_uid()), series_instance_uid=generate_uid(),
                             modality="CT", origin=SeriesOrigin.modality, state=SeriesState.complete, revision=1,
                             last_received_at=now - dt.timedelta(seconds=60))
        s.add_all([Job(series=first, revision=1, state=JobState.queued),
                   Job(series=other_study, revision=1, state=JobState.queued)])
        s.flush()
        first_id, second_id, returned_id = first.id, second.id, returned.id
    queue = JobQueue(sessions, worker="w", study_settle_s=10)
    other = queue.claim()
    assert other is not None and other.series_id != first_id, "another, settled study's job goes first"
    assert queue.claim() is None, "the second series is still being received"
    with sessions.begin() as s:
        row = s.get(Series, second_id)
        assert row is not None
        row.state, row.last_received_at = SeriesState.complete, utcnow() - dt.timedelta(seconds=3)
    assert queue.claim() is None, "the study received an image 3 s ago"
    with sessions.begin() as s:
        row = s.get(Series, second_id)
        assert row is not None
        row.last_received_at = utcnow() - dt.timedelta(seconds=11)
    claimed = queue.claim()
    assert claimed is not None and claimed.series_id == first_id
    with sessions() as s:
        assert s.get(Series, returned_id).state == SeriesState.receiving  # type: ignore[union-attr]


def _running(sessions: sessionmaker[Session], job_id: int, worker: str, *, heartbeat_age_s: float = 0.0) -> None:
    import datetime as dt

    with sessions.begin() as s:
        row = s.get(Job, job_id)
        assert row is not None
        row.state, row.worker, row.attempts = JobState.running, worker, 1
        row.heartbeat_at = utcnow() - dt.timedelta(seconds=heartbeat_age_s)


def test_a_job_its_own_idle_worker_lost_to_a_database_error_goes_back_at_once(sessions: sessionmaker[Session]) -> None:
    """A claim whose commit never answered, or an outcome the database did not take: the job stayed running under
    the worker's name, its lease fresh, and waited out the whole lease (120 s) before anyone ran it."""
    mine, theirs = _job(sessions, JobState.done), _job(sessions, JobState.done)
    _running(sessions, mine, "w")
    _running(sessions, theirs, "other-machine:1")
    queue = JobQueue(sessions, worker="w", lease_s=120)
    assert queue.requeue_stalled() == 0, "not idle: the worker may be running it"
    assert queue.requeue_stalled(idle=True) == 1
    with sessions() as s:
        assert s.get(Job, mine).state == JobState.queued  # type: ignore[union-attr]
        assert s.get(Job, theirs).state == JobState.running  # type: ignore[union-attr]
        [message] = s.scalars(select(Event.message).where(Event.job_id == mine, Event.kind == "job_requeued")).all()
    assert message == "worker w lost it to a database error: back in the queue"


def test_a_stalled_job_of_an_older_revision_is_superseded_not_run_again(sessions: sessionmaker[Session]) -> None:
    """Its series had a newer revision by the time its worker died: running it again only delayed the newer job
    (its results would not be sent anyway)."""
    job_id = _job(sessions, JobState.done, revision=1, series_revision=2)
    _running(sessions, job_id, "gone:1", heartbeat_age_s=600)
    assert JobQueue(sessions, worker="w", lease_s=120).requeue_stalled() == 1
    with sessions() as s:
        row = s.get(Job, job_id)
        assert row is not None and row.state == JobState.superseded
        assert row.error is not None and "revision 2 of the series has arrived since" in row.error
    assert JobQueue(sessions, worker="w").claim() is None


def test_a_job_that_kills_every_worker_fails_after_max_attempts_with_the_reason(sessions: sessionmaker[Session]) -> None:
    """A poison series (a decoder crash, the OOM killer) must not take the workers down one after another for ever."""
    import datetime as dt

    job_id = _job(sessions, JobState.done)
    requeue_for_reanalysis(sessions, job_id)
    for attempt in (1, 2, 3):
        queue = JobQueue(sessions, worker=f"w{attempt}", lease_s=60, max_attempts=3)
        claimed = queue.claim()
        assert claimed is not None and claimed.attempt == attempt
        later = utcnow() + dt.timedelta(seconds=61)  # its worker died: no heartbeat since
        assert JobQueue(sessions, worker="x", lease_s=60, max_attempts=3).requeue_stalled(later) == 1
    assert JobQueue(sessions, worker="w4").claim() is None
    with sessions() as s:
        row = s.get(Job, job_id)
        assert row is not None and row.state == JobState.failed
        assert row.error == "worker w3 stopped responding on 3 attempts"
        kinds = s.scalars(select(Event.kind).where(Event.job_id == job_id).order_by(Event.id)).all()
    assert kinds[-1] == "job_failed" and kinds.count("job_requeued") == 3  # reanalysis + two stalls


def test_the_claim_finds_a_study_s_other_series_by_index(sessions: sessionmaker[Session]) -> None:
    """Every worker's poll asks whether another series of each queued job's study is still arriving: without an
    index on series.study_id that read the whole series table (1.6 s per claim on 300,000 series, holding SQLite's
    write lock)."""
    from sqlalchemy import event

    job_id = _job(sessions, JobState.done)
    requeue_for_reanalysis(sessions, job_id)
    engine = sessions.kw["bind"]
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, params: Any, _context: Any, _many: bool) -> None:
        if statement.lstrip().startswith("SELECT") and "FROM jobs" in statement:
            seen.append((statement, params))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        JobQueue(sessions, worker="w", study_settle_s=10).claim()  # its series arrived just now: none is taken
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    [(statement, params)] = seen
    with engine.connect() as conn:
        plan = " / ".join(row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params))
    assert "SCAN series" not in plan and "USING INDEX ix_series_study" in plan, plan

