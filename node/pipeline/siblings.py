"""The series of a study compete for one analysis, and a series passed over is analysed after all when the one
preferred to it ends without results: refused by its own checks, or failed.

Selection ranks a study's series by their headers alone (``node.pipeline.select.choose``): a 1 mm lung-kernel
series is preferred to a 2.5 mm one before any pixel is read. If the preferred series is then refused by the
analysis (a slice missing, no lung coverage), or its job fails (an unexpected error, outputs that cannot be
written, an analysis past workers.max_job_s), the study would get no analysis at all. So a series that ended so is
no candidate for its siblings' choice, and the siblings passed over for it go back to the queue, where
the choice is made again without it. Their job_requeued event names the series and why it gave no results. A failed
series that ``lungnode reanalyse`` then runs again may give the study a second set of results, for that series.

A job passed over records the UID of the series preferred at the end of its reason (``select.NOT_BEST``): the
ledger needs no other column to find it again.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Exists, and_, exists, or_, select
from sqlalchemy.orm import Session, sessionmaker

from node.db.jobs import requeue_finished
from node.db.models import Instance, Job, JobState, Series, SeriesOrigin, SeriesState, Study
from node.pipeline.select import NOT_BEST, passed_over_for


def _ended_without_results() -> Exists:
    """SQL: the series' job of its current revision failed, or ended rejected and not for being passed over."""
    return exists(select(Job.id).where(
        Job.series_id == Series.id, Job.revision == Series.revision,
        or_(Job.state == JobState.failed,
            and_(Job.state == JobState.rejected, or_(Job.error.is_(None), ~Job.error.startswith(NOT_BEST))))))


def _gave_no_results(state: JobState, reason: str | None) -> bool:
    """The outcome ``_ended_without_results`` finds, for one job's state and reason."""
    return state == JobState.failed or (state == JobState.rejected and passed_over_for(reason) is None)


def candidate_files(sessions: sessionmaker[Session], series_id: int) -> list[tuple[str, list[Path]]]:
    """The other complete modality series of the study that may still be analysed (none refused by its checks or
    failed), each as its SeriesInstanceUID and files."""
    with sessions() as s:
        series = s.get(Series, series_id)
        assert series is not None
        siblings = s.execute(
            select(Series.id, Series.series_instance_uid).where(
                Series.study_id == series.study_id,
                Series.id != series_id,
                Series.state == SeriesState.complete,
                Series.origin == SeriesOrigin.modality,
                Series.purged_at.is_(None),
                ~_ended_without_results(),
            )
        ).all()
        return [
            (uid, [Path(p) for p in s.scalars(select(Instance.path).where(Instance.series_id == sid,
                                                                          Instance.purged_at.is_(None)))])
            for sid, uid in siblings
        ]


def _lock_study(s: Session, series_id: int) -> int:
    """Lock the study's row for the rest of the transaction and return its id: a job refused (or failed) and a
    sibling passed over for it, recorded by two workers at once, then see each other's outcome (PostgreSQL; SQLite
    runs one writing transaction at a time)."""
    study_id = s.scalar(select(Series.study_id).where(Series.id == series_id))
    assert study_id is not None
    s.execute(select(Study.id).where(Study.id == study_id).with_for_update())
    return study_id


def _passed_over_for(s: Session, study_id: int, series_uid: str) -> list[Job]:
    """The study's jobs of current revisions that ended passed over for ``series_uid``, whose images the spool still
    holds (their series rows locked, as retention locks them: a series retention deleted has nothing to analyse)."""
    rejected = s.scalars(select(Job).join(Series, Series.id == Job.series_id).where(
        Series.study_id == study_id, Job.revision == Series.revision, Job.state == JobState.rejected,
        Series.purged_at.is_(None), Job.error.startswith(NOT_BEST)).with_for_update()).all()
    return [job for job in rejected if passed_over_for(job.error) == series_uid]


def requeue_passed_over(s: Session, *, series_id: int, state: JobState, reason: str | None) -> list[int]:
    """In the caller's transaction, which records ``series_id``'s job as refused by its checks or failed (``state``,
    ``reason``): the jobs passed over for it go back to the queue. Returns their ids."""
    study_id = _lock_study(s, series_id)
    uid = s.scalar(select(Series.series_instance_uid).where(Series.id == series_id))
    assert uid is not None
    jobs = _passed_over_for(s, study_id, uid)
    for job in jobs:
        _requeue(s, job, preferred_uid=uid, state=state, reason=reason)
    return [job.id for job in jobs]


def requeue_if_preferred_ended(s: Session, *, job_id: int, preferred_uid: str) -> bool:
    """In the transaction that records ``job_id`` as passed over for ``preferred_uid``: when that series has been
    refused by its checks or has failed meanwhile (in another worker, while this one chose), this job goes back to
    the queue; True if it did. Without this, both outcomes recorded at once would leave the study with no analysis;
    in the same transaction, no stop between the two can leave it so either."""
    job = s.get(Job, job_id)
    assert job is not None
    study_id = _lock_study(s, job.series_id)
    held = s.scalar(select(Series.id).where(Series.id == job.series_id, Series.purged_at.is_(None))
                    .with_for_update())
    if held is None or job.state != JobState.rejected or passed_over_for(job.error) != preferred_uid:
        return False
    preferred = s.execute(select(Job.state, Job.error).join(Series, Series.id == Job.series_id).where(
        Series.study_id == study_id, Series.series_instance_uid == preferred_uid,
        Job.revision == Series.revision)).first()
    if preferred is None or not _gave_no_results(preferred.state, preferred.error):
        return False
    _requeue(s, job, preferred_uid=preferred_uid, state=preferred.state, reason=preferred.error)
    return True


def ended_as(state: JobState) -> str:
    """How a series that gave no results ended, in words: "failed" or "was refused by its checks"."""
    return "failed" if state == JobState.failed else "was refused by its checks"


def requeued_because(state: JobState) -> str:
    """Why a passed-over job went back to the queue, in words for its job_requeued log line (no patient data)."""
    return f"the series preferred to it {ended_as(state)}"


def _requeue(s: Session, job: Job, *, preferred_uid: str, state: JobState, reason: str | None) -> None:
    """Queue a job passed over for ``preferred_uid`` again, its event saying how that series ended and why."""
    requeue_finished(s, job, by=requeued_because(state),
                     why=f"series {preferred_uid}, preferred to this one, {ended_as(state)} ({reason}): the choice "
                         "is made again without it")
