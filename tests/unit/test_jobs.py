"""The job queue on a real SQLite ledger: an operator's reanalysis of a finished job, and when it is refused."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from node.db.jobs import JobQueue, requeue_for_reanalysis
from node.db.models import Job, JobState, Series, SeriesOrigin, SeriesState, Study, utcnow
from node.errors import LungnodeError


def _job(sessions: sessionmaker[Session], state: JobState, *, revision: int = 1, series_revision: int = 1,
         purged: bool = False) -> int:
    with sessions.begin() as s:
        series = Series(study=Study(study_instance_uid=f"1.2.{id(object())}"), series_instance_uid=f"1.3.{id(object())}",
                        modality="CT", origin=SeriesOrigin.modality, state=SeriesState.complete,
                        revision=series_revision, purged_at=utcnow() if purged else None)
        job = Job(series=series, revision=revision, state=state, attempts=2, error="was refused")
        s.add(job)
        s.flush()
        return int(job.id)


@pytest.mark.parametrize("state", [JobState.done, JobState.rejected, JobState.failed])
def test_a_finished_job_is_queued_again_with_a_fresh_set_of_attempts(sessions: sessionmaker[Session],
                                                                     state: JobState) -> None:
    job_id = _job(sessions, state)
    assert f"job {job_id} ({state.value}) is queued again" in requeue_for_reanalysis(sessions, job_id)
    claimed = JobQueue(sessions, worker="w").claim()
    assert claimed is not None and (claimed.job_id, claimed.attempt) == (job_id, 1)
    with sessions() as s:
        row = s.get(Job, job_id)
        assert row is not None and row.error is None and row.state == JobState.running


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"state": JobState.queued}, "is queued already"),
    ({"state": JobState.running}, "is running already"),
    ({"state": JobState.done, "series_revision": 2}, "revision 2 has come since"),
    ({"state": JobState.done, "purged": True}, "deleted by the retention rule"),
])
def test_reanalysis_is_refused_with_the_reason(sessions: sessionmaker[Session], kwargs: dict, words: str) -> None:
    job_id = _job(sessions, **kwargs)
    with pytest.raises(LungnodeError, match=words):
        requeue_for_reanalysis(sessions, job_id)
    with pytest.raises(LungnodeError, match="there is no job"):
        requeue_for_reanalysis(sessions, job_id + 100)
