"""Audit messages for the hospital's audit record repository (IHE ATNA): DICOM PS3.15 A.5 XML over syslog."""

from node.audit.messages import StudyRecord
from node.audit.trail import AuditTrail, no_audit

__all__ = ["AuditTrail", "StudyRecord", "no_audit"]
