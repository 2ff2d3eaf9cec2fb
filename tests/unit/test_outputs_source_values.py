"""Source images with patient or study values the standard does not allow (a date written 1961-03-15): the
outputs are still written, with those attributes empty, and no value reaches the log."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pydicom
import pytest

from node.config import OutputsSettings
from node.outputs import write
from node.outputs.truth import analysis_from_series
from node.outputs.write import clean_copied_values, write_outputs
from tests.helpers.faults import Synth, phantom, synth_series

BIRTH = "1961-03-15"


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    synth = synth_series(tmp_path_factory.mktemp("odd") / "series", phantom("covid", slices=40, matrix=64, seed=3))
    for path in synth.files:
        ds = pydicom.dcmread(path)
        ds.PatientBirthDate, ds.PatientSex, ds.StudyDate = BIRTH, "m", "20260101"
        ds.save_as(path)
    return synth


def test_invalid_copied_values_are_left_empty_and_named_not_quoted(odd: Synth, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    analysis = analysis_from_series(odd.files, lungs=odd.phantom.lungs, lesions=odd.phantom.lesions,
                                    series_instance_uid=odd.series_uid)
    with caplog.at_level(logging.DEBUG, logger="node"):
        objects = write_outputs(analysis, out_dir=tmp_path, source_paths=odd.files,
                                settings=OutputsSettings(key_image_count=1))
    assert [o.kind for o in objects] == ["seg", "sr", "key_image", "kos"] and analysis.output_errors == []
    for obj in objects:
        ds = pydicom.dcmread(tmp_path / obj.file)
        assert (ds.PatientBirthDate, ds.PatientSex, ds.StudyDate) == ("", "", "20260101")
    text = caplog.text
    assert "event=source_values_left_empty" in text and "attributes=PatientBirthDate,PatientSex" in text
    assert BIRTH not in text


def test_a_failed_output_is_recorded_without_the_value_in_its_message(odd: Synth, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_seg(**_: object) -> None:
        raise ValueError(f"Unable to convert '{BIRTH}' to 'DA' object")  # as highdicom words it

    monkeypatch.setattr(write, "build_seg", broken_seg)
    analysis = analysis_from_series(odd.files, lungs=odd.phantom.lungs, lesions=odd.phantom.lesions,
                                    series_instance_uid=odd.series_uid)
    with caplog.at_level(logging.INFO, logger="node"):
        objects = write_outputs(analysis, out_dir=tmp_path, source_paths=odd.files,
                                settings=OutputsSettings(key_images=False))
    assert [o.kind for o in objects] == ["sr", "kos"]
    assert analysis.output_errors == ["seg: ValueError"]
    assert "event=output_failed kind=seg" in caplog.text and BIRTH not in caplog.text


def test_clean_copied_values_keeps_valid_ones() -> None:
    ds = pydicom.Dataset()
    ds.PatientName, ds.PatientBirthDate, ds.PatientSex, ds.StudyTime = "DOE^JANE", "19610315", "F", "101500"
    assert clean_copied_values({"1": ds}) == []
    assert (str(ds.PatientName), ds.PatientBirthDate, ds.PatientSex) == ("DOE^JANE", "19610315", "F")


def test_a_job_whose_outputs_could_not_be_built_is_failed_and_sends_nothing(odd: Synth, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: 'done' with an empty outputs.json, and nothing said why the PACS got no results."""
    from node.config import Config, Destination
    from node.db.models import Instance, Job, JobState, OutboxItem, Series, SeriesOrigin, SeriesState, Study, utcnow
    from node.db.session import upgrade_schema
    from node.pipeline.worker import Worker

    def broken(**_: object) -> None:
        raise ValueError("cannot build")

    for name in ("build_seg", "build_sr", "build_key_images", "build_kos"):
        monkeypatch.setattr(write, name, broken)
    config = Config.model_validate({"storage": {"spool_dir": str(tmp_path / "spool"),
                                                "database_url": f"sqlite:///{tmp_path / 'ledger.sqlite'}"}})
    config.destinations = [Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)]
    worker = Worker(config, name="test")
    upgrade_schema(worker.engine)
    with worker.sessions.begin() as s:
        series = Series(study=Study(study_instance_uid=odd.study_uid), series_instance_uid=odd.series_uid,
                        origin=SeriesOrigin.modality, state=SeriesState.complete, revision=1,
                        last_received_at=utcnow() - dt.timedelta(hours=1))  # its study has settled
        s.add(series)
        s.flush()
        for i, f in enumerate(odd.files):
            s.add(Instance(series_id=series.id, sop_instance_uid=f"1.2.3.{i}", sop_class_uid="1.2", revision=1,
                           transfer_syntax_uid="1.2", path=str(f), size_bytes=f.stat().st_size))
        s.add(Job(series_id=series.id, revision=1, state=JobState.queued))
    job = worker.queue.claim()
    assert job is not None
    analysis = analysis_from_series(odd.files, lungs=odd.phantom.lungs, lesions=odd.phantom.lesions,
                                    series_instance_uid=odd.series_uid)
    worker._finish(job, analysis)
    with worker.sessions() as s:
        row = s.get(Job, job.job_id)
        assert row is not None and row.state == JobState.failed
        assert row.error == ("DICOM outputs not built: seg: ValueError; sr: ValueError; key_image: ValueError; "
                             "kos: ValueError")
        assert s.query(OutboxItem).count() == 0
    worker.engine.dispose()
