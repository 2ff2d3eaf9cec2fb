"""Decides when a series revision is complete and creates exactly one job for it.

A revision is complete when no instance arrived for ``quiet_period_s``, or sooner (after
``release_grace_s``) when every association that carried its instances was released normally.
An aborted association, or one cut by a restart, does not count as released: the sender may
come back with the rest, so the quiet period applies. The job's uniqueness on
(series, revision) makes a second completion of the same revision impossible.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from node.config import AssemblySettings
from node.db.jobs import restore_superseded
from node.db.models import (
    Association,
    AssociationState,
    Event,
    Instance,
    Job,
    JobState,
    Series,
    SeriesOrigin,
    SeriesState,
    utcnow,
)
from node.logs import LoopErrors, kv
from node.receive.inspect import ANALYSABLE_SOP_CLASSES
from node.receive.priority import priority_name, series_priority

log = logging.getLogger(__name__)


class Assembler:
    def __init__(self, settings: AssemblySettings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poke(self) -> None:
        """An association closed: look again now rather than at the next poll."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="assembler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        errors = LoopErrors(log, "assembler_error")
        while not self._stop.is_set():
            try:
                self.complete_due()
                errors.ok()
            except Exception as exc:  # keep assembling after a transient database error
                errors.failed(exc)
            self._wake.wait(self.settings.poll_interval_s)
            self._wake.clear()

    def due_series(self, now: dt.datetime | None = None) -> list[tuple[int, int, dt.datetime]]:
        """(id, revision, last_received_at) of series whose current revision is complete by the
        quiet-period or release rule, as seen now; ``_complete`` re-checks that nothing moved."""
        now = now or utcnow()
        quiet_before = now - dt.timedelta(seconds=self.settings.quiet_period_s)
        grace_before = now - dt.timedelta(seconds=self.settings.release_grace_s)
        not_released = (
            select(Instance.id)
            .outerjoin(Association, Instance.association_id == Association.id)
            .where(
                Instance.series_id == Series.id,
                Instance.revision == Series.revision,
                or_(Association.id.is_(None), Association.state != AssociationState.released),
            )
        )
        query = select(Series.id, Series.revision, Series.last_received_at).where(
            Series.state == SeriesState.receiving,
            or_(
                Series.last_received_at <= quiet_before,
                and_(Series.last_received_at <= grace_before, ~exists(not_released)),
            ),
        )
        with self.sessions() as s:
            return [(row[0], row[1], row[2]) for row in s.execute(query)]

    def complete_due(self, now: dt.datetime | None = None) -> int:
        done = 0
        for series_id, revision, last in self.due_series(now):
            if self._complete(series_id, revision, last):
                done += 1
        return done

    def _complete(self, series_id: int, revision: int, last_received_at: dt.datetime) -> bool:
        with self.sessions.begin() as s:
            series = s.get(Series, series_id, with_for_update=True)
            if (
                series is None
                or series.state != SeriesState.receiving
                or series.revision != revision
                or series.last_received_at != last_received_at
            ):
                return False  # completed elsewhere, or an instance arrived since it was found due
            present = s.scalar(
                select(func.count(Instance.id)).where(Instance.series_id == series.id, Instance.revision == series.revision,
                                                      Instance.purged_at.is_(None))
            )
            if not present:
                return self._close_empty_revision(s, series)
            series.state = SeriesState.complete
            series.completed_at = utcnow()
            if series.origin == SeriesOrigin.other and s.scalar(select(exists().where(
                    Instance.series_id == series.id, Instance.sop_class_uid.in_(ANALYSABLE_SOP_CLASSES)))):
                # The first instance (which set the origin) was not a CT image, but CT images came too: the
                # analysis decides, and refuses a mixed series with its reason, instead of it going unanalysed.
                series.origin = SeriesOrigin.modality
                series.note = "holds CT images although its first instance was not one"
            job_id: int | None = None
            level = 0
            if series.origin == SeriesOrigin.modality:
                level = series_priority(s, series, self.settings.priority_by_caller)
                job = Job(series_id=series.id, revision=series.revision, state=JobState.queued, priority=level)
                s.add(job)
                s.flush()
                job_id = job.id
                urgency = f" ({priority_name(level)} priority)" if level else ""
                message = (f"revision {series.revision} complete with {series.instance_count} instances: "
                           f"job queued{urgency}")
            else:
                message = f"revision {series.revision} complete with {series.instance_count} instances: not analysed ({series.note})"
            s.add(Event(kind="series_complete", series_id=series.id, job_id=job_id, message=message))
        log.info(kv("series_complete", series=series.series_instance_uid, revision=series.revision,
                    instances=series.instance_count, job=job_id, origin=series.origin.value,
                    priority=priority_name(level) if level else None))
        return True

    @staticmethod
    def _close_empty_revision(s: Session, series: Series) -> bool:
        """A revision whose only instances were never acknowledged (rows removed): no job for it.

        Revision 1 is closed as it is; a later one falls back to the previous, already analysed revision.
        """
        empty = series.revision
        if series.revision > 1:
            series.revision -= 1
            restore_superseded(s, series_id=series.id, revision=series.revision)
        series.state = SeriesState.complete
        series.completed_at = utcnow()
        if not s.scalar(select(exists().where(Instance.series_id == series.id, Instance.purged_at.is_(None)))):
            # A series that retention had emptied, whose images sent again were not acknowledged after all.
            series.purged_at = s.scalar(select(func.max(Instance.purged_at)).where(Instance.series_id == series.id))
        s.add(Event(kind="series_revision_empty", level="warning", series_id=series.id,
                    message=f"revision {empty} has no instances left (none was acknowledged): no job"))
        log.warning(kv("series_revision_empty", series=series.series_instance_uid, revision=empty))
        return False
