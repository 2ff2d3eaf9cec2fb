"""Series assembly against a real SQLite ledger: the quiet-period and release rules, revisions,
and exactly one job per (series, revision). Times are passed explicitly, so nothing sleeps."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, SecondaryCaptureImageStorage, generate_uid
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.config import AssemblySettings
from node.db.ingest import IngestLedger, Outcome
from node.db.models import AssociationState, Event, Instance, Job, JobState, Series, SeriesState
from node.receive.assembler import Assembler
from node.receive.inspect import InstanceHeader
from tests.helpers.wait import wait_until

QUIET = 10.0
GRACE = 2.0
T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


@pytest.fixture
def assembler(sessions: sessionmaker[Session]) -> Assembler:
    return Assembler(AssemblySettings(quiet_period_s=QUIET, release_grace_s=GRACE, poll_interval_s=0.05), sessions)


class Sender:
    """Records instances of one series as the SCP would, at chosen times."""

    def __init__(self, ledger: IngestLedger, *, sop_class: str = CTImageStorage, manufacturer: str = "ACME") -> None:
        self.ledger = ledger
        self.study_uid = generate_uid()
        self.series_uid = generate_uid()
        self.sop_class = sop_class
        self.manufacturer = manufacturer
        self.n = 0

    def header(self, sop_uid: str | None = None) -> InstanceHeader:
        self.n += 1
        return InstanceHeader(
            sop_class_uid=self.sop_class, sop_instance_uid=sop_uid or generate_uid(),
            study_instance_uid=self.study_uid, series_instance_uid=self.series_uid,
            transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CT", series_number=2,
            series_description="chest", instance_number=self.n, patient_id="P1", accession_number="A1",
            study_date="20260101", manufacturer=self.manufacturer, software_versions=None,
        )

    def send(self, t: float, *, assoc: int | None = None, sop_uid: str | None = None, own_output: bool = False):
        h = self.header(sop_uid)
        return self.ledger.record_instance(h, path=Path(f"/spool/{h.sop_instance_uid}.dcm"), size_bytes=1000,
                                           association_id=assoc, own_output=own_output, received_at=at(t))


def open_assoc(ledger: IngestLedger) -> int:
    return ledger.open_association(calling_ae="PACS", called_ae="LUNGNODE", host="127.0.0.1", port=40000)


def series_row(sessions: sessionmaker[Session], uid: str) -> Series:
    with sessions() as s:
        row = s.scalar(select(Series).where(Series.series_instance_uid == uid))
        assert row is not None
        return row


def jobs_of(sessions: sessionmaker[Session], uid: str) -> list[tuple[int, JobState]]:
    with sessions() as s:
        rows = s.execute(select(Job.revision, Job.state).join(Series).where(Series.series_instance_uid == uid)
                         .order_by(Job.revision))
        return [(r[0], r[1]) for r in rows]


# -- quiet period ----------------------------------------------------------------------------------
def test_quiet_period_completes_a_series_with_an_open_association(ledger, assembler, sessions) -> None:
    a = open_assoc(ledger)
    s = Sender(ledger)
    for t in (0, 1, 2):
        assert s.send(t, assoc=a).outcome == Outcome.stored
    assert assembler.complete_due(now=at(2 + QUIET - 0.1)) == 0
    assert series_row(sessions, s.series_uid).state == SeriesState.receiving
    assert jobs_of(sessions, s.series_uid) == []
    assert assembler.complete_due(now=at(2 + QUIET)) == 1
    row = series_row(sessions, s.series_uid)
    assert (row.state, row.revision, row.instance_count) == (SeriesState.complete, 1, 3)
    assert row.completed_at is not None
    assert jobs_of(sessions, s.series_uid) == [(1, JobState.queued)]


def test_instances_adopted_without_association_wait_for_the_quiet_period(ledger, assembler, sessions) -> None:
    s = Sender(ledger)
    s.send(0, assoc=None)
    assert assembler.complete_due(now=at(GRACE + 1)) == 0
    assert assembler.complete_due(now=at(QUIET)) == 1
    assert jobs_of(sessions, s.series_uid) == [(1, JobState.queued)]


# -- release rule -----------------------------------------------------------------------------------
def test_release_completes_after_the_grace_period(ledger, assembler, sessions) -> None:
    a = open_assoc(ledger)
    s = Sender(ledger)
    for t in (0, 0.5, 1.0):
        s.send(t, assoc=a)
    assert assembler.complete_due(now=at(1.0 + GRACE)) == 0, "still open: no release yet"
    ledger.close_association(a, AssociationState.released)
    assert assembler.complete_due(now=at(1.0 + GRACE - 0.1)) == 0
    assert assembler.complete_due(now=at(1.0 + GRACE)) == 1
    assert jobs_of(sessions, s.series_uid) == [(1, JobState.queued)]


def test_aborted_association_waits_for_the_quiet_period(ledger, assembler, sessions) -> None:
    a = open_assoc(ledger)
    s = Sender(ledger)
    s.send(0, assoc=a)
    s.send(1, assoc=a)
    ledger.close_association(a, AssociationState.aborted)
    assert assembler.complete_due(now=at(1 + GRACE + 1)) == 0
    assert assembler.complete_due(now=at(1 + QUIET - 0.01)) == 0
    assert assembler.complete_due(now=at(1 + QUIET)) == 1
    assert jobs_of(sessions, s.series_uid) == [(1, JobState.queued)]


def test_every_carrying_association_must_be_released(ledger, assembler, sessions) -> None:
    a, b = open_assoc(ledger), open_assoc(ledger)
    s = Sender(ledger)
    s.send(0, assoc=a)
    s.send(1, assoc=b)
    ledger.close_association(a, AssociationState.released)
    assert assembler.complete_due(now=at(1 + GRACE + 1)) == 0, "association b is still open"
    ledger.close_association(b, AssociationState.released)
    assert assembler.complete_due(now=at(1 + GRACE + 1)) == 1


def test_close_association_records_the_count(ledger, sessions) -> None:
    from node.db.models import Association

    a = open_assoc(ledger)
    s = Sender(ledger)
    for t in range(4):
        s.send(t, assoc=a)
    ledger.close_association(a, AssociationState.released)
    ledger.close_association(a, AssociationState.aborted)  # a second close does not overwrite the first
    with sessions() as sess:
        row = sess.get(Association, a)
        assert row is not None
        assert (row.state, row.instances_received) == (AssociationState.released, 4)
        assert row.closed_at is not None


# -- revisions ----------------------------------------------------------------------------------------
def test_late_instance_opens_revision_two_and_a_second_job(ledger, assembler, sessions) -> None:
    a = open_assoc(ledger)
    s = Sender(ledger)
    for t in range(5):
        s.send(t, assoc=a)
    ledger.close_association(a, AssociationState.released)
    assert assembler.complete_due(now=at(4 + GRACE)) == 1

    b = open_assoc(ledger)
    late = s.send(100, assoc=b)
    assert (late.outcome, late.revision, late.new_revision) == (Outcome.stored, 2, True)
    row = series_row(sessions, s.series_uid)
    assert (row.state, row.revision, row.instance_count, row.completed_at) == (SeriesState.receiving, 2, 6, None)
    more = s.send(101, assoc=b)
    assert (more.revision, more.new_revision) == (2, False)
    assert assembler.complete_due(now=at(101 + GRACE)) == 0, "revision 2's association is still open"
    ledger.close_association(b, AssociationState.released)
    assert assembler.complete_due(now=at(101 + GRACE)) == 1
    # Revision 1's job had not started: it ends as superseded, so only revision 2 (all 7 instances) is analysed.
    assert jobs_of(sessions, s.series_uid) == [(1, JobState.superseded), (2, JobState.queued)]
    with sessions() as sess:
        revs = {r[0]: r[1] for r in sess.execute(select(Instance.revision, func.count()).group_by(Instance.revision))}
        assert revs == {1: 5, 2: 2}
        kinds = list(sess.scalars(select(Event.kind).order_by(Event.id)))
        assert kinds.count("series_complete") == 2
        assert "series_revision_opened" in kinds and kinds.count("job_superseded") == 1


def test_duplicate_after_completion_changes_nothing(ledger, assembler, sessions) -> None:
    s = Sender(ledger)
    first = generate_uid()
    s.send(0, sop_uid=first)
    assert assembler.complete_due(now=at(QUIET)) == 1
    dup = s.send(50, sop_uid=first)
    assert dup.outcome == Outcome.duplicate
    row = series_row(sessions, s.series_uid)
    assert (row.state, row.revision, row.instance_count) == (SeriesState.complete, 1, 1)
    assert assembler.complete_due(now=at(500)) == 0
    assert jobs_of(sessions, s.series_uid) == [(1, JobState.queued)]


def test_own_outputs_and_other_classes_complete_without_a_job(ledger, assembler, sessions) -> None:
    own = Sender(ledger, sop_class=SecondaryCaptureImageStorage, manufacturer="lungnode")
    own.send(0, own_output=True)
    other = Sender(ledger, sop_class=SecondaryCaptureImageStorage)
    other.send(0)
    ct = Sender(ledger)
    ct.send(0)
    assert assembler.complete_due(now=at(QUIET)) == 3
    assert series_row(sessions, own.series_uid).origin.value == "own_output"
    assert series_row(sessions, other.series_uid).origin.value == "other"
    assert jobs_of(sessions, own.series_uid) == []
    assert jobs_of(sessions, other.series_uid) == []
    assert jobs_of(sessions, ct.series_uid) == [(1, JobState.queued)]


# -- exactly one job ----------------------------------------------------------------------------------
def test_complete_due_twice_makes_one_job(ledger, assembler, sessions) -> None:
    s = Sender(ledger)
    s.send(0)
    assert assembler.complete_due(now=at(QUIET)) == 1
    assert assembler.complete_due(now=at(QUIET)) == 0
    assert assembler.complete_due(now=at(QUIET * 10)) == 0
    assert jobs_of(sessions, s.series_uid) == [(1, JobState.queued)]


def test_two_assemblers_racing_make_one_job_per_series(ledger, sessions) -> None:
    """Two assemblers (two threads, own sessions) complete the same 30 due series at the same moment."""
    settings = AssemblySettings(quiet_period_s=QUIET, release_grace_s=GRACE)
    senders = [Sender(ledger) for _ in range(30)]
    for s in senders:
        s.send(0)
    workers = [Assembler(settings, sessions), Assembler(settings, sessions)]
    barrier = threading.Barrier(len(workers))
    done: list[int] = []
    errors: list[BaseException] = []

    def run(a: Assembler) -> None:
        try:
            barrier.wait()
            done.append(a.complete_due(now=at(QUIET)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(a,)) for a in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sum(done) == 30
    with sessions() as sess:
        per_series = [(r[0], r[1]) for r in sess.execute(select(Job.series_id, func.count()).group_by(Job.series_id))]
    assert len(per_series) == 30
    assert all(n == 1 for _, n in per_series)


def test_stale_due_list_does_not_complete_a_new_revision(ledger, sessions, monkeypatch) -> None:
    """Assembler A computes its due list; assembler B (another process) completes the series first;
    a late instance opens revision 2; then A acts on its stale list."""
    settings = AssemblySettings(quiet_period_s=QUIET, release_grace_s=GRACE)
    a, b = Assembler(settings, sessions), Assembler(settings, sessions)
    s = Sender(ledger)
    s.send(0)
    stale = a.due_series(now=at(QUIET))
    assert len(stale) == 1
    assert b.complete_due(now=at(QUIET)) == 1
    assert s.send(QUIET + 1).new_revision
    monkeypatch.setattr(a, "due_series", lambda now=None: stale)
    a.complete_due(now=at(QUIET + 1))
    row = series_row(sessions, s.series_uid)
    assert (row.revision, row.state) == (2, SeriesState.receiving), "revision 2 got no quiet period"
    assert jobs_of(sessions, s.series_uid) == [(1, JobState.superseded)], "one job, for revision 1 only"


def test_background_thread_completes_and_stops(ledger, sessions) -> None:
    """The real loop: a poke after the release wakes the thread long before its 5 s poll interval."""
    asm = Assembler(AssemblySettings(quiet_period_s=30, release_grace_s=0, poll_interval_s=5), sessions)
    asm.start()
    try:
        a = open_assoc(ledger)
        s = Sender(ledger)
        s.send((dt.datetime.now(dt.timezone.utc) - T0).total_seconds(), assoc=a)
        ledger.close_association(a, AssociationState.released)
        asm.poke()
        wait_until(lambda: jobs_of(sessions, s.series_uid), timeout=3, what="the job")
        assert jobs_of(sessions, s.series_uid) == [(1, JobState.queued)]
    finally:
        asm.stop()
    assert asm._thread is not None and not asm._thread.is_alive()
