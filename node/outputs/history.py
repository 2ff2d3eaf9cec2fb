"""The SR of a series' previous revision, which a new revision's SR names as its predecessor."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import Job, JobState
from node.outputs.write import predecessor_from


def previous_sr(sessions: sessionmaker[Session], *, series_id: int, revision: int,
                results_dir: Callable[[int], Path]) -> Dataset | None:
    """The SR published for the newest earlier revision of the series that has one (None: first SR).

    A superseded job's SR was never sent, so it is nobody's predecessor."""
    with sessions() as s:
        earlier = s.scalars(
            select(Job.id).where(Job.series_id == series_id, Job.revision < revision,
                                 Job.state != JobState.superseded).order_by(Job.revision.desc())
        ).all()
    for job_id in earlier:
        found = predecessor_from(results_dir(job_id))
        if found is not None:
            return found
    return None
