"""STOW-RS destinations: the configuration's checks, the credentials sent, and how each answer of a server (a small
HTTP server on 127.0.0.1 whose answers the test chooses) becomes an outcome: stored, stored with a warning, refused
for good, refused for now (out of resources), or a problem of the whole service."""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydantic import ValidationError

from node.config import Config, ConfigError, Destination, WebDestination, load_config
from node.send.outbox import Claimed
from node.send.scu import StoreOutcome
from node.send.stow import auth_header, stow_batch

SOP = "1.2.826.0.1.3680043.8.498.77"


def _dest(**kw: object) -> Destination | WebDestination:
    return Config.model_validate({"destinations": [{"name": "d", **kw}]}).destinations[0]


def test_a_url_makes_a_dicomweb_destination_and_its_mistakes_are_named(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("pw")
    assert isinstance(_dest(url="https://vna.example/dicom-web/"), WebDestination)
    assert _dest(url="https://vna.example/dicom-web/").url == "https://vna.example/dicom-web"  # type: ignore[union-attr]
    assert isinstance(_dest(ae_title="PACS", host="10.0.0.1", port=104), Destination)
    cases = {
        "ftp://vna.example/x": "is not the http(s) URL of a DICOMweb service",
        "https://vna.example/x?y=1": "is not the http(s) URL",
    }
    for url, said in cases.items():
        with pytest.raises(ValidationError, match=re.escape(said)):
            _dest(url=url)
    with pytest.raises(ValidationError, match="credentials over plain http"):
        _dest(url="http://vna.example/dicom-web", username="u", password_file=str(secret))
    _dest(url="http://127.0.0.1:8042/dicom-web", username="u", password_file=str(secret))  # loopback: allowed
    with pytest.raises(ValidationError, match="username and password_file go together"):
        _dest(url="https://vna.example/dicom-web", username="u")
    with pytest.raises(ValidationError, match="not both"):
        _dest(url="https://vna.example/dicom-web", username="u", password_file=str(secret), token_file=str(secret))
    with pytest.raises(ValidationError, match="need an https url"):
        _dest(url="http://127.0.0.1/dicom-web", ca_certificates=str(secret))
    with pytest.raises(ValidationError, match="storage_commitment"):  # a C-STORE setting on a STOW-RS destination
        _dest(url="https://vna.example/dicom-web", storage_commitment=True)
    with pytest.raises(ValidationError, match="no such file"):
        _dest(url="https://vna.example/dicom-web", token_file=str(tmp_path / "missing"))


def test_credentials_come_from_their_files(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("abc.def.ghi\n")
    (tmp_path / "pw").write_text("p:w d\n")
    bearer = _dest(url="https://vna.example/dw", token_file=str(tmp_path / "token"))
    basic = _dest(url="https://vna.example/dw", username="lungnode", password_file=str(tmp_path / "pw"))
    assert isinstance(bearer, WebDestination) and isinstance(basic, WebDestination)
    assert auth_header(bearer) == "Bearer abc.def.ghi"
    assert auth_header(basic) == "Basic " + base64.b64encode(b"lungnode:p:w d").decode()
    assert auth_header(WebDestination(name="x", url="https://vna.example/dw")) is None


Reply = tuple[int, dict[str, object] | None] | tuple[int, dict[str, object] | None, dict[str, str]]


class _Server(BaseHTTPRequestHandler):
    answers: list[Reply] = []
    seen: list[tuple[str, str, bytes]] = []
    authorizations: list[str | None] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append((self.path, self.headers["Content-Type"], body))
        self.authorizations.append(self.headers["Authorization"])
        status, doc, *extra = self.answers.pop(0)
        payload = json.dumps(doc).encode() if doc is not None else b""
        self.send_response(status)
        for name, value in (extra[0] if extra else {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *_args: object) -> None:
        pass


@contextmanager
def _server(answers: list[Reply]) -> Iterator[str]:
    _Server.answers, _Server.seen, _Server.authorizations = list(answers), [], []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/dicom-web"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _failed(reason: int) -> dict[str, object]:
    return {"00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [SOP]},
                                                 "00081197": {"vr": "US", "Value": [reason]}}]}}


def _items(tmp_path: Path, n: int) -> list[Claimed]:
    out = []
    for i in range(n):
        path = tmp_path / f"obj{i}.dcm"
        path.write_bytes(b"\0" * 128 + b"DICM" + bytes([i]) * 50)
        out.append(Claimed(i, 1, "d", "sr", path, SOP, "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.1.2.1", 1))
    return out


def test_each_answer_becomes_the_outcome_the_outbox_needs(tmp_path: Path) -> None:
    answers: list[tuple[int, dict[str, object] | None]] = [
        (200, None), (202, None), (409, _failed(0xA700)), (409, _failed(0xC122)), (400, None)]
    outcomes: list[StoreOutcome] = []
    with _server(answers) as url:
        error = stow_batch(WebDestination(name="d", url=url), _items(tmp_path, 5), timeout_s=5,
                           on_outcome=outcomes.append)
        seen = list(_Server.seen)
    assert error is None
    assert [(o.status, o.delivered, o.permanent) for o in outcomes] == [
        (0x0000, True, False),    # stored
        (0xB000, True, False),    # stored with a warning
        (0xA700, False, False),   # out of resources: try again later
        (0xC122, False, True),    # refused: sending it again gives the same answer
        (None, False, True)]      # a request the server cannot take
    assert "Failure Reason 0xA700" in (outcomes[2].error or "")
    path, content_type, body = seen[0]
    assert path == "/dicom-web/studies"
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    boundary = content_type.rsplit("=", 1)[1]
    assert body.startswith(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
    assert body.endswith(f"\r\n--{boundary}--\r\n".encode())
    assert (tmp_path / "obj0.dcm").read_bytes() in body, "the file travels as it is"


def test_a_service_problem_stops_the_batch_with_what_to_check(tmp_path: Path) -> None:
    outcomes: list[StoreOutcome] = []
    with _server([(200, None), (503, None)]) as url:
        error = stow_batch(WebDestination(name="d", url=url), _items(tmp_path, 3), timeout_s=5,
                           on_outcome=outcomes.append)
    assert [o.delivered for o in outcomes] == [True], "the object after the 503 is left for the retry"
    assert error is not None and "HTTP 503" in error and "destinations[d]" in error


def test_a_server_error_with_a_failure_reason_is_tried_again(tmp_path: Path) -> None:
    """5xx is the server's trouble, not the object's: retried later, whatever Failure Reason it names."""
    outcomes: list[StoreOutcome] = []
    with _server([(500, _failed(0x0110)), (409, _failed(0x0110))]) as url:
        assert stow_batch(WebDestination(name="d", url=url), _items(tmp_path, 2), timeout_s=5,
                          on_outcome=outcomes.append) is None
    assert [(o.status, o.delivered, o.permanent) for o in outcomes] == [(0x0110, False, False), (0x0110, False, True)]


def test_a_redirect_is_not_followed_and_the_error_names_where_it_points(tmp_path: Path) -> None:
    outcomes: list[StoreOutcome] = []
    secret = tmp_path / "pw"
    secret.write_text("s3cret")
    secret.chmod(0o600)
    target = "https://pacs.example/dicom-web/studies?session=abc"
    with _server([(301, None, {"Location": target})]) as url:
        dest = WebDestination(name="d", url=url, username="u", password_file=secret)
        error = stow_batch(dest, _items(tmp_path, 2), timeout_s=5, on_outcome=outcomes.append)
        seen = len(_Server.seen)
    assert outcomes == [] and seen == 1, "one request, the redirect not followed with our credentials"
    assert error is not None and "HTTP 301" in error and "redirects to https://pacs.example/dicom-web/studies:" in error
    assert "session=abc" not in error


def test_a_token_a_header_cannot_carry_is_refused_without_showing_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """http.client's own error quoted the whole header (the token) into the log and the outbox's last_error."""
    token = tmp_path / "token"
    token.write_text("eyJhbGciOi.secret-part\nsecond-line\n")
    token.chmod(0o644)
    outcomes: list[StoreOutcome] = []
    with _server([(200, None)]) as url:
        error = stow_batch(WebDestination(name="d", url=url, token_file=token), _items(tmp_path, 1), timeout_s=5,
                           on_outcome=outcomes.append)
        seen = len(_Server.seen)
    assert outcomes == [] and seen == 0
    assert error is not None and "destinations[d].token_file" in error and "one line of printable ASCII" in error
    assert "secret-part" not in error and "second-line" not in error
    assert "secret_file_readable_by_all setting=destinations[d].token_file" in caplog.text, "mode 0644: said once"


def test_a_password_in_the_url_is_refused_without_being_shown(tmp_path: Path) -> None:
    """It would reach every error message, the outbox and the audit messages: the configuration refuses it."""
    config = tmp_path / "config.yaml"
    config.write_text("destinations:\n  - {name: d, url: 'https://user:pw-in-url@vna.example/dicom-web'}\n")
    with pytest.raises(ConfigError, match="put no user or password in the url") as refused:
        load_config(config)
    assert "pw-in-url" not in str(refused.value)


def test_https_to_a_plain_http_port_says_so(tmp_path: Path) -> None:
    with _server([(200, None)]) as url:
        dest = WebDestination(name="d", url=url.replace("http://", "https://"))
        error = stow_batch(dest, _items(tmp_path, 1), timeout_s=5, on_outcome=lambda _o: None)
    assert error is not None and "TLS failed (the server did not speak TLS" in error, error
    assert "destinations[d].ca_certificates" in error
