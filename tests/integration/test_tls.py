"""DICOM over TLS with real peers on 127.0.0.1: dcmtk's echoscu/storescu calling a ``lungnode serve``
that listens with TLS, and the sender delivering to dcmtk's storescp with TLS. Certificates come from
a throw-away CA made with the openssl command (tests/helpers/certs.py)."""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from node.config import Config, Destination
from node.db.models import SendState
from node.send.outbox import enqueue_results
from node.send.sender import Sender
from node.tls import HANDSHAKE_TIMEOUT_S
from tests.conftest import NodeFactory
from tests.helpers.certs import Pki
from tests.helpers.dcmtk import run_dcmtk, storescp_running
from tests.helpers.net import free_port
from tests.helpers.node_proc import NodeProcess, run_cli
from tests.helpers.orthanc import Modality, OrthancFactory, orthanc_factory  # noqa: F401
from tests.helpers.outbox import make_job, write_results
from tests.helpers.series import write_ct_series
from tests.helpers.wait import wait_until
from tests.integration.test_send import make_config, outbox_rows, wait_states

pytestmark = pytest.mark.usefixtures("require_dcmtk")


def tls_settings(pki: Pki, *, client_certificates: bool = True) -> dict[str, Any]:
    return {"dicom": {"tls": {"enabled": True, "certificate": str(pki.server_cert), "private_key": str(pki.server_key),
                              "ca_certificates": str(pki.ca) if client_certificates else None}}}


def tls_echo(port: int, cert: Path, key: Path, ca: Path) -> subprocess.CompletedProcess[str]:
    return run_dcmtk("echoscu", "-aec", "LUNGNODE", "+tls", key, cert, "+cf", ca, "127.0.0.1", str(port), timeout=30)


@pytest.fixture
def tls_node(node_factory: NodeFactory, pki: Pki) -> NodeProcess:
    return node_factory(settings=tls_settings(pki))


def test_tls_caller_with_a_trusted_certificate_stores_images(tls_node: NodeProcess, pki: Pki, tmp_path: Path) -> None:
    assert "event=scp_listening" in tls_node.log and "tls=on" in tls_node.log
    echo = tls_echo(tls_node.port, pki.client_cert, pki.client_key, pki.ca)
    assert echo.returncode == 0, echo.stderr
    series = write_ct_series(tmp_path / "ct", slices=3, matrix=32)
    sent = run_dcmtk("storescu", "-aec", "LUNGNODE", "+tls", pki.client_key, pki.client_cert, "+cf", pki.ca,
                     "127.0.0.1", str(tls_node.port), *sorted((tmp_path / "ct").glob("*.dcm")))
    assert sent.returncode == 0, sent.stderr
    assert {r["sop_instance_uid"] for r in tls_node.instances(series.series_uid)} == set(series.sop_uids)
    tls_node.wait_for_log(r'event=association_accepted .*tls_peer="CN=pacs"')


def test_plain_and_untrusted_callers_are_dropped_and_logged(tls_node: NodeProcess, pki: Pki) -> None:
    start = len(tls_node.log)
    plain = run_dcmtk("echoscu", "-aec", "LUNGNODE", "127.0.0.1", str(tls_node.port), timeout=30)
    assert plain.returncode != 0
    tls_node.wait_for_log(r"event=tls_handshake_failed listener=dicom peer=127\.0\.0\.1 "
                          r"reason=\"the caller did not speak TLS", start=start)
    stranger = tls_echo(tls_node.port, pki.other_client_cert, pki.other_client_key, pki.ca)
    assert stranger.returncode != 0
    tls_node.wait_for_log(r"event=tls_handshake_failed .*reason=\"certificate verify failed: not signed by a trusted CA "
                          r".* fix=\"the caller needs a valid certificate signed by a CA in dicom.tls.ca_certificates",
                          start=start)
    wrong_trust = tls_echo(tls_node.port, pki.client_cert, pki.client_key, pki.other_ca)  # caller distrusts us
    assert wrong_trust.returncode != 0
    assert "association_accepted" not in tls_node.log[start:]
    assert tls_node.count("associations") == 0
    ok = tls_echo(tls_node.port, pki.client_cert, pki.client_key, pki.ca)  # the listener is still there
    assert ok.returncode == 0, ok.stderr


def test_callers_that_never_shake_hands_delay_no_one_and_are_dropped(tls_node: NodeProcess, pki: Pki) -> None:
    """Handshakes run in each connection's own thread: three silent connections do not hold up a real
    caller (in pynetdicom's accept loop each would cost it the 10 s limit), and each is cut at the limit."""
    silent = [socket.create_connection(("127.0.0.1", tls_node.port)) for _ in range(3)]
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        ok = tls_echo(tls_node.port, pki.client_cert, pki.client_key, pki.ca)
        assert ok.returncode == 0, ok.stderr
        assert time.monotonic() - t0 < 3.0
        for s in silent:
            s.settimeout(HANDSHAKE_TIMEOUT_S + 10)
            assert s.recv(1) == b""  # closed by the node, not left open
    finally:
        for s in silent:
            s.close()
    assert len(re.findall(r'event=tls_handshake_failed .*reason="timed out"', tls_node.log)) == 3


def test_a_pending_handshake_does_not_hold_up_shutdown(tls_node: NodeProcess) -> None:
    with socket.create_connection(("127.0.0.1", tls_node.port)):
        time.sleep(0.5)
        t0 = time.monotonic()
        assert tls_node.stop() == 0
        assert time.monotonic() - t0 < 5.0, tls_node.log[-2000:]
    assert "tls_handshake_failed" not in tls_node.log  # cut by the stop, not a caller's fault


def test_without_a_ca_bundle_any_tls_caller_is_accepted(node_factory: NodeFactory, pki: Pki) -> None:
    node = node_factory(settings=tls_settings(pki, client_certificates=False))
    anonymous = run_dcmtk("echoscu", "-aec", "LUNGNODE", "+tla", "+cf", pki.ca, "127.0.0.1", str(node.port), timeout=30)
    assert anonymous.returncode == 0, anonymous.stderr
    node.wait_for_log(r"event=association_accepted .*tls_peer=\"?no certificate")


# -- configuration -----------------------------------------------------------------------------------
def test_check_config_loads_the_certificates(tmp_path: Path, pki: Pki) -> None:
    import yaml

    def check(settings: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(settings), encoding="utf-8")
        return run_cli("check-config", path)

    assert check(tls_settings(pki)).returncode == 0
    mismatched = tls_settings(pki)
    mismatched["dicom"]["tls"]["private_key"] = str(pki.client_key)  # not the certificate's key
    bad = check(mismatched)
    assert bad.returncode == 2 and "dicom.tls: cannot load certificate" in bad.stderr, bad.stderr
    missing = tls_settings(pki)
    missing["dicom"]["tls"]["certificate"] = str(tmp_path / "nope.crt")
    bad = check(missing)
    assert bad.returncode == 2 and "dicom.tls.certificate: Value error, no such file" in bad.stderr, bad.stderr
    incomplete = {"dicom": {"tls": {"enabled": True}}}
    bad = check(incomplete)
    assert bad.returncode == 2 and "enabled: true needs certificate and private_key" in bad.stderr, bad.stderr
    not_a_ca = {"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 2762,
                                  "tls": {"ca_certificates": str(pki.server_key)}}]}
    bad = check(not_a_ca)
    assert bad.returncode == 2 and "destinations[pacs].tls.ca_certificates: cannot load CA" in bad.stderr, bad.stderr


# -- sending -----------------------------------------------------------------------------------------
@pytest.fixture
def tls_storescp(tmp_path: Path, pki: Pki) -> Iterator[tuple[int, Path]]:
    """dcmtk's storescp with TLS, requiring (its default) a client certificate the hospital CA signed."""
    with storescp_running(tmp_path / "storescp", "+tls", pki.server_key, pki.server_cert, "+cf", pki.ca) as port:
        yield port, tmp_path / "storescp"


def test_results_are_sent_over_tls(sessions: sessionmaker[Session], sender_factory: Any,
                                   tls_storescp: tuple[int, Path], pki: Pki, tmp_path: Path) -> None:
    port, out = tls_storescp
    objects = write_results(tmp_path / "results")
    dest = Destination.model_validate({
        "name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": port,
        "tls": {"ca_certificates": str(pki.ca), "certificate": str(pki.client_cert), "private_key": str(pki.client_key)}})
    enqueue_results(sessions, job_id=make_job(sessions), results_dir=tmp_path / "results", destinations=[dest])
    sender_factory(make_config(dest))
    wait_states(sessions, SendState.sent, count=len(objects))
    assert len(list(out.iterdir())) == len(objects)


@pytest.mark.parametrize("problem", ["untrusted", "no client certificate", "plain port"])
def test_a_tls_failure_is_recorded_with_its_reason_and_retried(
    sessions: sessionmaker[Session], sender_factory: Any, tls_storescp: tuple[int, Path], pki: Pki, tmp_path: Path,
    node_factory: NodeFactory, problem: str,
) -> None:
    port, out = tls_storescp
    tls: dict[str, Any] = {"ca_certificates": str(pki.ca), "certificate": str(pki.client_cert),
                           "private_key": str(pki.client_key)}
    if problem == "untrusted":
        tls["ca_certificates"] = str(pki.other_ca)
        expect = "TLS failed (certificate verify failed: not signed by a trusted CA"
    elif problem == "no client certificate":
        del tls["certificate"], tls["private_key"]
        expect = "TLS failed"
    else:
        port = node_factory().port  # a plain DICOM listener
        expect = "TLS failed"
    write_results(tmp_path / "results")
    dest = Destination.model_validate({"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": port,
                                       "tls": tls})
    enqueue_results(sessions, job_id=make_job(sessions), results_dir=tmp_path / "results", destinations=[dest])
    sender_factory(make_config(dest))

    def retried() -> bool:
        rows = outbox_rows(sessions)
        return bool(rows) and all(r.attempts >= 2 and r.state != SendState.sent for r in rows)
    wait_until(retried, timeout=30, what="two failed attempts")
    errors = {r.last_error for r in outbox_rows(sessions)}
    assert all(expect in (e or "") and "destinations[pacs].tls" in (e or "") for e in errors), errors
    assert list(out.iterdir()) == []


def test_storage_commitment_reports_are_received_over_tls_only(
    sessions: sessionmaker[Session], pki: Pki, caplog: pytest.LogCaptureFixture,
) -> None:
    """The commitment listener takes dicom.tls too: a PACS reporting in plain DICOM is dropped."""
    data = make_config(Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=free_port(),
                                   storage_commitment=True), commitment_port=0).model_dump(mode="json")
    data["dicom"]["tls"] = tls_settings(pki)["dicom"]["tls"]
    sender = Sender(Config.model_validate(data), sessions)
    caplog.set_level("INFO")
    sender.start()
    try:
        assert sender.listener is not None and sender.listener.port
        port = sender.listener.port
        plain = run_dcmtk("echoscu", "-aec", "LUNGNODE", "127.0.0.1", str(port), timeout=30)
        wait_until(lambda: "event=tls_handshake_failed listener=commitment" in caplog.text, timeout=10,
                   what="the plain caller logged")
        secure = tls_echo(port, pki.client_cert, pki.client_key, pki.ca)
    finally:
        sender.stop()
    assert plain.returncode != 0
    assert "commitment_listening" in caplog.text and "tls=on" in caplog.text
    # Past the handshake: the listener offers storage commitment only, so the echo itself is refused.
    assert "No Acceptable Presentation Contexts" in secure.stderr + secure.stdout, secure.stderr
    assert caplog.text.count("event=tls_handshake_failed") == 1


# -- Orthanc as the PACS, both ways over TLS ---------------------------------------------------------
def test_orthanc_routes_a_study_to_the_node_and_takes_results_back_over_tls(
    node_factory: NodeFactory, orthanc_factory: OrthancFactory, sessions: sessionmaker[Session],  # noqa: F811
    sender_factory: Any, pki: Pki, tmp_path: Path,
) -> None:
    node = node_factory(settings=tls_settings(pki))
    pacs = orthanc_factory(
        modalities={"lungnode": Modality("LUNGNODE", node.port, tls=True)},
        extra_config={"DicomTlsEnabled": True, "DicomTlsCertificate": str(pki.client_cert),
                      "DicomTlsPrivateKey": str(pki.client_key), "DicomTlsTrustedCertificates": str(pki.ca),
                      "DicomTlsRemoteCertificateRequired": True})
    series = write_ct_series(tmp_path / "ct", slices=3, matrix=32)
    study = {pacs.upload(f)["ParentStudy"] for f in sorted((tmp_path / "ct").glob("*.dcm"))}
    pacs.push("lungnode", sorted(study))  # Orthanc's own DICOM TLS client to the node's TLS listener
    assert {r["sop_instance_uid"] for r in node.instances(series.series_uid)} == set(series.sop_uids)
    node.wait_for_log(r'event=association_accepted .*tls_peer="CN=pacs"')

    objects = write_results(tmp_path / "results")
    dest = Destination.model_validate({
        "name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port,
        "tls": {"ca_certificates": str(pki.ca), "certificate": str(pki.server_cert), "private_key": str(pki.server_key)}})
    enqueue_results(sessions, job_id=make_job(sessions), results_dir=tmp_path / "results", destinations=[dest])
    sender_factory(make_config(dest))
    wait_states(sessions, SendState.sent, count=len(objects))
    assert all(pacs.find_instance(o.sop_instance_uid) for o in objects)


def test_a_destination_that_never_finishes_the_handshake_does_not_hold_up_sending(pki: Pki) -> None:
    """A peer that accepts the connection and stays silent: without a connection timeout the TLS handshake
    waited forever, and with it the one sender thread of every destination."""
    from node.config import SendingSettings
    from node.send.outbox import Claimed
    from node.send.scu import store_batch

    with socket.create_server(("127.0.0.1", 0)) as server:
        dest = Destination.model_validate({"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                           "port": server.getsockname()[1], "tls": {"ca_certificates": str(pki.ca)}})
        item = Claimed(1, 1, "pacs", "seg", Path("/nonexistent.dcm"), "1.2.3", "1.2.840.10008.5.1.4.1.1.66.4",
                       "1.2.840.10008.1.2.1", 1)
        answer: list[str | None] = []
        worker = threading.Thread(daemon=True, target=lambda: answer.append(store_batch(
            dest, [item], calling_ae="LUNGNODE", settings=SendingSettings(connect_timeout_s=2),
            on_outcome=lambda outcome: None)))
        worker.start()
        worker.join(timeout=15)  # in a thread: a regression fails the test instead of hanging the suite
        assert not worker.is_alive(), "store_batch still waiting on a silent TLS peer after 15 s"
    assert answer[0] is not None and "TLS failed (timed out)" in answer[0]


@pytest.mark.parametrize("check_hostname", [True, False])
def test_the_destination_certificate_must_name_its_host(
    sessions: sessionmaker[Session], sender_factory: Any, pki: Pki, tmp_path: Path, check_hostname: bool,
) -> None:
    """storescp presents a certificate the hospital CA signed for pacs.invalid; we call 127.0.0.1."""
    out = tmp_path / "storescp"
    with storescp_running(out, "+tls", pki.elsewhere_key, pki.elsewhere_cert, "+cf", pki.ca) as port:
        objects = write_results(tmp_path / "results")
        dest = Destination.model_validate({
            "name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": port,
            "tls": {"ca_certificates": str(pki.ca), "certificate": str(pki.client_cert),
                    "private_key": str(pki.client_key), "check_hostname": check_hostname}})
        enqueue_results(sessions, job_id=make_job(sessions), results_dir=tmp_path / "results", destinations=[dest])
        sender_factory(make_config(dest))
        if not check_hostname:
            wait_states(sessions, SendState.sent, count=len(objects))
            return
        wait_until(lambda: all(r.attempts >= 1 and r.last_error for r in outbox_rows(sessions)) and outbox_rows(sessions),
                   timeout=20, what="a failed attempt")
        errors = {r.last_error for r in outbox_rows(sessions)}
        assert all("IP address mismatch" in (e or "") for e in errors), errors
        assert list(out.iterdir()) == []


def test_certificate_dates_are_checked(pki: Pki, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """A certificate past its end is refused (check-config, serve, each send); a month ahead, a warning."""
    import ssl as _ssl
    import types

    import node.tls as tls
    from node.errors import LungnodeError

    not_after = _ssl.cert_time_to_seconds(_ssl._ssl._test_decode_cert(str(pki.server_cert))["notAfter"])
    ctx = _ssl.SSLContext(_ssl.PROTOCOL_TLS_SERVER)
    tls._load_chain(ctx, pki.server_cert, pki.server_key, "dicom.tls")  # 90 days left: silent
    assert "tls_certificate_expiring" not in caplog.text
    monkeypatch.setattr(tls, "time", types.SimpleNamespace(time=lambda: not_after - 10 * 86400))
    tls._load_chain(ctx, pki.server_cert, pki.server_key, "dicom.tls")
    assert "event=tls_certificate_expiring setting=dicom.tls" in caplog.text and "days_left=10" in caplog.text
    tls._load_chain(ctx, pki.server_cert, pki.server_key, "dicom.tls")  # a destination's context, at every send
    assert caplog.text.count("tls_certificate_expiring") == 1
    monkeypatch.setattr(tls, "time", types.SimpleNamespace(time=lambda: not_after + 86400))
    with pytest.raises(LungnodeError, match=r"dicom.tls: certificate .*node.crt expired on .*Install a current one"):
        tls._load_chain(ctx, pki.server_cert, pki.server_key, "dicom.tls")


def test_an_allowed_caller_can_be_tied_to_its_certificate(node_factory: NodeFactory, pki: Pki) -> None:
    """allowed_callers: PACS may call only with the certificate issued to "pacs"; the node's own
    certificate (same CA, CN "node") calling as PACS is refused with an A-ASSOCIATE-RJ."""
    settings = tls_settings(pki)
    settings["dicom"]["allowed_callers"] = [{"ae_title": "PACS", "certificate_cn": "pacs"}]
    node = node_factory(settings=settings)

    def echo(cert: Path, key: Path) -> subprocess.CompletedProcess[str]:
        return run_dcmtk("echoscu", "-aet", "PACS", "-aec", "LUNGNODE", "+tls", key, cert, "+cf", pki.ca,
                         "127.0.0.1", str(node.port), timeout=30)

    ok = echo(pki.client_cert, pki.client_key)
    assert ok.returncode == 0, ok.stderr
    other = echo(pki.server_cert, pki.server_key)
    assert other.returncode != 0 and "Calling AE Title Not Recognized" in other.stderr + other.stdout, other.stderr
    node.wait_for_log(r'event=association_rejected calling_ae=PACS host=127\.0\.0\.1 tls_peer="CN=node" reason=')


def test_certificate_cn_without_verified_certificates_is_a_config_error(tmp_path: Path, pki: Pki) -> None:
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"dicom": {"allowed_callers": [{"ae_title": "PACS", "certificate_cn": "pacs"}]}}))
    bad = run_cli("check-config", path)
    assert bad.returncode == 2 and "certificate_cn needs dicom.tls enabled with ca_certificates" in bad.stderr, bad.stderr


def test_a_revoked_caller_certificate_is_refused(node_factory: NodeFactory, pki: Pki, tmp_path: Path) -> None:
    """dicom.tls.crl: the hospital CA revoked the certificate issued to "pacs"; "node" (same CA) still calls."""
    from tests.helpers.certs import make_crl

    settings = tls_settings(pki)
    settings["dicom"]["tls"]["crl"] = str(make_crl(pki, tmp_path / "crl", revoked=(pki.client_cert,)))
    node = node_factory(settings=settings)
    revoked = tls_echo(node.port, pki.client_cert, pki.client_key, pki.ca)
    assert revoked.returncode != 0
    node.wait_for_log(r'event=tls_handshake_failed .*reason="certificate verify failed: certificate revoked" '
                      r'fix="the caller.s certificate is revoked')
    still_valid = tls_echo(node.port, pki.server_cert, pki.server_key, pki.ca)
    assert still_valid.returncode == 0, still_valid.stderr


def test_a_revoked_destination_certificate_is_refused(
    sessions: sessionmaker[Session], sender_factory: Any, tls_storescp: tuple[int, Path], pki: Pki, tmp_path: Path,
) -> None:
    from tests.helpers.certs import make_crl

    port, out = tls_storescp  # presents the "node" certificate, revoked here
    crl = make_crl(pki, tmp_path / "crl", revoked=(pki.server_cert,))
    write_results(tmp_path / "results")
    dest = Destination.model_validate({"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": port,
                                       "tls": {"ca_certificates": str(pki.ca), "certificate": str(pki.client_cert),
                                               "private_key": str(pki.client_key), "crl": str(crl)}})
    enqueue_results(sessions, job_id=make_job(sessions), results_dir=tmp_path / "results", destinations=[dest])
    sender_factory(make_config(dest))
    wait_until(lambda: outbox_rows(sessions) and all(r.last_error for r in outbox_rows(sessions)), timeout=20,
               what="a failed attempt")
    assert all("TLS failed (certificate verify failed: certificate revoked)" in (r.last_error or "")
               for r in outbox_rows(sessions))
    assert list(out.iterdir()) == []


def test_failed_handshakes_do_not_hold_association_slots(node_factory: NodeFactory, pki: Pki) -> None:
    """A failed handshake ends its connection at once: it held one of dicom.max_associations for the
    ACSE timeout (30 s), so a few plain-DICOM retries locked the real callers out."""
    settings = tls_settings(pki)
    settings["dicom"]["max_associations"] = 2
    node = node_factory(settings=settings)
    for _ in range(5):
        assert run_dcmtk("echoscu", "-aec", "LUNGNODE", "127.0.0.1", str(node.port), timeout=30).returncode != 0
    ok = tls_echo(node.port, pki.client_cert, pki.client_key, pki.ca)
    assert ok.returncode == 0, ok.stderr + ok.stdout
    assert "too many associations" not in node.log


def test_a_revocation_list_of_another_ca_is_reported_as_ours_to_fix(node_factory: NodeFactory, pki: Pki,
                                                                      tmp_path: Path) -> None:
    """dicom.tls.crl holding the wrong CA's list refuses every caller: logged at ERROR, naming our file."""
    from tests.helpers.certs import make_crl

    settings = tls_settings(pki)
    settings["dicom"]["tls"]["crl"] = str(make_crl(pki, tmp_path / "crl", other_ca=True))
    node = node_factory(settings=settings)
    assert tls_echo(node.port, pki.client_cert, pki.client_key, pki.ca).returncode != 0
    node.wait_for_log(r'ERROR .*event=tls_handshake_failed .*reason="certificate verify failed: unable to get '
                      r'certificate CRL" fix="dicom.tls.crl is out of date or not the list of the CA')


def test_lungnode_echo_checks_a_tls_listener_without_noise_in_its_log(tls_node: NodeProcess) -> None:
    """The container's health check on a TLS node: a connection check, which the node does not log as a failed
    handshake every 30 s."""
    proc = run_cli("echo", "--config", tls_node.config_path, "--timeout", "5")
    assert proc.returncode == 0 and "accepts connections (a TLS listener" in proc.stdout, proc.stderr
    time.sleep(1.0)
    assert "tls_handshake_failed" not in tls_node.log, tls_node.log[-2000:]


# -- cipher suites and key files ---------------------------------------------------------------------
def _tls12_client(pki: Pki, cipher: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(cipher)
    ctx.load_verify_locations(str(pki.ca))
    ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return ctx


def test_the_listener_offers_only_aead_suites_with_forward_secrecy(tls_node: NodeProcess, pki: Pki) -> None:
    """BCP 195: a TLS 1.2 caller offering only a CBC suite is refused (Python's default list took it), and told
    what to offer; one offering AES-GCM gets through."""
    start = len(tls_node.log)
    with socket.create_connection(("127.0.0.1", tls_node.port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            _tls12_client(pki, "ECDHE-RSA-AES128-SHA256").wrap_socket(raw, server_hostname="127.0.0.1")
    tls_node.wait_for_log(r'event=tls_handshake_failed .*reason="no shared cipher" fix="the caller must offer TLS 1.2 '
                          r"or later with an AEAD cipher suite", start=start)
    with socket.create_connection(("127.0.0.1", tls_node.port), timeout=10) as raw:
        with _tls12_client(pki, "ECDHE-RSA-AES128-GCM-SHA256").wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.cipher()[0] == "ECDHE-RSA-AES128-GCM-SHA256"


def _legacy_handshake(pki: Pki, dest: Destination) -> str | None:
    """What the node's check of ``dest`` finds when it is a TLS 1.2 server offering only a CBC suite, which closes
    the connection once the handshake is done."""
    from node.tls import destination_tls, diagnose

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    server_ctx.set_ciphers("ECDHE-RSA-AES128-SHA256")
    server_ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    with socket.create_server(("127.0.0.1", 0)) as server:

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                try:
                    server_ctx.wrap_socket(conn, server_side=True).close()
                except (OSError, ssl.SSLError):
                    pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        tls = destination_tls(dest)
        assert tls is not None
        why = diagnose(tls[0], "127.0.0.1", server.getsockname()[1], "127.0.0.1", 5.0)
        thread.join(10)
    return why


def test_a_destination_offering_only_cbc_suites_is_refused_unless_its_ciphers_are_widened(pki: Pki) -> None:
    """The sending side holds to the same suites: a TLS 1.2 server with only a CBC suite fails the handshake. A
    site with such a legacy peer widens that destination's ``tls.ciphers``, and only that one's."""
    def old_pacs(**tls: str) -> Destination:
        return Destination.model_validate({"name": "old", "ae_title": "OLD", "host": "127.0.0.1", "port": 104,
                                           "tls": {"ca_certificates": str(pki.ca), **tls}})

    why = _legacy_handshake(pki, old_pacs())
    assert why is not None and "handshake failure" in why, why
    why = _legacy_handshake(pki, old_pacs(ciphers="ECDHE+AESGCM:ECDHE+AES"))
    assert why is not None and "closed the connection after the handshake" in why, why  # the test server's close
    with pytest.raises(ValidationError, match="selects no cipher suite"):
        old_pacs(ciphers="NO-SUCH-SUITE")


def test_a_private_key_readable_by_every_user_is_named_with_the_fix(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    import shutil

    from node.tls import server_context

    key = tmp_path / "node.key"
    shutil.copy(pki.server_key, key)
    key.chmod(0o640)  # the service's group may read it: fine
    server_context(pki.server_cert, key, pki.ca)
    assert "secret_file_readable_by_all" not in caplog.text
    key.chmod(0o644)
    server_context(pki.server_cert, key, pki.ca)
    assert re.search(rf"WARNING .*event=secret_file_readable_by_all setting=dicom.tls.private_key file={key} "
                     rf'mode=0644 fix="chmod 600 {key}', caplog.text), caplog.text
