"""A series the PACS sends again after retention deleted its images (real SQLite ledger, real spool files): the
instances that come back are stored again, the series opens a new revision whose job reads only them, and the
ones that did not come back stay recorded as deleted, not mistaken for lost acknowledged images."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.config import AssemblySettings
from node.db.ingest import IngestLedger, Outcome, Recorded
from node.db.jobs import Claimed, requeue_for_reanalysis
from node.db.models import Event, Instance, Job, JobState, Series, SeriesState, utcnow
from node.errors import LungnodeError
from node.pipeline.worker import _series_files
from node.receive.assembler import Assembler
from node.receive.inspect import inspect_instance
from node.receive.reconcile import reconcile
from node.receive.retention import purge_expired
from node.receive.spool import Spool
from tests.helpers.series import make_ct_dataset

LATER = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", min_free_bytes=0)


@pytest.fixture
def assembler(sessions: sessionmaker[Session]) -> Assembler:
    return Assembler(AssemblySettings(quiet_period_s=5, release_grace_s=1), sessions)


class Pacs:
    """One series of three slices as the PACS holds it: any of them can be written to the spool and recorded, as
    the SCP does, any number of times."""

    def __init__(self) -> None:
        study, series = generate_uid(), generate_uid()
        self.series_uid = series
        self.slices = [make_ct_dataset(study_uid=study, series_uid=series, index=i, matrix=16) for i in range(3)]

    def write(self, spool: Spool, i: int) -> Path:
        ds = self.slices[i]
        path = spool.path_for(self.series_uid, ds.SOPInstanceUID)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        return path

    def send(self, spool: Spool, ledger: IngestLedger, i: int) -> Recorded:
        path = self.write(spool, i)
        header = inspect_instance(path, sop_class_uid="", sop_instance_uid=path.stem, check_request=False)
        return ledger.record_instance(header, path=path, size_bytes=path.stat().st_size, association_id=None,
                                      own_output=False)


def series_row(sessions: sessionmaker[Session]) -> Series:
    with sessions() as s:
        row = s.scalar(select(Series))
        assert row is not None
        return row


def jobs(sessions: sessionmaker[Session]) -> list[tuple[int, JobState]]:
    with sessions() as s:
        return [(j.revision, j.state) for j in s.scalars(select(Job).order_by(Job.id))]


def analysed(pacs: Pacs, spool: Spool, ledger: IngestLedger, sessions: sessionmaker[Session], assembler: Assembler,
             *, slices: int = 3) -> int:
    """The first ``slices`` slices received and revision 1 analysed (its job done); returns that job's id."""
    for i in range(slices):
        assert pacs.send(spool, ledger, i).outcome == Outcome.stored
    assert assembler.complete_due(now=LATER) == 1
    with sessions.begin() as s:
        job = s.scalars(select(Job)).one()
        job.state = JobState.done
        return int(job.id)


def analysed_then_purged(pacs: Pacs, spool: Spool, ledger: IngestLedger, sessions: sessionmaker[Session],
                         assembler: Assembler) -> int:
    """All three slices received, revision 1 analysed, then deleted by retention; returns revision 1's job id."""
    job_id = analysed(pacs, spool, ledger, sessions, assembler)
    assert purge_expired(spool, sessions, days=7, now=utcnow() + dt.timedelta(days=8)) == 1
    assert not list(spool.instances.rglob("*.dcm"))
    with sessions() as s:
        assert all(i.purged_at is not None for i in s.scalars(select(Instance)))
    return job_id


def test_images_sent_again_are_stored_and_only_they_are_analysed_as_a_new_revision(
        spool: Spool, ledger: IngestLedger, sessions: sessionmaker[Session], assembler: Assembler) -> None:
    pacs = Pacs()
    job1 = analysed_then_purged(pacs, spool, ledger, sessions, assembler)
    with pytest.raises(LungnodeError, match="send the series from the PACS again"):
        requeue_for_reanalysis(sessions, job1)

    first = pacs.send(spool, ledger, 0)
    assert (first.outcome, first.restored, first.new_revision, first.revision) == (Outcome.stored, True, True, 2)
    second = pacs.send(spool, ledger, 2)
    assert (second.outcome, second.restored, second.new_revision, second.revision) == (Outcome.stored, True, False, 2)
    again = pacs.send(spool, ledger, 2)  # the same image a third time: held now, so a plain duplicate
    assert (again.outcome, again.restored) == (Outcome.duplicate, False)

    row = series_row(sessions)
    assert (row.state, row.revision, row.purged_at, row.instance_count) == (SeriesState.receiving, 2, None, 3)
    assert assembler.complete_due(now=LATER + dt.timedelta(hours=1)) == 1
    assert jobs(sessions) == [(1, JobState.done), (2, JobState.queued)]
    with sessions() as s:
        job2 = s.scalars(select(Job).where(Job.revision == 2)).one()
        kinds = list(s.scalars(select(Event.kind).order_by(Event.id)))
        held = {i.sop_instance_uid: i.purged_at is None for i in s.scalars(select(Instance))}
    assert "series_restored" in kinds and "series_revision_opened" not in kinds
    assert held == {pacs.slices[0].SOPInstanceUID: True, pacs.slices[1].SOPInstanceUID: False,
                    pacs.slices[2].SOPInstanceUID: True}
    _, paths = _series_files(sessions, Claimed(job_id=job2.id, series_id=job2.series_id, revision=2, attempt=1))
    assert sorted(paths) == sorted(spool.path_for(pacs.series_uid, pacs.slices[i].SOPInstanceUID) for i in (0, 2))
    assert all(p.is_file() for p in paths)

    # A restart: the row of the slice that did not come back is history, not an acknowledged image gone missing.
    report = reconcile(spool, ledger, sessions)
    assert (report.rows_without_file, report.adopted) == (0, 0)
    with sessions() as s:
        assert len(list(s.scalars(select(Instance)))) == 3


def test_a_copy_sent_again_that_cannot_be_kept_leaves_the_series_as_retention_left_it(
        spool: Spool, ledger: IngestLedger, sessions: sessionmaker[Session], assembler: Assembler) -> None:
    pacs = Pacs()
    analysed_then_purged(pacs, spool, ledger, sessions, assembler)
    restored = pacs.send(spool, ledger, 1)
    assert restored.restored
    # the file's fsync failed: the SCP answers 0xA700, deletes the file and undoes the row
    spool.path_for(pacs.series_uid, pacs.slices[1].SOPInstanceUID).unlink()
    ledger.forget_instance(pacs.slices[1].SOPInstanceUID, restored=True)
    with sessions() as s:
        assert len(list(s.scalars(select(Instance)))) == 3, "the instance's history stays"
    assert assembler.complete_due(now=LATER + dt.timedelta(hours=1)) == 0
    row = series_row(sessions)
    assert (row.state, row.revision, row.instance_count) == (SeriesState.complete, 1, 3)
    assert row.purged_at is not None, "nothing is held again: still purged, so reanalysis says what to do"
    assert jobs(sessions) == [(1, JobState.done)]


def test_a_copy_sent_again_whose_row_a_crash_left_unwritten_is_adopted_at_start(
        spool: Spool, ledger: IngestLedger, sessions: sessionmaker[Session], assembler: Assembler) -> None:
    pacs = Pacs()
    analysed_then_purged(pacs, spool, ledger, sessions, assembler)
    pacs.write(spool, 1)  # linked into the spool, then the node died before the row was updated
    report = reconcile(spool, ledger, sessions)
    assert (report.adopted, report.rows_without_file) == (1, 0)
    row = series_row(sessions)
    assert (row.revision, row.purged_at) == (2, None)
    assert assembler.complete_due(now=LATER + dt.timedelta(hours=1)) == 1
    assert jobs(sessions) == [(1, JobState.done), (2, JobState.queued)]


def test_an_image_sent_while_retention_deletes_its_series_is_kept(
        spool: Spool, ledger: IngestLedger, sessions: sessionmaker[Session], assembler: Assembler,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The PACS sends a slice again just as retention deletes the series. The store waits for the deletion (the
    series' gate), then restores the slice as a new revision: acknowledged and kept, not deleted with the rest."""
    pacs = Pacs()
    analysed(pacs, spool, ledger, sessions, assembler)

    delete_files = spool.remove_files
    stored: list[Recorded] = []

    def store_like_the_scp() -> None:
        with spool.gate.storing(pacs.series_uid):
            stored.append(pacs.send(spool, ledger, 1))

    def remove_files_while_a_store_comes(paths: list[Path]) -> int:
        sender = threading.Thread(target=store_like_the_scp)
        sender.start()
        sender.join(1.0)  # without the gate the store would be done (and its file deleted below) by now
        removing_threads.append(sender)
        return delete_files(paths)

    removing_threads: list[threading.Thread] = []
    monkeypatch.setattr(spool, "remove_files", remove_files_while_a_store_comes)
    assert purge_expired(spool, sessions, days=7, now=utcnow() + dt.timedelta(days=8)) == 1
    removing_threads[0].join(10)
    assert not removing_threads[0].is_alive()

    assert stored and (stored[0].outcome, stored[0].restored, stored[0].revision) == (Outcome.stored, True, 2)
    kept = spool.path_for(pacs.series_uid, pacs.slices[1].SOPInstanceUID)
    assert kept.is_file(), "an acknowledged image was deleted"
    with sessions() as s:
        held = {i.sop_instance_uid: i.purged_at is None for i in s.scalars(select(Instance))}
    assert held[pacs.slices[1].SOPInstanceUID] and not held[pacs.slices[0].SOPInstanceUID]
    row = series_row(sessions)
    assert (row.state, row.revision, row.purged_at) == (SeriesState.receiving, 2, None)


def test_retention_leaves_a_series_that_an_image_reached_after_its_due_list(
        spool: Spool, ledger: IngestLedger, sessions: sessionmaker[Session], assembler: Assembler) -> None:
    """A store in flight when retention reaches the series: retention waits for it, checks again, and finds the
    series receiving a new revision, so it deletes nothing."""
    pacs = Pacs()
    analysed(pacs, spool, ledger, sessions, assembler, slices=2)
    in_flight, release = threading.Event(), threading.Event()

    def late_store() -> None:
        with spool.gate.storing(pacs.series_uid):
            in_flight.set()
            release.wait(10)
            pacs.send(spool, ledger, 2)  # a late slice: revision 2 opens

    sender = threading.Thread(target=late_store)
    sender.start()
    assert in_flight.wait(10)
    purged: list[int] = []
    retention = threading.Thread(target=lambda: purged.append(
        purge_expired(spool, sessions, days=7, now=utcnow() + dt.timedelta(days=8))))
    retention.start()
    retention.join(0.5)
    assert retention.is_alive(), "retention must wait for the store in flight"
    release.set()
    sender.join(10)
    retention.join(10)
    assert purged == [0]
    assert all(spool.path_for(pacs.series_uid, ds.SOPInstanceUID).is_file() for ds in pacs.slices)
    assert (series_row(sessions).state, series_row(sessions).revision) == (SeriesState.receiving, 2)


def test_files_a_stop_left_in_the_middle_of_retention_are_deleted_at_start(
        spool: Spool, ledger: IngestLedger, sessions: sessionmaker[Session], assembler: Assembler,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Retention marks the rows first, then deletes the files: after a stop between the two, start-up reconciliation
    finishes the deletion instead of taking the files for images sent again (which would analyse them again)."""
    pacs = Pacs()
    analysed(pacs, spool, ledger, sessions, assembler)

    def stopped(paths: list[Path]) -> int:
        raise KeyboardInterrupt("the node stopped here")

    monkeypatch.setattr(spool, "remove_files", stopped)
    with pytest.raises(KeyboardInterrupt):
        purge_expired(spool, sessions, days=7, now=utcnow() + dt.timedelta(days=8))
    monkeypatch.undo()
    assert len(list(spool.instances.rglob("*.dcm"))) == 3

    report = reconcile(spool, ledger, sessions)
    assert (report.purged, report.adopted, report.rows_without_file) == (3, 0, 0)
    assert not list(spool.instances.rglob("*.dcm")) and not (spool.instances / pacs.series_uid).exists()
    row = series_row(sessions)
    assert (row.state, row.revision) == (SeriesState.complete, 1) and row.purged_at is not None
    assert jobs(sessions) == [(1, JobState.done)]


def test_the_listener_stores_an_image_only_while_retention_is_not_deleting_its_series(
        spool: Spool, ledger: IngestLedger, port: int, tmp_path: Path) -> None:
    """The real C-STORE path takes the series' gate: while retention holds it, the answer waits."""
    from node.config import DicomSettings
    from node.receive.scp import StorageSCP
    from tests.helpers.scu import store_status

    pacs = Pacs()
    path = tmp_path / "slice.dcm"
    pacs.slices[0].save_as(path, enforce_file_format=True)
    scp = StorageSCP(DicomSettings(bind_address="127.0.0.1", port=port), spool=spool, ledger=ledger)
    scp.start()
    try:
        answers: list[int | None] = []
        with spool.gate.deleting(pacs.series_uid, timeout_s=1) as held:
            assert held
            sender = threading.Thread(target=lambda: answers.append(store_status(port, path)))
            sender.start()
            sender.join(1.5)
            assert sender.is_alive() and not answers, "stored while retention was deleting the series"
        sender.join(30)
        assert answers == [0x0000]
        assert spool.path_for(pacs.series_uid, pacs.slices[0].SOPInstanceUID).is_file()
    finally:
        scp.stop()
