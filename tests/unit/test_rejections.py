"""IOCM rejection notes on a real SQLite ledger: results a later analysis replaced are withdrawn, once, from the
destinations that received them and ask for it; the note is a valid KOS titled Rejected for Quality Reasons."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from node.config import Destination, OutputsSettings, SendingSettings
from node.db.jobs import requeue_for_reanalysis
from node.db.models import REJECTION_NOTE, Event, Job, OutboxItem, SendState
from node.outputs.rejection import Replaced, build_rejection_note
from node.send.outbox import Outbox, enqueue_results
from node.send.rejections import queue_rejections
from tests.helpers.outbox import make_job, open_next_revision, write_results

PACS = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104, reject_replaced=True)
PLAIN = Destination(name="plain", ae_title="PLAIN", host="127.0.0.1", port=105)
OUTPUTS = OutputsSettings()


def next_revision(sessions: sessionmaker[Session], job_id: int) -> int:
    """A done job for the next revision of ``job_id``'s series (late images came); its id."""
    new = open_next_revision(sessions, job_id, analysed=True)
    assert new is not None
    return new


def finish(sessions: sessionmaker[Session], job_id: int, results: Path) -> int:
    """What the worker does when a job is done: queue its results, then the rejection notes; the notes queued."""
    with sessions.begin() as s:
        enqueue_results(s, job_id=job_id, results_dir=results, destinations=[PACS, PLAIN])
        return queue_rejections(s, job_id=job_id, results_dir=results, destinations=[PACS, PLAIN], settings=OUTPUTS)


def deliver(sessions: sessionmaker[Session], job_id: int, *, kinds: tuple[str, ...] = ("seg", "sr", "key_image"),
            state: SendState = SendState.sent) -> None:
    with sessions.begin() as s:
        s.execute(update(OutboxItem).where(OutboxItem.job_id == job_id, OutboxItem.kind.in_(kinds))
                  .values(state=state))


def notes(sessions: sessionmaker[Session]) -> list[OutboxItem]:
    with sessions() as s:
        return list(s.scalars(select(OutboxItem).where(OutboxItem.kind == REJECTION_NOTE).order_by(OutboxItem.id)))


def listed(path: str | Path) -> set[str]:
    """The SOP Instance UIDs a note's evidence names."""
    ds = pydicom.dcmread(path)
    return {str(i.ReferencedSOPInstanceUID) for st in ds.CurrentRequestedProcedureEvidenceSequence
            for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}


def uids(objects: list) -> set[str]:
    return {o.sop_instance_uid for o in objects}


def test_the_note_is_a_rejection_kos_in_the_study_naming_each_object(tmp_path: Path) -> None:
    old = write_results(tmp_path / "old", study_uid="1.2.826.0.1.3680043.8.498.1")
    new = write_results(tmp_path / "new", study_uid="1.2.826.0.1.3680043.8.498.1")
    like = pydicom.dcmread(new[1].path)
    like.IssuerOfPatientID = "HOSPITAL-A"  # archives that match patients on ID and issuer
    replaced = [Replaced(o.sop_class_uid, o.sop_instance_uid,
                         str(pydicom.dcmread(o.path, stop_before_pixels=True).SeriesInstanceUID)) for o in old]
    note = build_rejection_note(like=like, replaced=replaced, sop_instance_uid="2.25.1", series_instance_uid="2.25.2",
                                series_number=9705, series_description="Replaced lungnode results withdrawn",
                                reason="Replaced by a later analysis.")
    assert note.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59" and note.Modality == "KO"
    title = note.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113001", "DCM")
    assert (note.StudyInstanceUID, note.PatientID, note.PatientName) == (like.StudyInstanceUID, like.PatientID,
                                                                         like.PatientName)
    assert note.IssuerOfPatientID == "HOSPITAL-A"
    assert note.SeriesNumber == 9705 and note.SeriesInstanceUID == "2.25.2"
    path = tmp_path / "note.dcm"
    note.save_as(path, enforce_file_format=True)
    assert listed(path) == uids(old)
    kinds = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID): i.ValueType
             for i in note.ContentSequence if "ReferencedSOPSequence" in i}
    assert kinds == {old[0].sop_instance_uid: "IMAGE", old[1].sop_instance_uid: "COMPOSITE",
                     old[2].sop_instance_uid: "IMAGE"}  # SEG and key image are images, the SR is a document
    with pytest.raises(ValueError, match="at least one object"):
        build_rejection_note(like=like, replaced=[], sop_instance_uid="2.25.3", series_instance_uid="2.25.2",
                             series_number=9705, series_description="x", reason="x")
    if shutil.which("dciodvfy"):
        proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        report = proc.stdout + proc.stderr
        assert "KeyObjectSelectionDocument" in report
        assert not [line for line in report.splitlines() if line.startswith("Error")], report


def test_a_new_revision_withdraws_what_the_destination_received_once(sessions: sessionmaker[Session],
                                                                      tmp_path: Path) -> None:
    study = "1.2.826.0.1.3680043.8.498.2"
    first = make_job(sessions, study_uid=study)
    old = write_results(tmp_path / "r1", study_uid=study)
    assert finish(sessions, first, tmp_path / "r1") == 0  # nothing was replaced
    deliver(sessions, first, kinds=("seg", "sr"))  # the key image is still pending: the PACS does not have it

    second = next_revision(sessions, first)
    new = write_results(tmp_path / "r2", study_uid=study)
    assert finish(sessions, second, tmp_path / "r2") == 1
    [note] = notes(sessions)
    assert note.destination == "pacs" and note.job_id == second and note.state == SendState.pending
    assert listed(note.path) == {old[0].sop_instance_uid, old[1].sop_instance_uid}
    assert Path(note.path).parent == tmp_path / "r2" and note.series_instance_uid
    with sessions() as s:
        marked = s.scalars(select(OutboxItem).where(OutboxItem.rejected_by == note.id)).all()
        assert {(r.destination, r.job_id, r.kind) for r in marked} == {("pacs", first, "seg"), ("pacs", first, "sr")}
        event = s.scalars(select(Event).where(Event.kind == "rejection_queued")).one()
        assert event.job_id == second and event.data == {"destination": "pacs", "replaced_jobs": [first], "objects": 2}

    # The same finish again (a worker re-running it): nothing new; the plain destination never gets a note.
    assert finish(sessions, second, tmp_path / "r2") == 0
    assert len(notes(sessions)) == 1

    # Revision 3 withdraws revision 2's results only: revision 1's were withdrawn already.
    deliver(sessions, second)
    third = next_revision(sessions, first)
    write_results(tmp_path / "r3", study_uid=study)
    assert finish(sessions, third, tmp_path / "r3") == 1
    later = notes(sessions)[-1]
    assert listed(later.path) == uids(new)


def test_the_same_objects_made_again_are_not_withdrawn(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    """Reanalysis with the same models gives the same UIDs: the destination has the right objects already."""
    job = make_job(sessions)
    write_results(tmp_path / "r1")
    finish(sessions, job, tmp_path / "r1")
    deliver(sessions, job)
    assert finish(sessions, job, tmp_path / "r1") == 0 and notes(sessions) == []


def two_revisions(sessions: sessionmaker[Session], tmp_path: Path, study: str) -> tuple[int, int, list, list]:
    """Revision 1's results delivered to both destinations, revision 2's queued with a note for ``pacs``."""
    first = make_job(sessions, study_uid=study)
    old = write_results(tmp_path / "r1", study_uid=study)
    finish(sessions, first, tmp_path / "r1")
    deliver(sessions, first)
    second = next_revision(sessions, first)
    new = write_results(tmp_path / "r2", study_uid=study)
    assert finish(sessions, second, tmp_path / "r2") == 1
    return first, second, old, new


def claim(sessions: sessionmaker[Session]) -> list[tuple[str, str]]:
    return [(c.kind, c.sop_instance_uid) for c in Outbox(sessions, SendingSettings()).claim("pacs", limit=10)]


def rejected_by(sessions: sessionmaker[Session], job_id: int) -> set[int | None]:
    with sessions() as s:
        return set(s.scalars(select(OutboxItem.rejected_by).where(OutboxItem.job_id == job_id,
                                                                  OutboxItem.destination == "pacs")))


def test_a_note_waits_until_the_new_results_are_delivered(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    """The archive must not hide the old answer before it holds the new one."""
    _, second, _, new = two_revisions(sessions, tmp_path, "1.2.826.0.1.3680043.8.498.3")
    [note] = notes(sessions)
    assert sorted(claim(sessions)) == sorted((o.kind, o.sop_instance_uid) for o in new)  # the results, not the note
    assert claim(sessions) == []  # they are being sent: the note still waits
    outbox = Outbox(sessions, SendingSettings())
    with sessions() as s:
        sending = s.scalars(select(OutboxItem.id).where(OutboxItem.job_id == second, OutboxItem.destination == "pacs",
                                                        OutboxItem.kind != REJECTION_NOTE)).all()
    for item_id in sending:
        outbox.mark_sent(item_id, status=0)
    assert claim(sessions) == [(REJECTION_NOTE, note.sop_instance_uid)]


def test_a_note_whose_results_were_superseded_is_dropped_and_the_next_results_withdraw(
        sessions: sessionmaker[Session], tmp_path: Path) -> None:
    """Revision 3 arrives before revision 2's results went out: they and their note are not sent, and revision 3's
    note withdraws revision 1's objects (revision 2's never reached the archive)."""
    study = "1.2.826.0.1.3680043.8.498.6"
    first, second, old, _ = two_revisions(sessions, tmp_path, study)
    third = next_revision(sessions, first)
    assert claim(sessions) == []
    [dropped] = notes(sessions)
    assert dropped.state == SendState.superseded and "made way for were not sent" in (dropped.last_error or "")
    assert rejected_by(sessions, first) == {None}
    with sessions() as s:
        assert s.scalars(select(Event).where(Event.kind == "rejection_superseded")).one().job_id == second
    write_results(tmp_path / "r3", study_uid=study)
    assert finish(sessions, third, tmp_path / "r3") == 1
    later = notes(sessions)[-1]
    assert later.job_id == third and listed(later.path) == uids(old)


def test_reanalysis_drops_the_note_until_its_rerun_makes_it_again(sessions: sessionmaker[Session],
                                                                  tmp_path: Path) -> None:
    first, second, _, _ = two_revisions(sessions, tmp_path, "1.2.826.0.1.3680043.8.498.7")
    [note] = notes(sessions)
    requeue_for_reanalysis(sessions, second)  # an operator asks for revision 2 again: its pending results go
    assert claim(sessions) == []
    assert notes(sessions)[0].state == SendState.superseded and rejected_by(sessions, first) == {None}
    assert finish(sessions, second, tmp_path / "r2") == 1  # the rerun makes the same objects: the same note
    [again] = notes(sessions)
    assert (again.id, again.state) == (note.id, SendState.pending) and rejected_by(sessions, first) == {note.id}


def test_a_withdrawn_object_is_never_sent_again(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    """A storage commitment that failed would put it back in the queue: it is superseded instead."""
    first, _, _, _ = two_revisions(sessions, tmp_path, "1.2.826.0.1.3680043.8.498.8")
    with sessions.begin() as s:
        s.execute(update(OutboxItem).where(OutboxItem.job_id == first).values(state=SendState.pending))
    sent = claim(sessions)
    assert sent and all(kind != REJECTION_NOTE for kind, _ in sent)
    with sessions() as s:
        rows = s.scalars(select(OutboxItem).where(OutboxItem.job_id == first, OutboxItem.destination == "pacs")).all()
    assert {r.state for r in rows} == {SendState.superseded}
    assert all("a rejection note withdrew it" in (r.last_error or "") for r in rows)


def test_an_object_whose_series_is_unknown_is_left_out_with_a_warning(sessions: sessionmaker[Session],
                                                                      tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Rows queued before the ledger kept the series: it is read from the file, and a row whose file is gone
    cannot be named (the others still are)."""
    study = "1.2.826.0.1.3680043.8.498.4"
    first = make_job(sessions, study_uid=study)
    old = write_results(tmp_path / "r1", study_uid=study)
    finish(sessions, first, tmp_path / "r1")
    deliver(sessions, first)
    with sessions.begin() as s:
        s.execute(update(OutboxItem).values(series_instance_uid=None))
    old[0].path.unlink()
    second = next_revision(sessions, first)
    write_results(tmp_path / "r2", study_uid=study)
    with caplog.at_level("WARNING"):
        assert finish(sessions, second, tmp_path / "r2") == 1
    [note] = notes(sessions)
    assert listed(note.path) == {old[1].sop_instance_uid, old[2].sop_instance_uid}
    assert "event=rejection_incomplete" in caplog.text and "missing=1" in caplog.text


def test_reanalysis_with_other_models_withdraws_the_jobs_own_results_and_resend_skips_them(
        sessions: sessionmaker[Session], tmp_path: Path) -> None:
    """``lungnode reanalyse`` with a new model: the same job makes new objects; the ones the PACS had are withdrawn,
    and ``retry --resend`` sends only what the job makes now (not what was withdrawn, nor files it no longer has)."""
    from node.send.outbox import requeue_failed

    study = "1.2.826.0.1.3680043.8.498.5"
    job = make_job(sessions, study_uid=study)
    old = write_results(tmp_path / "before", study_uid=study)
    finish(sessions, job, tmp_path / "before")
    deliver(sessions, job)
    for o in old:  # the worker removes from the job's folder what the new run no longer makes
        o.path.unlink()
    write_results(tmp_path / "after", study_uid=study)
    assert finish(sessions, job, tmp_path / "after") == 1
    [note] = notes(sessions)
    assert note.job_id == job and listed(note.path) == uids(old)
    deliver(sessions, job)
    assert requeue_failed(sessions, job_id=job, resend=True) == [("pacs", 4), ("plain", 3)]  # 3 new objects + note


def test_objects_made_again_after_a_withdrawal_get_new_uids(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    """Reanalysis with models A, then B (its note withdraws A's objects), then A again: an archive keeps a withdrawn
    UID withdrawn, so A's objects must come back as new instances. The notes queued so far are part of the UIDs."""
    from node.outputs.truth import analysis_from_series
    from node.outputs.write import write_outputs
    from node.send.rejections import withdrawals
    from tests.helpers.faults import phantom, synth_series

    synth = synth_series(tmp_path / "series", phantom("covid", slices=20, matrix=64, seed=3))
    files = list(synth.files)
    analysis = analysis_from_series(files, lungs=synth.phantom.lungs, lesions=synth.phantom.lesions,
                                    series_instance_uid=synth.series_uid)
    only_sr = OutputsSettings(seg=False, key_images=False, kos=False)

    def sr_uid(out: str, count: int) -> str:
        [obj] = write_outputs(analysis, out_dir=tmp_path / out, source_paths=files, settings=only_sr, withdrawals=count)
        return obj.sop_instance_uid

    assert sr_uid("a", 0) == sr_uid("a-again", 0)  # the same analysis, nothing withdrawn: the same instance
    assert sr_uid("after-one", 1) != sr_uid("a", 0)

    first, second, _, _ = two_revisions(sessions, tmp_path, "1.2.826.0.1.3680043.8.498.10")
    with sessions() as s:
        series_id = s.get(Job, first).series_id  # type: ignore[union-attr]
        assert withdrawals(s, series_id) == 1
    requeue_for_reanalysis(sessions, second)
    claim(sessions)  # the note is dropped: nothing was withdrawn
    with sessions() as s:
        assert withdrawals(s, series_id) == 0
