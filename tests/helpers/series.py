"""Test series: ``make_series`` wraps node.synthetic (the project's chest-CT phantom); the small
pydicom generator below makes the hand-crafted datasets (other classes, broken files, late slices).

The small generator writes valid, minimal CT Image Storage files: a water cylinder with two air "lungs", stored
values = HU + 1024 (unsigned, RescaleIntercept -1024), so every codec handles them losslessly.
Compressed transfer syntaxes come from pydicom's encoders, except JPEG lossless (process 14 SV1),
which pydicom cannot encode: that one is made with dcmtk's dcmcjpeg.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from node.synthetic import TRANSFER_SYNTAXES
from tests.helpers.dcmtk import run_dcmtk

if TYPE_CHECKING:
    from node.synthetic import Phantom


@dataclass
class SeriesInfo:
    """What a test needs to know about the series it wrote."""

    folder: Path
    files: list[Path]
    study_uid: str
    series_uid: str
    sop_uids: list[str]
    transfer_syntax: UID
    sop_class_uid: str = CTImageStorage
    extra: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.files)


def file_meta(sop_class: str, sop_uid: str, ts: UID) -> FileMetaDataset:
    """File meta information for a test dataset written by pydicom."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _common(ds: Dataset, *, study_uid: str, series_uid: str, sop_uid: str, sop_class: str, modality: str,
            manufacturer: str, series_number: int, instance_number: int) -> None:
    today = dt.date(2024, 1, 2).strftime("%Y%m%d")
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[series_uid, "for"])
    ds.PatientName = "Test^Phantom"
    ds.PatientID = "TEST0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = today
    ds.StudyTime = "101010"
    ds.SeriesDate = today
    ds.AccessionNumber = "ACC0001"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = modality
    ds.Manufacturer = manufacturer
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.SeriesDescription = "test series"


def _slice_pixels(matrix: int, z: int, slices: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:matrix, 0:matrix].astype(np.float32)
    c = (matrix - 1) / 2
    r = np.hypot(x - c, y - c)
    hu = np.full((matrix, matrix), -1000.0, dtype=np.float32)
    hu[r < 0.45 * matrix] = 20.0
    lung = 0.16 * matrix * (0.6 + 0.4 * np.sin(np.pi * (z + 1) / (slices + 1)))
    hu[np.hypot(x - c + 0.2 * matrix, y - c) < lung] = -850.0
    hu[np.hypot(x - c - 0.2 * matrix, y - c) < lung] = -850.0
    hu += rng.normal(0.0, 15.0, hu.shape).astype(np.float32)
    return np.clip(hu + 1024.0, 0, 4095).astype(np.uint16)


def make_ct_dataset(
    *, study_uid: str, series_uid: str, sop_uid: str | None = None, index: int = 0, slices: int = 1,
    matrix: int = 64, manufacturer: str = "ACME", seed: int = 0, thickness: float = 2.5,
) -> Dataset:
    """One axial CT slice (explicit VR little endian, uncompressed)."""
    sop_uid = sop_uid or generate_uid()
    ds = Dataset()
    ds.file_meta = file_meta(CTImageStorage, sop_uid, ExplicitVRLittleEndian)
    _common(ds, study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid, sop_class=CTImageStorage,
            modality="CT", manufacturer=manufacturer, series_number=3, instance_number=index + 1)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.KVP = "120"
    ds.SliceThickness = f"{thickness:g}"
    ds.PatientPosition = "HFS"
    ds.ImagePositionPatient = [-160.0, -160.0, -index * thickness]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [320.0 / matrix, 320.0 / matrix]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = matrix
    ds.Columns = matrix
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.WindowCenter = "-450"
    ds.WindowWidth = "1350"
    rng = np.random.default_rng(seed * 100003 + index)
    ds.PixelData = _slice_pixels(matrix, index, slices, rng).tobytes()
    return ds


def _encode(ds: Dataset, path: Path, ts: UID) -> None:
    """Write ``ds`` (uncompressed) to ``path`` in transfer syntax ``ts``."""
    if ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = ts
        ds.save_as(path, enforce_file_format=True)
    elif ts == JPEGLosslessSV1:
        tmp = path.with_suffix(".raw.dcm")
        ds.save_as(tmp, enforce_file_format=True)
        run_dcmtk("dcmcjpeg", "+e1", tmp, path, check=True)
        tmp.unlink()
    else:
        ds.compress(ts, encoding_plugin="pyjpegls" if ts == JPEGLSLossless else "")
        ds.save_as(path, enforce_file_format=True)


def write_ct_series(
    outdir: Path, *, slices: int = 40, matrix: int = 128, transfer_syntax: str = "explicit",
    study_uid: str | None = None, series_uid: str | None = None, manufacturer: str = "ACME", seed: int = 0,
) -> SeriesInfo:
    """Write ``slices`` CT slices as IM00001.dcm... into ``outdir``."""
    ts = TRANSFER_SYNTAXES[transfer_syntax]
    outdir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    files, uids = [], []
    for i in range(slices):
        ds = make_ct_dataset(study_uid=study_uid, series_uid=series_uid, index=i, slices=slices, matrix=matrix,
                             manufacturer=manufacturer, seed=seed)
        path = outdir / f"IM{i + 1:05d}.dcm"
        _encode(ds, path, ts)
        files.append(path)
        uids.append(str(ds.SOPInstanceUID))
    return SeriesInfo(outdir, files, study_uid, series_uid, uids, ts)


def write_secondary_capture(path: Path, *, manufacturer: str = "lungnode", study_uid: str | None = None) -> SeriesInfo:
    """A small 8-bit Secondary Capture image, e.g. a key image as this node would write it."""
    sop_uid, series_uid, study_uid = generate_uid(), generate_uid(), study_uid or generate_uid()
    ds = Dataset()
    ds.file_meta = file_meta(SecondaryCaptureImageStorage, sop_uid, ExplicitVRLittleEndian)
    _common(ds, study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid, sop_class=SecondaryCaptureImageStorage,
            modality="OT", manufacturer=manufacturer, series_number=901, instance_number=1)
    ds.ConversionType = "WSD"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 32
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(32 * 32) % 251).astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return SeriesInfo(path.parent, [path], study_uid, series_uid, [sop_uid], ExplicitVRLittleEndian,
                      sop_class_uid=SecondaryCaptureImageStorage)


def write_mr_image(path: Path, *, matrix: int = 32) -> SeriesInfo:
    """A small MR image from another vendor: a storage class the node keeps but never analyses."""
    sop_uid, series_uid, study_uid = generate_uid(), generate_uid(), generate_uid()
    ds = Dataset()
    ds.file_meta = file_meta(MRImageStorage, sop_uid, ExplicitVRLittleEndian)
    _common(ds, study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid, sop_class=MRImageStorage,
            modality="MR", manufacturer="OTHERVENDOR", series_number=5, instance_number=1)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.EchoTime = "10"
    ds.RepetitionTime = "500"
    ds.EchoTrainLength = "1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = matrix
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(matrix * matrix) % 1000).astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return SeriesInfo(path.parent, [path], study_uid, series_uid, [sop_uid], ExplicitVRLittleEndian,
                      sop_class_uid=MRImageStorage)


def dataset_offset(path: Path) -> int:
    """Byte offset where the dataset (after the file meta) starts in a Part 10 file."""
    raw = path.read_bytes()
    # 128-byte preamble + "DICM" + (0002,0000) UL element (12 bytes) whose value is the group length
    assert raw[128:132] == b"DICM"
    group_len = int.from_bytes(raw[140:144], "little")
    return 144 + group_len


def rewrite_body(src: Path, dst: Path, body: bytes) -> None:
    """Copy ``src``'s preamble and file meta (valid) and replace the dataset with ``body`` bytes."""
    raw = src.read_bytes()
    off = dataset_offset(src)
    dst.write_bytes(raw[:off] + body)


def rewrite_meta(src: Path, dst: Path, **overrides: str) -> None:
    """Copy ``src`` with some file meta elements changed (e.g. MediaStorageSOPInstanceUID), body untouched.

    pynetdicom's SCU takes the C-STORE request's UIDs from the file meta, so this makes a request
    that disagrees with its dataset. (pydicom's save_as would silently "fix" the meta.)
    """
    import io

    from pydicom.filereader import read_file_meta_info
    from pydicom.filewriter import write_file_meta_info

    meta = read_file_meta_info(src)
    for keyword, value in overrides.items():
        setattr(meta, keyword, value)
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)  # type: ignore[arg-type]
    dst.write_bytes(buf.getvalue() + src.read_bytes()[dataset_offset(src):])


def truncate_file(src: Path, dst: Path, *, drop: int) -> None:
    """Copy ``src`` without its last ``drop`` bytes."""
    raw = src.read_bytes()
    dst.write_bytes(raw[: len(raw) - drop])


@functools.lru_cache(maxsize=8)
def _phantom(kind: str, slices: int, matrix: int, seed: int) -> Phantom:
    from node.synthetic import PhantomSpec, make_phantom

    return make_phantom(PhantomSpec(kind=kind, slices=slices, matrix=matrix, seed=seed))  # type: ignore[arg-type]


def make_series(outdir: Path, *, slices: int = 40, matrix: int = 128, transfer_syntax: str = "explicit",
                seed: int = 0, kind: str = "covid", orientation: str = "HFS") -> SeriesInfo:
    """A synthetic chest-CT series from node.synthetic (phantoms cached per process), fresh UIDs each call."""
    from pydicom.filereader import read_file_meta_info

    from node.synthetic import SeriesOptions, write_series

    phantom = _phantom(kind, slices, matrix, seed)
    written = write_series(outdir, phantom, SeriesOptions(transfer_syntax=transfer_syntax, orientation=orientation,  # type: ignore[arg-type]
                                                          seed=None, write_truth=False))
    files = list(written.files)
    sops = [str(read_file_meta_info(f).MediaStorageSOPInstanceUID) for f in files]
    assert set(sops) == set(written.sop_instance_uids)
    return SeriesInfo(outdir, files, written.study_instance_uid, written.series_instance_uid, sops,
                      UID(written.transfer_syntax_uid))


def add_slice(series: SeriesInfo, outdir: Path, *, index: int, matrix: int) -> SeriesInfo:
    """One more slice of an existing series (a late instance), written to ``outdir``."""
    ds = make_ct_dataset(study_uid=series.study_uid, series_uid=series.series_uid, index=index, slices=index + 1,
                         matrix=matrix)
    first = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    ds.PatientID, ds.PatientName = first.get("PatientID", ""), first.get("PatientName", "")  # the same patient
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / f"IM{index + 1:05d}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return SeriesInfo(outdir, [path], series.study_uid, series.series_uid, [str(ds.SOPInstanceUID)],
                      ExplicitVRLittleEndian)
