"""STOW-RS (DICOMweb Store, PS3.18 10.5) to one destination: the same outbox, retries and per-object outcomes as
C-STORE, over HTTP(S).

Each object goes in its own request (``multipart/related; type="application/dicom"``) on one kept-alive
connection, so every object gets its own answer and memory stays bounded by the largest object. The file is sent
as it is, in its own transfer syntax. What the server answers becomes a DIMSE-like status, as STOW-RS reports
failures with the Failure Reason codes of C-STORE: 0x0000 stored, 0xB000 stored with a warning (HTTP 202), the
server's Failure Reason when it gives one. A 5xx or an out-of-resources reason is tried again later; a redirect is
reported, not followed (the credentials would go along).
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from node.config import WebDestination
from node.errors import LungnodeError
from node.send.outbox import Claimed
from node.send.scu import StoreOutcome
from node.tls import PLAIN_PEER, check_secret_file, tls_reason, web_tls

#: JSON keywords of PS3.18's store response: FailedSOPSequence, FailureReason, ReferencedSOPInstanceUID.
_FAILED_SOP_SEQUENCE, _FAILURE_REASON, _REFERENCED_SOP_INSTANCE = "00081198", "00081197", "00081155"
STATUS_WARNING = 0xB000
_PERMANENT_HTTP = {400, 409, 413, 415, 422}  # this object is refused; sending it again gives the same answer
_REDIRECTS = {301, 302, 303, 307, 308}


class Answer(NamedTuple):
    """An HTTP answer: what the outcome needs, and where a redirect points (for the error that names it)."""

    status: int
    reason: str
    body: bytes
    location: str | None = None


class _Refused(Exception):
    """An answer that concerns the destination, not one object (the caller retries the batch later)."""


class _TlsFailed(OSError):
    """A TLS handshake that failed; its text already names the settings to check."""


def _without_userinfo(url: str) -> str:
    """``url`` with any ``user:password@`` taken out: error messages and the ledger must not carry a password (the
    configuration refuses one in ``url``; a redirect's Location may still hold one)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()


def _where(dest: WebDestination) -> str:
    return f"destinations[{dest.name}] ({dest.url})"


def _read_secret(path: Path, setting: str) -> str:
    """A password or token file's text; a file others may read is named in the log (once)."""
    check_secret_file(path, setting)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LungnodeError(f"{setting}: {path} is not UTF-8 text") from None


def auth_header(dest: WebDestination) -> str | None:
    """HTTP Basic from username + password_file, or Bearer from token_file (files read at each batch, so a
    renewed token needs no restart). A token that cannot go in a header is refused here, without its text:
    http.client's own error would quote it into the log and the outbox."""
    if dest.token_file is not None:
        token = _read_secret(dest.token_file, f"destinations[{dest.name}].token_file").strip()
        if not token or any(not 33 <= ord(c) <= 126 for c in token):
            raise LungnodeError(f"destinations[{dest.name}].token_file: {dest.token_file} must hold the token alone, "
                                f"on one line of printable ASCII (it is empty, or holds a space, a line break or "
                                f"another character a header cannot carry; the token is not shown)")
        return "Bearer " + token
    if dest.username is not None and dest.password_file is not None:
        password = _read_secret(dest.password_file, f"destinations[{dest.name}].password_file").rstrip("\r\n")
        return "Basic " + base64.b64encode(f"{dest.username}:{password}".encode()).decode("ascii")
    return None


class StowConnection:
    """One kept-alive HTTP(S) connection to a DICOMweb service."""

    def __init__(self, dest: WebDestination, *, timeout_s: float) -> None:
        self.dest = dest
        parts = urlsplit(dest.url)
        self.path = parts.path.rstrip("/") + "/studies"
        host, port = parts.hostname or "", parts.port
        tls = web_tls(dest)
        self.conn: http.client.HTTPConnection = (
            http.client.HTTPSConnection(host, port, timeout=timeout_s, context=tls) if tls is not None
            else http.client.HTTPConnection(host, port, timeout=timeout_s))
        self.headers = {"Accept": "application/dicom+json"}
        auth = auth_header(dest)
        if auth is not None:
            self.headers["Authorization"] = auth
        self._used = False

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Answer:
        """The server's answer; connection errors raise OSError (http.client's and TLS's included). A kept-alive
        connection the server closed while idle is opened again once."""
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=body, headers={**self.headers, **(headers or {})})
                rsp = self.conn.getresponse()
                self._used = True
                return Answer(rsp.status, rsp.reason, rsp.read(), rsp.getheader("Location"))
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self.conn.close()
                if not self._used or attempt == 2:
                    raise OSError(f"{type(exc).__name__}: {exc}") from exc
            except ssl.SSLError as exc:
                self.conn.close()
                raise _TlsFailed(_tls_problem(self.dest, exc)) from exc
            except http.client.HTTPException as exc:
                self.conn.close()
                raise OSError(f"{type(exc).__name__}: {exc}") from exc
            except OSError:
                self.conn.close()
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.conn.close()


def _tls_problem(dest: WebDestination, exc: ssl.SSLError) -> str:
    """A failed TLS handshake in words, with the settings that decide it."""
    reason = tls_reason(exc)
    if reason == PLAIN_PEER:
        reason = "the server did not speak TLS (an https url for a plain http port?)"
    return (f"TLS failed ({reason}); check destinations[{dest.name}].ca_certificates (null: the system's CAs), "
            f"check_hostname, certificate/private_key")


def _failure_reason(body: bytes, sop_uid: str) -> int | None:
    """The Failure Reason the server gave for ``sop_uid`` (JSON store response), or None."""
    try:
        doc = json.loads(body)
        for item in doc.get(_FAILED_SOP_SEQUENCE, {}).get("Value", []):
            uid = item.get(_REFERENCED_SOP_INSTANCE, {}).get("Value", [None])[0]
            if uid in (sop_uid, None):
                return int(item.get(_FAILURE_REASON, {}).get("Value", [0xC000])[0])
    except (ValueError, TypeError, AttributeError, IndexError):
        return None
    return None


def _store_one(stow: StowConnection, item: Claimed) -> StoreOutcome:
    try:
        data = item.path.read_bytes()
    except FileNotFoundError:
        return StoreOutcome(item, None, False, f"result file {item.path} is missing; it cannot be sent", permanent=True)
    except OSError as exc:
        return StoreOutcome(item, None, False, f"cannot read {item.path}: {exc.strerror}", permanent=True)
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii") + data
            + f"\r\n--{boundary}--\r\n".encode("ascii"))
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    answer = stow.request("POST", stow.path, body, {"Content-Type": content_type})
    status, reason = answer.status, answer.reason
    if status == 200:
        return StoreOutcome(item, 0x0000, True)
    failure = _failure_reason(answer.body, item.sop_instance_uid)
    if status == 202 and failure is None:
        return StoreOutcome(item, STATUS_WARNING, True, "stored with a warning (HTTP 202)")
    if status in (200, 202, *_PERMANENT_HTTP) or failure is not None:
        # Out of resources, or a server error (5xx) whatever reason it gives: worth trying again later.
        transient = status >= 500 or (failure is not None and failure >> 8 == 0xA7)
        code = f", Failure Reason 0x{failure:04X}" if failure is not None else ""
        return StoreOutcome(item, failure, False, f"STOW-RS refused: HTTP {status} {reason}{code}",
                            permanent=not transient)
    raise _Refused(_http_problem(stow.dest, answer))


def _http_problem(dest: WebDestination, answer: Answer) -> str:
    """Why the service as a whole refused (the batch is retried later), and what to check."""
    status = answer.status
    if status in _REDIRECTS:
        target = _without_userinfo(answer.location or "?").split("?", 1)[0]
        hint = (f"it redirects to {target}: set the url to the DICOMweb root there (redirects are not followed, "
                f"so credentials never go to an address the configuration does not name)")
    else:
        hint = {401: "check username/password_file or token_file", 403: "check that this account may store",
                404: "check the url (the DICOMweb root, without /studies)",
                405: "the url does not accept STOW-RS (POST .../studies)"}.get(status, "the server's own log says why")
    return f"STOW-RS to {_where(dest)} answered HTTP {status} {answer.reason}: {hint}"


def stow_batch(
    dest: WebDestination,
    items: Sequence[Claimed],
    *,
    timeout_s: float,
    on_outcome: Callable[[StoreOutcome], None],
    should_stop: Callable[[], bool] = lambda: False,
) -> str | None:
    """Send ``items`` one request each, calling ``on_outcome`` per object; None, or why the destination could not
    take them (then the objects not answered yet are retried later, as after a failed association)."""
    try:
        stow = StowConnection(dest, timeout_s=timeout_s)
    except (LungnodeError, OSError, ssl.SSLError) as exc:
        return f"cannot send to {_where(dest)}: {exc}"
    try:
        for item in items:
            if should_stop():
                break
            on_outcome(_store_one(stow, item))
    except _Refused as exc:
        return str(exc)
    except _TlsFailed as exc:
        return f"cannot send to {_where(dest)}: {exc}"
    except OSError as exc:
        return f"cannot send to {_where(dest)}: {exc} (server down, wrong host or port, TLS, or a firewall)"
    finally:
        stow.close()
    return None


def check_service(dest: WebDestination, *, timeout_s: float) -> str | None:
    """``lungnode echo`` for a DICOMweb destination: None when the service answers a search (QIDO-RS, GET
    .../studies?limit=1) with our credentials, else what is wrong."""
    try:
        stow = StowConnection(dest, timeout_s=timeout_s)
        try:
            answer = stow.request("GET", stow.path + "?limit=1")
        finally:
            stow.close()
    except (LungnodeError, OSError, ssl.SSLError) as exc:
        return f"cannot reach {_where(dest)}: {exc}"
    if answer.status in (200, 204):
        return None
    return _http_problem(dest, answer)
