"""Analysis workers as they report themselves in the ledger (``workers`` table), for ``lungnode status``.

A worker writes its row when it starts (with the device its models run on), every ``SEEN_EVERY_S`` while it waits
for work, with each heartbeat of a job, and when it stops. A row not written for ``workers.lease_s`` is a worker that
is lost: the same rule that gives its job to another worker.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from node import __version__
from node.db.jobs import process_gone
from node.db.models import WorkerRecord, utcnow

#: How often an idle worker says it is alive (one small UPDATE).
SEEN_EVERY_S = 10.0
#: Workers seen within this long are listed by status (a crashed one stays visible as lost for a day).
LISTED_FOR = dt.timedelta(days=1)
#: The states ``workers_summary`` gives, in the order status lists them.
WORKER_STATES = ("busy", "idle", "lost", "stopped")
#: Rows older than this are deleted when a worker starts.
FORGOTTEN_AFTER = dt.timedelta(days=7)


def register(sessions: sessionmaker[Session], name: str, *, provider: str | None) -> None:
    """This worker starts: its row, fresh (a pid reused after a restart takes the old row over). Rows of this
    machine's workers whose process is gone go: a worker that died here was restarted (``event=worker_died``), and
    ``lost`` is kept for what nobody replaced (another machine down, a worker cut off)."""
    now = utcnow()
    with sessions.begin() as s:
        s.execute(delete(WorkerRecord).where(WorkerRecord.seen_at < now - FORGOTTEN_AFTER))
        for old in s.scalars(select(WorkerRecord).where(WorkerRecord.name != name, WorkerRecord.stopped_at.is_(None))):
            if process_gone(old.name):
                s.delete(old)
        _write(s, name, provider=provider, job_id=None, now=now, started=True)


def report(sessions: sessionmaker[Session], name: str, *, provider: str | None, job_id: int | None,
           stopped: bool = False) -> None:
    """Alive now, running ``job_id`` (None: idle); ``stopped``: a clean stop. Writes the row again if it was
    deleted meanwhile (by hand, or by another machine's clean-up), so a live worker is never unlisted."""
    with sessions.begin() as s:
        _write(s, name, provider=provider, job_id=job_id, now=utcnow(), stopped=stopped)


def _write(s: Session, name: str, *, provider: str | None, job_id: int | None, now: dt.datetime,
           started: bool = False, stopped: bool = False) -> None:
    row = s.get(WorkerRecord, name)
    if row is None:
        row = WorkerRecord(name=name, started_at=now)
        s.add(row)
    if started:
        row.started_at = now
    row.version, row.provider, row.seen_at, row.job_id = __version__, provider, now, job_id
    row.stopped_at = now if stopped else None


def workers_summary(s: Session, *, alive_s: float, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """The workers seen in the last day: ``busy`` (running ``job``), ``idle``, ``stopped``, or ``lost`` (not seen
    for ``alive_s``: killed, crashed, or its machine cut off)."""
    now = now or utcnow()
    rows = s.scalars(select(WorkerRecord).where(WorkerRecord.seen_at >= now - LISTED_FOR)
                     .order_by(WorkerRecord.name)).all()
    out = []
    for row in rows:
        seen_s = max(0, round((now - row.seen_at).total_seconds()))
        if row.stopped_at is not None:
            state = "stopped"
        elif seen_s > alive_s:
            state = "lost"
        else:
            state = "busy" if row.job_id is not None else "idle"
        out.append({"name": row.name, "state": state, "job": row.job_id if state == "busy" else None,
                    "provider": row.provider, "version": row.version, "seen_s_ago": seen_s,
                    "started_at": row.started_at.isoformat(timespec="seconds")})
    return out
