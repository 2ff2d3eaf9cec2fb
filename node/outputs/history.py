"""The SR of a series' previous revision, which a new revision's SR names as its predecessor."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import exists, or_, select
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import Job, JobState, OutboxItem, SendState
from node.outputs.write import predecessor_from


def previous_sr(sessions: sessionmaker[Session], *, series_id: int, revision: int,
                results_dir: Callable[[int], Path]) -> Dataset | None:
    """The SR published for the newest earlier revision of the series that has one (None: first SR).

    Only an SR the destinations received can be a predecessor: that of a finished (done) job whose SR went out
    to at least one destination, or that has none configured (no outbox row). A superseded or still running
    job's SR, or one that was never delivered, is nobody's predecessor."""
    sr_rows = select(OutboxItem.id).where(OutboxItem.job_id == Job.id, OutboxItem.kind == "sr")
    delivered = sr_rows.where(OutboxItem.state.in_([SendState.sent, SendState.committed]))
    with sessions() as s:
        earlier = s.scalars(
            select(Job.id).where(Job.series_id == series_id, Job.revision < revision, Job.state == JobState.done,
                                 or_(~exists(sr_rows), exists(delivered))).order_by(Job.revision.desc())
        ).all()
    for job_id in earlier:
        found = predecessor_from(results_dir(job_id))
        if found is not None:
            return found
    return None
