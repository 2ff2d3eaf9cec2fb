"""What the audit tests share: the DICOM audit message schema (PS3.15 A.5.1) to validate against, the RFC 5424
frame the node writes, a UDP socket standing in for the repository, and one call of every audited event."""

from __future__ import annotations

import re
import socket
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from node.audit import AuditTrail, StudyRecord

SCHEMA = Path(__file__).resolve().parents[1] / "data" / "dicom-audit-message.rng"
CT = "1.2.840.10008.5.1.4.1.1.2"
HEADER = re.compile(rb"^<85>1 (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00) (\S+) lungnode (\d+) IHE\+RFC-3881 - "
                    rb"\xef\xbb\xbf(<AuditMessage>.*</AuditMessage>)$", re.S)


def schema() -> Any:
    from lxml import etree

    return etree.RelaxNG(etree.parse(str(SCHEMA)))


def parse(xml: str) -> Any:
    from lxml import etree

    return etree.fromstring(xml.encode("utf-8"))


def xml_of(datagram: bytes) -> str:
    """The XML of one syslog message, after checking its RFC 5424 header."""
    match = HEADER.match(datagram)
    assert match, datagram[:120]
    return match.group(4).decode("utf-8")


def study(name: str = "Doe^Jane") -> StudyRecord:
    return StudyRecord("1.2.826.0.1.3680043.8.498.1", patient_id="P-1", patient_name=name, accession="A-7",
                       study_date="20260101", sop_classes=Counter({CT: 120}))


@contextmanager
def udp_repository() -> Iterator[tuple[int, socket.socket]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(10)
    try:
        yield sock.getsockname()[1], sock
    finally:
        sock.close()


def every_event(trail: AuditTrail) -> int:
    """Each audited event once; how many messages that makes."""
    trail.application_activity(started=True)
    trail.instances_received(calling_ae="CT1", host="10.1.2.3", studies=[study()], refused=2)
    trail.instances_sent(destination_ae="PACS", host="pacs.hospital.example", calling_ae="LUNGNODE",
                         studies=[study()], failed=1, error="0xA700 out of resources")
    trail.instances_deleted(study=study(), reason="received images kept 7 days (retention)")
    trail.node_authentication_failed(host="10.9.9.9", calling_ae=None, reason="TLS handshake failed: unknown ca")
    trail.application_activity(started=False)
    return 6
