"""The audit trail through real sockets on 127.0.0.1 (a UDP socket and a TCP listener the test reads): the RFC 5424
frame, the DICOM audit XML against the schema of PS3.15 A.5.1, a repository that is down and then back, one that
closes the connection, a full queue, and the configuration's checks."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from node.audit import AuditTrail
from node.config import AuditSettings, Config
from node.errors import LungnodeError
from tests.helpers.audit import every_event, parse, schema, study, udp_repository, xml_of
from tests.helpers.certs import Pki
from tests.helpers.net import free_port
from tests.helpers.wait import wait_until


def _trail(port: int, transport: str = "udp", backlog_dir: Path | None = None, **kw: object) -> AuditTrail:
    return AuditTrail(AuditSettings.model_validate({"host": "127.0.0.1", "port": port, "transport": transport, **kw}),
                      ae_title="LUNGNODE", backlog_dir=backlog_dir)


def test_every_event_is_one_rfc5424_datagram_whose_xml_the_dicom_schema_accepts() -> None:
    rng = schema()
    with udp_repository() as (port, sock):
        trail = _trail(port, source_id="LN-CT-3", enterprise_site_id="ST-MARY")
        trail.start()
        try:
            count = every_event(trail)
            datagrams = [sock.recv(65535) for _ in range(count)]
        finally:
            trail.stop()
    events = []
    for data in datagrams:
        doc = parse(xml_of(data))
        assert rng.validate(doc), f"{rng.error_log.last_error}\n{xml_of(data)}"
        assert doc.find("AuditSourceIdentification").attrib == {"AuditEnterpriseSiteID": "ST-MARY",
                                                                 "AuditSourceID": "LN-CT-3"}
        ident = doc.find("EventIdentification")
        events.append((ident.find("EventID").get("csd-code"), ident.get("EventActionCode"),
                       ident.get("EventOutcomeIndicator")))
    assert events == [("110100", "E", "0"), ("110104", "C", "4"), ("110104", "C", "4"), ("110103", "D", "0"),
                      ("110113", "E", "4"), ("110100", "E", "0")]
    sent = parse(xml_of(datagrams[2]))
    dest = next(p for p in sent.findall("ActiveParticipant") if p.find("RoleIDCode").get("csd-code") == "110152")
    assert (dest.get("NetworkAccessPointID"), dest.get("NetworkAccessPointTypeCode")) == ("pacs.hospital.example", "1")
    received = parse(xml_of(datagrams[1]))
    source = next(p for p in received.findall("ActiveParticipant") if p.find("RoleIDCode").get("csd-code") == "110153")
    assert (source.get("NetworkAccessPointID"), source.get("NetworkAccessPointTypeCode")) == ("10.1.2.3", "2")


def test_the_schema_refuses_a_message_that_breaks_it() -> None:
    """The validator the tests rely on can fail: a wrong outcome code, and a participant object without its name."""
    rng = schema()
    with udp_repository() as (port, sock):
        trail = _trail(port)
        trail.start()
        try:
            trail.instances_received(calling_ae="CT1", host="10.1.2.3", studies=[study()], refused=0)
            xml = xml_of(sock.recv(65535))
        finally:
            trail.stop()
    assert rng.validate(parse(xml))
    assert not rng.validate(parse(xml.replace('EventOutcomeIndicator="0"', 'EventOutcomeIndicator="5"')))
    assert not rng.validate(parse(re.sub(r"<ParticipantObjectName>[^<]*</ParticipantObjectName>", "", xml)))


def test_patient_names_with_markup_control_characters_and_accents_arrive_intact() -> None:
    with udp_repository() as (port, sock):
        trail = _trail(port)
        trail.start()
        try:
            trail.instances_received(calling_ae="CT<1>", host="10.1.2.3", refused=0,
                                     studies=[study('Müller^Zoë & "Kim" <x>\x1b$B')])
            data = sock.recv(65535)
        finally:
            trail.stop()
    doc = parse(xml_of(data))
    assert schema().validate(doc)
    patient = [o for o in doc.findall("ParticipantObjectIdentification") if o.get("ParticipantObjectTypeCode") == "1"]
    assert patient[0].findtext("ParticipantObjectName") == 'Müller^Zoë & "Kim" <x>$B', "ESC dropped, the rest kept"
    assert doc.find("ActiveParticipant").get("UserID") == "CT<1>"


class _TcpRepository:
    """A TCP listener that reads octet-counted frames (RFC 6587); ``close_after`` closes each connection after that
    many messages, as a repository restarting would."""

    def __init__(self, port: int, *, close_after: int | None = None) -> None:
        self.messages: list[bytes] = []
        self.connections = 0
        self.close_after = close_after
        self._server = socket.create_server(("127.0.0.1", port))
        self._server.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.settimeout(5)
            with conn, conn.makefile("rb") as stream:  # both closed: the file keeps the socket open otherwise
                taken = 0
                while self.close_after is None or taken < self.close_after:
                    length = b""
                    try:
                        while (c := stream.read(1)) not in (b" ", b""):
                            length += c
                    except OSError:  # idle for 5 s: drop the connection, as a repository may
                        break
                    if not length:
                        break
                    self.messages.append(stream.read(int(length)))
                    taken += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()


def test_a_repository_that_is_down_gets_the_queued_messages_in_order_once_it_is_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="node.audit")
    port = free_port()
    trail = _trail(port, "tcp")
    trail.start()
    try:
        for i in range(3):
            trail.node_authentication_failed(host=f"10.0.0.{i}", calling_ae=None, reason=f"attempt {i}")
        wait_until(lambda: "audit_send_failed" in caplog.text, what="the outage logged")
        time.sleep(1.5)  # a retry or two against the closed port
        assert caplog.text.count("audit_send_failed") == 1, "an outage is logged once, not at every retry"
        repo = _TcpRepository(port)
        try:
            wait_until(lambda: len(repo.messages) == 3, timeout=40, what="the queued messages delivered")
        finally:
            repo.close()
    finally:
        trail.stop()
    hosts = [parse(xml_of(m)).find("ActiveParticipant").get("NetworkAccessPointID") for m in repo.messages]
    assert hosts == ["10.0.0.0", "10.0.0.1", "10.0.0.2"]
    assert "event=audit_restored" in caplog.text


def test_a_connection_the_repository_closed_is_opened_again_for_the_next_message() -> None:
    port = free_port()
    repo = _TcpRepository(port, close_after=1)
    trail = _trail(port, "tcp")
    trail.start()
    try:
        for i in range(3):
            trail.application_activity(started=True)
            wait_until(lambda: len(repo.messages) == i + 1, timeout=15, what=f"message {i + 1}")
            time.sleep(0.2)  # the repository has closed the connection by now
    finally:
        trail.stop()
        repo.close()
    assert repo.connections == 3, "each message after a close went on a new connection, none was lost"


def test_a_full_queue_drops_new_messages_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    trail = _trail(free_port(), "tcp", queue_size=10)  # never started: nothing takes from the queue
    for _ in range(15):
        trail.application_activity(started=True)
    assert caplog.text.count("event=audit_dropped") == 1
    assert "messages=1 " in caplog.text, "the first drop is logged, the next ones within the minute counted"
    assert trail._dropped == 5


def test_stop_gives_up_on_a_repository_that_stays_down_and_counts_what_was_not_sent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    trail = _trail(free_port(), "tcp")
    trail.start()
    for _ in range(4):
        trail.application_activity(started=False)
    started = time.monotonic()
    trail.stop(timeout=1.0)
    assert time.monotonic() - started < 5
    assert re.search(r"event=audit_unsent messages=4\b", caplog.text), caplog.text


def test_messages_the_repository_did_not_take_are_kept_on_disk_and_sent_first_at_the_next_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A repository down across a stop, and across a process that ended without stopping (a crash): no message is
    lost, none is sent twice, and the older ones go first."""
    caplog.set_level(logging.INFO, logger="node.audit")
    # The port stays bound, not listening, while the repository is down: connections are refused, and no other
    # program on the machine can take the port and accept the messages meanwhile.
    reserved = socket.socket()
    reserved.bind(("127.0.0.1", 0))
    port, backlog = reserved.getsockname()[1], tmp_path / "spool" / "audit"
    first = _trail(port, "tcp", backlog_dir=backlog)
    first.start()
    for i in range(3):
        first.node_authentication_failed(host=f"10.0.0.{i}", calling_ae=None, reason="before the stop")
    first.stop(timeout=1.0)
    assert re.search(rf"event=audit_kept messages=3 folder={re.escape(str(backlog))}", caplog.text), caplog.text
    assert len(list(backlog.glob("*.syslog"))) == 3
    assert {f.stat().st_mode & 0o777 for f in backlog.iterdir()} == {0o600}, "they name patients"

    crashed = _trail(port, "tcp", backlog_dir=backlog)  # never stopped: its thread is left behind, as by a crash
    crashed.start()
    crashed.node_authentication_failed(host="10.0.0.3", calling_ae=None, reason="before the crash")
    wait_until(lambda: len(list(backlog.glob("*.syslog"))) == 4, what="the fourth message on disk")
    crashed._stop.set()  # the abandoned thread must not send: the repository is not up yet anyway
    crashed._thread.join(5)

    reserved.close()
    repo = _TcpRepository(port)
    last = _trail(port, "tcp", backlog_dir=backlog)
    try:
        last.start()
        assert "event=audit_backlog messages=4" in caplog.text
        last.node_authentication_failed(host="10.0.0.4", calling_ae=None, reason="after the restart")
        wait_until(lambda: len(repo.messages) == 5, timeout=20, what="the kept messages and the new one")
        last.stop()
    finally:
        repo.close()
    hosts = [parse(xml_of(m)).find("ActiveParticipant").get("NetworkAccessPointID") for m in repo.messages]
    assert hosts == [f"10.0.0.{i}" for i in range(5)]
    assert list(backlog.iterdir()) == []


def test_messages_handed_over_while_a_send_hangs_are_kept_at_stop(tmp_path: Path, pki: Pki) -> None:
    """A repository that accepts TCP and never answers the TLS handshake holds the sending thread past stop()'s
    wait: the messages it had not taken yet (the Application Stop among them) still go to the backlog folder."""
    backlog = tmp_path / "audit"
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        trail = _trail(silent.getsockname()[1], "tls", backlog_dir=backlog, tls={"ca_certificates": str(pki.ca)})
        trail.start()
        trail.application_activity(started=True)
        wait_until(lambda: len(list(backlog.glob("*.syslog"))) == 1, what="the first message taken")
        trail.application_activity(started=False)  # handed over while the thread waits on the handshake
        trail.stop(timeout=1.0)
    assert len(list(backlog.glob("*.syslog"))) == 2


def test_a_backlog_folder_that_cannot_be_made_stops_the_start_with_what_to_fix(tmp_path: Path) -> None:
    (tmp_path / "spool").write_text("a file where the folder goes")
    trail = _trail(free_port(), "tcp", backlog_dir=tmp_path / "spool" / "audit")
    with pytest.raises(LungnodeError, match="audit backlog folder .* cannot be used .*storage.spool_dir"):
        trail.start()


def test_audit_off_sends_nothing_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node.audit")
    trail = AuditTrail(AuditSettings(), ae_title="LUNGNODE")
    trail.start()
    assert every_event(trail) and trail._queue.empty() and trail._thread is None
    assert "event=audit_off" in caplog.text


def test_tls_transport_needs_the_repository_ca() -> None:
    with pytest.raises(ValidationError, match="transport tls needs tls.ca_certificates"):
        Config.model_validate({"audit": {"host": "audit.hospital.example"}})
    assert Config.model_validate({"audit": {"host": "audit.hospital.example", "transport": "udp"}}).audit.port == 6514
    with pytest.raises(ValidationError, match="audit.transport"):
        Config.model_validate({"audit": {"host": "10.0.0.1", "transport": "smtp"}})


def test_a_stow_rs_destination_is_named_by_its_url() -> None:
    url = "https://vna.hospital.example/dicom-web"
    with udp_repository() as (port, sock):
        trail = _trail(port)
        trail.start()
        try:
            trail.instances_sent(destination_ae=None, host="vna.hospital.example", url=url, calling_ae="LUNGNODE",
                                 studies=[study()], failed=0, error=None)
            doc = parse(xml_of(sock.recv(65535)))
        finally:
            trail.stop()
    assert schema().validate(doc)
    (dest,) = [p for p in doc.findall("ActiveParticipant") if p.find("RoleIDCode").get("csd-code") == "110152"]
    assert (dest.get("UserID"), dest.get("AlternativeUserID")) == (url, None)
    assert (dest.get("NetworkAccessPointID"), dest.get("NetworkAccessPointTypeCode")) == ("vna.hospital.example", "1")


def test_one_message_per_patient_each_with_its_own_studies() -> None:
    """IHE ATNA: one patient per message. An association (or a send batch) with two patients' studies gave one
    message naming both, which a repository files under one of them."""
    from collections import Counter

    from node.audit import StudyRecord
    from tests.helpers.audit import CT

    def record(uid: str, patient: str) -> StudyRecord:
        return StudyRecord(uid, patient_id=patient, patient_name=f"{patient}^Name", sop_classes=Counter({CT: 2}))

    studies = [record("1.2.3.1", "P-1"), record("1.2.3.2", "P-2"), record("1.2.3.3", "P-1")]
    rng = schema()
    with udp_repository() as (port, sock):
        trail = _trail(port)
        trail.start()
        try:
            trail.instances_received(calling_ae="CT1", host="10.1.2.3", studies=studies, refused=0)
            trail.instances_sent(destination_ae="PACS", host="10.1.2.4", calling_ae="LUNGNODE", studies=studies,
                                 failed=0, error=None)
            docs = [parse(xml_of(sock.recv(65535))) for _ in range(4)]
        finally:
            trail.stop()
    found = []
    for doc in docs:
        assert rng.validate(doc), rng.error_log.last_error
        objects = doc.findall("ParticipantObjectIdentification")
        patients = [o.get("ParticipantObjectID") for o in objects if o.get("ParticipantObjectTypeCode") == "1"]
        found.append((sorted(set(patients)),
                      [o.get("ParticipantObjectID") for o in objects if o.get("ParticipantObjectTypeCode") == "2"]))
    expected = [(["P-1"], ["1.2.3.1", "1.2.3.3"]), (["P-2"], ["1.2.3.2"])]
    assert found == expected * 2


def test_a_message_too_large_for_udp_is_dropped_with_an_error_and_holds_up_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A datagram over 64 KiB can never go: retried forever, it blocked every audit message behind it."""
    from collections import Counter

    from node.audit import StudyRecord

    huge = StudyRecord("1.2.3.9", patient_id="P-9", sop_classes=Counter({f"1.2.840.99.{i}": 1 for i in range(3000)}))
    with udp_repository() as (port, sock):
        trail = _trail(port)
        trail.start()
        try:
            trail.instances_received(calling_ae="CT1", host="10.1.2.3", studies=[huge], refused=0)
            trail.application_activity(started=False)
            doc = parse(xml_of(sock.recv(65535)))
        finally:
            trail.stop()
    assert doc.find("EventIdentification/EventTypeCode").get("originalText") == "Application Stop"
    assert re.search(r"ERROR .*event=audit_message_dropped .*reason=\"\d+ bytes do not fit in one UDP datagram\" "
                     r"fix=\"use audit.transport tls or tcp", caplog.text), caplog.text
