"""``lungnode process DIR --out OUT`` writes SEG, SR and key images beside result.json and lists them in
outputs.json (the sender's interface), with the tiny test models; a refused series gets its SR only;
the same input gives the same UIDs on a second run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
import pytest

from node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, MANUFACTURER, __version__
from node.outputs.identity import IDENTITY_KEYWORDS
from node.outputs.write import OUTPUTS_FILE
from tests.helpers.conformance import UID_RE, table
from tests.helpers.faults import phantom, synth_series, write_scout
from tests.helpers.node_proc import run_cli
from tests.helpers.onnx_models import make_models_dir

KEYS = {"kind", "file", "sop_class_uid", "sop_instance_uid", "series_instance_uid", "study_instance_uid",
        "transfer_syntax_uid"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_models_dir(tmp_path_factory.mktemp("models"))


def sr_text(path: Path) -> str:
    """Every TEXT content item value of an SR, one per line."""
    return "\n".join(str(e.value) for e in pydicom.dcmread(path).iterall() if e.keyword == "TextValue")


def process(folder: Path, out: Path, models: Path, **env: str) -> tuple[int, dict[str, Any], list[dict[str, str]]]:
    proc = run_cli("process", folder, "--out", out, timeout=180,
                   env={"LUNGNODE_INFERENCE__MODELS_DIR": str(models), "LUNGNODE_INFERENCE__DEVICE": "cpu", **env})
    result = json.loads((out / "result.json").read_text())
    listing = json.loads((out / OUTPUTS_FILE).read_text())
    assert list(listing) == ["objects"]
    for obj in listing["objects"]:
        assert set(obj) == KEYS
        assert (out / obj["file"]).is_file()
    return proc.returncode, result, listing["objects"]


def test_process_writes_the_objects_and_outputs_json(tmp_path: Path, models: Path) -> None:
    series = synth_series(tmp_path / "in", phantom(slices=40, matrix=96, seed=2, variant="mixed"))
    rc, result, objects = process(series.folder, tmp_path / "out", models)
    assert rc == 0 and result["status"] == "ok"
    assert [o["kind"] for o in objects] == ["seg", "sr", "key_image", "key_image", "key_image", "kos"]
    # result.json has the time each output took too (a third of the whole on large series)
    assert {"output_seg", "output_sr", "output_key_images", "output_kos"} <= set(result["timings_s"])
    proposed = {row[1]: UID_RE.findall(row[2]) for row in table("Presentation contexts proposed")}
    for obj in objects:
        ds = pydicom.dcmread(tmp_path / "out" / obj["file"], stop_before_pixels=True)
        assert ds.StudyInstanceUID == obj["study_instance_uid"] == series.study_uid
        assert ds.SOPInstanceUID == obj["sop_instance_uid"] and ds.SeriesInstanceUID == obj["series_instance_uid"]
        assert ds.SOPClassUID == obj["sop_class_uid"]
        assert ds.file_meta.TransferSyntaxUID == obj["transfer_syntax_uid"]
        assert ds.Manufacturer == MANUFACTURER
        # the File Meta names the software that wrote the file, lungnode, as the conformance statement says
        assert (ds.file_meta.ImplementationClassUID, ds.file_meta.ImplementationVersionName) == (
            IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)
        # ... and lists its SOP class and transfer syntax among those the sender proposes
        assert obj["transfer_syntax_uid"] in proposed[obj["sop_class_uid"]]
    seg = pydicom.dcmread(tmp_path / "out" / "seg.dcm", stop_before_pixels=True)
    # segment algorithm identification comes from the test models' manifests
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "lungnode-test-seg2d"
    text = sr_text(tmp_path / "out" / "sr.dcm")
    assert all(f"sha256 {m['sha256']}" in text for m in result["models"])
    # the SR names the algorithms as the SEG does, so a reader can match a measurement to its segment's maker
    sr = pydicom.dcmread(tmp_path / "out" / "sr.dcm")

    def items(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
        return [x for i in ds.get("ContentSequence", []) for x in (i, *items(i))]

    names = {str(i.TextValue) for i in items(sr) if "TextValue" in i
             and i.ConceptNameCodeSequence[0].CodeValue == "111001"}  # Algorithm Name
    assert "lungnode-test-seg2d" in names and "lung_seg" not in names

    rc2, _, again = process(series.folder, tmp_path / "again", models)
    assert rc2 == 0
    assert [o["sop_instance_uid"] for o in again] == [o["sop_instance_uid"] for o in objects]


def test_skipped_folder_gets_its_sr_only_when_asked(tmp_path: Path, models: Path) -> None:
    """As in the node: a series the selection skips (here a scout) gets an SR only with
    outputs.sr_for_skipped_series; never a SEG or key image."""
    write_scout(tmp_path / "scout" / "IM00001.dcm")
    rc, result, objects = process(tmp_path / "scout", tmp_path / "default", models)
    assert rc == 3 and result["status"] == "rejected" and objects == []
    rc, result, objects = process(tmp_path / "scout", tmp_path / "out", models,
                                  LUNGNODE_OUTPUTS__SR_FOR_SKIPPED_SERIES="true")
    assert rc == 3 and result["status"] == "rejected"
    assert [o["kind"] for o in objects] == ["sr"]
    assert "holds LOCALIZER" in sr_text(tmp_path / "out" / "sr.dcm")


def test_a_description_outside_the_source_character_set_is_written_unchanged(tmp_path: Path, models: Path) -> None:
    """Objects keep a Latin-1 source's character set; the one whose configured description needs more is UTF-8."""
    series = synth_series(tmp_path / "in", phantom(slices=40, matrix=96, seed=2, variant="mixed"))
    for f in sorted(series.folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.SpecificCharacterSet, ds.PatientName = "ISO_IR 100", "Müller^Jürgen"
        ds.save_as(f)
    rc, _, objects = process(series.folder, tmp_path / "out", models,
                             LUNGNODE_OUTPUTS__SEG_SERIES_DESCRIPTION="Lunge – Läsionen 肺")
    assert rc == 0
    written = {o["kind"]: pydicom.dcmread(tmp_path / "out" / o["file"], stop_before_pixels=True) for o in objects}
    assert written["seg"].SpecificCharacterSet == "ISO_IR 192"
    assert written["seg"].SeriesDescription == "Lunge – Läsionen 肺"
    assert {str(ds.SpecificCharacterSet) for kind, ds in written.items() if kind != "seg"} == {"ISO_IR 100"}
    assert {str(ds.PatientName) for ds in written.values()} == {"Müller^Jürgen"}


def test_every_object_carries_the_source_identity_and_names_the_node(tmp_path: Path, models: Path) -> None:
    """A Japanese ISO 2022 source (PS3.5 annex H's form, empty first value) with issuers, other IDs and
    de-identification marks, in a stated time zone: all objects are built, each with the same patient and study
    values and the same equipment, and no time in another zone."""
    series = synth_series(tmp_path / "in", phantom(slices=40, matrix=96, seed=2, variant="mixed"))
    issuer, other, accession = pydicom.Dataset(), pydicom.Dataset(), pydicom.Dataset()
    issuer.UniversalEntityID, issuer.UniversalEntityIDType = "1.2.3.4.5", "ISO"
    other.PatientID, other.IssuerOfPatientID = "OLD-7", "HOSP-B"
    accession.LocalNamespaceEntityID = "RIS-A"
    for f in sorted(series.folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.SpecificCharacterSet, ds.PatientName = ["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎"
        ds.IssuerOfPatientID, ds.IssuerOfPatientIDQualifiersSequence = "HOSP-A", [issuer]
        ds.OtherPatientIDsSequence, ds.IssuerOfAccessionNumberSequence = [other], [accession]
        ds.PatientIdentityRemoved, ds.DeidentificationMethod = "YES", "pseudonymised by the site"
        ds.TimezoneOffsetFromUTC = "+0900"
        ds.save_as(f)
    source = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    rc, result, objects = process(series.folder, tmp_path / "out", models,
                                  LUNGNODE_OUTPUTS__DEVICE_SERIAL_NUMBER="LN-0042")
    assert rc == 0 and "output_errors" not in result
    assert sorted({o["kind"] for o in objects}) == ["key_image", "kos", "seg", "sr"]
    for obj in objects:
        ds = pydicom.dcmread(tmp_path / "out" / obj["file"], stop_before_pixels=True)
        assert list(ds.SpecificCharacterSet) == ["ISO 2022 IR 6", "ISO 2022 IR 87"], obj["kind"]
        for keyword in IDENTITY_KEYWORDS:
            assert ds.get(keyword) == source.get(keyword), (obj["kind"], keyword)
        assert (ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions, ds.DeviceSerialNumber) == (
            MANUFACTURER, "lungnode", __version__, "LN-0042"), obj["kind"]
        assert ds.TimezoneOffsetFromUTC == "+0900"
        contributed = [str(i.ContributionDateTime) for i in ds.get("ContributingEquipmentSequence", [])
                       if "ContributionDateTime" in i and i.get("Manufacturer") != source.Manufacturer]
        assert all(v.endswith("+0900") for v in contributed), (obj["kind"], contributed)
    assert str(pydicom.dcmread(tmp_path / "out" / "kos.dcm").PatientName) == "Yamada^Tarou=山田^太郎"


def test_an_output_that_cannot_be_built_fails_process(tmp_path: Path, models: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """As a worker fails the job, process exits 1 and result.json names what is missing, not "ok" and 0."""
    from node.config import Config
    from node.outputs import write
    from node.pipeline.process import EXIT_FAILED
    from node.pipeline.process import process as run_process

    def broken(**_: object) -> None:
        raise ValueError("cannot build")

    monkeypatch.setattr(write, "build_seg", broken)
    series = synth_series(tmp_path / "in", phantom(slices=40, matrix=96, seed=2, variant="mixed"))
    config = Config.model_validate({"inference": {"models_dir": str(models), "device": "cpu"}})
    assert run_process(series.folder, tmp_path / "out", config) == EXIT_FAILED
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["status"] == "ok" and result["output_errors"] == ["seg: ValueError"]
    assert "seg" not in {o["kind"] for o in json.loads((tmp_path / "out" / OUTPUTS_FILE).read_text())["objects"]}
