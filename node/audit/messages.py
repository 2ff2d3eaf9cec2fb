"""DICOM audit messages (PS3.15 A.5, the XML of IHE ATNA): what happened, who took part, which patient and study.

Pure functions from facts to the XML document; sending is ``node.audit.syslog``'s job. The element order and the
attributes follow the DICOM Audit Message Schema (A.5.1); the codes are DICOM's (DCM) and RFC 3881's.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

#: (code, coding scheme, meaning) as the schema's coded values take them.
Code = tuple[str, str, str]

APPLICATION_ACTIVITY: Code = ("110100", "DCM", "Application Activity")
INSTANCES_ACCESSED: Code = ("110103", "DCM", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED: Code = ("110104", "DCM", "DICOM Instances Transferred")
SECURITY_ALERT: Code = ("110113", "DCM", "Security Alert")
APPLICATION_START: Code = ("110120", "DCM", "Application Start")
APPLICATION_STOP: Code = ("110121", "DCM", "Application Stop")
NODE_AUTHENTICATION: Code = ("110126", "DCM", "Node Authentication")
ROLE_APPLICATION: Code = ("110150", "DCM", "Application")
ROLE_LAUNCHER: Code = ("110151", "DCM", "Application Launcher")
ROLE_DESTINATION: Code = ("110152", "DCM", "Destination Role ID")
ROLE_SOURCE: Code = ("110153", "DCM", "Source Role ID")
STUDY_UID: Code = ("110180", "DCM", "Study Instance UID")
PATIENT_NUMBER: Code = ("2", "RFC-3881", "Patient Number")

#: EventOutcomeIndicator: success, minor failure (some of the work failed), serious failure (refused).
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = "0", "4", "8"

Action = Literal["C", "R", "U", "D", "E"]

#: Characters XML 1.0 cannot carry (DICOM text may hold them: an ESC of ISO 2022, a stray NUL).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _text(value: str) -> str:
    return _NOT_XML.sub("", value)


@dataclass(frozen=True)
class Participant:
    """An application (or person) taking part: a DICOM peer by AE title and address, or this node."""

    user_id: str
    requestor: bool
    role: Code | None = None
    alternative_user_id: str | None = None
    address: str | None = None  # IP address or host name (told apart when written)


@dataclass
class StudyRecord:
    """One study's part in an event: its patient and how many instances of each SOP class."""

    study_uid: str
    patient_id: str | None = None
    patient_name: str | None = None
    accession: str | None = None
    study_date: str | None = None
    sop_classes: Counter[str] = field(default_factory=Counter)


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    value, scheme, meaning = code
    return ET.SubElement(parent, tag, {"csd-code": value, "codeSystemName": scheme, "originalText": meaning})


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _participant(root: ET.Element, p: Participant) -> None:
    attrs = {"UserID": _text(p.user_id)}
    if p.alternative_user_id:
        attrs["AlternativeUserID"] = _text(p.alternative_user_id)
    attrs["UserIsRequestor"] = "true" if p.requestor else "false"
    if p.address:
        attrs["NetworkAccessPointID"] = p.address
        attrs["NetworkAccessPointTypeCode"] = "2" if _is_ip(p.address) else "1"
    element = ET.SubElement(root, "ActiveParticipant", attrs)
    if p.role is not None:
        _coded(element, "RoleIDCode", p.role)


def _objects(root: ET.Element, study: StudyRecord) -> None:
    """The study (type 2 system object, role 3 report) and its patient (type 1 person, role 1 patient)."""
    obj = ET.SubElement(root, "ParticipantObjectIdentification", {
        "ParticipantObjectID": study.study_uid, "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3"})
    _coded(obj, "ParticipantObjectIDTypeCode", STUDY_UID)
    ET.SubElement(obj, "ParticipantObjectName").text = ""  # the schema asks for a name or a query; a study has neither
    if study.study_date:
        ET.SubElement(obj, "ParticipantObjectDetail", {
            "type": "StudyDate", "value": base64.b64encode(study.study_date.encode("ascii", "replace")).decode()})
    if study.accession or study.sop_classes:
        description = ET.SubElement(obj, "ParticipantObjectDescription")
        if study.accession:
            ET.SubElement(description, "Accession", {"Number": _text(study.accession)})
        for uid, count in sorted(study.sop_classes.items()):
            ET.SubElement(description, "SOPClass", {"UID": uid, "NumberOfInstances": str(count)})
    patient = ET.SubElement(root, "ParticipantObjectIdentification", {
        "ParticipantObjectID": _text(study.patient_id or ""), "ParticipantObjectTypeCode": "1",
        "ParticipantObjectTypeCodeRole": "1"})
    _coded(patient, "ParticipantObjectIDTypeCode", PATIENT_NUMBER)
    ET.SubElement(patient, "ParticipantObjectName").text = _text(study.patient_name or "")


def build(
    *,
    event: Code,
    action: Action | None,
    outcome: str,
    participants: list[Participant],
    source_id: str,
    site_id: str | None = None,
    event_type: Code | None = None,
    outcome_description: str | None = None,
    studies: list[StudyRecord] | None = None,
) -> str:
    """One AuditMessage document (no XML declaration: syslog carries it as UTF-8 after a BOM)."""
    root = ET.Element("AuditMessage")
    attrs: dict[str, str] = {}
    if action is not None:
        attrs["EventActionCode"] = action
    attrs["EventDateTime"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
    attrs["EventOutcomeIndicator"] = outcome
    ident = ET.SubElement(root, "EventIdentification", attrs)
    _coded(ident, "EventID", event)
    if event_type is not None:
        _coded(ident, "EventTypeCode", event_type)
    if outcome_description:
        ET.SubElement(ident, "EventOutcomeDescription").text = _text(outcome_description)
    for p in participants:
        _participant(root, p)
    source = {"AuditSourceID": _text(source_id)}
    if site_id:
        source = {"AuditEnterpriseSiteID": _text(site_id), **source}
    src = ET.SubElement(root, "AuditSourceIdentification", source)
    ET.SubElement(src, "AuditSourceTypeCode", {"csd-code": "4"})  # application server process
    for study in studies or []:
        _objects(root, study)
    return ET.tostring(root, encoding="unicode")
