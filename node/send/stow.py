"""STOW-RS (DICOMweb Store, PS3.18 10.5) to one destination: the same outbox, retries and per-object outcomes as
C-STORE, over HTTP(S).

Each object goes in its own request (``multipart/related; type="application/dicom"``) on one kept-alive
connection, so every object gets its own answer and memory stays bounded by the largest object. The file is sent
as it is, in its own transfer syntax. What the server answers becomes a DIMSE-like status, as STOW-RS reports
failures with the Failure Reason codes of C-STORE: 0x0000 stored, 0xB000 stored with a warning (HTTP 202), the
server's Failure Reason when it gives one.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import uuid
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from node.config import WebDestination
from node.errors import LungnodeError
from node.send.outbox import Claimed
from node.send.scu import StoreOutcome
from node.tls import web_tls

#: JSON keywords of PS3.18's store response: FailedSOPSequence, FailureReason, ReferencedSOPInstanceUID.
_FAILED_SOP_SEQUENCE, _FAILURE_REASON, _REFERENCED_SOP_INSTANCE = "00081198", "00081197", "00081155"
STATUS_WARNING = 0xB000
_PERMANENT_HTTP = {400, 409, 413, 415, 422}  # this object is refused; sending it again gives the same answer


class _Refused(Exception):
    """An answer that concerns the destination, not one object (the caller retries the batch later)."""


def _where(dest: WebDestination) -> str:
    return f"destinations[{dest.name}] ({dest.url})"


def auth_header(dest: WebDestination) -> str | None:
    """HTTP Basic from username + password_file, or Bearer from token_file (files read at each batch, so a
    renewed token needs no restart)."""
    if dest.token_file is not None:
        return "Bearer " + dest.token_file.read_text(encoding="utf-8").strip()
    if dest.username is not None and dest.password_file is not None:
        password = dest.password_file.read_text(encoding="utf-8").rstrip("\r\n")
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
                headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
        """(HTTP status, reason, body); connection errors raise OSError (http.client's included). A kept-alive
        connection the server closed while idle is opened again once."""
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=body, headers={**self.headers, **(headers or {})})
                rsp = self.conn.getresponse()
                self._used = True
                return rsp.status, rsp.reason, rsp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self.conn.close()
                if not self._used or attempt == 2:
                    raise OSError(f"{type(exc).__name__}: {exc}") from exc
            except (http.client.HTTPException, ssl.SSLError) as exc:
                self.conn.close()
                raise OSError(f"{type(exc).__name__}: {exc}") from exc
            except OSError:
                self.conn.close()
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.conn.close()


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
    status, reason, answer = stow.request("POST", stow.path, body, {"Content-Type": content_type})
    if status == 200:
        return StoreOutcome(item, 0x0000, True)
    failure = _failure_reason(answer, item.sop_instance_uid)
    if status == 202 and failure is None:
        return StoreOutcome(item, STATUS_WARNING, True, "stored with a warning (HTTP 202)")
    if status in (200, 202, *_PERMANENT_HTTP) or failure is not None:
        transient = failure is not None and failure >> 8 == 0xA7  # out of resources: worth trying again later
        code = f", Failure Reason 0x{failure:04X}" if failure is not None else ""
        return StoreOutcome(item, failure, False, f"STOW-RS refused: HTTP {status} {reason}{code}",
                            permanent=not transient)
    raise _Refused(_http_problem(stow.dest, status, reason))


def _http_problem(dest: WebDestination, status: int, reason: str) -> str:
    """Why the service as a whole refused (the batch is retried later), and what to check."""
    hint = {401: "check username/password_file or token_file", 403: "check that this account may store",
            404: "check the url (the DICOMweb root, without /studies)",
            405: "the url does not accept STOW-RS (POST .../studies)"}.get(status, "the server's own log says why")
    return f"STOW-RS to {_where(dest)} answered HTTP {status} {reason}: {hint}"


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
            status, reason, _ = stow.request("GET", stow.path + "?limit=1")
        finally:
            stow.close()
    except (LungnodeError, OSError, ssl.SSLError) as exc:
        return f"cannot reach {_where(dest)}: {exc}"
    if status in (200, 204):
        return None
    return _http_problem(dest, status, reason)
