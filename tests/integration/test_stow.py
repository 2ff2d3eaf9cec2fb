"""Results sent by STOW-RS (DICOMweb) to a real Orthanc with its DICOMweb plugin on 127.0.0.1: through the same outbox
as C-STORE (statuses, retries, refusals), with HTTP Basic authentication, over HTTPS with the hospital CA, and
``lungnode echo`` for a DICOMweb destination."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.orm import Session, sessionmaker

from node.config import Config
from node.db.models import SendState
from node.orthanc import have_dicomweb
from node.send.outbox import enqueue_results
from tests.helpers.certs import Pki
from tests.helpers.net import free_port
from tests.helpers.node_proc import run_cli
from tests.helpers.orthanc import OrthancServer
from tests.helpers.outbox import make_job, write_results
from tests.helpers.socat import have_socat, tls_front
from tests.helpers.wait import wait_until
from tests.integration.test_send import FAST_RETRY, outbox_rows, wait_states

pytestmark = pytest.mark.skipif(not have_dicomweb(), reason="Orthanc's DICOMweb plugin is not installed "
                                "(Debian packages orthanc and orthanc-dicomweb)")

USER = ("lungnode", "s3cret-pw")


@pytest.fixture
def orthanc_web(tmp_path: Path) -> Iterator[Callable[..., OrthancServer]]:
    started: list[OrthancServer] = []

    def make(**kw: Any) -> OrthancServer:
        server = OrthancServer(tmp_path / f"pacs{len(started)}", dicomweb=True, **kw)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()


def _password(tmp_path: Path, text: str = USER[1]) -> Path:
    path = tmp_path / f"stow-password-{text}"
    path.write_text(text + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def _web(url: str, **kw: Any) -> dict[str, Any]:
    return {"name": "vna", "url": url, **kw}


def _config(dest: dict[str, Any], **sending: Any) -> Config:
    return Config.model_validate({"dicom": {"ae_title": "LUNGNODE", "bind_address": "127.0.0.1"},
                                  "destinations": [dest], "sending": {**FAST_RETRY, **sending}})


def test_results_go_by_stow_rs_in_their_own_transfer_syntax_with_basic_auth(
    sessions: sessionmaker[Session], sender_factory: Any, orthanc_web: Callable[..., OrthancServer], tmp_path: Path,
) -> None:
    pacs = orthanc_web(http_user=USER)
    objects = write_results(tmp_path / "results", jpegls=True)
    config = _config(_web(f"{pacs.url}/dicom-web", username=USER[0], password_file=str(_password(tmp_path))))
    enqueue_results(sessions, job_id=make_job(sessions), results_dir=tmp_path / "results",
                    destinations=config.destinations)
    sender_factory(config)
    rows = wait_states(sessions, SendState.sent, count=3)
    assert all(r.last_status == 0 and r.attempts == 1 for r in rows)
    for obj in objects:
        found = pacs.find_instance(obj.sop_instance_uid)
        assert found is not None, obj.kind
        assert pacs.metadata(found, "TransferSyntax") == obj.transfer_syntax_uid, "sent as written (JPEG-LS too)"
        assert pacs.get_file(found)[128:132] == b"DICM"


def test_a_wrong_password_is_retried_then_failed_with_what_to_check(
    sessions: sessionmaker[Session], sender_factory: Any, orthanc_web: Callable[..., OrthancServer], tmp_path: Path,
) -> None:
    pacs = orthanc_web(http_user=USER)
    write_results(tmp_path / "results", kinds=("sr",))
    config = _config(_web(f"{pacs.url}/dicom-web", username=USER[0],
                          password_file=str(_password(tmp_path, "not-the-password"))), max_attempts=2)
    enqueue_results(sessions, job_id=make_job(sessions), results_dir=tmp_path / "results",
                    destinations=config.destinations)
    sender_factory(config)
    (row,) = wait_states(sessions, SendState.failed, count=1)
    assert row.attempts == 2
    assert "HTTP 401" in (row.last_error or "") and "check username/password_file" in (row.last_error or "")
    assert pacs.instances() == []


def test_an_object_the_server_cannot_store_fails_at_once_and_the_rest_go_through(
    sessions: sessionmaker[Session], sender_factory: Any, orthanc_web: Callable[..., OrthancServer], tmp_path: Path,
) -> None:
    pacs = orthanc_web()
    objects = write_results(tmp_path / "results", kinds=("seg", "sr"))
    broken = next(o for o in objects if o.kind == "seg")
    broken.path.write_bytes(broken.path.read_bytes()[:300])  # a damaged file: the server cannot parse it
    config = _config(_web(f"{pacs.url}/dicom-web"))
    enqueue_results(sessions, job_id=make_job(sessions), results_dir=tmp_path / "results",
                    destinations=config.destinations)
    sender_factory(config)

    def settled() -> bool:
        return {r.kind: r.state for r in outbox_rows(sessions)} == {"seg": SendState.failed, "sr": SendState.sent}

    wait_until(settled, timeout=30, what="seg failed, sr sent")
    seg = next(r for r in outbox_rows(sessions) if r.kind == "seg")
    assert seg.attempts == 1, "a refused object is not retried"
    assert "STOW-RS refused: HTTP 400" in (seg.last_error or "")
    assert [pacs.find_instance(o.sop_instance_uid) is not None for o in objects] == [False, True]


def test_a_server_down_then_up_gets_the_objects_once(
    sessions: sessionmaker[Session], sender_factory: Any, orthanc_web: Callable[..., OrthancServer], tmp_path: Path,
) -> None:
    port = free_port()
    objects = write_results(tmp_path / "results", kinds=("sr", "key_image"))
    config = _config(_web(f"http://127.0.0.1:{port}/dicom-web"), max_attempts=30)
    enqueue_results(sessions, job_id=make_job(sessions), results_dir=tmp_path / "results",
                    destinations=config.destinations)
    sender_factory(config)
    wait_until(lambda: all(r.attempts >= 1 and r.state == SendState.pending for r in outbox_rows(sessions)),
               timeout=20, what="a failed first attempt")
    assert "cannot send to destinations[vna]" in (outbox_rows(sessions)[0].last_error or "")
    pacs = orthanc_web(http_port=port)
    wait_states(sessions, SendState.sent, count=2, timeout=40)
    assert sorted(pacs.sop_instance_uids()) == sorted(o.sop_instance_uid for o in objects)


def test_https_with_the_hospital_ca_and_a_server_it_did_not_sign(
    sessions: sessionmaker[Session], sender_factory: Any, orthanc_web: Callable[..., OrthancServer], tmp_path: Path,
    pki: Pki,
) -> None:
    if not have_socat():
        pytest.skip("socat is not installed (the HTTPS front of these tests)")
    pacs = orthanc_web(http_user=USER)
    password = str(_password(tmp_path))
    with tls_front(pacs.http_port, certificate=pki.server_cert, private_key=pki.server_key,
                   folder=tmp_path / "front") as port:
        url = f"https://127.0.0.1:{port}/dicom-web"
        objects = write_results(tmp_path / "results", kinds=("sr",))
        trusted = _config(_web(url, ca_certificates=str(pki.ca), username=USER[0], password_file=password))
        enqueue_results(sessions, job_id=make_job(sessions), results_dir=tmp_path / "results",
                        destinations=trusted.destinations)
        sender_factory(trusted)
        wait_states(sessions, SendState.sent, count=1)
        assert pacs.find_instance(objects[0].sop_instance_uid) is not None

        config_file = tmp_path / "config.yaml"
        for ca, ok in ((pki.ca, True), (pki.other_ca, False)):
            config_file.write_text(yaml.safe_dump({"destinations": [
                _web(url, ca_certificates=str(ca), username=USER[0], password_file=password)]}))
            echo = run_cli("echo", "--config", config_file, "--destination", "vna")
            assert (echo.returncode == 0) == ok, echo.stdout + echo.stderr
            if ok:
                assert "answered a DICOMweb search" in echo.stdout
            else:
                assert "certificate verify failed" in echo.stderr.lower(), echo.stderr

        # Without ca_certificates the system's CAs decide (OpenSSL reads SSL_CERT_FILE in their place here).
        config_file.write_text(yaml.safe_dump({"destinations": [
            _web(url, username=USER[0], password_file=password)]}))
        for system_cas, ok in ((pki.other_ca, False), (pki.ca, True)):
            echo = run_cli("echo", "--config", config_file, "--destination", "vna",
                           env={"SSL_CERT_FILE": str(system_cas)})
            assert (echo.returncode == 0) == ok, echo.stdout + echo.stderr


def test_echo_names_a_wrong_password_and_a_wrong_url(
    orthanc_web: Callable[..., OrthancServer], tmp_path: Path,
) -> None:
    pacs = orthanc_web(http_user=USER)
    config_file = tmp_path / "config.yaml"
    cases = [({"url": f"{pacs.url}/dicom-web", "username": USER[0], "password_file": str(_password(tmp_path))}, 0, ""),
             ({"url": f"{pacs.url}/dicom-web", "username": USER[0],
               "password_file": str(_password(tmp_path, "wrong"))}, 1, "HTTP 401"),
             ({"url": f"{pacs.url}/not-dicom-web", "username": USER[0],
               "password_file": str(_password(tmp_path))}, 1, "HTTP 404")]
    for dest, code, said in cases:
        config_file.write_text(yaml.safe_dump({"destinations": [{"name": "vna", **dest}]}))
        echo = run_cli("echo", "--config", config_file, "--destination", "vna")
        assert echo.returncode == code, echo.stdout + echo.stderr
        assert said in echo.stdout + echo.stderr
