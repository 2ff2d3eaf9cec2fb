"""Composition root: how one running node is put together.

    config ─► spool + ledger (database, migrated) ─► reconcile after any crash
           ─► SCP (receive)  ─► assembler (series complete ─► job)  ─► retention
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from types import FrameType

from node import __version__
from sqlalchemy.exc import SQLAlchemyError

from node.config import Config
from node.errors import LungnodeError
from node.db.ingest import IngestLedger
from node.db.session import make_engine, make_sessionmaker, upgrade_schema
from node.logs import kv
from node.receive.assembler import Assembler
from node.receive.reconcile import reconcile
from node.receive.retention import purge_expired
from node.receive.scp import StorageSCP
from node.receive.spool import Spool

log = logging.getLogger(__name__)


class Node:
    """The receiving side of lungnode, started and stopped as one unit."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.engine = make_engine(config.storage.database_url)
        self.sessions = make_sessionmaker(self.engine)
        self.spool = Spool(
            config.storage.spool_dir,
            min_free_bytes=config.storage.min_free_disk_mb * 2**20,
            fsync=config.storage.fsync,
        )
        self.ledger = IngestLedger(self.sessions)
        self.assembler = Assembler(config.assembly, self.sessions)
        self.scp = StorageSCP(
            config.dicom, spool=self.spool, ledger=self.ledger, on_association_closed=self.assembler.poke
        )
        self._stop = threading.Event()
        self._housekeeping: threading.Thread | None = None
        self.port: int | None = None

    def start(self) -> None:
        try:
            upgrade_schema(self.engine)
        except SQLAlchemyError as exc:
            raise LungnodeError(
                f"cannot open the database {self.engine.url.render_as_string(hide_password=True)}: "
                f"{exc.__class__.__name__}: {exc.orig if hasattr(exc, 'orig') else exc}. Check storage.database_url."
            ) from exc
        reconcile(self.spool, self.ledger, self.sessions)
        self.assembler.start()
        self.port = self.scp.start()
        self._housekeeping = threading.Thread(target=self._retention_loop, name="retention", daemon=True)
        self._housekeeping.start()

    def _retention_loop(self) -> None:
        settings = self.config.retention
        while not self._stop.wait(settings.check_interval_s):
            try:
                purge_expired(self.spool, self.sessions, days=settings.received_days)
            except Exception:  # retention must never stop the node; the error is logged in full
                log.exception(kv("retention_error"))

    def stop(self) -> None:
        self._stop.set()
        self.scp.stop()
        self.assembler.stop()
        self.engine.dispose()
        log.info(kv("node_stopped"))


def serve(config: Config) -> int:
    """Run the node in the foreground until SIGTERM or SIGINT."""
    log.info(kv("node_starting", version=__version__))
    log.info("event=effective_config config=%s", json.dumps(config.redacted(), sort_keys=True))
    node = Node(config)
    try:
        node.start()
    except BaseException:
        node.stop()
        raise
    stop = threading.Event()

    def _signal(signum: int, _frame: FrameType | None) -> None:
        log.info(kv("signal_received", signal=signal.Signals(signum).name))
        stop.set()

    signal.signal(signal.SIGTERM, _signal)
    signal.signal(signal.SIGINT, _signal)
    log.info(kv("node_ready", ae_title=config.dicom.ae_title, port=node.port))
    stop.wait()
    node.stop()
    return 0
