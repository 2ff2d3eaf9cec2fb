"""Recording what the SCP receives: associations, studies, series (with revisions) and instances.

Each call is one short transaction; the SCP answers success only after it committed. An instance whose file the
retention rule deleted is stored again when it is received again: its row is updated, and its series opens a new
revision, so the PACS can send a study again to have it analysed again.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from pydicom.uid import UID
from sqlalchemy import Engine, bindparam, func, insert, select, update
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from node.db.jobs import supersede_queued_jobs
from node.db.models import (
    Association,
    AssociationState,
    Event,
    Instance,
    Series,
    SeriesOrigin,
    SeriesState,
    Study,
    utcnow,
)
from node.errors import InstanceRejected
from node.logs import kv
from node.receive.inspect import ANALYSABLE_SOP_CLASSES, STATUS_CANNOT_PARSE, STATUS_OTHER_STUDY, InstanceHeader

log = logging.getLogger(__name__)


_TOUCH_OPEN_SERIES = (
    update(Series)
    .where(Series.id == bindparam("sid"), Series.state == SeriesState.receiving)
    .values(instance_count=Series.instance_count + 1, last_received_at=bindparam("now"))
    .returning(Series.revision)
)
_INSERT_INSTANCE = insert(Instance)


class Outcome(str, Enum):
    stored = "stored"
    duplicate = "duplicate"


@dataclass(frozen=True)
class Recorded:
    outcome: Outcome
    series_id: int
    revision: int
    new_revision: bool = False
    existing_path: str | None = None  # a duplicate: where the ledger already holds this instance
    existing_size: int | None = None  # ... and its size in bytes
    existing_transfer_syntax: str | None = None  # ... and the transfer syntax it was received in
    patient_id: str | None = None  # the study's PatientID as recorded
    restored: bool = False  # stored again: its row existed, its file had been deleted by retention


@dataclass(frozen=True)
class _KnownSeries:
    series_id: int
    study_uid: str
    patient_id: str | None


def origin_of(header: InstanceHeader, *, own_output: bool) -> SeriesOrigin:
    if own_output:
        return SeriesOrigin.own_output
    if header.sop_class_uid in ANALYSABLE_SOP_CLASSES:
        return SeriesOrigin.modality
    return SeriesOrigin.other


class IngestLedger:
    """Database side of the SCP. Thread-safe: every method opens its own session."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        # SeriesInstanceUID -> the series as first recorded: its id, and the study UID and PatientID a
        # later instance must agree with. None of them changes, so the cache can only be incomplete,
        # never wrong; it lets the common case (another instance of an open series) skip the
        # study/series lookups.
        self._series: dict[str, _KnownSeries] = {}
        self._cache_lock = threading.Lock()

    @property
    def _engine(self) -> Engine:
        """The sessions' engine, for the Core statements of the hot paths."""
        return self.sessions.kw["bind"]

    # -- associations -------------------------------------------------------------------------
    def open_association(self, *, calling_ae: str, called_ae: str, host: str, port: int) -> int:
        # Core, not the ORM: this runs once per association, inside its negotiation.
        with self._engine.begin() as conn:
            row_id = conn.execute(
                insert(Association)
                .values(calling_ae=calling_ae, called_ae=called_ae, peer_host=host, peer_port=port,
                        state=AssociationState.open)
                .returning(Association.id)
            ).scalar_one()
            return int(row_id)

    def note_priority(self, assoc_id: int, level: int) -> None:
        """The association's most urgent C-STORE Priority so far (``node.receive.priority`` level)."""
        with self._engine.begin() as conn:
            conn.execute(update(Association).where(Association.id == assoc_id).values(priority=level))

    def close_association(self, assoc_id: int, state: AssociationState) -> None:
        with self.sessions.begin() as s:
            received = select(func.count(Instance.id)).where(Instance.association_id == assoc_id).scalar_subquery()
            s.execute(
                update(Association)
                .where(Association.id == assoc_id, Association.state == AssociationState.open)
                .values(state=state, closed_at=utcnow(), instances_received=received)
            )

    def abort_open_associations(self) -> int:
        """At start-up: associations the previous process had open were cut by its end."""
        with self.sessions.begin() as s:
            result = s.execute(
                update(Association)
                .where(Association.state == AssociationState.open)
                .values(state=AssociationState.aborted, closed_at=utcnow())
            )
            return int(getattr(result, "rowcount", 0) or 0)

    # -- instances ----------------------------------------------------------------------------
    def forget_instance(self, sop_instance_uid: str, *, restored: bool = False) -> None:
        """Undo a row whose file could not be made durable (the instance was not acknowledged). A ``restored`` row
        is the instance's history: it stays, its file marked gone again."""
        with self.sessions.begin() as s:
            row = s.scalar(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid))
            if row is None:
                return
            if restored:
                row.purged_at = utcnow()
                return
            s.execute(update(Series).where(Series.id == row.series_id).values(instance_count=Series.instance_count - 1))
            s.delete(row)

    def known_paths(self) -> set[str]:
        """Paths of the instances whose files the spool holds (not those retention deleted)."""
        with self.sessions() as s:
            return set(s.scalars(select(Instance.path).where(Instance.purged_at.is_(None))))

    def purged_paths(self, paths: list[str]) -> dict[str, dt.datetime]:
        """Those of ``paths`` whose instances retention deleted (their rows stay, marked purged), with when. Asked
        for given paths only: the ledger keeps a purged row for every image it ever held."""
        found: dict[str, dt.datetime] = {}
        with self.sessions() as s:
            for i in range(0, len(paths), 500):
                found.update((path, at) for path, at in s.execute(
                    select(Instance.path, Instance.purged_at).where(Instance.path.in_(paths[i:i + 500]),
                                                                     Instance.purged_at.is_not(None)))
                    if at is not None)
        return found

    def record_instance(
        self,
        header: InstanceHeader,
        *,
        path: Path,
        size_bytes: int,
        association_id: int | None,
        own_output: bool,
        received_at: dt.datetime | None = None,
    ) -> Recorded:
        """Insert the instance, creating study/series or a new series revision as needed.

        A second insert of the same SOP Instance UID (a concurrent re-send) is a duplicate.
        """
        now = received_at or utcnow()
        known = self._series.get(header.series_instance_uid)
        if known is not None and known.study_uid != header.study_instance_uid:
            raise _other_study(header, patient=False)
        if known is not None and known.patient_id and header.patient_id and (
                known.patient_id != _cut(header.patient_id, 64)):
            raise _other_study(header, patient=True)
        series_id = known.series_id if known is not None else None
        if known is not None and not known.patient_id and header.patient_id:
            series_id = None  # the full path: the first instance that names the patient names it for the study
        for attempt in range(3):
            try:
                if series_id is not None:
                    fast = self._record_into_open_series(series_id, header, path, size_bytes, association_id, now)
                    if fast is not None:
                        return fast
                with self.sessions.begin() as s:
                    recorded = self._record(s, header, path, size_bytes, association_id, own_output, now)
                if recorded.outcome == Outcome.stored:  # a duplicate's series may be another series entirely
                    with self._cache_lock:
                        self._series[header.series_instance_uid] = _KnownSeries(
                            recorded.series_id, header.study_instance_uid, recorded.patient_id)
                return recorded
            except IntegrityError:
                # The same instance (a concurrent re-send), or its study/series, was inserted
                # concurrently: look again.
                with self.sessions() as s:
                    existing = s.scalar(select(Instance).where(Instance.sop_instance_uid == header.sop_instance_uid))
                    if existing is not None and existing.purged_at is None:
                        return _duplicate(s, existing, header)
                    if existing is not None:  # received again after retention: the full path restores it
                        series_id = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _record_into_open_series(
        self,
        series_id: int,
        h: InstanceHeader,
        path: Path,
        size_bytes: int,
        association_id: int | None,
        now: dt.datetime,
    ) -> Recorded | None:
        """Common case in two prebuilt statements: the series exists and its revision is open.

        Returns None when the series is complete (a late instance): the caller takes the full path.
        Core statements built once at import keep SQLAlchemy's per-call cost off the hot path.
        """
        with self._engine.begin() as conn:
            revision = conn.execute(_TOUCH_OPEN_SERIES, {"sid": series_id, "now": now}).scalar()
            if revision is None:
                return None
            conn.execute(
                _INSERT_INSTANCE,
                {
                    "series_id": series_id,
                    "association_id": association_id,
                    "sop_instance_uid": h.sop_instance_uid,
                    "sop_class_uid": h.sop_class_uid,
                    "transfer_syntax_uid": h.transfer_syntax_uid,
                    "instance_number": h.instance_number,
                    "revision": revision,
                    "path": str(path),
                    "size_bytes": size_bytes,
                    "received_at": now,
                },
            )
        return Recorded(Outcome.stored, series_id, revision)

    def _record(
        self,
        s: Session,
        h: InstanceHeader,
        path: Path,
        size_bytes: int,
        association_id: int | None,
        own_output: bool,
        now: dt.datetime,
    ) -> Recorded:
        existing = s.scalar(
            select(Instance).where(Instance.sop_instance_uid == h.sop_instance_uid).with_for_update())
        if existing is not None and existing.purged_at is None:
            return _duplicate(s, existing, h)
        if existing is not None:
            _same_study(s, existing, h)

        study = s.scalar(select(Study).where(Study.study_instance_uid == h.study_instance_uid).with_for_update())
        if study is None:
            study = Study(
                study_instance_uid=h.study_instance_uid,
                patient_id=_cut(h.patient_id, 64),
                accession_number=_cut(h.accession_number, 64),
                study_date=_cut(h.study_date, 16),
            )
            s.add(study)
            s.flush()

        if study.patient_id and h.patient_id and study.patient_id != _cut(h.patient_id, 64):
            raise _other_study(h, patient=True)
        if not study.patient_id and h.patient_id:
            # A study whose first images came without a PatientID takes the first one given: a later different one
            # is then another patient, refused as above, not mixed into the series.
            study.patient_id = _cut(h.patient_id, 64)
        series = s.scalar(select(Series).where(Series.series_instance_uid == h.series_instance_uid))
        if series is not None and series.study_id != study.id:
            raise _other_study(h, patient=False)
        new_revision = False
        opened = "series_revision_opened"  # or series_restored: what the new revision is
        superseded = 0
        if series is None:
            origin = origin_of(h, own_output=own_output)
            series = Series(
                study_id=study.id,
                series_instance_uid=h.series_instance_uid,
                modality=_cut(h.modality, 16),
                series_number=h.series_number,
                series_description=_cut(h.series_description, 64),
                origin=origin,
                state=SeriesState.receiving,
                revision=1,
                instance_count=0,
                first_received_at=now,
                last_received_at=now,
                note=_origin_note(origin, h),
            )
            s.add(series)
            s.flush()
            s.add(Event(kind="series_opened", series_id=series.id, association_id=association_id,
                        message=f"series opened ({origin.value})"))
        elif series.state == SeriesState.complete:
            series.revision += 1
            series.state = SeriesState.receiving
            series.completed_at = None
            new_revision = True
            message = f"late instance after completion opens revision {series.revision}"
            if series.purged_at is not None:  # its images had been deleted: those sent again are held again
                series.purged_at = None
                opened = "series_restored"
                message = (f"received again after retention deleted its images: revision {series.revision} opens "
                           "with the instances sent again")
            s.add(Event(kind=opened, series_id=series.id, association_id=association_id, message=message))
            superseded = supersede_queued_jobs(s, series_id=series.id, revision=series.revision, now=now)

        values = {"association_id": association_id, "sop_class_uid": h.sop_class_uid,
                  "transfer_syntax_uid": h.transfer_syntax_uid, "instance_number": h.instance_number,
                  "revision": series.revision, "path": str(path), "size_bytes": size_bytes, "received_at": now}
        if existing is None:
            s.add(Instance(series_id=series.id, sop_instance_uid=h.sop_instance_uid, **values))
            series.instance_count += 1
        else:  # its file was deleted by retention: this copy is the one held now
            if existing.series_id != series.id:  # the PACS has filed it in another series since
                s.execute(update(Series).where(Series.id == existing.series_id)
                          .values(instance_count=Series.instance_count - 1))
                series.instance_count += 1
                existing.series_id = series.id
            for key, value in values.items():
                setattr(existing, key, value)
            existing.purged_at = None
        series.last_received_at = now
        if new_revision:
            log.info(kv(opened, series=h.series_instance_uid, revision=series.revision,
                        jobs_superseded=superseded or None))
        return Recorded(Outcome.stored, series.id, series.revision, new_revision, patient_id=study.patient_id,
                        restored=existing is not None)


def _same_study(s: Session, existing: Instance, h: InstanceHeader, *, held: bool = False) -> None:
    """An instance known already must come for the same study and patient, and while its file is ``held``, for the
    same series. Otherwise it is not the same image but a UID collision (a faulty UID generator): refused, since
    acknowledging it would drop an image the sender thinks delivered, or file it with another patient's. (A purged
    instance may come back in another series: the PACS may have filed it there since.)"""
    study_uid, patient_id, series_uid = s.execute(
        select(Study.study_instance_uid, Study.patient_id, Series.series_instance_uid).join(Series).where(
            Series.id == existing.series_id)).one()
    if study_uid != h.study_instance_uid or (patient_id and h.patient_id and patient_id != _cut(h.patient_id, 64)):
        raise InstanceRejected(
            STATUS_OTHER_STUDY,
            f"SOP Instance UID {h.sop_instance_uid} is already known here for another study or PatientID: two "
            "different images with one UID (the sender's UIDs are not unique); refused, not acknowledged")
    if held and series_uid != h.series_instance_uid:
        raise InstanceRejected(
            STATUS_OTHER_STUDY,
            f"SOP Instance UID {h.sop_instance_uid} is already held here in another series of this study "
            f"({series_uid}): two different images with one UID (the sender's UIDs are not unique); refused, not "
            "acknowledged, so the sender's queue shows it")


def _duplicate(s: Session, existing: Instance, h: InstanceHeader) -> Recorded:
    """An instance held already (the same series'): acknowledged again, not stored again."""
    _same_study(s, existing, h, held=True)
    return Recorded(Outcome.duplicate, existing.series_id, existing.revision, existing_path=existing.path,
                    existing_size=existing.size_bytes, existing_transfer_syntax=existing.transfer_syntax_uid)


def _other_study(h: InstanceHeader, *, patient: bool) -> InstanceRejected:
    """Images of two patients or studies must never be analysed as one series: refuse, naming no patient.
    ``patient``: the study holds another PatientID (else: the series is held under another study)."""
    conflict = (f"study {h.study_instance_uid} already holds images with another PatientID" if patient else
                f"series {h.series_instance_uid} is already held here under another study")
    return InstanceRejected(STATUS_OTHER_STUDY, f"{conflict}; refused so that two patients' images are never "
                            "analysed together")


def unrecordable(exc: DataError) -> InstanceRejected:
    """The refusal of an instance whose header holds a value the database cannot store. The driver's own message
    quotes the row's values (patient data): only its class is named."""
    return InstanceRejected(STATUS_CANNOT_PARSE, f"a header value cannot be recorded: {type(exc.orig).__name__} "
                            "from the database")


def _cut(value: str | None, length: int) -> str | None:
    """A header value fitted to its column (the file in the spool keeps the original)."""
    return value[:length] if value else None


def _origin_note(origin: SeriesOrigin, h: InstanceHeader) -> str | None:
    if origin == SeriesOrigin.own_output:
        return "this node's own output returned by a peer: stored, never analysed"
    if origin == SeriesOrigin.other:
        name = UID(h.sop_class_uid).name  # pydicom's name, e.g. X-Ray Radiation Dose SR Storage; the UID when unknown
        named = f"{name} ({h.sop_class_uid})" if name != h.sop_class_uid else h.sop_class_uid
        return f"storage class {named} is stored but not analysed"
    return None
