"""Whose results they are and what made them: the attributes every created object carries alike.

Each object copies the patient and study from the source images, so an archive files the SEG, SR, key
images and KOS with the CT they describe. An archive that matches patients on ID and issuer (IHE
multi-domain) would file an object that lacks the issuer under another patient, so the issuer
sequences travel too, and a de-identified source stays marked as such in every object. Each object
also names the node as its equipment (manufacturer, model, software version, device serial number),
so a reader can tell which installation and version made it.
"""

from __future__ import annotations

from copy import deepcopy

from pydicom.dataset import Dataset

from node import MANUFACTURER, __version__

MODEL_NAME = "lungnode"
#: Patient and study values the outputs copy from the source images (highdicom's patient, study and
#: general-study modules). One the standard's value representation does not allow stops highdicom.
COPIED_KEYWORDS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime",
                   "PatientSex", "PatientAge", "PatientSize", "PatientWeight", "StudyDate", "StudyTime", "StudyID",
                   "AccessionNumber", "ReferringPhysicianName", "StudyDescription")
#: ``COPIED_KEYWORDS`` and what highdicom copies into the SEG and SR but not into a Secondary Capture or a KOS.
IDENTITY_KEYWORDS = (*COPIED_KEYWORDS, "IssuerOfPatientIDQualifiersSequence", "OtherPatientIDsSequence",
                     "IssuerOfAccessionNumberSequence", "PatientIdentityRemoved", "DeidentificationMethod",
                     "DeidentificationMethodCodeSequence")


def copy_identity(target: Dataset, source: Dataset) -> None:
    """Copy the patient and study attributes ``source`` has (with a value) into ``target``."""
    for keyword in IDENTITY_KEYWORDS:
        if keyword in source and source[keyword].value not in (None, ""):
            setattr(target, keyword, deepcopy(source[keyword].value))


def name_equipment(ds: Dataset, device_serial_number: str) -> None:
    """The General Equipment values of a created object: this node, its version and its serial number."""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.SoftwareVersions = __version__
    ds.DeviceSerialNumber = device_serial_number
