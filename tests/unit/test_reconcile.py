"""Start-up reconciliation of spool and ledger after a crash (real SQLite, real spool folders)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.config import AssemblySettings
from node.db.ingest import IngestLedger
from node.db.models import Association, AssociationState, Instance, Job, JobState, Series, SeriesState
from node.receive.assembler import Assembler
from node.receive.inspect import inspect_instance
from node.receive.reconcile import reconcile
from node.receive.spool import Spool
from tests.helpers.series import make_ct_dataset

LATER = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", min_free_bytes=0)


class SpoolSeries:
    def __init__(self) -> None:
        self.study_uid, self.series_uid, self.n = generate_uid(), generate_uid(), 0

    def write(self, spool: Spool) -> Path:
        """A committed spool file (as after the link), no row yet."""
        ds = make_ct_dataset(study_uid=self.study_uid, series_uid=self.series_uid, index=self.n, matrix=16)
        self.n += 1
        path = spool.path_for(self.series_uid, ds.SOPInstanceUID)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        return path

    def record(self, spool: Spool, ledger: IngestLedger, *, with_file: bool = True, assoc: int | None = None) -> Path:
        path = self.write(spool)
        header = inspect_instance(path, sop_class_uid="", sop_instance_uid=path.stem, check_request=False)
        ledger.record_instance(header, path=path, size_bytes=path.stat().st_size, association_id=assoc, own_output=False)
        if not with_file:
            path.unlink()  # the row committed, the file never became durable (crash in between)
        return path


def count(sessions: sessionmaker[Session], model: type) -> int:
    with sessions() as s:
        return len(list(s.scalars(select(model))))


def test_partial_files_are_discarded_and_open_associations_aborted(spool, ledger, sessions) -> None:
    (spool.incoming / "123-1.part").write_bytes(b"half a dataset")
    (spool.incoming / "123-2.part").write_bytes(b"")
    a = ledger.open_association(calling_ae="PACS", called_ae="LUNGNODE", host="127.0.0.1", port=1)
    done = ledger.open_association(calling_ae="PACS", called_ae="LUNGNODE", host="127.0.0.1", port=2)
    ledger.close_association(done, AssociationState.released)
    reconcile(spool, ledger, sessions)
    assert list(spool.incoming.iterdir()) == []
    with sessions() as s:
        assert s.get(Association, a).state == AssociationState.aborted
        assert s.get(Association, done).state == AssociationState.released


def test_committed_file_without_row_is_adopted(spool, ledger, sessions) -> None:
    ser = SpoolSeries()
    recorded = ser.record(spool, ledger)
    orphan = ser.write(spool)  # linked into place, then the crash came before its row
    report = reconcile(spool, ledger, sessions)
    assert report.adopted == 1
    with sessions() as s:
        rows = {r.path: r for r in s.scalars(select(Instance))}
        assert set(rows) == {str(recorded), str(orphan)}
        assert rows[str(orphan)].association_id is None
        series = s.scalar(select(Series))
        assert series is not None and series.instance_count == 2
    assert reconcile(spool, ledger, sessions).adopted == 0, "a second start adopts nothing new"


def test_unreadable_committed_file_is_not_adopted(spool, ledger, sessions) -> None:
    bad = spool.path_for("1.2.3", "1.2.3.4")
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)
    report = reconcile(spool, ledger, sessions)
    assert (report.adopted, report.unreadable) == (0, 1)
    assert count(sessions, Instance) == 0
    assert not bad.exists(), "moved out of instances/"
    assert (spool.root / "quarantine" / "1.2.3" / "1.2.3.4.dcm").read_bytes().endswith(b"garbage")


def test_row_without_file_is_removed(spool, ledger, sessions) -> None:
    ser = SpoolSeries()
    kept = ser.record(spool, ledger)
    ser.record(spool, ledger, with_file=False)
    reconcile(spool, ledger, sessions)
    with sessions() as s:
        assert [r.path for r in s.scalars(select(Instance))] == [str(kept)]
        series = s.scalar(select(Series))
        assert series is not None and series.instance_count == 1


@pytest.mark.parametrize("undo", ["reconcile", "forget_instance"])
def test_unacknowledged_late_instance_does_not_leave_an_empty_revision(spool, ledger, sessions, undo) -> None:
    assembler = Assembler(AssemblySettings(quiet_period_s=5, release_grace_s=1), sessions)
    ser = SpoolSeries()
    for _ in range(3):
        ser.record(spool, ledger)
    assert assembler.complete_due(now=LATER) == 1
    late = ser.record(spool, ledger, with_file=(undo == "forget_instance"))
    with sessions() as s:
        assert s.scalar(select(Series.revision)) == 2
    if undo == "reconcile":
        reconcile(spool, ledger, sessions)
    else:
        late.unlink()  # the file could not be made durable: the SCP answers 0xA700 and undoes the row
        ledger.forget_instance(late.stem)
    with sessions() as s:  # the late image had superseded revision 1's queued job...
        assert [j.state for j in s.scalars(select(Job))] == [JobState.superseded]
    assembler.complete_due(now=LATER + dt.timedelta(hours=1))
    with sessions() as s:
        jobs = list(s.scalars(select(Job)))
        assert [j.revision for j in jobs] == [1], "a job for a revision without instances"
        # ...and revision 1 answers for the series again: its acknowledged images are analysed after all
        assert jobs[0].state == JobState.queued and jobs[0].error is None
        series = s.scalar(select(Series))
        assert series is not None and series.state == SeriesState.complete and series.instance_count == 3
