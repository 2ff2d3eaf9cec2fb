"""The SR a new SR names as its predecessor: that of the series' previous revision, or the one a job published
before it was analysed again."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import ColumnElement, Select, exists, or_, select
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import Job, JobState, OutboxItem, SendState, Series, Study
from node.outputs.sr import predecessor_reference
from node.outputs.write import predecessor_from, read_manifest

#: Finished jobs whose SR (results, a refusal or a failure) may have gone out; superseded ones never send theirs.
_FINISHED_WITH_SR = (JobState.done, JobState.rejected, JobState.failed)


def previous_sr(sessions: sessionmaker[Session], *, series_id: int, revision: int,
                results_dir: Callable[[int], Path], job_id: int | None = None) -> Dataset | None:
    """The SR published for the newest earlier revision of the series that has one (None: first SR); with
    ``job_id``, first the SR that job published before it was analysed again (``lungnode reanalyse``).

    Only an SR the destinations received can be a predecessor: that of a finished job (its results, or the SR
    saying why it was refused or failed) whose SR went out to at least one destination, or, with no destination
    configured (no outbox row), the one in its results folder. The reference comes from the ledger's outbox row,
    so an SR whose files retention deleted is still named. A superseded or still running job's SR, or one that
    was never delivered, is nobody's predecessor."""
    if job_id is not None and (own := _published_before(sessions, job_id, results_dir(job_id))) is not None:
        return own
    with sessions() as s:
        earlier = s.scalars(
            select(Job.id).where(Job.series_id == series_id, Job.revision < revision,
                                 Job.state.in_(_FINISHED_WITH_SR)).order_by(Job.revision.desc(), Job.id.desc())
        ).all()
        for earlier_id in earlier:
            row = s.execute(_sr_rows(earlier_id, delivered=True).order_by(OutboxItem.id.desc()).limit(1)).first()
            if row is not None and row.series_instance_uid is not None:
                return predecessor_reference(study_uid=row.study_instance_uid, series_uid=row.series_instance_uid,
                                             sop_class_uid=row.sop_class_uid, sop_instance_uid=row.sop_instance_uid)
            # No destination (no row), or delivered by a row from before migration 0005, which does not record the
            # SR's series: the SR in the job's results folder, while it is there.
            if row is not None or s.execute(_sr_rows(earlier_id, delivered=False).limit(1)).first() is None:
                local = predecessor_from(results_dir(earlier_id))
                if local is not None:
                    return local
    return None


def _sr_rows(job_id: int, *, delivered: bool) -> Select[str, str, str | None, str]:
    """The job's SR outbox rows (only those a destination received, with ``delivered``), with the SR's study."""
    query = (select(OutboxItem.sop_instance_uid, OutboxItem.sop_class_uid, OutboxItem.series_instance_uid,
                    Study.study_instance_uid)
             .join(Job, OutboxItem.job_id == Job.id).join(Series, Job.series_id == Series.id)
             .join(Study, Series.study_id == Study.id)
             .where(OutboxItem.job_id == job_id, OutboxItem.kind == "sr"))
    return query.where(OutboxItem.state.in_([SendState.sent, SendState.committed])) if delivered else query


def _published(job_id: Any, sop_instance_uid: str | None = None) -> ColumnElement[bool]:
    """The job's SR (that one, with ``sop_instance_uid``) reached a destination, or the job has no SR to send."""
    rows = select(OutboxItem.id).where(OutboxItem.job_id == job_id, OutboxItem.kind == "sr")
    delivered = rows.where(OutboxItem.state.in_([SendState.sent, SendState.committed]))
    if sop_instance_uid is not None:
        delivered = delivered.where(OutboxItem.sop_instance_uid == sop_instance_uid)
    return or_(~exists(rows), exists(delivered))


def _published_before(sessions: sessionmaker[Session], job_id: int, out: Path) -> Dataset | None:
    """The SR a job published before it was analysed again: its last SR if that was delivered (or there is no
    destination), else the SR that one named, which it would have replaced."""
    own = predecessor_from(out)
    if own is None:
        return None
    with sessions() as s:
        if s.scalar(select(_published(job_id, str(own.SOPInstanceUID)))):
            return own
    sr = next((out / o.file for o in read_manifest(out) if o.kind == "sr"), None)
    try:
        named = dcmread(sr, stop_before_pixels=True).get("PredecessorDocumentsSequence") if sr else None
    except (OSError, InvalidDicomError):
        return None
    if not named:
        return None
    study = named[0]
    series = study.ReferencedSeriesSequence[0]
    ref = series.ReferencedSOPSequence[0]
    return predecessor_reference(study_uid=study.StudyInstanceUID, series_uid=series.SeriesInstanceUID,
                                 sop_class_uid=ref.ReferencedSOPClassUID, sop_instance_uid=ref.ReferencedSOPInstanceUID)
