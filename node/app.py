"""Composition root: how one running node is put together.

    config ─► spool + ledger (database, migrated) ─► reconcile after any crash
           ─► SCP (receive)  ─► assembler (series complete ─► job)  ─► retention
           ─► worker processes (job ─► node.pipeline.runner.analyse_series ─► result)
           ─► sender thread (outbox ─► C-STORE to each destination, retries, storage commitment)
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from node import __version__
from node.audit import AuditTrail, no_audit
from node.audit.backlog import SPOOL_FOLDER
from node.config import Config
from node.db.ingest import IngestLedger
from node.db.session import (
    claim_ledger,
    db_reason,
    make_sessionmaker,
    open_database,
    release_ledger,
    warn_on_clock_skew,
)
from node.db.status import record_analysis_state
from node.errors import LungnodeError
from node.logs import kv
from node.receive.assembler import Assembler
from node.receive.reconcile import reconcile
from node.receive.retention import purge_expired
from node.receive.scp import StorageSCP
from node.receive.spool import Spool, claim_spool
from node.send.sender import Sender
from node.signals import stop_on_signals

log = logging.getLogger(__name__)

# What SIGHUP does: logrotate sends it by habit, and the default would end the node without a word.
HANGUP_ACTION = "none: the log file is reopened by itself when moved; restart the node to apply a changed configuration"


class Node:
    """The receiving side of lungnode, started and stopped as one unit."""

    def __init__(self, config: Config, audit: AuditTrail | None = None) -> None:
        self.config = config
        self.audit = audit or no_audit(config.dicom.ae_title)
        self.engine = open_database(config.storage.database_url)
        self._ledger_lock = claim_ledger(self.engine)
        warn_on_clock_skew(self.engine)
        self.sessions = make_sessionmaker(self.engine)
        self.spool = Spool(
            config.storage.spool_dir,
            min_free_bytes=config.storage.min_free_disk_mb * 2**20,
            fsync=config.storage.fsync,
        )
        self.ledger = IngestLedger(self.sessions)
        self.assembler = Assembler(config.assembly, self.sessions)
        self.scp = StorageSCP(
            config.dicom, spool=self.spool, ledger=self.ledger, on_association_closed=self.assembler.poke,
            audit=self.audit,
        )
        self._stop = threading.Event()
        self._housekeeping: threading.Thread | None = None
        self.port: int | None = None

    def start(self) -> None:
        reconcile(self.spool, self.ledger, self.sessions)
        self.assembler.start()
        self.port = self.scp.start()
        self._housekeeping = threading.Thread(target=self._retention_loop, name="retention", daemon=True)
        self._housekeeping.start()

    def _retention_loop(self) -> None:
        """A pass at start, then every ``check_interval_s``: a node restarted with a shorter ``received_days`` (the
        fix its disk-full error names) frees the space now, not an hour later."""
        settings = self.config.retention
        while True:
            try:
                purge_expired(self.spool, self.sessions, days=settings.received_days, audit=self.audit,
                              identifiers_days=settings.identifiers_days)
            except Exception:  # retention must never stop the node; the error is logged in full
                log.exception(kv("retention_error"))
            if self._stop.wait(settings.check_interval_s):
                return

    def stop_receiving(self) -> None:
        """Stop the listener first at shutdown: no image is accepted while the rest winds down."""
        self.scp.stop()

    def stop(self) -> None:
        self._stop.set()
        self.scp.stop()
        self.assembler.stop()
        if self._ledger_lock is not None:
            release_ledger(self._ledger_lock)
        self.engine.dispose()
        log.info(kv("node_stopped"))


#: A worker that dies within this many seconds of its start waits before its restart, the wait doubling from
#: 2 s up to RESTART_MAX_WAIT_S: one that crashes at start would otherwise load the models every 2 s and take
#: the CPU the listener needs. A worker that lived longer is restarted at once.
CRASH_LOOP_S, RESTART_MAX_WAIT_S = 60.0, 300.0


class WorkerPool:
    """The analysis worker processes of ``lungnode serve``; a worker that dies is restarted."""

    def __init__(self, config: Config, config_path: Path | None = None,
                 sessions: sessionmaker[Session] | None = None) -> None:
        """``sessions``: the ledger where whether analysis runs is recorded, for ``lungnode status``."""
        self.config = config
        self.config_path = config_path
        self.sessions = sessions
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self._started_at: list[float] = []  # monotonic, per slot
        self._restart_at: list[float | None] = []  # when a dead worker's slot starts again
        self._waits: list[float] = []
        self.models_broken_since: float | None = None  # monotonic time of the last failed check
        self._problem: str | None = None

    def start(self) -> None:
        count = self.config.workers.count
        if count == 0:
            log.info(kv("workers_disabled", reason="workers.count is 0"))
            return
        problem = self._check_models()
        if problem:
            self._disabled(problem)
            return
        self._start_workers(count)

    def _record(self, problem: str | None) -> None:
        if self.sessions is None:
            return
        try:
            with self.sessions.begin() as s:
                record_analysis_state(s, problem=problem)
        except SQLAlchemyError as exc:  # the log line says it anyway; status then shows the last state it knew
            log.error(kv("analysis_state_not_recorded", reason=db_reason(exc)))

    def _disabled(self, problem: str) -> None:
        self._problem = problem
        self._record(problem)
        log.error(kv("analysis_disabled", reason=problem,
                     effect="images are received and series assembled; jobs wait in the queue",
                     fix=f"{verify_command(self.config_path)}; the node checks the models again every "
                         f"{self.config.workers.models_recheck_s:g} s and starts analysing once they pass"))

    def _check_models(self) -> str | None:
        # The analysis modules (onnxruntime, SimpleITK, highdicom) are imported where workers are started: the
        # listener process never analyses, and a node started without workers neither loads nor holds them.
        from node.pipeline.infer import clear_model_cache, models_problem, pairing_warnings

        problem = models_problem(self.config.inference)
        # The check built a session per model in this process, which never analyses (the workers are spawned
        # and load their own): free them, and on a GPU their device memory.
        clear_model_cache()
        self.models_broken_since = time.monotonic() if problem else None
        if problem is None:
            for warning in pairing_warnings(self.config.inference):
                log.warning(kv("model_pairing", problem=warning))
        return problem

    def _spawn(self, count: int) -> list[multiprocessing.process.BaseProcess]:
        from node.pipeline.worker import start_workers  # see _check_models: not imported by the listener

        return start_workers(self.config, count)

    def _start_workers(self, count: int) -> None:
        self._record(None)
        self.procs = self._spawn(count)
        self._started_at, self._restart_at, self._waits = [time.monotonic()] * count, [None] * count, [0.0] * count
        log.info(kv("workers_started", count=count, pids=",".join(str(p.pid) for p in self.procs)))

    def watch(self) -> None:
        if self.models_broken_since is not None:
            if time.monotonic() - self.models_broken_since >= self.config.workers.models_recheck_s:
                problem = self._check_models()
                if problem is None:
                    log.info(kv("analysis_enabled", reason="the models pass their checks now"))
                    self._start_workers(self.config.workers.count)
                elif problem != self._problem:  # another reason now: say it once, as at start
                    self._disabled(problem)
            return
        now = time.monotonic()
        for i, proc in enumerate(self.procs):
            if proc.is_alive():
                continue
            restart_at = self._restart_at[i]
            if restart_at is None:  # found dead just now
                lived = now - self._started_at[i]
                self._waits[i] = min(max(2 * self._waits[i], 2.0), RESTART_MAX_WAIT_S) if lived < CRASH_LOOP_S else 0.0
                restart_at = self._restart_at[i] = now + self._waits[i]
                log.error(kv("worker_died", pid=proc.pid, exitcode=proc.exitcode, lived_s=f"{lived:.0f}",
                             action="restarting", restart_in_s=f"{self._waits[i]:g}",
                             fix="the lines of this pid before this one say why" if self._waits[i] else None))
            if now >= restart_at:
                self.procs[i] = self._spawn(1)[0]
                self._started_at[i], self._restart_at[i] = now, None

    def stop(self) -> None:
        for proc in self.procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
        self.procs = []


def verify_command(config_path: Path | None) -> str:
    """The command that checks the models this node is configured with (its own config file, not the defaults)."""
    return f"lungnode models --config {config_path} verify" if config_path else "lungnode models verify"


def check_device(config: Config) -> None:
    """Refuse to start when ``inference.device`` names a GPU that cannot be used (auto and cpu never refuse)."""
    if config.workers.count > 0 and config.inference.device not in ("auto", "cpu"):
        from node.pipeline.infer import choose_providers

        choose_providers(config.inference.device)


def serve(config: Config, config_path: Path | None = None) -> int:
    """Run the node in the foreground until SIGTERM or SIGINT."""
    # The results' creation times are local times (node.outputs.clock): say which zone, so IT sees a wrong TZ.
    now = dt.datetime.now().astimezone()
    log.info(kv("node_starting", version=__version__, time_zone=now.tzname(), utc_offset=now.strftime("%z")))
    log.info("event=effective_config config=%s", json.dumps(config.redacted(), sort_keys=True))
    try:
        spool_lock = claim_spool(config.storage.spool_dir)  # before anything reads or repairs the spool
        check_device(config)
        audit = AuditTrail(config.audit, ae_title=config.dicom.ae_title,
                           backlog_dir=config.storage.spool_dir / SPOOL_FOLDER)
        node = Node(config, audit)
        sender = Sender(config, node.sessions, audit)
        try:
            audit.start()
            node.start()
            sender.start()
        except BaseException as exc:
            sender.stop()
            node.stop()
            audit.stop()
            if isinstance(exc, SQLAlchemyError):  # e.g. the ledger's disk full when start-up reconciliation writes
                raise LungnodeError(f"the database could not be brought up to date at start ({db_reason(exc)}). "
                                    f"Check storage.database_url, and the free space and permissions where it "
                                    f"lives") from exc
            raise
    except LungnodeError as exc:  # the reason belongs in the node's log too, not only on stderr
        log.error(kv("node_start_failed", reason=str(exc)))
        raise
    stop = threading.Event()

    def _hangup(signum: int, _frame: FrameType | None) -> None:
        log.info(kv("signal_received", signal="SIGHUP", action=HANGUP_ACTION))

    stop_on_signals(stop, said=lambda signum: log.info(kv("signal_received", signal=signal.Signals(signum).name)))
    signal.signal(signal.SIGHUP, _hangup)
    log.info(kv("node_ready", ae_title=config.dicom.ae_title, port=node.port))
    audit.application_activity(started=True)
    workers = WorkerPool(config, config_path, node.sessions)
    workers.start()
    while not stop.wait(2.0):
        workers.watch()
    node.stop_receiving()
    workers.stop()
    sender.stop()
    node.stop()
    audit.application_activity(started=False)
    audit.stop()
    os.close(spool_lock)
    return 0
