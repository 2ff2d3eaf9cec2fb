"""inspect_instance: what the SCP checks before it acknowledges a C-STORE.

Files are written with pydicom (valid file meta) and then damaged the way a broken sender or a
cut connection would damage them."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from node.errors import InstanceRejected
from node.receive.inspect import (
    STATUS_CANNOT_PARSE,
    STATUS_INCOMPLETE,
    STATUS_MISSING_UID,
    STATUS_SOP_CLASS_MISMATCH,
    STATUS_UID_MISMATCH,
    _walked_header,
    inspect_instance,
)
from tests.helpers.series import make_ct_dataset, rewrite_body, truncate_file, write_ct_series

SEQ_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


@pytest.fixture(autouse=True)
def _quiet_pydicom_warnings() -> None:
    warnings.simplefilter("ignore")


def ct_file(folder: Path, *, transfer_syntax: str = "explicit", matrix: int = 64) -> Path:
    return write_ct_series(folder / transfer_syntax, slices=1, matrix=matrix, transfer_syntax=transfer_syntax).files[0]


def inspect(path: Path, *, sop_class: str | None = None, sop_uid: str | None = None, check_request: bool = True):
    meta = pydicom.filereader.read_file_meta_info(path)
    return inspect_instance(
        path,
        sop_class_uid=sop_class or str(meta.MediaStorageSOPClassUID),
        sop_instance_uid=sop_uid or str(meta.MediaStorageSOPInstanceUID),
        check_request=check_request,
    )


def rejected(path: Path, **kw: object) -> InstanceRejected:
    with pytest.raises(InstanceRejected) as exc:
        inspect(path, **kw)  # type: ignore[arg-type]
    if exc.value.status not in (STATUS_UID_MISMATCH, STATUS_SOP_CLASS_MISMATCH):
        assert _walked_header(path) is None, "the lean walk must leave a refused file to pydicom"
    return exc.value


# -- a good instance ----------------------------------------------------------------------------
@pytest.mark.parametrize("ts", ["explicit", "implicit", "rle", "jpeg-ls", "jpeg2000", "jpeg-lossless"])
def test_good_instance_header(tmp_path: Path, ts: str) -> None:
    path = ct_file(tmp_path, transfer_syntax=ts)
    ds = pydicom.dcmread(path)
    h = inspect(path)
    assert h.sop_class_uid == CTImageStorage
    assert h.sop_instance_uid == ds.SOPInstanceUID
    assert h.series_instance_uid == ds.SeriesInstanceUID
    assert h.study_instance_uid == ds.StudyInstanceUID
    assert h.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    assert h.modality == "CT"
    assert h.manufacturer == "ACME"
    assert h.instance_number == 1
    assert h.series_number == 3
    assert h.patient_id == "TEST0001"
    assert h.patient_name == "Test^Phantom"  # for the audit trail
    assert h.study_date == "20240102"


# -- truncation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("ts", ["explicit", "implicit"])
@pytest.mark.parametrize("drop", [1, 2, 100, 8000])
def test_truncated_native_pixel_data(tmp_path: Path, ts: str, drop: int) -> None:
    src = ct_file(tmp_path, transfer_syntax=ts)  # 64x64x2 = 8192 bytes of pixel data, the last element
    truncate_file(src, tmp_path / "cut.dcm", drop=drop)
    rej = rejected(tmp_path / "cut.dcm")
    assert rej.status == STATUS_INCOMPLETE
    assert "(7FE0,0010)" in rej.reason or "pixel data truncated" in rej.reason


def test_short_native_pixel_data_with_consistent_length(tmp_path: Path) -> None:
    """Pixel Data whose own length is consistent but shorter than Rows x Columns x 2."""
    ds = make_ct_dataset(study_uid=generate_uid(), series_uid=generate_uid(), matrix=64)
    ds.PixelData = ds.PixelData[: 64 * 64]  # half a frame
    path = tmp_path / "short.dcm"
    ds.save_as(path, enforce_file_format=True)
    rej = rejected(path)
    assert rej.status == STATUS_INCOMPLETE
    assert "4096 of 8192" in rej.reason


def test_truncated_last_element_that_is_not_pixel_data(tmp_path: Path) -> None:
    ds = make_ct_dataset(study_uid=generate_uid(), series_uid=generate_uid(), matrix=16)
    del ds.PixelData
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage  # no pixel-length rule applies
    block = ds.private_block(0x7FE1, "LUNGNODE TEST", create=True)
    block.add_new(0x10, "OB", bytes(range(256)) * 4)  # (7FE1,1010), 1024 bytes, the last element
    src = tmp_path / "full.dcm"
    ds.save_as(src, enforce_file_format=True)
    assert inspect(src).sop_class_uid == MRImageStorage
    truncate_file(src, tmp_path / "cut.dcm", drop=10)
    rej = rejected(tmp_path / "cut.dcm")
    assert rej.status == STATUS_INCOMPLETE
    assert "(7FE1,1010) declares 1024 bytes, 1014 present" in rej.reason


@pytest.mark.parametrize("ts", ["rle", "jpeg-ls", "jpeg2000"])
@pytest.mark.parametrize("drop", [2, 8, 300])
def test_truncated_encapsulated_pixel_data(tmp_path: Path, ts: str, drop: int) -> None:
    src = ct_file(tmp_path, transfer_syntax=ts)
    assert src.read_bytes().endswith(SEQ_DELIMITER)
    truncate_file(src, tmp_path / "cut.dcm", drop=drop)
    assert rejected(tmp_path / "cut.dcm").status == STATUS_INCOMPLETE


@pytest.mark.parametrize("keep", [0, 2, 6])
def test_truncated_inside_pixel_data_header(tmp_path: Path, keep: int) -> None:
    src = ct_file(tmp_path)
    raw = src.read_bytes()
    start = raw.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) tag of Pixel Data
    (tmp_path / "cut.dcm").write_bytes(raw[: start + keep])
    assert rejected(tmp_path / "cut.dcm").status == STATUS_INCOMPLETE


# -- the image header of compressed pixel data -----------------------------------------------------
@pytest.mark.parametrize("ts", ["rle", "jpeg-ls", "jpeg2000", "jpeg-lossless"])
@pytest.mark.parametrize("missing", [("Rows",), ("Columns",), ("Rows", "Columns"), ("BitsAllocated",)])
def test_compressed_ct_without_rows_columns_or_bits_allocated_is_refused_by_name(
        tmp_path: Path, ts: str, missing: tuple[str, ...]) -> None:
    """Such images were acknowledged (0x0000): only native pixel data had its Rows and Columns checked."""
    src = ct_file(tmp_path, transfer_syntax=ts)
    ds = pydicom.dcmread(src)
    for keyword in missing:
        delattr(ds, keyword)
    path = tmp_path / "no-header.dcm"
    ds.save_as(path)  # as sent: the compressed pixel data kept, the header short of its image description
    rej = rejected(path)
    assert rej.status == STATUS_INCOMPLETE
    assert rej.reason.startswith(f"compressed pixel data without {' or '.join(missing)} ")


def test_compressed_ct_with_rows_0_is_refused(tmp_path: Path) -> None:
    ds = pydicom.dcmread(ct_file(tmp_path, transfer_syntax="jpeg-ls"))
    ds.Rows = 0
    ds.save_as(tmp_path / "rows0.dcm")
    rej = rejected(tmp_path / "rows0.dcm")
    assert rej.status == STATUS_INCOMPLETE and "without Rows (or 0)" in rej.reason


def test_native_pixel_data_without_bits_allocated_is_refused(tmp_path: Path) -> None:
    ds = make_ct_dataset(study_uid=generate_uid(), series_uid=generate_uid(), matrix=16)
    del ds.BitsAllocated
    ds["PixelData"].VR = "OW"  # pydicom takes the VR from BitsAllocated otherwise
    ds.save_as(tmp_path / "nobits.dcm", enforce_file_format=True)
    rej = rejected(tmp_path / "nobits.dcm")
    assert rej.status == STATUS_INCOMPLETE and "without BitsAllocated" in rej.reason


@pytest.mark.parametrize(("tag", "vr", "name"), [(0x7FE00008, "OF", "Float Pixel Data (7FE0,0008)"),
                                                 (0x7FE00009, "OD", "Double Float Pixel Data (7FE0,0009)")])
def test_ct_with_float_pixel_data_is_refused_as_unsupported_not_truncated(tmp_path: Path, tag: int, vr: str,
                                                                          name: str) -> None:
    ds = make_ct_dataset(study_uid=generate_uid(), series_uid=generate_uid(), matrix=16)
    values = (np.frombuffer(ds.PixelData, dtype=np.uint16).astype(np.float32) - 1024.0)
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.RescaleIntercept, ds.RescaleSlope
    ds.BitsAllocated = 32 if vr == "OF" else 64
    ds.add_new(tag, vr, values.astype(np.float32 if vr == "OF" else np.float64).tobytes())
    path = tmp_path / "float.dcm"
    ds.save_as(path, enforce_file_format=True)
    rej = rejected(path)
    assert rej.status == STATUS_INCOMPLETE
    assert f"a CT image with {name} and no Pixel Data (7FE0,0010)" in rej.reason and "float" in rej.reason
    assert "truncated" not in rej.reason


# -- garbage --------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(8))
def test_garbage_bytes_after_valid_file_meta(tmp_path: Path, seed: int) -> None:
    src = ct_file(tmp_path)
    body = np.random.default_rng(seed).bytes(3000)
    rewrite_body(src, tmp_path / "garbage.dcm", body)
    rej = rejected(tmp_path / "garbage.dcm")
    assert 0xC000 <= rej.status <= 0xCFFF, hex(rej.status)


@pytest.mark.parametrize(
    "body",
    [b"", b"this is not DICOM at all, just text\n" * 20, b"\x08\x00\x16\x00UI", b"\x00" * 7],
    ids=["empty", "text", "cut-header", "seven-zeros"],
)
def test_bodies_that_are_not_a_dataset(tmp_path: Path, body: bytes) -> None:
    src = ct_file(tmp_path)
    rewrite_body(src, tmp_path / "bad.dcm", body)
    rej = rejected(tmp_path / "bad.dcm")
    assert rej.status in (STATUS_CANNOT_PARSE, STATUS_MISSING_UID, STATUS_INCOMPLETE), hex(rej.status)


# -- UIDs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keyword", ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_missing_uid(tmp_path: Path, keyword: str) -> None:
    ds = make_ct_dataset(study_uid=generate_uid(), series_uid=generate_uid(), matrix=16)
    delattr(ds, keyword)
    path = tmp_path / "no-uid.dcm"
    ds.save_as(path, enforce_file_format=True)
    rej = rejected(path)
    assert rej.status == STATUS_MISSING_UID
    assert keyword in rej.reason


@pytest.mark.parametrize("value", ["1.2.abc", "1.02.3", "1." + "2" * 70])
def test_invalid_series_uid(tmp_path: Path, value: str) -> None:
    ds = make_ct_dataset(study_uid=generate_uid(), series_uid=value, matrix=16)
    path = tmp_path / "bad-uid.dcm"
    ds.save_as(path, enforce_file_format=True)
    rej = rejected(path)
    assert rej.status == STATUS_MISSING_UID
    assert "SeriesInstanceUID is not a valid UID" in rej.reason


def test_sop_instance_uid_differs_from_request(tmp_path: Path) -> None:
    path = ct_file(tmp_path)
    rej = rejected(path, sop_uid=generate_uid())
    assert rej.status == STATUS_UID_MISMATCH
    # a file found in the spool has no request to compare with
    assert inspect(path, sop_uid=generate_uid(), check_request=False).modality == "CT"


def test_sop_class_differs_from_request(tmp_path: Path) -> None:
    path = ct_file(tmp_path)
    rej = rejected(path, sop_class=MRImageStorage)
    assert rej.status == STATUS_SOP_CLASS_MISMATCH
    assert inspect(path, sop_class=MRImageStorage, check_request=False).sop_class_uid == CTImageStorage


def test_transfer_syntax_comes_from_file_meta(tmp_path: Path) -> None:
    path = ct_file(tmp_path, transfer_syntax="implicit")
    assert inspect(path).transfer_syntax_uid == "1.2.840.10008.1.2"
    assert inspect(ct_file(tmp_path)).transfer_syntax_uid == ExplicitVRLittleEndian
