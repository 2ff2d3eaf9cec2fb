"""Key Object Selection: the slices of the key images flagged in the source series ("Of Interest"), frames
named for Enhanced CT, none for a series without lesions; valid by dciodvfy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.multival import MultiValue

from node.config import OutputsSettings
from node.outputs.keyimage import pick_slices
from node.outputs.truth import analysis_from_series
from node.outputs.write import write_outputs
from node.pipeline.call import calls_pneumonia
from tests.helpers.faults import Synth, phantom, synth_series, write_enhanced_ct

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
ONLY_KOS = OutputsSettings(seg=False, sr=False, key_images=False)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    return synth_series(tmp_path_factory.mktemp("kos") / "series", phantom("covid", slices=40, matrix=96, seed=2))


def _references(kos: pydicom.Dataset) -> list[tuple[str, list[int] | None]]:
    out = []
    for item in kos.ContentSequence:
        if item.ValueType == "IMAGE":
            ref = item.ReferencedSOPSequence[0]
            frames = ref.get("ReferencedFrameNumber")
            listed = frames if isinstance(frames, MultiValue) else [frames]
            out.append((str(ref.ReferencedSOPInstanceUID), None if frames is None else [int(f) for f in listed]))
    return out


def _write(files: list[Path], synth: Synth, out: Path, lesions: np.ndarray | None = None) -> list[pydicom.Dataset]:
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    analysis = analysis_from_series(files, lungs=synth.phantom.lungs,
                                    lesions=synth.phantom.lesions if lesions is None else lesions,
                                    series_instance_uid=series_uid)
    objects = write_outputs(analysis, out_dir=out, source_paths=files, settings=ONLY_KOS)
    return [pydicom.dcmread(out / o.file) for o in objects]


def test_flags_the_source_images_of_the_key_slices(synth: Synth, tmp_path: Path) -> None:
    [kos] = _write(list(synth.files), synth, tmp_path / "out")
    assert kos.SOPClassUID == KOS_SOP_CLASS and kos.Modality == "KO" and kos.SeriesNumber == 9704
    assert kos.StudyInstanceUID == synth.study_uid
    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == ("113000", "DCM", "Of Interest")
    # the same slices as the key images: canonical z -> the source image there
    analysis = analysis_from_series(list(synth.files), lungs=synth.phantom.lungs, lesions=synth.phantom.lesions,
                                    series_instance_uid=synth.series_uid)
    assert analysis.volume is not None
    expected = [analysis.volume.frames[z].sop_instance_uid
                for z in pick_slices(synth.phantom.lungs, synth.phantom.lesions, 3)]
    assert _references(kos) == [(uid, None) for uid in expected]
    evidence = kos.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == synth.series_uid
    assert {str(r.ReferencedSOPInstanceUID) for r in evidence.ReferencedSOPSequence} == set(expected)
    text = " ".join(str(i.TextValue) for i in kos.ContentSequence if i.ValueType == "TEXT")
    assert "not cleared for clinical use" in text and "image " in text


def test_enhanced_ct_frames_are_named(synth: Synth, tmp_path: Path) -> None:
    [(path, members)] = write_enhanced_ct(list(synth.files), tmp_path / "enh" / "ct.dcm", order_seed=4)
    [kos] = _write([path], synth, tmp_path / "out")
    [(uid, frames)] = _references(kos)
    assert uid == str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    classic_z = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): k
                 for k, f in enumerate(synth.files)}
    assert frames is not None and len(frames) == 3
    # frame n holds classic slice members[n-1]: the flagged frames are the key slices' frames
    analysis = analysis_from_series(list(synth.files), lungs=synth.phantom.lungs, lesions=synth.phantom.lesions,
                                    series_instance_uid=synth.series_uid)
    assert analysis.volume is not None
    key_files = {classic_z[analysis.volume.frames[z].sop_instance_uid]
                 for z in pick_slices(synth.phantom.lungs, synth.phantom.lesions, 3)}
    assert {members[n - 1] for n in frames} == key_files


def test_no_kos_without_lesions(synth: Synth, tmp_path: Path) -> None:
    assert _write(list(synth.files), synth, tmp_path / "out", lesions=np.zeros_like(synth.phantom.lesions)) == []


def test_no_kos_for_a_series_called_no_pneumonia(synth: Synth, tmp_path: Path) -> None:
    """A few false millilitres on a normal CT must not put key-image marks on the study the report calls normal."""
    files = list(synth.files)
    speck = np.zeros_like(synth.phantom.lesions)
    z = int(np.argmax((synth.phantom.lesions > 0).sum(axis=(1, 2))))
    speck[z] = synth.phantom.lesions[z]  # one slice of lesion: the slice rule says no pneumonia
    analysis = analysis_from_series(files, lungs=synth.phantom.lungs, lesions=speck,
                                    series_instance_uid=synth.series_uid,
                                    probabilities={"covid19": 0.05, "other_pneumonia": 0.1, "no_pneumonia": 0.85})
    assert analysis.slice_rule is not None and analysis.slice_rule.decision == "no_pneumonia"
    assert write_outputs(analysis, out_dir=tmp_path / "normal", source_paths=files, settings=ONLY_KOS) == []
    analysis.probabilities = {"covid19": 0.2, "other_pneumonia": 0.45, "no_pneumonia": 0.35}  # the model disagrees
    [kos] = write_outputs(analysis, out_dir=tmp_path / "called", source_paths=files, settings=ONLY_KOS)
    assert kos.kind == "kos"


@pytest.mark.parametrize(("result", "expected"), [
    ({"probabilities": {"covid19": 0.6, "other_pneumonia": 0.1, "no_pneumonia": 0.3}}, True),
    ({"probabilities": {"covid19": 0.1, "other_pneumonia": 0.1, "no_pneumonia": 0.8},
      "slice_rule": {"decision": "no_pneumonia"}}, False),
    ({"probabilities": {"covid19": 0.1, "other_pneumonia": 0.1, "no_pneumonia": 0.8},
      "slice_rule": {"decision": "pneumonia"}}, True),
    ({"probabilities": None, "slice_rule": None}, True),  # neither model nor rule ran: lesions alone decide
])
def test_calls_pneumonia(result: dict[str, object], expected: bool) -> None:
    assert calls_pneumonia(result) is expected


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) is not installed")
def test_dciodvfy_finds_no_error(synth: Synth, tmp_path: Path) -> None:
    _write(list(synth.files), synth, tmp_path / "out")
    proc = subprocess.run(["dciodvfy", str(tmp_path / "out" / "kos.dcm")], capture_output=True, text=True, timeout=60)
    report = proc.stdout + proc.stderr
    assert "KeyObjectSelectionDocument" in report
    assert not [line for line in report.splitlines() if line.startswith("Error")], report
