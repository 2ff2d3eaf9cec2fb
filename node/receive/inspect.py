"""Read and check a received instance before it is acknowledged.

pydicom reads a truncated file without complaint (it returns short values), so completeness is
checked here: the last element must hold as many bytes as its header declares, native pixel
data must be as long as Rows x Columns x frames says, and compressed pixel data needs Rows, Columns
and BitsAllocated to be decoded at all. Anything wrong becomes an InstanceRejected
carrying the DICOM status to answer.
"""

from __future__ import annotations

import unicodedata
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID

from node.errors import InstanceRejected
from node.receive.walk import walk_file

# Storage service statuses (PS3.4 B.2.3). The C000 range is "cannot understand".
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_CANNOT_PARSE = 0xC210
STATUS_MISSING_UID = 0xC221
STATUS_UID_MISMATCH = 0xC222
STATUS_INCOMPLETE = 0xC223
STATUS_OTHER_STUDY = 0xC224  # the series is already known under another study or patient

#: The Error Comment (0000,0902; LO, at most 64 characters) of each refusal, which a PACS shows beside the status:
#: what went wrong in words, naming no patient. The node's log line (event=store_refused) has the whole reason.
ERROR_COMMENTS = {
    STATUS_OUT_OF_RESOURCES: "lungnode: out of resources (spool or database); send it again",
    STATUS_SOP_CLASS_MISMATCH: "lungnode: SOP Class differs from the one the request names",
    STATUS_CANNOT_PARSE: "lungnode: the data set cannot be read",
    STATUS_MISSING_UID: "lungnode: a Study, Series or SOP Instance UID is missing",
    STATUS_UID_MISMATCH: "lungnode: SOP Instance UID differs from the request's",
    STATUS_INCOMPLETE: "lungnode: pixel data or image attributes missing or cut short",
    STATUS_OTHER_STUDY: "lungnode: conflicts with images held (study, series, PatientID)",
}

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
ANALYSABLE_SOP_CLASSES = frozenset({CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE})

_UNDEFINED = 0xFFFFFFFF
#: Pixel data elements a CT image cannot use in place of Pixel Data (7FE0,0010), by tag.
FLOAT_PIXEL_DATA = {0x7FE00008: "Float Pixel Data (7FE0,0008)", 0x7FE00009: "Double Float Pixel Data (7FE0,0009)"}


@dataclass(frozen=True)
class InstanceHeader:
    """What the ledger needs from one instance; PHI fields are stored, never logged."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    instance_number: int | None
    patient_id: str | None
    accession_number: str | None
    study_date: str | None
    manufacturer: str | None
    software_versions: str | None
    patient_name: str | None = None  # for the audit trail (IHE ATNA) only, never stored


#: The ledger's integer columns are 32-bit (PostgreSQL refuses more); an IS value may hold 12 digits.
INT32 = range(-2**31, 2**31)


def for_ledger(header: InstanceHeader) -> InstanceHeader:
    """The header with values every ledger database can hold: integers outside 32 bits become unknown, text loses
    control characters (PostgreSQL refuses a NUL; other characters, a no-break space say, stay as sent, so a
    Patient ID compares as before). The file in the spool keeps what was sent."""
    changes: dict[str, Any] = {}
    for f in fields(header):
        value = getattr(header, f.name)
        if isinstance(value, int) and value not in INT32:
            changes[f.name] = None
        elif isinstance(value, str) and any(unicodedata.category(c) == "Cc" for c in value):
            changes[f.name] = "".join(c for c in value if unicodedata.category(c) != "Cc") or None
    return replace(header, **changes) if changes else header


def _str(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value)


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _check_uid(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if not value:
        raise InstanceRejected(STATUS_MISSING_UID, f"dataset has no {keyword}")
    uid = str(value)
    if not UID(uid).is_valid:
        raise InstanceRejected(STATUS_MISSING_UID, f"{keyword} is not a valid UID")
    return uid


_SEQ_DELIMITER = (b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", b"\xff\xfe\xe0\xdd\x00\x00\x00\x00")  # LE, BE


def _truncated(reason: str) -> InstanceRejected:
    return InstanceRejected(STATUS_INCOMPLETE, f"dataset truncated: {reason}")


def _check_complete(ds: Dataset, path: Path) -> None:
    """The file must end exactly where its last element ends, and images must carry their pixels."""
    size = path.stat().st_size
    tags = sorted(ds.keys())
    if tags:
        raw = ds.get_item(tags[-1])
        if isinstance(raw, RawDataElement) and raw.value_tell is not None:
            if raw.length == _UNDEFINED:
                with path.open("rb") as fh:
                    fh.seek(max(0, size - 8))
                    if fh.read(8) not in _SEQ_DELIMITER:
                        raise _truncated(f"element {raw.tag} of undefined length has no closing delimiter")
            else:
                end = raw.value_tell + raw.length
                if end > size:
                    raise _truncated(f"element {raw.tag} declares {raw.length} bytes, {size - raw.value_tell} present")
                if end < size:
                    raise _truncated(f"{size - end} stray bytes after element {raw.tag} (an element header cut short)")
    if str(ds.get("SOPClassUID", "")) in ANALYSABLE_SOP_CLASSES and "PixelData" not in ds:
        if float_pixels := [name for tag, name in FLOAT_PIXEL_DATA.items() if tag in ds]:
            raise InstanceRejected(STATUS_INCOMPLETE, f"a CT image with {float_pixels[0]} and no Pixel Data "
                                   "(7FE0,0010): CT numbers are stored as integers with a rescale, and this node "
                                   "does not take float pixel data for CT")
        raise _truncated("a CT image without pixel data")
    if "PixelData" not in ds:
        return
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        problem = _encapsulated_problem(_int(ds, "Rows"), _int(ds, "Columns"), _int(ds, "BitsAllocated"))
    else:
        problem = _pixel_length_problem(len(ds.PixelData or b""), _int(ds, "Rows"), _int(ds, "Columns"),
                                        _int(ds, "SamplesPerPixel"), _int(ds, "NumberOfFrames"),
                                        _int(ds, "BitsAllocated"))
    if problem:
        raise InstanceRejected(STATUS_INCOMPLETE, problem)


def _encapsulated_problem(rows: int | None, cols: int | None, bits: int | None) -> str | None:
    """Why the header of compressed pixel data cannot describe its frames, or None. Their length says nothing (the
    codestream's size is checked when decoded, ``node.pipeline.codestream``), but without Rows, Columns and Bits
    Allocated (type 1, PS3.3 C.7.6.3) no decoder can make an image of them."""
    missing = [name for name, value in (("Rows", rows), ("Columns", cols), ("BitsAllocated", bits)) if not value]
    if missing:
        return (f"compressed pixel data without {' or '.join(missing)} (or 0): Rows, Columns and BitsAllocated must "
                "be given and positive")
    return None


def _pixel_length_problem(got: int, rows: int | None, cols: int | None, samples: int | None, frames: int | None,
                          bits: int | None) -> str | None:
    """Why native pixel data of ``got`` bytes does not fit the image header, or None when it does.

    One pad byte may make an odd length even. Shared by the lean walk and pydicom's path, so both
    accept and refuse the same files."""
    if not rows or not cols:
        return f"an image of {rows or 0} x {cols or 0} pixels: Rows and Columns must be given and positive"
    if not bits:
        return "pixel data without BitsAllocated (or 0): its length cannot be checked, nor its pixels read"
    expected = rows * cols * (samples or 1) * (frames or 1) * (bits or 0) // 8
    if got < expected:
        return f"pixel data truncated: {got} of {expected} bytes"
    if expected and got > expected + expected % 2:
        return (f"pixel data longer than Rows x Columns x SamplesPerPixel x NumberOfFrames x BitsAllocated "
                f"says: {got} bytes for {expected}")
    return None


def inspect_instance(
    path: Path, *, sop_class_uid: str, sop_instance_uid: str, check_request: bool = True
) -> InstanceHeader:
    """Parse the received file and check it against the C-STORE request; raise InstanceRejected.

    A clean little-endian file is read by the lean walk (``walk``); any other, and any file the
    walk has a doubt about, by pydicom, which names the reason for a refusal.
    ``check_request=False`` skips the comparison with the request (a file found in the spool).
    """
    header = for_ledger(_walked_header(path) or _pydicom_header(path))
    if not check_request:
        return header
    if header.sop_instance_uid != sop_instance_uid:
        raise InstanceRejected(
            STATUS_UID_MISMATCH, "SOPInstanceUID in the dataset differs from AffectedSOPInstanceUID of the request"
        )
    if header.sop_class_uid != sop_class_uid:
        raise InstanceRejected(
            STATUS_SOP_CLASS_MISMATCH, "SOPClassUID in the dataset differs from AffectedSOPClassUID of the request"
        )
    return header


def _walked_header(path: Path) -> InstanceHeader | None:
    """The header from the lean walk, when the walk and every check pydicom's path makes pass."""
    walked = walk_file(path)
    if walked is None:
        return None
    v = walked.values
    found = [v.get(k) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")]
    uids = [u.strip() for u in found if isinstance(u, str)]  # (pydicom's UID strips both ends)
    if len(uids) < 4 or not all(UID(u).is_valid for u in uids):
        return None
    sop_class, sop_instance, study, series = uids
    encapsulated = walked.encapsulated
    if walked.pixel_data_length is None:
        if sop_class in ANALYSABLE_SOP_CLASSES:
            return None
    elif encapsulated != (walked.pixel_data_length == -1):
        return None
    elif encapsulated:
        if _encapsulated_problem(_as_int(v.get("Rows")), _as_int(v.get("Columns")), _as_int(v.get("BitsAllocated"))):
            return None  # pydicom's path names what is missing
    else:
        if _pixel_length_problem(walked.pixel_data_length, _as_int(v.get("Rows")), _as_int(v.get("Columns")),
                                 _as_int(v.get("SamplesPerPixel")), _int_text(v.get("NumberOfFrames")),
                                 _as_int(v.get("BitsAllocated"))):
            return None  # pydicom's path names what is wrong
    text = {k: val for k, val in v.items() if isinstance(val, str)}
    return InstanceHeader(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        study_instance_uid=study,
        series_instance_uid=series,
        transfer_syntax_uid=walked.transfer_syntax_uid,
        modality=text.get("Modality"),
        series_number=_int_text(text.get("SeriesNumber")),
        series_description=text.get("SeriesDescription"),
        instance_number=_int_text(text.get("InstanceNumber")),
        patient_id=text.get("PatientID"),
        patient_name=text.get("PatientName"),
        accession_number=text.get("AccessionNumber"),
        study_date=text.get("StudyDate"),
        manufacturer=text.get("Manufacturer"),
        software_versions=text.get("SoftwareVersions"),
    )


def _as_int(value: str | int | None) -> int:
    return value if isinstance(value, int) else 0


def _int_text(value: str | int | None) -> int | None:
    """An IS value as pydicom's IS reads it: an integer, or a float with no fraction."""
    if not isinstance(value, str):
        return None
    try:
        return int(value)
    except ValueError:
        try:
            number = float(value)
        except ValueError:
            return None
        return int(number) if number.is_integer() else None


def _pydicom_header(path: Path) -> InstanceHeader:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path)
            ds.keys()  # force the element walk so garbled streams fail here
        for w in caught:
            if "before delimiter" in str(w.message) or "End of file" in str(w.message):
                raise _truncated(str(w.message))
        _check_complete(ds, path)
        # Values are converted only when read, so a garbled one (an unknown VR) fails here.
        return InstanceHeader(
            sop_class_uid=_check_uid(ds, "SOPClassUID"),
            sop_instance_uid=_check_uid(ds, "SOPInstanceUID"),
            study_instance_uid=_check_uid(ds, "StudyInstanceUID"),
            series_instance_uid=_check_uid(ds, "SeriesInstanceUID"),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            modality=_str(ds, "Modality"),
            series_number=_int(ds, "SeriesNumber"),
            series_description=_str(ds, "SeriesDescription"),
            instance_number=_int(ds, "InstanceNumber"),
            patient_id=_str(ds, "PatientID"),
            patient_name=_str(ds, "PatientName"),
            accession_number=_str(ds, "AccessionNumber"),
            study_date=_str(ds, "StudyDate"),
            manufacturer=_str(ds, "Manufacturer"),
            software_versions=_str(ds, "SoftwareVersions"),
        )
    except InstanceRejected:
        raise
    except Exception as exc:  # pydicom raises many types on garbled input; all mean "cannot understand"
        raise InstanceRejected(STATUS_CANNOT_PARSE, f"dataset cannot be parsed: {type(exc).__name__}: {exc}") from exc
