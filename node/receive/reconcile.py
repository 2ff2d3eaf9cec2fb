"""Start-up reconciliation of spool and ledger after any stop, a SIGKILL included.

Order of the receive path is: file fsynced and renamed into the spool, row committed, status sent.
So after a crash:
- files in ``incoming/`` were never acknowledged: deleted;
- a committed file without a row was not acknowledged either, but it is a valid instance, so it is
  adopted (a sender that retries then gets a duplicate, which is harmless); one that does not parse
  (cut short by a power loss) is moved to ``quarantine/``;
- a file whose row retention marked purged, and older than that mark, was left by a stop in the middle
  of a retention pass (rows first, then files): deleted, as retention meant to. One written after the
  mark is a copy sent again whose row was not restored yet: adopted like any file without a row;
- a row whose file is missing was never acknowledged either (the row and the file are made durable
  in parallel, and the answer waits for both): the row is removed, with an event saying so;
- associations left open were cut: marked aborted, so their series wait for the quiet period and the
  assembler completes them as usual.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete, select, update
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session, sessionmaker

from node.db.ingest import IngestLedger, Outcome, unrecordable
from node.db.models import Event, Instance, Series
from node.errors import InstanceRejected
from node.logs import kv
from node.receive.inspect import inspect_instance
from node.receive.scp import is_own_output
from node.receive.spool import Spool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconcileReport:
    discarded_partial: int
    aborted_associations: int
    adopted: int
    unreadable: int
    rows_without_file: int
    duplicates: int = 0  # files of an instance the ledger holds at another path: quarantined
    purged: int = 0  # files of rows retention had marked purged when the node stopped: deleted


def reconcile(spool: Spool, ledger: IngestLedger, sessions: sessionmaker[Session]) -> ReconcileReport:
    discarded = spool.discard_incoming()
    aborted = ledger.abort_open_associations()
    known = ledger.known_paths()
    unknown = [path for path in spool.committed_files() if str(path) not in known]
    purged_rows = ledger.purged_paths([str(path) for path in unknown])
    adopted = unreadable = duplicates = purged = 0
    for path in unknown:
        if _left_by_retention(path, purged_rows.get(str(path))):
            spool.remove_files([path])
            purged += 1
            continue
        try:
            header = inspect_instance(path, sop_class_uid="", sop_instance_uid=path.stem, check_request=False)
            recorded = ledger.record_instance(
                header, path=path, size_bytes=path.stat().st_size, association_id=None, own_output=is_own_output(header)
            )
        except (InstanceRejected, DataError) as exc:
            # Never acknowledged (it has no row), and not a valid instance (e.g. cut by a power loss) or one
            # the ledger refuses (another study's series, a value the database cannot hold): set aside for
            # inspection rather than deleted, and never a reason for the node not to start. A database error's
            # own message quotes the row's values (patient data): only its class is logged.
            moved = spool.quarantine(path)
            reason = (exc if isinstance(exc, InstanceRejected) else unrecordable(exc)).reason
            log.error(kv("reconcile_unreadable", path=path, moved_to=moved, reason=reason))
            unreadable += 1
            continue
        if recorded.outcome == Outcome.duplicate:  # the ledger holds this instance at another path
            moved = spool.quarantine(path)
            log.warning(kv("reconcile_duplicate", path=path, moved_to=moved, held_at=recorded.existing_path))
            duplicates += 1
            continue
        adopted += 1
    missing = _drop_rows_without_file(sessions)
    report = ReconcileReport(discarded, aborted, adopted, unreadable, missing, duplicates, purged)
    log.info(kv("reconcile_done", discarded_partial=discarded, aborted_associations=aborted, adopted=adopted,
                unreadable=unreadable, duplicates=duplicates, rows_without_file=missing, retention_finished=purged))
    return report


def _left_by_retention(path: Path, purged_at: dt.datetime | None) -> bool:
    """A file retention meant to delete: its row is marked purged, and the file was written before that."""
    if purged_at is None:
        return False
    try:
        return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc) <= purged_at
    except FileNotFoundError:
        return False


def _drop_rows_without_file(sessions: sessionmaker[Session]) -> int:
    missing = 0
    with sessions.begin() as s:
        rows = s.execute(
            select(Instance.id, Instance.path, Instance.series_id, Instance.sop_instance_uid)
            .where(Instance.purged_at.is_(None))
        ).all()
        for instance_id, path, series_id, sop in rows:
            if Path(path).is_file():
                continue
            missing += 1
            log.warning(kv("reconcile_row_without_file", sop=sop, path=path,
                           action="removed from the ledger; it was not acknowledged"))
            s.execute(delete(Instance).where(Instance.id == instance_id))
            s.execute(update(Series).where(Series.id == series_id).values(instance_count=Series.instance_count - 1))
            s.add(Event(kind="instance_row_removed", level="warning", series_id=series_id,
                        message=f"instance {sop} was recorded but its file never reached the spool (crash before "
                                f"acknowledgement): record removed"))
    return missing
