"""Retention of received images: the spool keeps a series for ``retention.received_days`` after it
completed, then deletes its files (the ledger rows stay, with ``purged_at`` set). A series whose job
is still queued or running is never purged."""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import exists, select
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import Event, Job, JobState, Series, SeriesState, utcnow
from node.logs import kv
from node.receive.spool import Spool

log = logging.getLogger(__name__)


def purge_expired(spool: Spool, sessions: sessionmaker[Session], *, days: float, now: dt.datetime | None = None) -> int:
    """Delete the spool files of expired series; returns how many series were purged."""
    if days <= 0:
        return 0
    cutoff = (now or utcnow()) - dt.timedelta(days=days)
    active = select(Job.id).where(Job.series_id == Series.id, Job.state.in_([JobState.queued, JobState.running]))
    with sessions() as s:
        due = list(
            s.execute(
                select(Series.id, Series.series_instance_uid).where(
                    Series.state == SeriesState.complete,
                    Series.purged_at.is_(None),
                    Series.completed_at <= cutoff,
                    ~exists(active),
                )
            )
        )
    for series_id, series_uid in due:
        removed = spool.remove_series(series_uid)
        with sessions.begin() as s:
            series = s.get(Series, series_id)
            if series is None:
                continue
            series.purged_at = utcnow()
            s.add(Event(kind="series_purged", series_id=series_id,
                        message=f"{removed} received files deleted after {days:g} days (retention)"))
        log.info(kv("series_purged", series=series_uid, files=removed))
    return len(due)
