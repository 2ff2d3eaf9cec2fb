"""IHE ATNA audit messages to a real audit repository: Debian's rsyslogd on 127.0.0.1, over mutual TLS from
``lungnode serve``, over UDP from the sender and over TCP from retention. Every message must parse as RFC 5424 in
rsyslog and validate against the DICOM audit message schema (PS3.15 A.5.1)."""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from sqlalchemy.orm import Session, sessionmaker

from node.audit import AuditTrail
from node.config import AuditSettings, Config, Destination
from node.db.models import Instance, Job, JobState, Series, SeriesOrigin, SeriesState, Study, utcnow
from node.receive.retention import purge_expired
from node.receive.spool import Spool
from node.send.outbox import enqueue_results
from node.send.sender import Sender
from tests.helpers.audit import parse, schema
from tests.helpers.certs import Pki
from tests.helpers.dcmtk import echoscu, have_dcmtk, run_dcmtk, storescp_running, storescu
from tests.helpers.net import free_port
from tests.helpers.node_proc import NodeProcess, run_cli
from tests.helpers.outbox import make_job, write_results
from tests.helpers.rsyslog import Received, Repository, have_rsyslog, received, rsyslog_running, wait_received
from tests.helpers.series import write_ct_series
from tests.helpers.wait import wait_until

pytestmark = pytest.mark.skipif(not have_rsyslog(), reason="rsyslogd with rsyslog-gnutls is not installed "
                                "(the audit repository of these tests): apt-get install rsyslog rsyslog-gnutls")

FAST = {"retry_base_s": 0.2, "retry_factor": 2.0, "retry_max_delay_s": 1.0, "poll_interval_s": 0.1,
        "connect_timeout_s": 5, "max_attempts": 1}


@pytest.fixture
def repository(tmp_path: Path, pki: Pki) -> Iterator[Repository]:
    with rsyslog_running(tmp_path / "rsyslog", pki) as repo:
        yield repo


def _event(msg: Received) -> str:
    return str(parse(msg.xml).find("EventIdentification/EventID").get("originalText"))


def _valid(messages: list[Received]) -> None:
    rng = schema()
    for msg in messages:
        assert (msg.msgid, msg.app_name, msg.pri) == ("IHE+RFC-3881", "lungnode", "85"), msg
        assert rng.validate(parse(msg.xml)), f"{rng.error_log.last_error}\n{msg.xml}"


def _participants(doc: Any) -> dict[str, dict[str, str]]:
    """Active participants by role meaning (or UserID when without a role)."""
    out = {}
    for p in doc.findall("ActiveParticipant"):
        role = p.find("RoleIDCode")
        out[role.get("originalText") if role is not None else p.get("UserID")] = dict(p.attrib)
    return out


def _objects(doc: Any) -> dict[str, Any]:
    """Participant objects by ID type: "Study Instance UID" and "Patient Number"."""
    return {o.find("ParticipantObjectIDTypeCode").get("originalText"): o
            for o in doc.findall("ParticipantObjectIdentification")}


def test_serve_audits_start_images_received_a_refused_caller_and_stop_over_mutual_tls(
    tmp_path: Path, pki: Pki, repository: Repository,
) -> None:
    if not have_dcmtk("storescu", "echoscu"):
        pytest.skip("dcmtk's storescu/echoscu are not installed")
    series = write_ct_series(tmp_path / "ct", slices=5, matrix=32)
    node = NodeProcess(tmp_path / "node", settings={
        "dicom": {"allowed_callers": ["STORESCU"]},
        "audit": {"host": "127.0.0.1", "port": repository.tls, "transport": "tls", "enterprise_site_id": "HOSPITAL",
                  "tls": {"ca_certificates": str(pki.ca), "certificate": str(pki.client_cert),
                          "private_key": str(pki.client_key)}},
    })
    node.start()
    try:
        assert storescu(node.port, *series.files).returncode == 0
        # the node's own health check is refused too (not on the list), and is no security alert
        assert run_cli("echo", "--config", node.config_path, "--timeout", "5").returncode == 0
        assert echoscu(node.port, calling="INTRUDER").returncode != 0  # not in allowed_callers: rejected
        node.wait_for_log(r"event=association_rejected calling_ae=INTRUDER")
        # an allowed caller that names another AE title is refused by pynetdicom itself, and audited the same way
        assert echoscu(node.port, calling="STORESCU", called="OTHERNODE").returncode != 0
        node.wait_for_log(r"event=association_rejected calling_ae=STORESCU called_ae=OTHERNODE")
    finally:
        assert node.stop() == 0
    assert "event=audit_on" in node.log and "audit_send_failed" not in node.log
    messages = wait_received(repository, 5)
    _valid(messages)
    assert [_event(m) for m in messages] == ["Application Activity", "DICOM Instances Transferred", "Security Alert",
                                             "Security Alert", "Application Activity"], "in the order they happened"
    start, transferred, alert, wrong_called, stop = (parse(m.xml) for m in messages)
    assert start.find("EventIdentification/EventTypeCode").get("originalText") == "Application Start"
    assert stop.find("EventIdentification/EventTypeCode").get("originalText") == "Application Stop"
    assert start.find("AuditSourceIdentification").attrib == {"AuditSourceID": "LUNGNODE",
                                                              "AuditEnterpriseSiteID": "HOSPITAL"}

    ident = transferred.find("EventIdentification")
    assert (ident.get("EventActionCode"), ident.get("EventOutcomeIndicator")) == ("C", "0")
    who = _participants(transferred)
    assert who["Source Role ID"]["UserID"] == "STORESCU" and who["Source Role ID"]["UserIsRequestor"] == "true"
    assert who["Source Role ID"]["NetworkAccessPointID"] == "127.0.0.1"
    assert who["Destination Role ID"]["UserID"] == "LUNGNODE"
    objs = _objects(transferred)
    study = objs["Study Instance UID"]
    assert study.get("ParticipantObjectID") == series.study_uid
    sop_classes = study.findall("ParticipantObjectDescription/SOPClass")
    assert [(c.get("UID"), c.get("NumberOfInstances")) for c in sop_classes] == [(series.sop_class_uid, "5")]
    assert study.find("ParticipantObjectDescription/Accession").get("Number") == "ACC0001"
    patient = objs["Patient Number"]
    assert patient.get("ParticipantObjectID") == "TEST0001"
    assert patient.findtext("ParticipantObjectName") == "Test^Phantom"

    ident = alert.find("EventIdentification")
    assert ident.find("EventTypeCode").get("originalText") == "Node Authentication"
    assert ident.get("EventOutcomeIndicator") == "4" and "allowed_callers" in ident.findtext("EventOutcomeDescription")
    assert _participants(alert)["INTRUDER"]["UserIsRequestor"] == "true"
    assert "called AE title 'OTHERNODE'" in wrong_called.find("EventIdentification").findtext("EventOutcomeDescription")
    assert _participants(wrong_called)["STORESCU"]["UserIsRequestor"] == "true"


def test_audit_messages_survive_a_crash_while_the_repository_is_down(
    tmp_path: Path, pki: Pki, repository: Repository,
) -> None:
    """kill -9 while the repository is down: the messages wait under the spool folder and the next start sends
    them first, in the order they happened."""
    if not have_dcmtk("storescu"):
        pytest.skip("dcmtk's storescu is not installed")
    series = write_ct_series(tmp_path / "ct", slices=3, matrix=32)
    down = socket.socket()  # bound, not listening: refused, and no other program can take the port meanwhile
    down.bind(("127.0.0.1", 0))
    node = NodeProcess(tmp_path / "node", settings={
        "audit": {"host": "127.0.0.1", "port": down.getsockname()[1], "transport": "tcp"}})
    node.start()
    try:
        assert storescu(node.port, *series.files).returncode == 0
        node.wait_for_log(r"event=audit_send_failed")
        kept = node.spool_dir / "audit"
        wait_until(lambda: len(list(kept.glob("*.syslog"))) == 2, what="start and transfer messages on disk")
        node.kill()
        status = run_cli("status", "--config", node.config_path)
        assert "2 audit messages waiting for the audit repository" in status.stdout, status.stdout
        metrics = run_cli("status", "--metrics", "--config", node.config_path)
        assert "lungnode_audit_messages_waiting 2" in metrics.stdout, metrics.stdout
        node.reconfigure({"audit": {"port": repository.tcp}})
        node.start()
        node.wait_for_log(r"event=audit_backlog messages=2")
        messages = wait_received(repository, 3)
    finally:
        node.stop()
        down.close()
    _valid(messages)
    assert [_event(m) for m in messages] == ["Application Activity", "DICOM Instances Transferred",
                                             "Application Activity"]
    assert list(kept.iterdir()) == [], "all sent, the Application Stop of the clean stop included"


def _send(sessions: sessionmaker[Session], dest: Destination, audit: AuditTrail, results: Path,
          repository: Repository, *, messages: int) -> list[Received]:
    """Queue ``results`` for ``dest``, run a sender until the repository holds ``messages`` audit messages."""
    enqueue_results(sessions, job_id=make_job(sessions), results_dir=results, destinations=[dest])
    config = Config.model_validate({"dicom": {"ae_title": "LUNGNODE", "bind_address": "127.0.0.1"},
                                    "destinations": [dest.model_dump()], "sending": FAST})
    sender = Sender(config, sessions, audit)
    sender.start()
    try:
        return wait_received(repository, messages)
    finally:
        sender.stop()


def test_results_sent_and_a_send_that_failed_are_audited_over_udp(
    tmp_path: Path, sessions: sessionmaker[Session], repository: Repository,
) -> None:
    if not have_dcmtk("storescp"):
        pytest.skip("dcmtk's storescp is not installed")
    audit = AuditTrail(AuditSettings(host="127.0.0.1", port=repository.udp, transport="udp"), ae_title="LUNGNODE")
    audit.start()
    objects = write_results(tmp_path / "results")
    study_uid = str(pydicom.dcmread(objects[0].path, stop_before_pixels=True).StudyInstanceUID)
    try:
        with storescp_running(tmp_path / "storescp") as port:
            dest = Destination(name="store", ae_title="STORESCP", host="127.0.0.1", port=port)
            sent = _send(sessions, dest, audit, tmp_path / "results", repository, messages=1)
        down = Destination(name="down", ae_title="NOBODY", host="127.0.0.1", port=free_port())
        messages = _send(sessions, down, audit, tmp_path / "results", repository, messages=2)
    finally:
        audit.stop()
    _valid(messages)
    assert messages[0] == sent[0]
    ok, failed = (parse(m.xml) for m in messages)
    assert ok.find("EventIdentification").get("EventOutcomeIndicator") == "0"
    who = _participants(ok)
    assert who["Source Role ID"]["UserID"] == "LUNGNODE" and who["Source Role ID"]["UserIsRequestor"] == "true"
    assert who["Destination Role ID"]["UserID"] == "STORESCP"
    study = _objects(ok)["Study Instance UID"]
    assert study.get("ParticipantObjectID") == study_uid
    counted = {c.get("UID"): int(c.get("NumberOfInstances")) for c in study.iter("SOPClass")}
    assert counted == {o.sop_class_uid: 1 for o in objects}, "one SEG, one SR, one key image"

    ident = failed.find("EventIdentification")
    assert ident.get("EventOutcomeIndicator") == "8", "nothing delivered: a serious failure"
    assert "3 object(s) not delivered" in ident.findtext("EventOutcomeDescription")
    assert _participants(failed)["Destination Role ID"]["UserID"] == "NOBODY"
    assert failed.find("ParticipantObjectIdentification") is None, "no study was transferred"


def test_retention_deleting_images_is_audited_over_tcp(
    tmp_path: Path, sessions: sessionmaker[Session], repository: Repository,
) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    series = write_ct_series(tmp_path / "ct", slices=3, matrix=16)
    for path, sop in zip(series.files, series.sop_uids):
        target = spool.path_for(series.series_uid, sop)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    with sessions.begin() as s:
        row = Series(study=Study(study_instance_uid=series.study_uid), series_instance_uid=series.series_uid,
                     modality="CT", origin=SeriesOrigin.modality, state=SeriesState.complete, revision=1,
                     instance_count=3, completed_at=utcnow() - dt.timedelta(days=8))
        s.add(Job(series=row, revision=1, state=JobState.done))
        s.flush()
        for sop in series.sop_uids:  # the ledger names what retention deletes
            path = spool.path_for(series.series_uid, sop)
            s.add(Instance(series_id=row.id, sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                           transfer_syntax_uid="1.2.840.10008.1.2.1", revision=1, path=str(path),
                           size_bytes=path.stat().st_size))
    audit = AuditTrail(AuditSettings(host="127.0.0.1", port=repository.tcp, transport="tcp"), ae_title="LUNGNODE")
    audit.start()
    try:
        assert purge_expired(spool, sessions, days=7, audit=audit) == 1
        (msg,) = wait_received(repository, 1)
    finally:
        audit.stop()
    _valid([msg])
    doc = parse(msg.xml)
    ident = doc.find("EventIdentification")
    assert (_event(msg), ident.get("EventActionCode")) == ("DICOM Instances Accessed", "D")
    assert "7 days" in ident.findtext("EventOutcomeDescription")
    study = _objects(doc)["Study Instance UID"]
    assert study.get("ParticipantObjectID") == series.study_uid
    assert [c.get("NumberOfInstances") for c in study.iter("SOPClass")] == ["3"]
    assert _objects(doc)["Patient Number"].get("ParticipantObjectID") == "TEST0001"
    wait_until(lambda: not (spool.instances / series.series_uid).exists(), what="series deleted")


def test_a_caller_refused_at_the_tls_handshake_is_a_security_alert(
    tmp_path: Path, pki: Pki, repository: Repository,
) -> None:
    if not have_dcmtk("echoscu"):
        pytest.skip("dcmtk's echoscu is not installed")
    node = NodeProcess(tmp_path / "node", settings={
        "dicom": {"tls": {"enabled": True, "certificate": str(pki.server_cert), "private_key": str(pki.server_key),
                          "ca_certificates": str(pki.ca)}},
        "audit": {"host": "127.0.0.1", "port": repository.udp, "transport": "udp"},
    })
    node.start()
    try:
        stranger = run_dcmtk("echoscu", "-aec", "LUNGNODE", "+tls", pki.other_client_key, pki.other_client_cert,
                             "+cf", pki.ca, "127.0.0.1", str(node.port), timeout=30)
        assert stranger.returncode != 0
        node.wait_for_log(r"event=tls_handshake_failed")
        messages = wait_received(repository, 2)  # Application Start, then the alert
    finally:
        node.stop()
    _valid(messages)
    alert = parse(messages[1].xml)
    ident = alert.find("EventIdentification")
    assert ident.find("EventTypeCode").get("originalText") == "Node Authentication"
    assert ident.findtext("EventOutcomeDescription").startswith("TLS handshake failed: certificate verify failed")
    caller = next(p for p in alert.findall("ActiveParticipant") if p.get("UserIsRequestor") == "true")
    assert (caller.get("UserID"), caller.get("NetworkAccessPointID")) == ("127.0.0.1", "127.0.0.1")


def test_a_caller_refused_at_the_commitment_listener_s_handshake_is_a_security_alert(
    sessions: sessionmaker[Session], pki: Pki, repository: Repository,
) -> None:
    """The storage commitment listener takes dicom.tls too; a caller it refuses is audited as on dicom.port."""
    if not have_dcmtk("echoscu"):
        pytest.skip("dcmtk's echoscu is not installed")
    audit = AuditTrail(AuditSettings(host="127.0.0.1", port=repository.udp, transport="udp"), ae_title="LUNGNODE")
    config = Config.model_validate({
        "dicom": {"ae_title": "LUNGNODE", "bind_address": "127.0.0.1",
                  "tls": {"enabled": True, "certificate": str(pki.server_cert), "private_key": str(pki.server_key),
                          "ca_certificates": str(pki.ca)}},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port(),
                          "storage_commitment": True}],
        "sending": {**FAST, "commitment_port": 0}})
    audit.start()
    sender = Sender(config, sessions, audit)
    sender.start()
    try:
        assert sender.listener is not None
        plain = run_dcmtk("echoscu", "-aec", "LUNGNODE", "127.0.0.1", str(sender.listener.port), timeout=30)
        messages = wait_received(repository, 1)
    finally:
        sender.stop()
        audit.stop()
    assert plain.returncode != 0
    _valid(messages)
    ident = parse(messages[0].xml).find("EventIdentification")
    assert ident.find("EventTypeCode").get("originalText") == "Node Authentication"
    assert ident.findtext("EventOutcomeDescription").startswith("TLS handshake failed")


def test_echo_audit_checks_the_way_to_the_repository(tmp_path: Path, pki: Pki, repository: Repository) -> None:
    config_file = tmp_path / "config.yaml"
    tls = {"ca_certificates": str(pki.ca), "certificate": str(pki.client_cert), "private_key": str(pki.client_key)}
    cases = [({"port": repository.tls, "tls": tls}, 0, "accepted a connection and the TLS handshake"),
             ({"port": repository.tls, "tls": {**tls, "ca_certificates": str(pki.other_ca)}}, 1,
              "certificate verify failed"),
             ({"port": free_port(), "tls": tls}, 1, "cannot connect"),
             ({"port": repository.tcp, "transport": "tcp"}, 0, "accepted a connection"),
             ({"port": repository.udp, "transport": "udp"}, 0, "UDP has no connection to check")]
    for audit, code, said in cases:
        config_file.write_text(yaml.safe_dump({"audit": {"host": "127.0.0.1", **audit}}))
        echo = run_cli("echo", "--config", config_file, "--audit")
        assert echo.returncode == code, echo.stdout + echo.stderr
        assert said in echo.stdout + echo.stderr
    assert received(repository) == [], "a check sends no audit message"
