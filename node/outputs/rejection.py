"""IHE IOCM rejection note: a Key Object Selection that withdraws results a later analysis replaced.

Late images open a new revision of a series, and ``lungnode reanalyse`` runs other models on it: the new results
carry new UIDs (``node.outputs.uids``) and the old ones stay in the archive, so a reader would find two answers
for one series. Imaging Object Change Management (IHE RAD IOCM) lets the creator withdraw instances: a KOS in the
same study titled "Rejected for Quality Reasons" (DCM 113001, CID 7011) whose evidence lists them. An archive
that supports IOCM hides or deletes what the note lists; one that does not files the note as one more document,
which is why only destinations with ``reject_replaced`` get one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID, ExplicitVRLittleEndian

from node import MANUFACTURER
from node.outputs.charset import settle_character_set
from node.outputs.clock import creation_moment, stamp_creation
from node.outputs.identity import copy_identity, name_equipment
from node.outputs.sr import device_observer

REJECTED_FOR_QUALITY_REASONS = codes.DCM.RejectedForQualityReasons  # (113001, DCM), CID 7011

#: What highdicom's KOS reads from its first evidence item (present, empty here): the note then copies the values
#: from the new results, with the other identity attributes (``IDENTITY_KEYWORDS``).
_READ_BY_HIGHDICOM = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                      "StudyID", "AccessionNumber", "ReferringPhysicianName")


@dataclass(frozen=True)
class Replaced:
    """One object the destination received that a later analysis replaced."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str


def _is_image(sop_class_uid: str) -> bool:
    """SEG and Secondary Capture are images (an IMAGE reference); SR and KOS documents are not (COMPOSITE)."""
    name = UID(sop_class_uid).name
    return not ("SR" in name or "Key Object" in name or "Report" in name)


def _evidence(like: Dataset, obj: Replaced) -> Dataset:
    ds = Dataset()
    for keyword in _READ_BY_HIGHDICOM:
        setattr(ds, keyword, "")
    ds.StudyInstanceUID = like.StudyInstanceUID
    if "SpecificCharacterSet" in like:
        ds.SpecificCharacterSet = like.SpecificCharacterSet
    ds.SeriesInstanceUID, ds.SOPClassUID, ds.SOPInstanceUID = (
        obj.series_instance_uid, obj.sop_class_uid, obj.sop_instance_uid)
    if _is_image(obj.sop_class_uid):
        ds.Rows = ds.Columns = 1  # only tells highdicom to reference it as an IMAGE; not written into the note
    return ds


def build_rejection_note(*, like: Dataset, replaced: Sequence[Replaced], sop_instance_uid: str,
                         series_instance_uid: str, series_number: int, series_description: str, reason: str,
                         device_serial_number: str = "1", device_uid: str | None = None) -> Dataset:
    """The rejection note withdrawing ``replaced``; ``like``: an object of the new results (same patient and study),
    whose header the note's patient and study modules copy. ``reason``: why, in the Key Object Description."""
    if not replaced:
        raise ValueError("a rejection note needs at least one object to withdraw")
    evidence = [_evidence(like, obj) for obj in replaced]
    content = hd.ko.KeyObjectSelection(
        document_title=REJECTED_FOR_QUALITY_REASONS, referenced_objects=evidence,
        observer_device_context=device_observer(device_serial_number, device_uid), description=reason)
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=evidence, content=content, series_instance_uid=series_instance_uid, series_number=series_number,
        sop_instance_uid=sop_instance_uid, instance_number=1, manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian)
    note.SeriesDescription = series_description
    copy_identity(note, like)  # the patient as the withdrawn objects name it
    if like.get("TimezoneOffsetFromUTC"):
        note.TimezoneOffsetFromUTC = like.TimezoneOffsetFromUTC
    name_equipment(note, device_serial_number)
    stamp_creation(note, *creation_moment(like))
    settle_character_set(note)
    return note
