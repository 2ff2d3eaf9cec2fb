"""TID 1500 Measurement Report: content from the SR template, values equal result.json, segment groups
reference the SEG, a refused series gets a short SR saying why, revisions name their predecessor,
templates are validated strictly, and the worker publishes every object with outputs.json."""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from sqlalchemy.orm import Session, sessionmaker

from node import MANUFACTURER
from node.config import Config, OutputsSettings, load_config
from node.db.models import Instance, Job, JobState, Series, SeriesOrigin, SeriesState, Study, utcnow
from node.errors import ConfigError
from node.outputs.history import previous_sr
from node.outputs.sr import FAILED_STATEMENT
from node.outputs.sr_template import TEMPLATES_DIR, TemplateError, load_template, lookup
from node.outputs.truth import analysis_from_series
from node.outputs.write import predecessor_from, read_manifest, write_outputs
from node.pipeline.call import calls_pneumonia
from node.pipeline.runner import NOT_FOR_CLINICAL_USE, Analysis
from node.pipeline.volume import QAFlag
from node.pipeline.worker import Worker, results_dir
from tests.helpers.faults import Synth, phantom, synth_series

TEMPLATE = load_template("lung_ct_pneumonia")
SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    return synth_series(tmp_path_factory.mktemp("sr") / "series", phantom("covid", slices=40, matrix=96, seed=2,
                                                                             variant="mixed"))


@pytest.fixture(scope="module")
def analysis(synth: Synth) -> Analysis:
    files = list(synth.files)
    random.Random(1).shuffle(files)
    return analysis_from_series(files, lungs=synth.phantom.lungs, lesions=synth.phantom.lesions,
                                series_instance_uid=synth.series_uid)


# -- reading an SR back with pydicom -------------------------------------------------------------
def concept(item: Dataset) -> tuple[str, str]:
    c = item.ConceptNameCodeSequence[0]
    return str(c.CodeValue), str(c.CodingSchemeDesignator)


def groups_by_tracking_id(sr: Dataset) -> dict[str, list[Dataset]]:
    """Measurement group content items, by Tracking Identifier, walking the tree with pydicom only."""
    (measurements,) = [i for i in sr.ContentSequence if concept(i) == ("126010", "DCM")]
    out = {}
    for group in measurements.ContentSequence:
        assert concept(group) == ("125007", "DCM")
        (tid,) = [i.TextValue for i in group.ContentSequence if concept(i) == ("112039", "DCM")]
        out[str(tid)] = list(group.ContentSequence)
    return out


def nums(items: list[Dataset]) -> dict[tuple[str, str], tuple[float, str]]:
    out = {}
    for i in items:
        if i.ValueType == "NUM":
            mv = i.MeasuredValueSequence[0]
            assert concept(i) not in out, "two measurements with one concept in a group"
            out[concept(i)] = (float(mv.NumericValue), str(mv.MeasurementUnitsCodeSequence[0].CodeValue))
    return out


def texts(items: list[Dataset], code: tuple[str, str]) -> list[str]:
    return [str(i.TextValue) for i in items if i.ValueType == "TEXT" and concept(i) == code]


def code_of(ref: Any) -> tuple[str, str]:
    c = ref.to_code()
    return str(c.value), str(c.scheme_designator)


# -- content -------------------------------------------------------------------------------------
def test_sr_values_equal_result_json(analysis: Analysis, synth: Synth, tmp_path: Path) -> None:
    objects = write_outputs(analysis, out_dir=tmp_path, source_paths=synth.files,
                            settings=OutputsSettings(key_images=False, kos=False, sr_series_number=77, sr_series_description="m"))
    assert [o.kind for o in objects] == ["seg", "sr"]
    result = analysis.result_json()
    assert result.get("slice_rule"), "the runner's slice rule is part of result.json"
    sr = pydicom.dcmread(tmp_path / "sr.dcm")
    assert sr.SOPClassUID == SR_SOP_CLASS
    src = pydicom.dcmread(synth.files[0], stop_before_pixels=True)
    assert (sr.StudyInstanceUID, sr.PatientID, str(sr.PatientName)) == (src.StudyInstanceUID, src.PatientID,
                                                                         str(src.PatientName))
    assert (sr.Manufacturer, sr.SeriesNumber, sr.SeriesDescription) == (MANUFACTURER, 77, "m")
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert "PredecessorDocumentsSequence" not in sr

    groups = groups_by_tracking_id(sr)
    compared = 0
    by_role = dict(zip(("lung", "lesion", "diagnosis"), result["models"]))
    for spec in TEMPLATE.groups:
        items = groups[spec.tracking_id]
        # TID 4019 Algorithm Identification: the model that produced the group, with its file's hash
        assert texts(items, ("111001", "DCM")) == [by_role[spec.model]["name"]]
        assert texts(items, ("111003", "DCM")) == [by_role[spec.model]["version"]]
        assert texts(items, ("111002", "DCM")) == [f"sha256={by_role[spec.model]['sha256']}"]
        got = nums(items)
        assert len(got) == len(spec.measurements)
        for m in spec.measurements:
            value, unit = got[code_of(m.concept)]
            assert value == pytest.approx(lookup(result, m.value) * m.scale, rel=1e-9), m.value
            assert unit == m.unit.to_code().value
            compared += 1
        for e in spec.evaluations:
            (item,) = [i for i in items if i.ValueType == "CODE" and concept(i) == code_of(e.concept)]
            expected = e.codes[lookup(result, e.value)].to_code()
            assert item.ConceptCodeSequence[0].CodeValue == expected.value
    assert compared == sum(len(g.measurements) for g in TEMPLATE.groups) == 18  # every value the template names
    # which lung carries the lesions: each side's lesion volume, with its finding site
    for side, site in (("right", "3341006"), ("left", "44029006")):
        items = groups[f"Lesions of the {side} lung"]
        assert [i.ConceptCodeSequence[0].CodeValue for i in items
                if i.ValueType == "CODE" and concept(i) == ("363698007", "SCT")] == [site]
    lesion = result["lesion_volume_ml"]
    assert lesion["right"] + lesion["left"] == pytest.approx(lesion["total"], abs=0.11)  # each rounded to 0.1 ml

    # the node's call, which decides its key images and KOS, is stated, not left to be worked out
    call = groups["Call of the node"]
    (said,) = [i for i in call if i.ValueType == "CODE" and concept(i) == ("NODECALL", "99LUNGNODE")]
    (best,) = [i for i in call if i.ValueType == "CODE" and concept(i) == ("MOSTPROBABLE", "99LUNGNODE")]
    probabilities = result["probabilities"]
    assert result["call"]["most_probable"] == max(probabilities, key=probabilities.get)
    assert best.ConceptCodeSequence[0].CodeValue == {"covid19": "840539006", "other_pneumonia": "OTHERPNEUMONIA",
                                                      "no_pneumonia": "NOPNEUMONIA"}[result["call"]["most_probable"]]
    assert said.ConceptCodeSequence[0].CodeValue == (
        codes.SCT.Present if calls_pneumonia(result) else codes.SCT.Absent).value

    # the decision is the slice rule's, with its code
    decision = result["slice_rule"]["decision"]
    (item,) = [i for i in groups["Slice evidence rule"] if i.ValueType == "CODE" and concept(i) == ("SLICERULE", "99LUNGNODE")]
    present = codes.SCT.Present if decision == "pneumonia" else codes.SCT.Absent
    assert item.ConceptCodeSequence[0].CodeValue == present.value

    # TID 1500's Image Library: one group (the frame of reference, CT) with an entry per analysed image
    (library,) = [i for i in sr.ContentSequence if concept(i) == ("111028", "DCM")]
    (group,) = library.ContentSequence
    listed = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in group.ContentSequence
              if i.ValueType == "IMAGE"]
    assert sorted(listed) == sorted(str(src_ds.SOPInstanceUID) for src_ds in
                                    (pydicom.dcmread(f, stop_before_pixels=True) for f in synth.files))
    context = {concept(i): i for i in group.ContentSequence if i.RelationshipType == "HAS ACQ CONTEXT"}
    assert context[("112227", "DCM")].UID == src.FrameOfReferenceUID
    assert context[("121139", "DCM")].ConceptCodeSequence[0].CodeValue == "CT"

    # the private codes' scheme is identified, so a reader can tell them from standard ones
    (scheme,) = sr.CodingSchemeIdentificationSequence
    assert (scheme.CodingSchemeDesignator, scheme.CodingSchemeResponsibleOrganization) == ("99LUNGNODE", "lungnode")
    def finding(group: str) -> tuple[str, str]:
        (item,) = [i for i in groups[group] if i.ValueType == "CODE" and concept(i) == ("121071", "DCM")]
        code = item.ConceptCodeSequence[0]
        return str(code.CodeValue), str(code.CodingSchemeDesignator)

    # COVID-19 pneumonia is a pneumonia too: the other class is not coded as plain SCT Pneumonia
    assert finding("Probability of COVID-19 pneumonia") == ("840539006", "SCT")
    assert finding("Probability of other pneumonia") == ("OTHERPNEUMONIA", "99LUNGNODE")
    assert finding("Probability of no pneumonia") == ("NOPNEUMONIA", "99LUNGNODE")

    info = groups[TEMPLATE.information_group]
    st = TEMPLATE.statements
    assert texts(info, code_of(st.disclaimer)) == [NOT_FOR_CLINICAL_USE]
    assert texts(info, code_of(st.status)) == ["Analysis ok"]
    models = texts(info, code_of(st.model))
    assert models == [f"{m['name']} {m['version']} sha256 {m['sha256']}" for m in result["models"]]
    assert texts(info, code_of(st.qa_flag)) == [f"{f['code']} ({f['severity']}): {f['reason']}" for f in result["qa"]]

    # highdicom reads the same report
    hsr = hd.sr.srread(tmp_path / "sr.dcm")
    report = hsr.content
    seg = pydicom.dcmread(tmp_path / "seg.dcm", stop_before_pixels=True)
    volumetric = report.get_volumetric_roi_measurement_groups()
    assert len(volumetric) == 4
    seg_tracking = {int(s.SegmentNumber): str(s.TrackingUID) for s in seg.SegmentSequence}
    for group in volumetric:
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert group.tracking_uid == seg_tracking[ref.referenced_segment_numbers[0]]
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        key = {"Right lung": "lung_volume_ml.right", "Left lung": "lung_volume_ml.left",
               "Ground glass opacity": "lesion_volume_ml.ggo", "Consolidation": "lesion_volume_ml.consolidation"}
        assert volume.value == pytest.approx(lookup(result, key[group.tracking_identifier]))
        assert volume.unit.value == "mL"
    image_groups = report.get_image_measurement_groups()
    uids = [g.tracking_uid for g in [*volumetric, *image_groups]]
    assert len(set(uids)) == len(uids) == len(TEMPLATE.groups) + 1
    # evidence: the SEG and the source images
    evidence = {str(r.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for r in se.ReferencedSOPSequence}
    evidence |= {str(r.ReferencedSOPInstanceUID) for s in sr.get("PertinentOtherEvidenceSequence", [])
                 for se in s.ReferencedSeriesSequence for r in se.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence
    assert {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in synth.files} <= evidence


def test_without_slice_rule_the_group_is_left_out(analysis: Analysis, synth: Synth, tmp_path: Path) -> None:
    plain = Analysis(**{**analysis.__dict__, "slice_rule": None})
    assert plain.result_json().get("slice_rule") is None
    write_outputs(plain, out_dir=tmp_path, source_paths=synth.files, settings=OutputsSettings(key_images=False, kos=False))
    groups = groups_by_tracking_id(pydicom.dcmread(tmp_path / "sr.dcm"))
    assert "Slice evidence rule" not in groups and "Right lung" in groups


def test_rejected_series_gets_a_short_sr_saying_why(synth: Synth, tmp_path: Path) -> None:
    reason = "gantry tilt of about 12.0 degrees (sheared slices) is not supported"
    rejected = Analysis(status="rejected", series_instance_uid=synth.series_uid, reason=reason,
                        qa=[QAFlag("gantry_tilt", "refuse", reason)])
    objects = write_outputs(rejected, out_dir=tmp_path, source_paths=synth.files, settings=OutputsSettings())
    assert [o.kind for o in objects] == ["sr"]
    assert json.loads((tmp_path / "outputs.json").read_text())["objects"][0]["kind"] == "sr"
    sr = pydicom.dcmread(tmp_path / "sr.dcm")
    assert sr.StudyInstanceUID == synth.study_uid
    groups = groups_by_tracking_id(sr)
    assert list(groups) == [TEMPLATE.information_group]
    info = groups[TEMPLATE.information_group]
    st = TEMPLATE.statements
    assert texts(info, code_of(st.reason)) == [reason]
    assert texts(info, code_of(st.status)) == ["Analysis rejected"]
    assert texts(info, code_of(st.disclaimer)) == [NOT_FOR_CLINICAL_USE]
    (evaluation,) = [i for i in info if i.ValueType == "CODE" and concept(i) == code_of(st.refused_concept)]
    assert concept(evaluation) == code_of(st.refused_concept)
    assert evaluation.ConceptCodeSequence[0].CodeValue == st.refused_value.to_code().value
    hd.sr.srread(tmp_path / "sr.dcm")  # highdicom reads it


def test_failed_analysis_sr_blames_the_node_not_the_images_and_quotes_no_error(synth: Synth, tmp_path: Path) -> None:
    reason = "analysis failed: ValueError: bad value 'DOE^JANE' in PatientName"  # an error may quote patient data
    failed = Analysis(status="failed", series_instance_uid=synth.series_uid, reason=reason)
    write_outputs(failed, out_dir=tmp_path, source_paths=synth.files, settings=OutputsSettings())
    sr = pydicom.dcmread(tmp_path / "sr.dcm")
    info = groups_by_tracking_id(sr)[TEMPLATE.information_group]
    st = TEMPLATE.statements
    assert texts(info, code_of(st.status)) == ["Analysis failed"]
    assert texts(info, code_of(st.reason)) == []  # not "Reason for rejecting acquisition"
    assert not [i for i in info if i.ValueType == "CODE" and concept(i) == code_of(st.refused_concept)]
    assert FAILED_STATEMENT in texts(info, code_of(st.disclaimer))
    assert b"DOE^JANE" not in (tmp_path / "sr.dcm").read_bytes()


def test_no_source_images_no_objects(tmp_path: Path) -> None:
    empty = Analysis(status="rejected", series_instance_uid="", reason="no DICOM images found")
    assert write_outputs(empty, out_dir=tmp_path, source_paths=[], settings=OutputsSettings()) == []
    assert json.loads((tmp_path / "outputs.json").read_text()) == {"objects": []}


def test_new_revision_names_the_previous_sr(analysis: Analysis, synth: Synth, tmp_path: Path) -> None:
    settings = OutputsSettings(key_images=False, kos=False, seg=False)
    first = {o.kind: o for o in write_outputs(analysis, out_dir=tmp_path / "r1", source_paths=synth.files,
                                              settings=settings)}
    previous = predecessor_from(tmp_path / "r1")
    assert previous is not None
    second = {o.kind: o for o in write_outputs(analysis, out_dir=tmp_path / "r2", source_paths=synth.files,
                                               settings=settings, revision=2, predecessor=previous)}
    assert second["sr"].sop_instance_uid != first["sr"].sop_instance_uid
    sr2 = pydicom.dcmread(tmp_path / "r2" / "sr.dcm")
    sr1 = pydicom.dcmread(tmp_path / "r1" / "sr.dcm")
    assert sr2.SeriesDescription == f"{sr1.SeriesDescription} rev 2"  # the earlier one stays in the PACS
    (study,) = sr2.PredecessorDocumentsSequence
    ref = study.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert study.StudyInstanceUID == synth.study_uid
    assert study.ReferencedSeriesSequence[0].SeriesInstanceUID == first["sr"].series_instance_uid
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (SR_SOP_CLASS, first["sr"].sop_instance_uid)


def test_objects_with_other_content_get_other_uids(analysis: Analysis, synth: Synth, tmp_path: Path) -> None:
    """Archives keep the first instance they get under a UID: a failed analysis run again with success, or other
    output settings, must not reuse the UIDs of what was sent before; the same run again must."""
    settings = OutputsSettings(key_images=False, kos=False, seg=False)

    def sr_uid(a: Analysis, out: str, s: OutputsSettings = settings, device: str | None = None) -> str:
        (sr,) = [o for o in write_outputs(a, out_dir=tmp_path / out, source_paths=synth.files, settings=s,
                                          device_uid=device) if o.kind == "sr"]
        return sr.sop_instance_uid

    ok = sr_uid(analysis, "ok")
    assert sr_uid(analysis, "again") == ok
    failed = Analysis(status="failed", series_instance_uid=synth.series_uid, reason="the lesion model failed",
                      models=analysis.models)
    assert sr_uid(failed, "failed") != ok
    assert sr_uid(analysis, "described", OutputsSettings(key_images=False, kos=False, seg=False,
                                                        sr_series_description="AI results")) != ok
    # Two installations (their own Device UID, the SR's observer) write two contents: never under one UID.
    here, there = sr_uid(analysis, "here", device="2.25.1"), sr_uid(analysis, "there", device="2.25.2")
    assert len({ok, here, there}) == 3
    assert sr_uid(analysis, "here-again", device="2.25.1") == here


# -- templates -------------------------------------------------------------------------------------
def shipped() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((TEMPLATES_DIR / "lung_ct_pneumonia.yaml").read_text())
    return data


@pytest.mark.parametrize(("edit", "field", "words"), [
    (lambda d: d["groups"][0].update(colour="red"), "groups[0].colour", "unknown key"),
    (lambda d: d["groups"][5]["measurements"][0].update(unti=None), "groups[5].measurements[0].unti",
     "unknown key (did you mean unit?)"),
    (lambda d: d["groups"][5]["measurements"][0].update(value="lung_volume_ml.middle"),
     "groups[5].measurements[0].value", "unknown value"),
    (lambda d: d["groups"][5]["measurements"][0].update(concept={"keyword": "SCT.Volumen"}),
     "groups[5].measurements[0].concept", "not in pydicom's code dictionaries"),
    (lambda d: d["groups"][5]["measurements"][0].update(unit={"code": "ml", "scheme": "SCT", "meaning": "ml"}),
     "groups[5].measurements[0].unit", "UCUM"),
    (lambda d: d["groups"][4]["evaluations"][0]["codes"].pop("no_pneumonia"), "groups[4].evaluations[0]",
     "missing ['no_pneumonia']"),
    (lambda d: d["groups"][5].update(segment="liver"), "groups[5].segment", "unknown segment"),
    (lambda d: d["groups"][2].update(id="covid19_probability"), "groups", "unique"),
    (lambda d: d["statements"].pop("disclaimer"), "statements.disclaimer", "Field required"),
    (lambda d: d.pop("coding_schemes"), "coding_schemes", "['99LUNGNODE'] used but not declared"),
])
def test_a_bad_template_names_the_field(tmp_path: Path, edit: Any, field: str, words: str) -> None:
    data = shipped()
    edit(data)
    (tmp_path / "lung_ct_pneumonia.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(TemplateError) as info:
        load_template("lung_ct_pneumonia", tmp_path)
    line = next(line for line in str(info.value).splitlines() if line.strip().startswith(field + ":"))
    assert words in line
    # ... and stops start-up (config validation) with the same words
    with pytest.raises(ConfigError, match="outputs") as cfg:
        load_config(None, environ={"LUNGNODE_OUTPUTS__SR_TEMPLATES_DIR": str(tmp_path)})
    assert field in str(cfg.value)


def test_shipped_template_loads_and_a_missing_one_is_named(tmp_path: Path) -> None:
    assert load_template("lung_ct_pneumonia").name == "lung_ct_pneumonia"
    with pytest.raises(TemplateError, match="does not exist: set outputs.sr_template to one of"):
        load_template("nope", tmp_path)


# -- the worker publishes the objects of each revision ---------------------------------------------
def add_job(sessions: sessionmaker[Session], *, series_id: int, revision: int) -> None:
    with sessions() as s, s.begin():
        s.add(Job(series_id=series_id, revision=revision, state=JobState.queued))


def device_observer_uid(ds: pydicom.Dataset) -> str:
    """The Device Observer UID (DCM 121012) of an SR or KOS content tree."""
    for item in ds.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == "121012":
            return str(item.UID)
    raise AssertionError("no Device Observer UID")


def worker_with_series(synth: Synth, tmp_path: Path, **settings: Any) -> tuple[Config, Worker, int]:
    """A worker on a fresh ledger holding ``synth`` as a complete series (revision 1); returns its id too."""
    config = Config.model_validate({"storage": {"spool_dir": str(tmp_path / "spool"),
                                                "database_url": f"sqlite:///{tmp_path / 'ledger.sqlite'}"},
                                    "outputs": {"key_image_count": 2}, **settings})
    from node.db.session import upgrade_schema

    worker = Worker(config, name="test")
    upgrade_schema(worker.engine)
    with worker.sessions() as s, s.begin():
        study = Study(study_instance_uid=synth.study_uid)
        series = Series(study=study, series_instance_uid=synth.series_uid, origin=SeriesOrigin.modality,
                        state=SeriesState.complete, revision=1,
                        last_received_at=utcnow() - dt.timedelta(hours=1))  # its study has settled
        s.add_all([study, series])
        s.flush()
        for i, f in enumerate(synth.files):
            s.add(Instance(series_id=series.id, sop_instance_uid=f"1.2.3.{i}", sop_class_uid="1.2", revision=1,
                           transfer_syntax_uid="1.2", path=str(f), size_bytes=f.stat().st_size))
        series_id = series.id
    return config, worker, series_id


def test_worker_publishes_objects_and_the_next_revision_names_the_previous_sr(
        analysis: Analysis, synth: Synth, tmp_path: Path) -> None:
    config, worker, series_id = worker_with_series(synth, tmp_path)
    add_job(worker.sessions, series_id=series_id, revision=1)
    published = []
    for revision in (1, 2):
        if revision == 2:  # late images opened revision 2 after revision 1's results were published
            with worker.sessions.begin() as s:
                row = s.get(Series, series_id)
                assert row is not None
                row.revision = 2
            add_job(worker.sessions, series_id=series_id, revision=2)
        job = worker.queue.claim()
        assert job is not None
        worker._finish(job, analysis)
        published.append(results_dir(config, job.job_id))
    first, second = published
    for out in published:
        names = sorted(p.name for p in out.iterdir())
        assert names == ["key_image_1.dcm", "key_image_2.dcm", "kos.dcm", "outputs.json", "result.json", "seg.dcm",
                         "sr.dcm"]
        assert [o.file for o in read_manifest(out)] == ["seg.dcm", "sr.dcm", "key_image_1.dcm", "key_image_2.dcm",
                                                       "kos.dcm"]
    assert not list(first.parent.glob("*.attempt-*"))  # staging folders are gone
    # both revisions' SR and KOS name this installation's device, kept beside the spool
    device = (tmp_path / "spool" / "device-uid").read_text().strip()
    for out in published:
        assert {device_observer_uid(pydicom.dcmread(out / name)) for name in ("sr.dcm", "kos.dcm")} == {device}
    sr1 = {o.kind: o for o in read_manifest(first)}["sr"]
    sr2 = pydicom.dcmread(second / "sr.dcm")
    assert sr2.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == sr1.sop_instance_uid
    assert previous_sr(worker.sessions, series_id=series_id, revision=1,
                       results_dir=lambda j: results_dir(config, j)) is None
    with worker.sessions() as s:
        assert [j.state for j in s.query(Job).order_by(Job.revision)] == [JobState.done, JobState.done]
    with worker.sessions.begin() as s:  # had revision 2 arrived before revision 1's results went out...
        s.query(Job).filter(Job.revision == 1).update({Job.state: JobState.superseded})
    assert previous_sr(worker.sessions, series_id=series_id, revision=2,  # ...its never-sent SR is no predecessor
                       results_dir=lambda j: results_dir(config, j)) is None
    from node.config import Destination
    from node.db.models import OutboxItem, SendState
    from node.send.outbox import enqueue_results

    def predecessor_uid() -> str | None:
        found = previous_sr(worker.sessions, series_id=series_id, revision=2,
                            results_dir=lambda j: results_dir(config, j))
        return None if found is None else str(found.SOPInstanceUID)

    with worker.sessions.begin() as s:  # done, with a destination: a predecessor only once its SR went out
        s.query(Job).filter(Job.revision == 1).update({Job.state: JobState.done})
        job1 = s.query(Job).filter(Job.revision == 1).one().id
        enqueue_results(s, job_id=job1, results_dir=first,
                        destinations=[Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)])
    assert predecessor_uid() is None
    with worker.sessions.begin() as s:
        s.query(OutboxItem).filter(OutboxItem.kind == "sr").update({OutboxItem.state: SendState.sent})
    assert predecessor_uid() == sr1.sop_instance_uid
    with worker.sessions.begin() as s:  # a row from before migration 0005 does not record the SR's series...
        s.query(OutboxItem).filter(OutboxItem.kind == "sr").update({OutboxItem.series_instance_uid: None})
    assert predecessor_uid() == sr1.sop_instance_uid  # ...so the SR in the results folder names it
    with worker.sessions.begin() as s:
        s.query(OutboxItem).filter(OutboxItem.kind == "sr").update(
            {OutboxItem.series_instance_uid: sr1.series_instance_uid})
    import shutil
    shutil.rmtree(first)  # retention deleted revision 1's results: the ledger still knows the SR the PACS holds
    assert predecessor_uid() == sr1.sop_instance_uid
    with worker.sessions.begin() as s:  # a refused revision's SR (saying why) went out too: it is named as well
        s.query(Job).filter(Job.revision == 1).update({Job.state: JobState.rejected})
    assert predecessor_uid() == sr1.sop_instance_uid
    worker.engine.dispose()


def test_series_skipped_by_selection_get_an_sr_only_when_asked(synth: Synth, tmp_path: Path) -> None:
    reason = "another series of the study is preferred (1.25 mm, kernel 'LUNG'): 1.2.3"
    skipped = Analysis(status="rejected", series_instance_uid=synth.series_uid, reason=reason,
                       qa=[QAFlag("selection_not_best", "refuse", reason)])
    assert write_outputs(skipped, out_dir=tmp_path / "a", source_paths=synth.files, settings=OutputsSettings()) == []
    assert json.loads((tmp_path / "a" / "outputs.json").read_text()) == {"objects": []}
    [sr] = write_outputs(skipped, out_dir=tmp_path / "b", source_paths=synth.files,
                         settings=OutputsSettings(sr_for_skipped_series=True))
    info = groups_by_tracking_id(pydicom.dcmread(tmp_path / "b" / sr.file))[TEMPLATE.information_group]
    assert texts(info, code_of(TEMPLATE.statements.reason)) == [reason]


def test_reanalysis_withdraws_what_was_not_delivered_names_the_sr_that_was_and_leaves_no_stale_object(
        analysis: Analysis, synth: Synth, tmp_path: Path) -> None:
    from dataclasses import replace

    from node.db.jobs import requeue_for_reanalysis
    from node.db.models import OutboxItem, SendState

    pacs = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
    config, worker, series_id = worker_with_series(synth, tmp_path, destinations=[pacs])
    add_job(worker.sessions, series_id=series_id, revision=1)

    def run(result: Analysis) -> Path:
        job = worker.queue.claim()
        assert job is not None
        worker._finish(job, result)
        return results_dir(config, job.job_id)

    def sends() -> dict[str, list[str]]:
        with worker.sessions() as s:
            rows = s.query(OutboxItem).order_by(OutboxItem.id).all()
            return {state: sorted(r.kind for r in rows if r.state.value == state)
                    for state in sorted({r.state.value for r in rows})}

    out = run(analysis)
    first_sr = {o.kind: o for o in read_manifest(out)}["sr"].sop_instance_uid
    with worker.sessions.begin() as s:  # the SR reached the PACS, the SEG was refused, the rest still waits
        s.query(OutboxItem).filter(OutboxItem.kind == "sr").update({OutboxItem.state: SendState.sent})
        s.query(OutboxItem).filter(OutboxItem.kind == "seg").update({OutboxItem.state: SendState.failed})
    with worker.sessions() as s:
        job_id = s.query(Job).one().id
    told = requeue_for_reanalysis(worker.sessions, job_id)
    assert "4 of its results not yet delivered are withdrawn" in told, told
    assert sends() == {"sent": ["sr"], "superseded": ["key_image", "key_image", "kos", "seg"]}

    # Nothing changed (same models, same result): the same objects again. Those withdrawn go out after all;
    # the SR the PACS has is not sent again, and is not its own predecessor.
    run(analysis)
    sr = pydicom.dcmread(out / "sr.dcm")
    assert sr.SOPInstanceUID == first_sr and "PredecessorDocumentsSequence" not in sr
    assert sends() == {"pending": ["key_image", "key_image", "kos", "seg"], "sent": ["sr"]}

    # A new result (after a model update, say): new objects, and the new SR names the one the PACS holds.
    requeue_for_reanalysis(worker.sessions, job_id)
    run(replace(analysis, probabilities={k: round(v / 2, 4) for k, v in (analysis.probabilities or {}).items()}))
    sr = pydicom.dcmread(out / "sr.dcm")
    assert sr.SOPInstanceUID != first_sr
    assert sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == first_sr
    assert sends() == {"pending": ["key_image", "key_image", "kos", "seg", "sr"], "sent": ["sr"],
                       "superseded": ["key_image", "key_image", "kos", "seg"]}

    # Refused when run again: nothing of the earlier runs is left to be sent or found in its folder.
    requeue_for_reanalysis(worker.sessions, job_id)
    run(Analysis(status="rejected", series_instance_uid=synth.series_uid, reason="a better series of the study"))
    names = sorted(p.name for p in out.iterdir())
    assert [n for n in names if n.endswith(".dcm") and n != "sr.dcm"] == [], names  # a refusal has its short SR
    assert sends()["pending"] == ["sr"]  # only the refusal's short SR, which names the SR before it
    refusal = pydicom.dcmread(out / "sr.dcm")
    assert refusal.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == first_sr, "the SR the PACS holds; the withdrawn one passed its reference on"
    with worker.sessions() as s:
        assert s.query(OutboxItem).filter(OutboxItem.state == SendState.pending).one().sop_instance_uid \
            == refusal.SOPInstanceUID
    worker.engine.dispose()
