"""Retention on a real SQLite ledger and a real spool: a series' images go after ``received_days``, and its
jobs' results with them once nothing still needs the files (a send waiting, failed or awaiting commitment)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import (
    Event,
    Instance,
    Job,
    JobState,
    OutboxItem,
    SendState,
    Series,
    SeriesOrigin,
    SeriesState,
    Study,
    utcnow,
)
from node.errors import LungnodeError
from node.receive.retention import forget_identifiers, purge_expired
from node.receive.spool import Spool
from node.send.outbox import requeue_failed


def _series_with_job(sessions: sessionmaker[Session], spool: Spool, *, age_days: float, job_state: JobState,
                     sends: list[tuple[SendState, str | None]]) -> tuple[str, int]:
    """A complete series with one image on disk, one job with a result file, and outbox rows (state, commitment)."""
    uid = generate_uid()
    image = spool.path_for(uid, generate_uid())
    image.parent.mkdir(parents=True)
    image.write_bytes(b"image")
    with sessions.begin() as s:
        series = Series(study=Study(study_instance_uid=generate_uid()), series_instance_uid=uid, modality="CT",
                        origin=SeriesOrigin.modality, state=SeriesState.complete, revision=1, instance_count=1,
                        completed_at=utcnow() - dt.timedelta(days=age_days))
        s.add(series)
        s.flush()
        s.add(Instance(series_id=series.id, sop_instance_uid=image.stem, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                       transfer_syntax_uid="1.2.840.10008.1.2.1", revision=1, path=str(image), size_bytes=5))
        job = Job(series=series, revision=1, state=job_state)
        s.add(job)
        s.flush()
        job_id = int(job.id)
    result = spool.results_dir(job_id) / "sr.dcm"
    result.parent.mkdir(parents=True)
    result.write_bytes(b"sr")
    with sessions.begin() as s:
        for state, commitment in sends:
            s.add(OutboxItem(job_id=job_id, destination="pacs", kind="sr", path=str(result),
                             sop_instance_uid=generate_uid(), sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22",
                             transfer_syntax_uid="1.2.840.10008.1.2.1", state=state, commitment_uid=commitment))
    return uid, job_id


@pytest.fixture()
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", min_free_bytes=0)


def test_results_go_with_the_images_once_every_destination_has_them(sessions: sessionmaker[Session],
                                                                     spool: Spool) -> None:
    old, delivered = _series_with_job(sessions, spool, age_days=8, job_state=JobState.done,
                                      sends=[(SendState.committed, "1.2.3"), (SendState.sent, None)])
    _, waiting = _series_with_job(sessions, spool, age_days=8, job_state=JobState.done,
                                  sends=[(SendState.sent, None), (SendState.pending, None)])
    _, failed = _series_with_job(sessions, spool, age_days=8, job_state=JobState.done, sends=[(SendState.failed, None)])
    _, committing = _series_with_job(sessions, spool, age_days=8, job_state=JobState.done,
                                     sends=[(SendState.sent, "1.2.4")])
    young, recent = _series_with_job(sessions, spool, age_days=1, job_state=JobState.done, sends=[])

    assert purge_expired(spool, sessions, days=7) == 4
    assert not (spool.instances / old).exists() and (spool.instances / young).exists()
    assert not spool.results_dir(delivered).exists()
    for kept in (waiting, failed, committing, recent):  # a send still needs the files, or the series is young
        assert (spool.results_dir(kept) / "sr.dcm").is_file()
    with sessions() as s:
        assert s.scalars(select(Event.job_id).where(Event.kind == "results_purged")).all() == [delivered]

    with sessions.begin() as s:  # the waiting send went out: its results follow at the next pass
        for item in s.scalars(select(OutboxItem).where(OutboxItem.job_id == waiting)):
            item.state = SendState.sent
    assert purge_expired(spool, sessions, days=7) == 0
    assert not spool.results_dir(waiting).exists() and spool.results_dir(failed).exists()
    with sessions() as s:
        assert sorted(s.scalars(select(Event.job_id).where(Event.kind == "results_purged"))) == [delivered, waiting]


def test_resending_results_that_retention_deleted_says_so(sessions: sessionmaker[Session], spool: Spool) -> None:
    _, job_id = _series_with_job(sessions, spool, age_days=8, job_state=JobState.done, sends=[(SendState.sent, None)])
    purge_expired(spool, sessions, days=7)
    with pytest.raises(LungnodeError, match="deleted with its series' images by the retention rule"):
        requeue_failed(sessions, job_id=job_id, resend=True)
    with sessions() as s:
        assert s.scalars(select(OutboxItem.state).where(OutboxItem.job_id == job_id)).all() == [SendState.sent]


def test_a_running_job_keeps_its_series(sessions: sessionmaker[Session], spool: Spool) -> None:
    uid, job_id = _series_with_job(sessions, spool, age_days=30, job_state=JobState.running, sends=[])
    assert purge_expired(spool, sessions, days=7) == 0
    assert (spool.instances / uid).is_dir() and spool.results_dir(job_id).is_dir()
    assert purge_expired(spool, sessions, days=0) == 0  # 0 keeps everything


def test_patient_identifiers_go_some_days_after_the_last_image_of_their_study(sessions: sessionmaker[Session],
                                                                              spool: Spool) -> None:
    """retention.identifiers_days: once every image of a study is gone, the ledger's Patient ID and accession
    number follow after that many days; a study with any image still held keeps them (the node needs them to keep
    patients apart)."""
    gone, _ = _series_with_job(sessions, spool, age_days=8, job_state=JobState.done, sends=[])
    held, _ = _series_with_job(sessions, spool, age_days=1, job_state=JobState.done, sends=[])
    with sessions.begin() as s:
        for series in s.scalars(select(Series)):
            series.study.patient_id, series.study.accession_number = "P-1", "A-1"
    assert purge_expired(spool, sessions, days=7, identifiers_days=30) == 1

    def identifiers() -> dict[str, tuple[str | None, str | None]]:
        with sessions() as s:
            return {ser.series_instance_uid: (ser.study.patient_id, ser.study.accession_number)
                    for ser in s.scalars(select(Series))}
    assert identifiers() == {gone: ("P-1", "A-1"), held: ("P-1", "A-1")}, "the images went just now"
    later = utcnow() + dt.timedelta(days=31)
    assert forget_identifiers(sessions, days=30, now=later) == 1
    assert identifiers() == {gone: (None, None), held: ("P-1", "A-1")}
    assert forget_identifiers(sessions, days=30, now=later) == 0, "once"
    with sessions() as s:
        assert s.scalars(select(Event.kind).where(Event.kind == "identifiers_forgotten")).all() == \
            ["identifiers_forgotten"]
