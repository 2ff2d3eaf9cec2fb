"""``lungnode process DIR --out OUT`` writes SEG, SR and key images beside result.json and lists them in
outputs.json (the sender's interface), with the tiny test models; a refused series gets its SR only;
the same input gives the same UIDs on a second run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
import pytest

from node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, MANUFACTURER
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
