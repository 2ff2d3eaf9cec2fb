"""Worker processes: claim a job from the ledger, analyse its series, record the outcome.

Analysis is CPU/GPU heavy and partly pure Python, so it runs in separate processes that share
nothing with the DICOM listener but the database. A worker keeps a heartbeat on its job; if the
process dies, the lease runs out and any worker puts the job back in the queue.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from node.config import Config
from node.db.jobs import Claimed, JobQueue, this_machine
from node.db.models import REJECTION_NOTE, Instance, Job, JobState, Series
from node.db.session import db_reason, make_engine, make_sessionmaker, warn_on_clock_skew
from node.db.workers import SEEN_EVERY_S, register, report
from node.errors import LungnodeError, one_line
from node.logs import LoopErrors, error_reason, kv, redacted_traceback, setup_logging
from node.outputs.device import installation_device_uid
from node.outputs.history import previous_sr
from node.outputs.write import OUTPUTS_FILE, WrittenObject, manifests_for, write_outputs
from node.pipeline.infer import get_model
from node.pipeline.runner import Analysis, analyse_series, warm_up
from node.pipeline.select import SeriesHeader, Verdict, check, choose, header_image, passed_over_for
from node.pipeline.siblings import candidate_files, requeue_if_preferred_ended, requeue_passed_over, requeued_because
from node.pipeline.volume import QAFlag
from node.receive.spool import results_path
from node.send.outbox import enqueue_results
from node.send.rejections import queue_rejections, withdrawals
from node.signals import stop_on_signals

log = logging.getLogger(__name__)
#: The longest wait between two tries while the database cannot be reached (the wait doubles from the poll interval).
DB_RETRY_MAX_S = 30.0
#: Exit status of a worker that stopped itself because its job ran past ``workers.max_job_s`` (EX_TEMPFAIL).
EXIT_JOB_TIMED_OUT = 75
#: How long a worker whose job timed out waits for the database to record the failure before it exits anyway.
FAIL_WAIT_S = 10.0


def _db_unreachable(exc: BaseException) -> bool:
    """The database cannot be reached now (down, restarting, its connection cut, locked): not the job's fault, so
    the job is not failed for it (it goes back to the queue once the database answers)."""
    return isinstance(exc, (OperationalError, InterfaceError)) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated)


def _log_requeued(job_ids: list[int], state: JobState, *, ended_job: int) -> None:
    """One job_requeued line per job passed over for ``ended_job``'s series, which ended ``state`` without results."""
    for job_id in job_ids:
        log.info(kv("job_requeued", job=job_id, reason=requeued_because(state), ended_job=ended_job))


def _free_siblings(s: Session, job: Job) -> None:
    """A job failed after its workers stopped on it max_attempts times: the series passed over for its series go
    back to the queue, in the transaction that fails it."""
    _log_requeued(requeue_passed_over(s, series_id=job.series_id, state=JobState.failed, reason=job.error),
                  JobState.failed, ended_job=job.id)


def results_dir(config: Config, job_id: int) -> Path:
    return results_path(config.storage.spool_dir, job_id)


def _series_header(paths: list[Path]) -> SeriesHeader:
    """Selection facts of the series, from the image ``select.header_image`` picks (slice count from the file count):
    its first CT image that is not a localizer, so the verdict does not depend on the order images came in. A stray
    image of another kind in a CT series must not decide its selection: the analysis refuses the mix
    (``mixed_modalities``) with its reason.
    """
    if not paths:
        raise LungnodeError("the series has no instances left in the spool")
    ds = header_image(pydicom.dcmread(path, stop_before_pixels=True) for path in paths)
    assert ds is not None  # paths is not empty
    return SeriesHeader.from_dataset(ds, slice_count=len(paths))


#: Why a sibling's header cannot be read for the choice (its own job says so when it runs).
_UNREADABLE = (LungnodeError, OSError, InvalidDicomError)


def _series_files(sessions: sessionmaker[Session], job: Claimed) -> tuple[str, list[Path]]:
    with sessions() as s:
        series = s.get(Series, job.series_id)
        assert series is not None
        paths = s.scalars(
            # Instances that retention deleted and the PACS did not send again are not read.
            select(Instance.path).where(Instance.series_id == job.series_id, Instance.revision <= job.revision,
                                        Instance.purged_at.is_(None))
        ).all()
        return series.series_instance_uid, [Path(p) for p in paths]


class Worker:
    def __init__(self, config: Config, *, name: str | None = None) -> None:
        self.config = config
        self.name = name or f"{this_machine()}:{os.getpid()}"
        self.engine = make_engine(config.storage.database_url)  # the node (or `lungnode worker`) opened it
        self.sessions = make_sessionmaker(self.engine)
        w = config.workers
        self.queue = JobQueue(self.sessions, worker=self.name, lease_s=w.lease_s, max_attempts=w.max_attempts,
                              study_settle_s=config.assembly.study_settle_s,
                              low_max_wait_s=config.assembly.low_priority_max_wait_s, on_failed=_free_siblings)
        self.stop = threading.Event()
        self.device_uid = installation_device_uid(config.storage.spool_dir)  # the SR's and KOS's observer
        self.provider: str | None = None  # of its models, once loaded (preload)
        self.preload_s: float | None = None  # seconds preload took: loading, checking and warming the models
        self.abandoned = threading.Event()  # set when the job ran past workers.max_job_s: its results are not published

    def preload(self) -> None:
        """Load, check and warm the three models now: a bad model stops the worker at start, not mid-job, and
        the first series does not pay for onnxruntime's first runs."""
        started = time.perf_counter()
        for role in ("lung", "lesion", "diagnosis"):
            model = get_model(self.config.inference, role)
            warm_up(model)
            self.provider = model.provider
        self.preload_s = time.perf_counter() - started

    def _report(self, job_id: int | None, *, stopped: bool = False) -> None:
        """Tell the ledger this worker is alive (``node.db.workers``). Best effort: the next report, seconds later,
        says it again, and a database that is down is the loop's to wait out."""
        try:
            report(self.sessions, self.name, provider=self.provider, job_id=job_id, stopped=stopped)
        except SQLAlchemyError:
            pass

    def run_one(self, db_answered: Callable[[], None] | None = None) -> bool:
        """Claim and run one job; False when the queue was empty. A database error that is not the job's fault
        (``_db_unreachable``) is raised, leaving the job to ``requeue_stalled`` once the database answers.
        ``db_answered`` is called once the claim went through, before the job runs (a job can take minutes)."""
        self.queue.requeue_stalled(idle=True)  # none of ours runs now: one left running was lost to a database error
        job = self.queue.claim()
        if db_answered is not None:
            db_answered()
        if job is None:
            return False
        beat_stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job.job_id, beat_stop), daemon=True)
        beat.start()
        watchdog = self._watchdog(job.job_id, beat_stop)
        self._report(job.job_id)
        try:
            series_uid, paths = _series_files(self.sessions, job)
            verdict = self._select(job, _series_header(paths))
            if not verdict.eligible:
                analysis = Analysis(status="rejected", series_instance_uid=series_uid, reason=verdict.reason,
                                    qa=[QAFlag(f"selection_{verdict.rule}", "refuse", verdict.reason or "")])
            else:
                analysis = analyse_series(paths, self.config.inference, series_instance_uid=series_uid)
            self._finish(job, analysis)
        except Exception as exc:  # any failure of one job is recorded on it; the worker goes on
            if _db_unreachable(exc):
                raise  # recording it would fail too; the loop waits for the database
            self._fail(job, exc)
        finally:
            beat_stop.set()
            if watchdog is not None:
                watchdog.cancel()
            beat.join()
            self._report(None)
        return True

    def _fail(self, job: Claimed, exc: Exception) -> None:
        """Record an unexpected failure of a job: one readable line as its reason (lungnode status shows it), the
        traceback in the log at ERROR with the job's id. The message may quote a header value, so the log shows it
        only where logging.include_phi allows, as the analysis' own series_failed does."""
        log.error(kv("job_error", job=job.job_id, error=error_reason(exc)) + "\n" + redacted_traceback(exc))
        self._record_failed(job.job_id, error=one_line(exc), log_reason=error_reason(exc))

    def _record_failed(self, job_id: int, *, error: str, log_reason: str | None = None) -> None:
        """Record a job as failed; the series passed over for its series go back to the queue in the same
        transaction (``node.pipeline.siblings``): the study may still be analysed from one of them."""
        requeued: list[int] = []

        def free_siblings(session: Session) -> None:
            series_id = session.scalar(select(Job.series_id).where(Job.id == job_id))
            assert series_id is not None
            requeued.extend(requeue_passed_over(session, series_id=series_id, state=JobState.failed, reason=error))

        if self.queue.finish(job_id, JobState.failed, error=error, also=free_siblings, log_reason=log_reason):
            _log_requeued(requeued, JobState.failed, ended_job=job_id)

    def _select(self, job: Claimed, header: SeriesHeader) -> Verdict:
        """This series' verdict among the complete CT series of its study that may still be analysed (the best one
        is; one refused by its checks is no candidate: ``node.pipeline.siblings``). A sibling whose header cannot be
        read is left out of the choice: its own job is refused for it, and it must not fail this one."""
        verdict = check(header, self.config.selection)
        if not verdict.eligible:
            return verdict
        others = []
        for uid, paths in candidate_files(self.sessions, job.series_id):
            try:
                others.append(_series_header(paths))
            except _UNREADABLE as exc:
                log.warning(kv("sibling_unreadable", job=job.job_id, series=uid, error=error_reason(exc),
                               effect="left out of the choice of the study's series"))
        _, verdicts = choose([header, *others], self.config.selection)
        return verdicts[0]

    def _finish(self, job: Claimed, analysis: Analysis) -> None:
        """Write result.json and the DICOM outputs, publish them, then record the outcome and queue the
        objects for sending in one transaction, only if the job is still ours.

        Publishing comes first so that a job recorded as done always has its files: a crash before the
        outcome is recorded leaves the job to be run again, and the outputs are deterministic (same
        series, revision and models give the same objects and UIDs), so a second run, or a stale
        worker that lost the job, writes the same objects again. Objects are moved first, outputs.json
        and result.json last (the sender and status readers look for those two).
        """
        state = {"ok": JobState.done, "rejected": JobState.rejected, "failed": JobState.failed}[analysis.status]
        out = results_dir(self.config, job.job_id)
        staged = analysis.write(out.with_name(f"{out.name}.attempt-{job.attempt}"))
        try:
            objects = self._write_outputs(job, analysis, staged.parent)
        except Exception:
            # Nothing of it is published: no job owns the staged folder, and retention would never delete it.
            shutil.rmtree(staged.parent, ignore_errors=True)
            raise
        error = analysis.reason
        if analysis.output_errors and state == JobState.done:
            # The radiologist would get less than the analysis found: a person must look (the reason names the
            # objects and their errors; event=output_failed has the rest).
            error = "DICOM outputs not built: " + "; ".join(analysis.output_errors)
            state = JobState.done if objects else JobState.failed
            log.error(kv("outputs_incomplete", job=job.job_id, built=len(objects),
                         failed=",".join(e.split(":")[0] for e in analysis.output_errors),
                         effect="the built ones are sent" if objects else "nothing to send: job failed"))
        if self.abandoned.is_set():  # failed by workers.max_job_s while it ran: this process is ending
            shutil.rmtree(staged.parent, ignore_errors=True)
            return  # publish and record nothing
        last = [OUTPUTS_FILE, staged.name]
        names = sorted(f.name for f in staged.parent.iterdir() if f.name not in last) + last
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            (staged.parent / name).replace(out / name)
        staged.parent.rmdir()
        for old in out.iterdir():  # objects of an earlier run of this job (reanalysis) that this run did not make
            if old.name not in names and old.is_file() and not old.name.startswith(REJECTION_NOTE):
                old.unlink()  # (its rejection notes stay: what they withdrew is still replaced)

        preferred = passed_over_for(analysis.reason) if state == JobState.rejected else None
        requeued: list[int] = []
        requeued_self: list[int] = []

        def queue_for_sending(session: Session) -> None:
            if state in (JobState.rejected, JobState.failed) and preferred is None:  # no results: its siblings run
                requeued.extend(requeue_passed_over(session, series_id=job.series_id, state=state, reason=error))
            if preferred is not None and requeue_if_preferred_ended(session, job_id=job.job_id,
                                                                    preferred_uid=preferred):
                requeued_self.append(job.job_id)
                return  # queued again: nothing of this outcome is sent
            if self.config.destinations and (out / OUTPUTS_FILE).is_file():
                enqueue_results(session, job_id=job.job_id, results_dir=out, destinations=self.config.destinations)
                if state == JobState.done and not analysis.output_errors:  # only whole results replace the old ones
                    queue_rejections(session, job_id=job.job_id, results_dir=out, destinations=self.config.destinations,
                                     settings=self.config.outputs, device_uid=self.device_uid)

        timings = {**self._waits(job), **analysis.result_json()["timings_s"]}
        if not self.queue.finish(job.job_id, state, error=error, timings=timings, also=queue_for_sending,
                                 log_reason=analysis.log_reason):
            return
        _log_requeued(requeued, state, ended_job=job.job_id)
        for job_id in requeued_self:
            log.info(kv("job_requeued", job=job_id, reason="the series preferred to it ended without results",
                        preferred=preferred))

    def _write_outputs(self, job: Claimed, analysis: Analysis, staged_dir: Path) -> list[WrittenObject]:
        """The DICOM outputs of ``analysis``, written into the staged folder of this attempt."""
        _, paths = _series_files(self.sessions, job)
        predecessor = previous_sr(self.sessions, series_id=job.series_id, revision=job.revision, job_id=job.job_id,
                                  results_dir=lambda job_id: results_dir(self.config, job_id))
        with self.sessions() as s:
            withdrawn = withdrawals(s, job.series_id)
        return write_outputs(analysis, out_dir=staged_dir, source_paths=paths, settings=self.config.outputs,
                             revision=job.revision, manifests=manifests_for(self.config.inference, analysis),
                             predecessor=predecessor, device_uid=self.device_uid, withdrawals=withdrawn)

    def _waits(self, job: Claimed) -> dict[str, float]:
        """Seconds from the last image to the series being complete, and from the job's creation to its start."""
        with self.sessions() as s:
            series, row = s.get(Series, job.series_id), s.get(Job, job.job_id)
            out = {}
            if series is not None and series.completed_at is not None:
                out["series_complete"] = (series.completed_at - series.last_received_at).total_seconds()
            if row is not None and row.started_at is not None:
                out["queue_wait"] = (row.started_at - row.created_at).total_seconds()
            return {k: round(v, 3) for k, v in out.items()}

    def _heartbeat(self, job_id: int, stop: threading.Event) -> None:
        """Extend the job's lease every quarter lease until ``stop``, or until the job is no longer ours. A failed
        beat (the database restarting) is tried again at the next: a thread that died of it would let the lease run
        out once the database is back, and the job would be run twice."""
        interval = max(0.05, self.config.workers.lease_s / 4)
        errors = LoopErrors(log, "heartbeat_error")
        while not stop.wait(interval):
            try:
                if not self.queue.heartbeat(job_id):
                    return
                self._report(job_id)
            except SQLAlchemyError as exc:
                errors.failed(exc)
                continue
            errors.ok()

    def _watchdog(self, job_id: int, stop: threading.Event) -> threading.Timer | None:
        """End the job at ``workers.max_job_s`` (``_time_out``) from a thread of its own: the job's thread may be
        stuck where Python cannot interrupt it, and a heartbeat may be waiting on a lock that thread holds."""
        limit = self.config.workers.max_job_s
        if not limit:
            return None
        timer = threading.Timer(limit, self._time_out, args=(job_id, limit, threading.get_ident(), stop))
        timer.daemon = True
        timer.start()
        return timer

    def _time_out(self, job_id: int, limit: float, job_thread: int, stop: threading.Event) -> None:
        """End this process, whose job ran past ``limit``, after failing the job if the database takes it within
        ``FAIL_WAIT_S`` (a database that is down, or a lock the stuck job holds, must not keep the process alive: the
        job is then found gone and requeued, up to workers.max_attempts). Serve's pool, or systemd for ``lungnode
        worker``, starts a new process. The log says where the job hung (code locations only, no patient data)."""
        if stop.is_set():
            return  # it finished at the deadline
        self.abandoned.set()  # _finish publishes nothing from now on
        frame = sys._current_frames().get(job_thread)
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                            for f in reversed(traceback.extract_stack(frame)[-4:])) if frame else "unknown"
        log.error(kv("job_timed_out", job=job_id, worker=self.name, limit_s=f"{limit:g}", where=where,
                     action=f"the job is failed and this worker process exits with status {EXIT_JOB_TIMED_OUT}"))
        error = (f"analysis still running after workers.max_job_s ({limit:g} s): its worker process was ended "
                 f"(serve, or systemd for lungnode worker, starts a new one); `lungnode reanalyse {job_id}` runs it "
                 "again (event=job_timed_out in the log says where it hung)")
        failing = threading.Thread(target=self._fail_timed_out, args=(job_id, error), name="job-timeout", daemon=True)
        failing.start()
        failing.join(FAIL_WAIT_S)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_JOB_TIMED_OUT)  # the job's thread cannot be stopped from here; the process can

    def _fail_timed_out(self, job_id: int, error: str) -> None:
        try:
            self._record_failed(job_id, error=error)
        except SQLAlchemyError as exc:
            log.error(kv("job_timeout_not_recorded", job=job_id, error=db_reason(exc),
                         effect="the job goes back to the queue when its lease runs out (at once for a worker started "
                                "on this machine)"))

    def loop(self) -> None:
        """Run jobs until ``stop``. While the database cannot be reached the worker waits and tries again, the wait
        doubling from the poll interval up to ``DB_RETRY_MAX_S`` (no busy loop against a server that is restarting);
        the error is logged once in full, then once a minute, and once more when it clears."""
        log.info(kv("worker_ready", worker=self.name, provider=self.provider,
                    models_s=f"{self.preload_s:.2f}" if self.preload_s is not None else None))
        poll = self.config.workers.poll_interval_s
        errors = LoopErrors(log, "worker_error")
        delay = poll
        reported_at: float | None = None  # not registered yet
        while not self.stop.is_set():
            try:
                if reported_at is None:
                    register(self.sessions, self.name, provider=self.provider)
                    reported_at = time.monotonic()
                elif time.monotonic() - reported_at >= min(SEEN_EVERY_S, self.config.workers.lease_s / 4):
                    self._report(None)
                    reported_at = time.monotonic()
                busy = self.run_one(db_answered=errors.ok)  # a cleared error is said before the job, not after
            except SQLAlchemyError as exc:
                errors.failed(exc)
                delay = min(max(delay * 2, poll), DB_RETRY_MAX_S)
                self.stop.wait(delay)
                continue
            errors.ok()
            delay = poll
            if not busy:
                self.stop.wait(poll)
        self._report(None, stopped=True)
        self.engine.dispose()
        log.info(kv("worker_stopped", worker=self.name))


def _stop_when_orphaned(worker: Worker, parent_pid: int, interval_s: float = 1.0) -> None:
    """Stop the worker (after its current job) once the ``serve`` process that started it is gone.

    A node killed with SIGKILL cannot stop its workers; without this they would run on beside the
    workers of the restarted node, holding memory and models until someone notices.
    """
    while not worker.stop.wait(interval_s):
        if os.getppid() != parent_pid:
            log.warning(kv("worker_orphaned", worker=worker.name, parent=parent_pid,
                           effect="stopping after the current job"))
            worker.stop.set()


def worker_process_main(config: Config, parent_pid: int | None = None) -> None:
    """Entry point of a worker process (``lungnode worker``, or one started by ``serve`` with its pid)."""
    setup_logging(config.logging.level, config.logging.file, config.logging.include_phi)
    worker = Worker(config)
    stop_on_signals(worker.stop)
    if parent_pid is not None:
        # serve's workers: SIGHUP is logrotate's habit, and serve outlives it (the log file is watched). A worker
        # run from a terminal keeps the default, ending with its session.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        threading.Thread(target=_stop_when_orphaned, args=(worker, parent_pid), name="orphan-watch", daemon=True).start()
    else:  # `lungnode worker`, perhaps on another machine than the node's (serve checks its own clock)
        warn_on_clock_skew(worker.engine)
    worker.preload()
    worker.loop()


def start_workers(config: Config, count: int) -> list[multiprocessing.process.BaseProcess]:
    """Start ``count`` worker processes (spawned: no state shared with the listener's threads)."""
    ctx = multiprocessing.get_context("spawn")
    procs: list[multiprocessing.process.BaseProcess] = []
    for i in range(count):
        p = ctx.Process(target=worker_process_main, args=(config, os.getpid()), name=f"lungnode-worker-{i + 1}", daemon=False)
        p.start()
        procs.append(p)
    return procs
