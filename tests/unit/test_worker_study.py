"""A worker among the series of one study, and a job that fails: real synthetic series on disk, a real SQLite ledger
(conftest's ``engine``, ``sessions`` and ``ledger``), tiny real ONNX models, ``Worker.run_one`` in process.

One series must not cost another its analysis (a bad header in a sibling, a preferred series that its checks then
refuse or whose job fails), the order images came in must not decide a verdict (a localizer first or in the middle), and a job that
fails records one readable line, leaving no staged folder behind.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from node.config import AssemblySettings, Config, InferenceSettings, SelectionSettings, StorageSettings, WorkerSettings
from node.db.ingest import IngestLedger
from node.db.models import Event, Job, Series, utcnow
from node.errors import one_line
from node.outputs.write import read_manifest
from node.pipeline.runner import Analysis
from node.pipeline.volume import QAFlag
from node.pipeline.worker import Worker, _series_header, results_dir
from node.receive.assembler import Assembler
from node.receive.inspect import inspect_instance
from tests.helpers.faults import Synth, phantom, synth_series
from tests.helpers.onnx_models import make_models_dir

MIN_SLICES = 10  # the small test series have fewer than the default 40


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_models_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture
def config(engine: Engine, tmp_path: Path, models: Path) -> Config:
    """The node's configuration on conftest's migrated ledger (tmp_path/ledger.sqlite)."""
    return Config(
        storage=StorageSettings(spool_dir=tmp_path / "spool", database_url=str(engine.url), min_free_disk_mb=0),
        inference=InferenceSettings(models_dir=models, device="cpu", threads=1),
        workers=WorkerSettings(lease_s=120.0, poll_interval_s=0.05, max_attempts=3),
        selection=SelectionSettings(min_slices=MIN_SLICES),
    )


@pytest.fixture
def worker(config: Config) -> Iterator[Worker]:
    w = Worker(config, name="w")
    yield w
    w.engine.dispose()


def receive(ledger: IngestLedger, files: list[Path]) -> None:
    """Record the files as the SCP does (header read from each real file), a minute ago: the study has settled."""
    received = utcnow() - dt.timedelta(minutes=1)
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        header = inspect_instance(path, sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
                                  check_request=False)
        ledger.record_instance(header, path=path, size_bytes=path.stat().st_size, association_id=None,
                               own_output=False, received_at=received)


def complete(sessions: sessionmaker[Session]) -> dict[str, int]:
    """Close every receiving series (quiet period over); SeriesInstanceUID -> its job's id."""
    Assembler(AssemblySettings(quiet_period_s=1.0, release_grace_s=0.0), sessions).complete_due(
        utcnow() + dt.timedelta(seconds=5))
    with sessions() as s:
        return {uid: job_id for uid, job_id in s.execute(
            select(Series.series_instance_uid, Job.id).join(Job, Job.series_id == Series.id))}


def job(sessions: sessionmaker[Session], job_id: int) -> Job:
    with sessions() as s:
        row = s.get(Job, job_id)
        assert row is not None
        return row


def events(sessions: sessionmaker[Session], job_id: int) -> list[tuple[str, str]]:
    with sessions() as s:
        return [(e.kind, e.message) for e in s.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id))]


def run_all(worker: Worker, most: int = 8) -> int:
    """Run jobs until the queue is empty; how many ran."""
    ran = 0
    while worker.run_one():
        ran += 1
        assert ran <= most, "the queue never empties"
    return ran


def chest(root: Path, name: str, study: str, *, series_number: int = 1, **spec: Any) -> Synth:
    spec = {"slices": 40, "matrix": 64, "seed": 5, **spec}
    return synth_series(root / "incoming" / name, phantom(**spec), study_instance_uid=study, series_number=series_number)


def plant(path: Path, element: bytes, replacement: bytes) -> None:
    raw = path.read_bytes()
    assert raw.count(element) == 1, element
    path.write_bytes(raw.replace(element, replacement))


# -- A: a sibling's bad header -----------------------------------------------------------------------------
def test_a_sibling_whose_header_cannot_be_read_does_not_fail_the_good_series(
        worker: Worker, ledger: IngestLedger, sessions: sessionmaker[Session], tmp_path: Path) -> None:
    """Both jobs failed with ``ValueError: invalid literal for int() with base 10: 'ab'``: the good series' job read
    its sibling's NumberOfFrames to choose between them."""
    study = pydicom.uid.generate_uid()
    bad, good = chest(tmp_path, "bad", study, series_number=2), chest(tmp_path, "good", study, series_number=3)
    for path in bad.files:
        ds = pydicom.dcmread(path)
        ds.NumberOfFrames = 1
        ds.save_as(path, enforce_file_format=True)
        plant(path, b"\x28\x00\x08\x00IS\x02\x001 ", b"\x28\x00\x08\x00IS\x02\x00ab")  # as dcmodify -i wrote it
    receive(ledger, bad.files)  # the bad one first: its job runs first, and the good one's reads its header
    receive(ledger, good.files)
    jobs = complete(sessions)
    assert run_all(worker) == 2
    good_job, bad_job = job(sessions, jobs[good.series_uid]), job(sessions, jobs[bad.series_uid])
    assert (good_job.state.value, good_job.error) == ("done", None)
    assert bad_job.state.value == "rejected"
    assert bad_job.error == "NumberOfFrames 'ab' is not a number of frames"


# -- B: an element pydicom cannot decode, and a job whose outputs cannot be written ---------------------------
def test_a_private_element_of_unknown_vr_does_not_stop_the_outputs(
        worker: Worker, config: Config, ledger: IngestLedger, sessions: sessionmaker[Session], tmp_path: Path) -> None:
    """(0009,1010) sent with the explicit VR 'ZZ': analysed, then the outputs failed with NotImplementedError (its
    recorded reason a multi-line traceback), nothing was published, and job-N.attempt-1/ stayed behind."""
    s = chest(tmp_path, "zz", pydicom.uid.generate_uid())
    for path in s.files:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 100"  # the outputs decode the source headers in it
        ds.add_new(0x00090010, "LO", "PRIVCREATOR")
        ds.add_new(0x00091010, "LO", "PRIVVAL1")
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        path.write_bytes(buffer.getvalue().replace(b"\x09\x00\x10\x10LO", b"\x09\x00\x10\x10ZZ", 1))
    receive(ledger, s.files)
    [job_id] = complete(sessions).values()
    assert run_all(worker) == 1
    row = job(sessions, job_id)
    assert (row.state.value, row.error) == ("done", None)
    out = results_dir(config, job_id)
    written = {o.kind for o in read_manifest(out)}
    assert {"seg", "sr"} <= written
    assert pydicom.dcmread(out / "sr.dcm").PatientID == pydicom.dcmread(s.files[0]).PatientID
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no staged attempt folder left


def test_a_job_whose_outputs_cannot_be_written_fails_in_one_line_and_leaves_no_staged_folder(
        worker: Worker, config: Config, ledger: IngestLedger, sessions: sessionmaker[Session], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The staged folder of an attempt that failed is no job's results: retention never deletes it."""
    s = chest(tmp_path, "blocked", pydicom.uid.generate_uid())
    receive(ledger, s.files)
    [job_id] = complete(sessions).values()
    staged = results_dir(config, job_id).with_name(f"job-{job_id}.attempt-1")
    (staged / "outputs.json").mkdir(parents=True)  # outputs.json cannot be written: a folder holds its name
    with caplog.at_level(logging.INFO):
        assert run_all(worker) == 1
    row = job(sessions, job_id)
    assert row.state.value == "failed" and row.error is not None
    assert row.error.startswith("IsADirectoryError: ") and "\n" not in row.error
    assert not staged.exists() and not results_dir(config, job_id).exists()
    [line] = [r.getMessage() for r in caplog.records if "event=job_error" in r.getMessage()]
    assert f"job={job_id}" in line and "Traceback (most recent call last)" in line and "write_outputs" in line


def test_a_failed_job_records_its_reason_and_logs_the_message_only_where_include_phi_allows(
        worker: Worker, ledger: IngestLedger, sessions: sessionmaker[Session], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """job_error and job_failed quoted the exception's message (it may quote a header value) where the analysis'
    own series_failed redacts it."""
    s = chest(tmp_path, "gone", pydicom.uid.generate_uid())
    receive(ledger, s.files)
    [job_id] = complete(sessions).values()
    for path in s.files:
        path.unlink()  # e.g. purged by hand while queued
    with caplog.at_level(logging.INFO):
        assert run_all(worker) == 1
    row = job(sessions, job_id)
    assert row.state.value == "failed" and row.error is not None
    assert row.error.startswith("FileNotFoundError: ") and str(s.folder) in row.error  # for the operator
    lines = [r.getMessage() for r in caplog.records if f"job={job_id}" in r.getMessage()]
    logged = [line for line in lines if "event=job_error" in line or "event=job_failed" in line]
    assert len(logged) == 2 and all("FileNotFoundError: [redacted]" in line for line in logged), logged
    assert not [line for line in lines if str(s.folder) in line]


def test_a_reason_is_one_line_even_where_the_library_wrote_a_traceback_into_its_message(tmp_path: Path) -> None:
    s = chest(tmp_path, "one", pydicom.uid.generate_uid())
    ds = pydicom.dcmread(s.files[0], stop_before_pixels=True)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.add_new(0x00090010, "LO", "PRIVCREATOR")
    ds.add_new(0x00091010, "LO", "PRIVVAL1")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    read = pydicom.dcmread(io.BytesIO(buffer.getvalue().replace(b"\x09\x00\x10\x10LO", b"\x09\x00\x10\x10ZZ", 1)))
    with pytest.raises(NotImplementedError) as info:
        read.decode()
    assert "Traceback" in str(info.value)  # pydicom's message holds one
    assert one_line(info.value) == ("NotImplementedError: With tag (0009,1010) got exception: Unknown Value "
                                    "Representation 'ZZ' in tag (0009,1010)")


# -- C: the preferred series refused by its checks ------------------------------------------------------------
def _thin_with_a_gap_and_thick(tmp_path: Path) -> tuple[Synth, list[Path], Synth]:
    """Series X: 1.25 mm, sharp kernel, one slice missing; series Y: 5 mm, smooth, complete."""
    study = pydicom.uid.generate_uid()
    thin = chest(tmp_path, "thin", study, slice_thickness_mm=1.25, kernel="sharp", series_number=3)
    thick = chest(tmp_path, "thick", study, slice_thickness_mm=5.0, kernel="smooth", series_number=2)
    gap = thin.file_of_index(20)
    return thin, [p for p in thin.files if p != gap], thick


def test_when_the_preferred_series_is_refused_by_its_checks_the_next_one_is_analysed(
        worker: Worker, ledger: IngestLedger, sessions: sessionmaker[Session], tmp_path: Path) -> None:
    """The thick series was rejected for the thin one, the thin one then for its missing slice: nothing analysed."""
    thin, thin_files, thick = _thin_with_a_gap_and_thick(tmp_path)
    receive(ledger, thick.files)  # its job first: passed over for the thin one, which is still queued
    receive(ledger, thin_files)
    jobs = complete(sessions)
    assert run_all(worker) == 3  # thick (passed over), thin (refused), thick again
    thin_job, thick_job = job(sessions, jobs[thin.series_uid]), job(sessions, jobs[thick.series_uid])
    assert thin_job.state.value == "rejected" and "1 slice(s) missing" in (thin_job.error or "")
    assert (thick_job.state.value, thick_job.error) == ("done", None)
    kinds = [kind for kind, _ in events(sessions, thick_job.id)]
    assert kinds[-4:] == ["job_rejected", "job_requeued", "job_started", "job_done"]
    rejected, requeued = [message for kind, message in events(sessions, thick_job.id)
                          if kind in ("job_rejected", "job_requeued")]
    assert rejected.startswith("another series of the study is preferred") and thin.series_uid in rejected
    assert requeued.startswith(f"series {thin.series_uid}, preferred to this one, was refused by its checks (")
    assert "1 slice(s) missing" in requeued


def test_a_series_refused_first_is_no_candidate_for_its_siblings(
        worker: Worker, ledger: IngestLedger, sessions: sessionmaker[Session], tmp_path: Path) -> None:
    thin, thin_files, thick = _thin_with_a_gap_and_thick(tmp_path)
    receive(ledger, thin_files)  # its job first: refused; the thick one then chooses without it
    receive(ledger, thick.files)
    jobs = complete(sessions)
    assert run_all(worker) == 2
    assert job(sessions, jobs[thin.series_uid]).state.value == "rejected"
    assert job(sessions, jobs[thick.series_uid]).state.value == "done"


def test_a_series_passed_over_whose_images_retention_deleted_is_not_queued_again(
        worker: Worker, ledger: IngestLedger, sessions: sessionmaker[Session], tmp_path: Path) -> None:
    """Passed over, its job finished, then its images deleted by retention before the preferred series was refused:
    there is nothing left to analyse, so it stays as it was instead of failing at ERROR."""
    from sqlalchemy import update

    from node.db.models import Series, utcnow

    thin, thin_files, thick = _thin_with_a_gap_and_thick(tmp_path)
    receive(ledger, thick.files)
    receive(ledger, thin_files)
    jobs = complete(sessions)
    assert worker.run_one()  # the thick series: passed over for the thin one
    assert job(sessions, jobs[thick.series_uid]).state.value == "rejected"
    with sessions.begin() as s:
        s.execute(update(Series).where(Series.series_instance_uid == thick.series_uid).values(purged_at=utcnow()))
    assert worker.run_one()  # the thin series: refused for its gap
    assert run_all(worker) == 0
    thick_job = job(sessions, jobs[thick.series_uid])
    assert thick_job.state.value == "rejected" and (thick_job.error or "").startswith("another series")


def test_a_series_passed_over_while_the_preferred_one_was_being_refused_is_analysed(
        config: Config, ledger: IngestLedger, sessions: sessionmaker[Session], tmp_path: Path) -> None:
    """Two workers: one chooses for the thick series while the thin one is still queued, the other refuses the thin
    one before the first records its choice. Neither outcome alone requeues the thick series."""
    thin, thin_files, thick = _thin_with_a_gap_and_thick(tmp_path)
    receive(ledger, thick.files)
    receive(ledger, thin_files)
    jobs = complete(sessions)
    first, second = Worker(config, name="first"), Worker(config, name="second")
    try:
        claimed = first.queue.claim()
        assert claimed is not None and claimed.job_id == jobs[thick.series_uid]
        verdict = first._select(claimed, _series_header(thick.files))
        assert verdict.rule == "not_best"
        assert second.run_one()  # the thin series, refused meanwhile
        assert job(sessions, jobs[thin.series_uid]).state.value == "rejected"
        first._finish(claimed, Analysis(status="rejected", series_instance_uid=thick.series_uid, reason=verdict.reason,
                                        qa=[QAFlag("selection_not_best", "refuse", verdict.reason or "")]))
        assert job(sessions, jobs[thick.series_uid]).state.value == "queued"
        assert first.run_one()
        assert job(sessions, jobs[thick.series_uid]).state.value == "done"
    finally:
        first.engine.dispose()
        second.engine.dispose()


def _thin_and_thick(tmp_path: Path) -> tuple[Synth, Synth]:
    """Series X: 1.25 mm, sharp kernel (preferred); series Y: 5 mm, smooth; both complete."""
    study = pydicom.uid.generate_uid()
    return (chest(tmp_path, "thin", study, slice_thickness_mm=1.25, kernel="sharp", series_number=3),
            chest(tmp_path, "thick", study, slice_thickness_mm=5.0, kernel="smooth", series_number=2))


def _block_outputs(config: Config, job_id: int) -> None:
    """The job's first attempt cannot write outputs.json: a folder holds its name."""
    (results_dir(config, job_id).with_name(f"job-{job_id}.attempt-1") / "outputs.json").mkdir(parents=True)


def test_when_the_preferred_series_fails_the_next_one_is_analysed(
        worker: Worker, config: Config, ledger: IngestLedger, sessions: sessionmaker[Session], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The thick series was passed over for the thin one, whose job then failed: without the fallback the study
    would have no results at all."""
    thin, thick = _thin_and_thick(tmp_path)
    receive(ledger, thick.files)  # its job first: passed over for the thin one, which is still queued
    receive(ledger, thin.files)
    jobs = complete(sessions)
    _block_outputs(config, jobs[thin.series_uid])
    with caplog.at_level(logging.INFO):
        assert run_all(worker) == 3  # thick (passed over), thin (failed), thick again
    thin_job, thick_job = job(sessions, jobs[thin.series_uid]), job(sessions, jobs[thick.series_uid])
    assert thin_job.state.value == "failed" and (thin_job.error or "").startswith("IsADirectoryError: ")
    assert (thick_job.state.value, thick_job.error) == ("done", None)
    [requeued] = [message for kind, message in events(sessions, thick_job.id) if kind == "job_requeued"]
    assert requeued.startswith(f"series {thin.series_uid}, preferred to this one, failed (IsADirectoryError: ")
    [line] = [r.getMessage() for r in caplog.records if "event=job_requeued" in r.getMessage()]
    assert f"job={thick_job.id}" in line and f"ended_job={thin_job.id}" in line and "failed" in line


def test_a_series_failed_first_is_no_candidate_for_its_siblings(
        worker: Worker, config: Config, ledger: IngestLedger, sessions: sessionmaker[Session], tmp_path: Path) -> None:
    thin, thick = _thin_and_thick(tmp_path)
    receive(ledger, thin.files)  # its job first: failed; the thick one then chooses without it
    receive(ledger, thick.files)
    jobs = complete(sessions)
    _block_outputs(config, jobs[thin.series_uid])
    assert run_all(worker) == 2
    assert job(sessions, jobs[thin.series_uid]).state.value == "failed"
    assert job(sessions, jobs[thick.series_uid]).state.value == "done"


def test_when_the_preferred_series_fails_for_stalling_its_workers_the_next_one_is_analysed(
        worker: Worker, ledger: IngestLedger, sessions: sessionmaker[Session], tmp_path: Path) -> None:
    """A job whose workers stopped on it max_attempts times is failed by the queue, not by a worker: it frees the
    series passed over for it too."""
    from sqlalchemy import update

    thin, thick = _thin_and_thick(tmp_path)
    receive(ledger, thick.files)
    receive(ledger, thin.files)
    jobs = complete(sessions)
    assert worker.run_one()  # the thick series: passed over for the thin one
    assert job(sessions, jobs[thick.series_uid]).state.value == "rejected"
    with sessions.begin() as s:  # the thin one's third worker stopped responding half an hour ago
        s.execute(update(Job).where(Job.id == jobs[thin.series_uid]).values(
            state="running", worker="elsewhere:1", attempts=3, heartbeat_at=utcnow() - dt.timedelta(minutes=30)))
    assert worker.queue.requeue_stalled() == 1
    thin_job = job(sessions, jobs[thin.series_uid])
    assert thin_job.state.value == "failed" and thin_job.error == "worker elsewhere:1 stopped responding on 3 attempts"
    assert job(sessions, jobs[thick.series_uid]).state.value == "queued"
    assert run_all(worker) == 1
    assert job(sessions, jobs[thick.series_uid]).state.value == "done"


# -- D: a localizer filed in the axial series -------------------------------------------------------------
@pytest.mark.parametrize("first", [True, False], ids=["localizer-first", "localizer-later"])
def test_a_localizer_in_the_series_is_left_out_and_the_axial_images_analysed(
        worker: Worker, config: Config, ledger: IngestLedger, sessions: sessionmaker[Session], tmp_path: Path,
        first: bool) -> None:
    """Received first, the localizer had the series refused for its ImageType; received later, for 'images of
    different sizes in one series'."""
    s = chest(tmp_path, "axial", pydicom.uid.generate_uid())
    ds = pydicom.dcmread(s.files[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    pixels = ds.pixel_array[:32].copy()
    ds.Rows, ds.PixelData = 32, pixels.tobytes()
    localizer = s.folder / "LOC00001.dcm"
    ds.save_as(localizer, enforce_file_format=True)
    receive(ledger, [localizer, *s.files] if first else [*s.files[:20], localizer, *s.files[20:]])
    [job_id] = complete(sessions).values()
    assert run_all(worker) == 1
    row = job(sessions, job_id)
    assert (row.state.value, row.error) == ("done", None)
    result = json.loads((results_dir(config, job_id) / "result.json").read_text())
    assert [q["code"] for q in result["qa"] if q["code"] == "localizer_left_out"] == ["localizer_left_out"]
