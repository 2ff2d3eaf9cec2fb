"""A created object keeps the source's Specific Character Set unless one of its values does not fit it."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from node.outputs.charset import UTF8, settle_character_set, writable_character_set


def _object(charset: str | list[str] | None, **values: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _round_trip(ds: Dataset, tmp_path: Path) -> Dataset:
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    return pydicom.dcmread(tmp_path / "x.dcm")


def test_values_that_fit_keep_the_source_character_set(tmp_path: Path) -> None:
    ds = _object("ISO_IR 100", PatientName="Müller^Jürgen", SeriesDescription="Lungs (lungnode, not for clinical use)")
    assert settle_character_set(ds) is False
    back = _round_trip(ds, tmp_path)
    assert back.SpecificCharacterSet == "ISO_IR 100" and back.PatientName == "Müller^Jürgen"


def test_a_configured_description_outside_the_source_set_switches_the_object_to_utf8(tmp_path: Path) -> None:
    """Without the switch pydicom writes 'Lunge ? Ä ?', with only a warning."""
    ds = _object("ISO_IR 100", PatientName="Müller^Jürgen", SeriesDescription="Lunge – Ä 肺")
    assert settle_character_set(ds) is True
    back = _round_trip(ds, tmp_path)
    assert back.SpecificCharacterSet == UTF8
    assert (back.SeriesDescription, back.PatientName) == ("Lunge – Ä 肺", "Müller^Jürgen")


def test_values_inside_sequences_are_checked(tmp_path: Path) -> None:
    item = Dataset()
    item.CodeMeaning = "Milchglas – Trübung"  # en dash: not in Latin-1
    ds = _object("ISO_IR 100", ConceptNameCodeSequence=Sequence([item]))
    assert settle_character_set(ds) is True
    assert _round_trip(ds, tmp_path).ConceptNameCodeSequence[0].CodeMeaning == "Milchglas – Trübung"


def test_without_a_character_set_only_ascii_fits() -> None:
    assert settle_character_set(_object(None, PatientName="Doe^John")) is False
    assert settle_character_set(_object(None, PatientName="Müller^Jürgen")) is True


def test_japanese_iso_2022_names_stay_in_their_set(tmp_path: Path) -> None:
    ds = _object(["", "ISO 2022 IR 87"], PatientName="Yamada^Tarou=山田^太郎")
    assert settle_character_set(ds) is False
    back = _round_trip(ds, tmp_path)
    assert back.PatientName == "Yamada^Tarou=山田^太郎"


def test_utf8_objects_are_left_alone() -> None:
    assert settle_character_set(_object(UTF8, PatientName="肺^太郎", SeriesDescription="Лёгкие")) is False


@pytest.mark.parametrize(("source", "written"), [
    (["", "ISO 2022 IR 87"], ["ISO 2022 IR 6", "ISO 2022 IR 87"]),  # an empty value 1 is ISO 2022 IR 6
    ("ISO 2022 IR 100", "ISO_IR 100"),  # one code-extension term: the plain one
    ("ISO 2022 IR 6", None),
    ("ISO_IR 100", "ISO_IR 100"),
    (["ISO 2022 IR 6", "ISO 2022 IR 149"], UTF8),  # Korean: highdicom does not take it, UTF-8 holds it
    ("ISO 2022 IR 58", UTF8),
    ("GB18030", "GB18030"),
    (None, None),
])
def test_the_source_character_set_is_written_in_a_form_highdicom_takes(source: str | list[str] | None,
                                                                        written: str | list[str] | None) -> None:
    assert writable_character_set(source) == written


def test_source_elements_pydicom_cannot_decode_are_left_out_of_the_headers(tmp_path: Path) -> None:
    """A private element sent with the explicit VR 'ZZ' made decoding the source headers raise NotImplementedError
    (with a traceback in its message), and no output was built. A public one sent so is read with its dictionary VR."""
    from node.outputs.charset import prepare_source_character_sets
    from node.outputs.seg import read_source_headers

    ds = _object("ISO_IR 100", PatientName="Müller^Jürgen", StudyID="S1")
    item = Dataset()
    item.add_new(0x00090010, "LO", "PRIVCREATOR")
    item.add_new(0x00091011, "LO", "NESTED")
    ds.add_new(0x00090010, "LO", "PRIVCREATOR")
    ds.add_new(0x00091010, "LO", "PRIVVAL1")
    ds.add_new(0x00400260, "SQ", Sequence([item]))  # Performed Protocol Code Sequence, a private element inside
    path = tmp_path / "zz.dcm"
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    for tag in (b"\x09\x00\x10\x10", b"\x09\x00\x11\x10", b"\x20\x00\x10\x00"):  # (0009,1010), (0009,1011), StudyID
        raw = raw.replace(tag + b"LO", tag + b"ZZ", 1).replace(tag + b"SH", tag + b"ZZ", 1)
    path.write_bytes(raw)
    with pytest.raises(NotImplementedError):
        pydicom.dcmread(path).decode()
    [header] = read_source_headers([path]).values()
    prepare_source_character_sets([header])
    assert (header.StudyID, header.PatientName) == ("S1", "Müller^Jürgen")
    assert 0x00091010 not in header and 0x00091011 not in header.PerformedProtocolCodeSequence[0]
    assert header.PerformedProtocolCodeSequence[0][0x00090010].value == "PRIVCREATOR"
