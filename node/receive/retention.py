"""Retention of received images and results: the spool keeps a series for ``retention.received_days``
after it completed, then deletes its files (the ledger rows stay, with ``purged_at`` set). A series
whose job is still queued or running is never purged. The results of its jobs (``results/job-N/``)
go with it, or later, once every destination has them: a result still waiting to be sent, failed
(``lungnode retry`` may send it again) or waiting for storage commitment is kept. A purged series that the
PACS sends again is stored again (see ``IngestLedger``)."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.audit import AuditTrail
from node.audit.studies import studies_of
from node.db.models import Event, Instance, Job, JobState, OutboxItem, SendState, Series, SeriesState, Study, utcnow
from node.logs import kv
from node.receive.spool import Spool

log = logging.getLogger(__name__)


#: How long retention waits for stores of a series in flight before leaving it for the next pass.
GATE_WAIT_S = 10.0


def purge_expired(spool: Spool, sessions: sessionmaker[Session], *, days: float, now: dt.datetime | None = None,
                  audit: AuditTrail | None = None, identifiers_days: float | None = None) -> int:
    """Delete the spool files of expired series; returns how many series were purged."""
    if days <= 0:
        return 0
    cutoff = (now or utcnow()) - dt.timedelta(days=days)
    with sessions() as s:
        due = list(s.execute(select(Series.id, Series.series_instance_uid).where(_due(cutoff))))
    purged = 0
    for series_id, series_uid in due:
        with spool.gate.deleting(series_uid, timeout_s=GATE_WAIT_S) as held:
            if not held:
                log.info(kv("series_purge_deferred", series=series_uid,
                            reason="images of this series are being received; next retention pass"))
                continue
            purged += _purge_series(spool, sessions, series_id, series_uid, cutoff=cutoff, days=days, audit=audit)
    purge_results(spool, sessions)
    if identifiers_days is not None:
        forget_identifiers(sessions, days=identifiers_days, now=now)
    return purged


def _due(cutoff: dt.datetime) -> Any:
    """A series whose images may go: complete since ``cutoff`` or longer, still held, and no job queued or running."""
    active = select(Job.id).where(Job.series_id == Series.id, Job.state.in_([JobState.queued, JobState.running]))
    return and_(Series.state == SeriesState.complete, Series.purged_at.is_(None), Series.completed_at <= cutoff,
                ~exists(active))


def _purge_series(spool: Spool, sessions: sessionmaker[Session], series_id: int, series_uid: str, *,
                  cutoff: dt.datetime, days: float, audit: AuditTrail | None) -> int:
    """Purge one series under its gate: checked again (an image may have come since the due list was read, opening
    a new revision), rows marked purged first, then exactly their files deleted. A crash between the two leaves
    files whose rows are purged; start-up reconciliation deletes those. Returns 1 if purged, else 0."""
    with sessions.begin() as s:
        if s.scalar(select(Series.id).where(Series.id == series_id, _due(cutoff)).with_for_update()) is None:
            return 0
        paths = [Path(p) for p in s.scalars(select(Instance.path).where(Instance.series_id == series_id,
                                                                       Instance.purged_at.is_(None)))]
        at = utcnow()
        s.execute(update(Series).where(Series.id == series_id).values(purged_at=at))
        s.execute(update(Instance).where(Instance.series_id == series_id, Instance.purged_at.is_(None))
                  .values(purged_at=at))
        s.add(Event(kind="series_purged", series_id=series_id,
                    message=f"{len(paths)} received files deleted after {days:g} days (retention)"))
    # Read before the files go (the audit message names the study and patient whose images were deleted), but not
    # inside the transaction: on SQLite it holds the write lock every store waits for. The gate is still held.
    studies = studies_of(sorted(p for p in paths if p.is_file())) if audit is not None and audit.enabled else []
    removed = spool.remove_files(paths)
    if audit is not None:
        for study in studies:
            audit.instances_deleted(study=study, reason=f"received images kept {days:g} days (retention)")
    log.info(kv("series_purged", series=series_uid, files=removed))
    return 1


def forget_identifiers(sessions: sessionmaker[Session], *, days: float, now: dt.datetime | None = None) -> int:
    """Blank the Patient ID and accession number of studies whose images all went ``days`` ago or longer: the
    ledger then keeps no patient identifier for them (data minimisation); returns how many studies."""
    cutoff = (now or utcnow()) - dt.timedelta(days=days)
    held = select(Series.id).where(Series.study_id == Study.id, Series.purged_at.is_(None))
    newest_purge = select(func.max(Series.purged_at)).where(Series.study_id == Study.id).scalar_subquery()
    with sessions.begin() as s:
        ids = list(s.scalars(select(Study.id).where(
            or_(Study.patient_id.is_not(None), Study.accession_number.is_not(None)),
            ~exists(held), newest_purge <= cutoff)))
        if ids:
            s.execute(update(Study).where(Study.id.in_(ids)).values(patient_id=None, accession_number=None))
            s.add(Event(kind="identifiers_forgotten", message=f"Patient ID and accession number blanked for "
                                                              f"{len(ids)} studies, {days:g} days after their images"))
    if ids:
        log.info(kv("identifiers_forgotten", studies=len(ids), days=f"{days:g}"))
    return len(ids)


def purge_results(spool: Spool, sessions: sessionmaker[Session]) -> int:
    """Delete the results of jobs whose series was purged, once nothing of theirs still needs the files; returns
    how many jobs' results were deleted (each once: a ``results_purged`` event marks it)."""
    needed = select(OutboxItem.id).where(
        OutboxItem.job_id == Job.id,
        or_(OutboxItem.state.in_([SendState.pending, SendState.sending, SendState.failed]),
            and_(OutboxItem.state == SendState.sent, OutboxItem.commitment_uid.is_not(None))))
    done = select(Event.id).where(Event.job_id == Job.id, Event.kind == "results_purged")
    with sessions() as s:
        due = list(s.execute(
            select(Job.id, Series.series_instance_uid).join(Series, Job.series_id == Series.id).where(
                Series.purged_at.is_not(None), Job.state.not_in([JobState.queued, JobState.running]),
                ~exists(needed), ~exists(done))))
    for job_id, series_uid in due:
        removed = spool.remove_results(job_id)
        with sessions.begin() as s:
            s.add(Event(kind="results_purged", job_id=job_id,
                        message=f"{removed} result files deleted with the series' images (retention)"))
        log.info(kv("results_purged", job=job_id, series=series_uid, files=removed))
    return len(due)
