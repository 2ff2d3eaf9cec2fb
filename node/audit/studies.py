"""The studies (and their patients) a set of DICOM files belongs to, read from the files' headers for the audit
trail: the ledger keeps no patient names, and the objects sent are the node's own results."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import pydicom

from node.audit.messages import StudyRecord
from node.logs import kv

log = logging.getLogger(__name__)

_TAGS = ["SOPClassUID", "StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyDate"]


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    return str(ds.get(keyword) or "") or None


def studies_of(paths: Iterable[Path]) -> list[StudyRecord]:
    """One record per study, counting the files per SOP class; a file that cannot be read is left out (logged)."""
    studies: dict[str, StudyRecord] = {}
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
            uid = str(ds.StudyInstanceUID)
            sop_class = str(ds.SOPClassUID)
        except (OSError, AttributeError, pydicom.errors.InvalidDicomError) as exc:
            log.warning(kv("audit_file_unreadable", file=path.name, reason=f"{type(exc).__name__}: {exc}"))
            continue
        study = studies.get(uid)
        if study is None:
            study = studies[uid] = StudyRecord(uid, patient_id=_text(ds, "PatientID"),
                                               patient_name=_text(ds, "PatientName"),
                                               accession=_text(ds, "AccessionNumber"),
                                               study_date=_text(ds, "StudyDate"))
        study.sop_classes[sop_class] += 1
    return list(studies.values())
