"""The job queue is the ledger's ``jobs`` table.

A worker claims the oldest queued job in one transaction (PostgreSQL: ``FOR UPDATE SKIP LOCKED``
so several workers and machines share the queue without blocking; SQLite: transactions are
serialised by BEGIN IMMEDIATE, which gives the same guarantee on one machine), keeps a heartbeat
while it runs, and records the outcome. A job whose heartbeat stopped (its worker died) goes back
to the queue, up to ``max_attempts`` times.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable

from sqlalchemy import ColumnElement, and_, case, exists, or_, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased, sessionmaker

from node.db.models import (
    REJECTION_NOTE,
    Event,
    Job,
    JobState,
    OutboxItem,
    SendState,
    Series,
    SeriesOrigin,
    SeriesState,
    utcnow,
)
from node.errors import LungnodeError
from node.logs import kv
from node.receive.priority import priority_name

log = logging.getLogger(__name__)

#: The states a job ends in (``JobQueue.finish``).
FINISHED_STATES = (JobState.done, JobState.rejected, JobState.failed)


@dataclass(frozen=True)
class Claimed:
    job_id: int
    series_id: int
    revision: int
    attempt: int


def taken_as(now: dt.datetime, low_max_wait_s: float) -> ColumnElement[int] | InstrumentedAttribute[int]:
    """A queued job's level as workers see it: its priority (``node.receive.priority``), except that a low job
    that has waited ``low_max_wait_s`` or more counts as medium (0: never), so routine traffic cannot hold a
    research backlog back for ever. Nothing is ever lifted to high: that stays for the urgent callers."""
    if low_max_wait_s <= 0:
        return Job.priority
    waited = Job.created_at <= now - dt.timedelta(seconds=low_max_wait_s)
    return case((and_(Job.priority < 0, waited), 0), else_=Job.priority)


def queue_order(now: dt.datetime, low_max_wait_s: float) -> tuple[Any, ...]:
    """The order in which workers take queued jobs: the most urgent first (``taken_as``), then the oldest."""
    return (taken_as(now, low_max_wait_s).desc(), Job.id)


def study_settling(series: Any, now: dt.datetime, settle_s: float) -> ColumnElement[bool]:
    """The study of ``series`` (an aliased Series) is still arriving: one of its CT series is being received, or
    got an image less than ``settle_s`` ago. Its jobs wait, so the best series is chosen among all."""
    other = aliased(Series)
    return exists(select(other.id).where(
        other.study_id == series.study_id, other.origin == SeriesOrigin.modality,
        or_(other.state == SeriesState.receiving, other.last_received_at > now - dt.timedelta(seconds=settle_s))))


class JobQueue:
    def __init__(self, sessions: sessionmaker[Session], *, worker: str, lease_s: float = 60.0, max_attempts: int = 3,
                 study_settle_s: float = 0.0, low_max_wait_s: float = 0.0,
                 on_failed: Callable[[Session, Job], object] | None = None) -> None:
        """``on_failed`` runs in the transaction that fails a job its workers no longer ran (``_give_back``): the
        worker frees the series passed over for it there, as it does for the jobs it fails itself."""
        self.sessions = sessions
        self.on_failed = on_failed
        self.worker = worker
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.study_settle_s = study_settle_s
        self.low_max_wait_s = low_max_wait_s

    def claim(self) -> Claimed | None:
        """Take the most urgent queued job whose study has settled (``study_settle_s``: no image for that long, no CT
        series still being received), the oldest of its priority (``node.receive.priority``; a low job that waited
        ``low_max_wait_s`` counts as medium), or None when there is none: the worker then picks the best series among
        all of the study's, not among those that happened to arrive first."""
        now = utcnow()
        mine = aliased(Series)
        with self.sessions.begin() as s:
            row = s.execute(
                select(Job, taken_as(now, self.low_max_wait_s))
                .join(mine, Job.series_id == mine.id)
                .where(Job.state == JobState.queued, ~study_settling(mine, now, self.study_settle_s))
                .order_by(*queue_order(now, self.low_max_wait_s))
                .limit(1)
                .with_for_update(skip_locked=True, of=Job)
            ).first()
            if row is None:
                return None
            job, level = row
            nominal, waited_s = job.priority, round((now - job.created_at).total_seconds())
            job.state = JobState.running
            job.worker = self.worker
            job.started_at = now
            job.heartbeat_at = now
            job.attempts += 1
            job.error = None
            s.add(Event(kind="job_started", job_id=job.id, series_id=job.series_id,
                        message=f"attempt {job.attempts} on {self.worker}"))
            claimed = Claimed(job.id, job.series_id, job.revision, job.attempts)
        aged = {"taken_as": priority_name(level)} if level != nominal else {}
        log.info(kv("job_started", job=claimed.job_id, attempt=claimed.attempt, worker=self.worker,
                    priority=priority_name(nominal), waited_s=waited_s, **aged))
        return claimed

    def heartbeat(self, job_id: int) -> bool:
        """Extend the lease; False when the job is no longer ours (requeued after a stall)."""
        with self.sessions.begin() as s:
            result = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.running, Job.worker == self.worker)
                .values(heartbeat_at=utcnow())
            )
            return bool(getattr(result, "rowcount", 0))

    def finish(self, job_id: int, state: JobState, *, error: str | None = None, timings: dict[str, Any] | None = None,
               also: Callable[[Session], object] | None = None, log_reason: str | None = None) -> bool:
        """Record the outcome; False (and nothing written) if another worker owns the job now.

        ``also`` runs in the same transaction once the job is known to be ours (e.g. queueing the
        results for sending), so the outcome and what follows from it are committed together or not at all.
        ``log_reason``: ``error`` as the log line may show it, where ``error`` quotes an exception's message (patient
        data, perhaps: ``node.logs.error_reason``); default ``error``.
        """
        shown = error if log_reason is None else log_reason
        if state not in FINISHED_STATES:
            raise ValueError(f"not a final state: {state}")
        with self.sessions.begin() as s:
            result = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.running, Job.worker == self.worker)
                .values(state=state, finished_at=utcnow(), error=error, timings=timings)
            )
            if not getattr(result, "rowcount", 0):
                log.warning(kv("job_result_dropped", job=job_id, worker=self.worker,
                               reason="the job is no longer this worker's: requeued after a stall, or failed by "
                                      "workers.max_job_s, while it ran"))
                return False
            job = s.get(Job, job_id)
            assert job is not None
            newer = s.scalar(select(Series.revision).where(Series.id == job.series_id))
            if newer is not None and newer > job.revision:
                # The sender would put stale results beside the newer revision's: keep them in the spool only.
                error = (f"{state.value}, but revision {newer} of the series arrived while it ran: its results stay "
                         f"in the spool and are not sent (the job of revision {newer} answers for the series)")
                state = job.state = JobState.superseded
                job.error = shown = error
            elif also is not None:
                also(s)
            s.add(Event(kind=f"job_{state.value}", level="error" if state == JobState.failed else "info",
                        job_id=job_id, series_id=job.series_id, message=error or state.value, data=timings))
        # A series that was never analysed needs a person: ERROR, what sites alert on (docs/operations.md).
        log.log(logging.ERROR if state == JobState.failed else logging.INFO,
                kv(f"job_{state.value}", job=job_id, worker=self.worker, reason=shown))
        return True

    def requeue_stalled(self, now: dt.datetime | None = None, *, idle: bool = False) -> int:
        """Jobs whose worker stopped sending heartbeats go back to the queue (or fail after max_attempts); so do, at
        once, jobs of a worker on this machine whose process is gone (a node killed and restarted: no need to wait
        out the lease). ``idle``: the caller runs no job now, so one still running under its own name was lost to a
        database error (a claim whose commit never answered, an outcome the database did not take): it goes back
        at once too, instead of sitting out the lease."""
        cutoff = (now or utcnow()) - dt.timedelta(seconds=self.lease_s)
        count = 0
        with self.sessions.begin() as s:
            stalled = {job: "stopped responding" for job in s.scalars(
                select(Job)
                .where(Job.state == JobState.running, Job.heartbeat_at < cutoff)
                .with_for_update(skip_locked=True)
            )}
            stalled.update({job: "is gone" for job in s.scalars(
                select(Job)
                .where(Job.state == JobState.running, Job.heartbeat_at >= cutoff,
                       Job.worker.like(f"{this_machine()}:%"))
                .with_for_update(skip_locked=True)
            ) if process_gone(job.worker)})
            if idle:
                stalled.update({job: "lost it to a database error" for job in s.scalars(
                    select(Job)
                    .where(Job.state == JobState.running, Job.heartbeat_at >= cutoff, Job.worker == self.worker)
                    .with_for_update(skip_locked=True)
                )})
            for job, why in stalled.items():
                count += 1
                self._give_back(s, job, why)
        return count

    def _give_back(self, s: Session, job: Job, why: str) -> None:
        """End or requeue a running job its worker no longer runs: failed once it has had ``max_attempts`` (a job
        that kills every worker must not loop for ever), superseded when a newer revision of its series arrived
        meanwhile (that revision's job answers for the series: running this one again would be wasted), else back
        in the queue."""
        stalled_worker = job.worker
        newer = s.scalar(select(Series.revision).where(Series.id == job.series_id))
        if newer is not None and newer > job.revision:
            job.state, job.finished_at = JobState.superseded, utcnow()
            job.error = (f"worker {stalled_worker} {why}, and revision {newer} of the series has arrived since: "
                         "not run again (the job of that revision answers for the series)")
            s.add(Event(kind="job_superseded", job_id=job.id, series_id=job.series_id, message=job.error))
        elif job.attempts >= self.max_attempts:
            job.state = JobState.failed
            job.finished_at = utcnow()
            job.error = f"worker {stalled_worker} {why} on {job.attempts} attempts"
            s.add(Event(kind="job_failed", level="error", job_id=job.id, series_id=job.series_id, message=job.error))
            if self.on_failed is not None:
                self.on_failed(s, job)
        else:
            s.add(Event(kind="job_requeued", level="warning", job_id=job.id, series_id=job.series_id,
                        message=f"worker {stalled_worker} {why}: back in the queue"))
            job.state = JobState.queued
            job.worker = None
        log.log(logging.ERROR if job.state == JobState.failed else logging.WARNING,
                kv("job_stalled", job=job.id, worker=stalled_worker, reason=why, new_state=job.state.value))


#: The inode of a Linux boot's first PID namespace (PROC_PID_INIT_INO): a process that is not in a container.
INIT_PID_NS = 4026531836


def machine_name(hostname: str, pid_ns: int | None) -> str:
    """Where a pid names one process: the hostname, with the PID namespace of a container (``host/ns4026532301``).
    Two containers on one host with host networking share the hostname but not their pids: without it, one would
    take the other's live worker for gone and run its job a second time."""
    return hostname if pid_ns in (None, INIT_PID_NS) else f"{hostname}/ns{pid_ns}"


@functools.cache
def this_machine() -> str:
    """This process's ``machine_name``, once: it cannot change while the process runs, and every poll of the queue
    asks for it."""
    try:
        pid_ns: int | None = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # no /proc (not Linux): the hostname alone
        pid_ns = None
    return machine_name(socket.gethostname(), pid_ns)


def process_gone(worker: str | None) -> bool:
    """True when ``worker`` ("machine:pid", the default worker name) names a process of this machine
    (``this_machine``) that no longer exists. Another machine's worker, or a name of another form, is left to its
    lease."""
    host, _, pid = (worker or "").rpartition(":")
    if host != this_machine() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists (another user's, say)
        return False
    return False


def supersede_queued_jobs(s: Session, *, series_id: int, revision: int, now: dt.datetime) -> int:
    """Queued jobs of a series' older revisions end as ``superseded`` once ``revision`` opens (in the caller's
    transaction): the new revision's job reads every instance, and an older one's results must not be sent."""
    error = f"revision {revision} of the series arrived before it ran: not analysed"
    # One conditional UPDATE: a job a worker claims meanwhile (PostgreSQL) is running and stays so.
    ids = s.scalars(update(Job).where(Job.series_id == series_id, Job.revision < revision,
                                      Job.state == JobState.queued)
                    .values(state=JobState.superseded, finished_at=now, error=error).returning(Job.id)).all()
    for job_id in ids:
        s.add(Event(kind="job_superseded", job_id=job_id, series_id=series_id, message=error))
    return len(ids)


def restore_superseded(s: Session, *, series_id: int, revision: int) -> int:
    """Undo ``revision``'s supersession when the newer revision came to nothing (none of its images was
    acknowledged): its job runs (again: its outputs are the same objects) and its unsent results go out."""
    jobs = s.scalars(select(Job).where(Job.series_id == series_id, Job.revision == revision,
                                       Job.state == JobState.superseded)).all()
    for job in jobs:
        job.state, job.error, job.finished_at, job.worker = JobState.queued, None, None, None
        s.add(Event(kind="job_requeued", job_id=job.id, series_id=series_id,
                    message=f"the newer revision of the series had no acknowledged image: revision {revision} "
                            "answers for the series again"))
    job_ids = s.scalars(select(Job.id).where(Job.series_id == series_id, Job.revision == revision)).all()
    if job_ids:
        s.execute(update(OutboxItem).where(OutboxItem.job_id.in_(job_ids), OutboxItem.state == SendState.superseded)
                  .values(state=SendState.pending, next_attempt_at=utcnow(), last_error=None))
    return len(jobs)


def requeue_finished(s: Session, job: Job, *, why: str, by: str) -> int:
    """Put a finished job back in the queue (in the caller's transaction), its results not yet delivered withdrawn:
    it sends its new ones. ``why`` goes into its job_requeued event, ``by`` into the withdrawn sends' reason. Returns
    how many sends were withdrawn."""
    unsent = s.execute(update(OutboxItem).where(OutboxItem.job_id == job.id, OutboxItem.kind != REJECTION_NOTE,
                                                OutboxItem.state.in_([SendState.pending, SendState.failed])).values(
            state=SendState.superseded, updated_at=utcnow(),
            last_error=f"not sent: the job is analysed again ({by}); it sends its new results"))
    withdrawn = int(getattr(unsent, "rowcount", 0) or 0)
    if withdrawn:
        s.add(Event(kind="send_superseded", job_id=job.id,
                    message=f"{withdrawn} results not yet delivered are withdrawn: the job is analysed again"))
    job.state, job.error, job.worker, job.attempts = JobState.queued, None, None, 0
    job.started_at = job.finished_at = job.heartbeat_at = None
    # Queued now: its wait, the oldest-queued metric (an alert) and the day's turnaround count from here,
    # not from the series' first arrival days ago. The job's events keep its history.
    job.created_at = utcnow()
    s.add(Event(kind="job_requeued", job_id=job.id, series_id=job.series_id, message=why))
    return withdrawn


def requeue_for_reanalysis(sessions: sessionmaker[Session], job_id: int) -> str:
    """Put a finished job of a series' current revision back in the queue, so the models run on it again (after a
    model update, say); returns what was done, for the operator. Its results replace the earlier ones in the spool
    and go out like any others. Raises LungnodeError where that cannot be done, saying why."""
    with sessions.begin() as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None:
            raise LungnodeError(f"there is no job {job_id} (lungnode status lists the jobs)")
        series = s.get(Series, job.series_id)
        assert series is not None
        if job.state in (JobState.queued, JobState.running):
            raise LungnodeError(f"job {job_id} is {job.state.value} already")
        if job.revision < series.revision:
            raise LungnodeError(f"job {job_id} answered revision {job.revision} of its series, and revision "
                                f"{series.revision} has come since: reanalyse the newest revision's job")
        if series.purged_at is not None:
            raise LungnodeError(f"the images of job {job_id}'s series were deleted by the retention rule "
                                "(retention.received_days) and the node holds no copy: send the series from the PACS "
                                "again; the node stores it again and analyses it as a new revision")
        before = job.state.value
        withdrawn = requeue_finished(s, job, why=f"reanalysis asked by an operator (it was {before})",
                                     by="lungnode reanalyse")
    log.info(kv("job_requeued", job=job_id, reason="reanalysis asked by an operator", was=before,
                sends_withdrawn=withdrawn or None))
    withdrawn_note = (f"; {withdrawn} of its results not yet delivered are withdrawn (the new results go out "
                      "instead)") if withdrawn else ""
    return (f"job {job_id} ({before}) is queued again: a running node analyses it within workers.poll_interval_s"
            f"{withdrawn_note}")

