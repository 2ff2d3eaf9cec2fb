"""The ledger: what arrived, how it was grouped, and every job and event since.

The schema is owned by the Alembic migrations in node/db/migrations; these classes must match
them (a test compares the two).
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Stored as naive UTC (same on SQLite and PostgreSQL), always returned timezone-aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the ledger; use node.db.models.utcnow()")
        return value.astimezone(dt.timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        return None if value is None else value.replace(tzinfo=dt.timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dt.datetime: UTCDateTime(), dict[str, Any]: JSON}


class SeriesState(str, enum.Enum):
    receiving = "receiving"  # instances are arriving; the current revision is open
    complete = "complete"  # the current revision is closed; a job exists if it is analysable


class SeriesOrigin(str, enum.Enum):
    modality = "modality"  # images from a scanner/PACS: candidates for analysis
    own_output = "own_output"  # our SEG/SR/key image coming back from the PACS: never analysed
    other = "other"  # a storage class we keep but do not analyse


class AssociationState(str, enum.Enum):
    open = "open"
    released = "released"
    aborted = "aborted"  # aborted by the peer, or cut by a node restart


class JobState(str, enum.Enum):
    queued = "queued"
    running = "running"
    done = "done"
    rejected = "rejected"  # refused by selection/QA, with a recorded reason
    failed = "failed"
    # A newer revision of its series arrived before its results went out: that revision's job answers for the
    # series (it reads every instance), so this one's results stay in the spool and are not sent.
    superseded = "superseded"


def _enum(e: type[enum.Enum], name: str) -> Enum:
    return Enum(e, name=name, native_enum=False, length=16, validate_strings=True)


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    # Header values are stored cut to these lengths: non-conformant senders exceed the VR limits
    # (e.g. "2020.01.01" dates), and PostgreSQL would refuse the row.
    accession_number: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    origin: Mapped[SeriesOrigin] = mapped_column(_enum(SeriesOrigin, "series_origin"))
    state: Mapped[SeriesState] = mapped_column(_enum(SeriesState, "series_state"))
    revision: Mapped[int] = mapped_column(Integer, default=1)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[dt.datetime | None]
    purged_at: Mapped[dt.datetime | None]  # received images deleted by the retention rule
    note: Mapped[str | None] = mapped_column(Text)
    study: Mapped[Study] = relationship(back_populates="series")
    # by study: every poll's study_settling; by last image: status' newest series (migration 0008)
    __table_args__ = (Index("ix_series_state", "state"), Index("ix_series_study", "study_id"),
                      Index("ix_series_last_received", "last_received_at"))


class Association(Base):
    __tablename__ = "associations"
    id: Mapped[int] = mapped_column(primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    called_ae: Mapped[str] = mapped_column(String(16))
    peer_host: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int] = mapped_column(Integer)
    state: Mapped[AssociationState] = mapped_column(_enum(AssociationState, "association_state"))
    opened_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    closed_at: Mapped[dt.datetime | None]
    instances_received: Mapped[int] = mapped_column(Integer, default=0)
    # The most urgent C-STORE Priority of its requests (node.receive.priority levels); null: MEDIUM
    priority: Mapped[int | None] = mapped_column(Integer)
    __table_args__ = (Index("ix_associations_state", "state"),)


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"))
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    revision: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # Its file deleted by the retention rule; cleared when the instance is received again (the row is its history).
    purged_at: Mapped[dt.datetime | None]
    __table_args__ = (Index("ix_instances_series_revision", "series_id", "revision"),)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"))
    revision: Mapped[int] = mapped_column(Integer)
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    heartbeat_at: Mapped[dt.datetime | None]
    worker: Mapped[str | None] = mapped_column(String(128))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # 1 high, 0 medium, -1 low
    error: Mapped[str | None] = mapped_column(Text)
    timings: Mapped[dict[str, Any] | None]
    series: Mapped[Series] = relationship()
    __table_args__ = (
        UniqueConstraint("series_id", "revision", name="uq_jobs_series_revision"),
        Index("ix_jobs_state", "state"),
    )


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(64))
    level: Mapped[str] = mapped_column(String(8), default="info")
    series_id: Mapped[int | None] = mapped_column(ForeignKey("series.id"))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None]
    # by kind: status' latest analysis state (migration 0009)
    __table_args__ = (Index("ix_events_at", "at"), Index("ix_events_job_kind", "job_id", "kind"),
                      Index("ix_events_kind", "kind", "id"))


class SendState(str, enum.Enum):
    pending = "pending"  # waiting for its (next) attempt at next_attempt_at
    sending = "sending"  # claimed by the sender; back to pending at start if the node stopped meanwhile
    sent = "sent"  # C-STORE answered success or warning (last_status); final unless storage commitment is asked
    committed = "committed"  # the destination confirmed storage commitment: delivered
    failed = "failed"  # gave up after sending.max_attempts or a permanent refusal; `lungnode retry` requeues
    superseded = "superseded"  # not sent: a newer revision of the series arrived first (its job sends its own)


#: The outbox kind of an IOCM rejection note (``node.send.rejections``); the others are the OutputKinds.
REJECTION_NOTE = "rejection"


class OutboxItem(Base):
    """One result object to deliver to one destination (the sender's queue and its record)."""

    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    destination: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(String(1024))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))  # the object's series (null before 0005)
    # The row (kind "rejection") of the IOCM rejection note that withdrew this object from its destination, once a
    # later analysis of the series replaced it (destinations with reject_replaced)
    rejected_by: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[SendState] = mapped_column(_enum(SendState, "send_state"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_status: Mapped[int | None] = mapped_column(Integer)  # DIMSE status of the last C-STORE, e.g. 0xB000
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_at: Mapped[dt.datetime | None]  # when last_error happened (null before 0007)
    commitment_uid: Mapped[str | None] = mapped_column(String(64))  # Transaction UID of the pending N-ACTION
    commitment_requested_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[dt.datetime | None]
    committed_at: Mapped[dt.datetime | None]
    __table_args__ = (
        UniqueConstraint("destination", "sop_instance_uid", name="uq_outbox_destination_sop"),
        Index("ix_outbox_state_due", "state", "next_attempt_at"),
        Index("ix_outbox_job", "job_id"),
        Index("ix_outbox_commitment", "commitment_uid"),
    )


class WorkerRecord(Base):
    """An analysis worker process as it last reported itself. A queue that only grows tells IT late that no worker
    runs (all crashed, a remote machine down); ``lungnode status`` and the metrics say it at once, and on which
    device each worker runs the models."""

    __tablename__ = "workers"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)  # machine:pid, as on its jobs
    version: Mapped[str] = mapped_column(String(32))
    provider: Mapped[str | None] = mapped_column(String(64))  # onnxruntime's provider of its models
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    seen_at: Mapped[dt.datetime] = mapped_column(default=utcnow)  # alive while within workers.lease_s
    job_id: Mapped[int | None] = mapped_column(Integer)  # the job it runs; None when idle
    stopped_at: Mapped[dt.datetime | None]  # a clean stop; a crash leaves it None and seen_at ageing
