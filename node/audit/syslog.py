"""Syslog transport of audit messages as IHE ATNA asks: RFC 5424 messages, over TLS (RFC 5425), TCP (octet-counted
frames, RFC 6587) or UDP (RFC 5426, one message per datagram).

A stream connection is opened when the first message goes and kept; one the repository closed is noticed before the
next write and opened again. Errors are raised to the caller (``node.audit.trail``), which retries and logs them.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import select
import socket
import ssl
from typing import Protocol

#: PRI of every message: facility 10 (security/authorization) x 8 + severity 5 (notice), as IHE ITI-20 gives it.
PRI = 10 * 8 + 5
APP_NAME = "lungnode"
#: MSGID of an RFC 3881 / DICOM audit message in IHE ITI-20.
MSGID = "IHE+RFC-3881"
_BOM = b"\xef\xbb\xbf"


def _header_field(value: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, at most ``limit`` characters, "-" when empty."""
    text = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return text or "-"


def frame(xml: str, *, hostname: str) -> bytes:
    """One RFC 5424 message carrying ``xml`` (UTF-8, after a BOM as the RFC asks for UTF-8 content)."""
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
    header = f"<{PRI}>1 {stamp} {_header_field(hostname, 255)} {APP_NAME} {os.getpid()} {MSGID} -"
    return header.encode("ascii") + b" " + _BOM + xml.encode("utf-8")


class Undeliverable(Exception):
    """A message this transport can never carry (a UDP datagram over the size limit): retrying it would hold up
    every message queued behind it."""


class Transport(Protocol):
    def send(self, message: bytes) -> None: ...
    def close(self) -> None: ...


class UdpTransport:
    """One datagram per message: nothing is known about delivery (RFC 5426)."""

    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        self._sock: socket.socket | None = None

    def send(self, message: bytes) -> None:
        if self._sock is None:
            info = socket.getaddrinfo(*self.address, type=socket.SOCK_DGRAM)[0]
            self._sock = socket.socket(info[0], socket.SOCK_DGRAM)
            self._sock.connect(info[4])
        try:
            self._sock.send(message)
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                raise Undeliverable(f"{len(message)} bytes do not fit in one UDP datagram") from exc
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class StreamTransport:
    """TCP, or TLS when given a context: each message as ``LENGTH SP MESSAGE`` (octet counting)."""

    def __init__(self, host: str, port: int, *, tls: ssl.SSLContext | None, timeout_s: float) -> None:
        self.host, self.port, self.tls, self.timeout_s = host, port, tls, timeout_s
        self._sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        if self.tls is not None:
            try:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise
        return sock

    def _closed_by_peer(self, sock: socket.socket) -> bool:
        """The repository never writes to us: anything readable is its close (or a TLS alert before it)."""
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        try:
            sock.setblocking(False)
            return sock.recv(1) == b""
        except (ssl.SSLWantReadError, BlockingIOError):
            return False
        except OSError:
            return True
        finally:
            sock.settimeout(self.timeout_s)

    def connect(self) -> None:
        """Open the connection now (it is otherwise opened by the first message)."""
        if self._sock is None:
            self._sock = self._connect()

    def send(self, message: bytes) -> None:
        if self._sock is not None and self._closed_by_peer(self._sock):
            self.close()
        self.connect()
        assert self._sock is not None
        try:
            self._sock.sendall(str(len(message)).encode("ascii") + b" " + message)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the connection; TLS with its close_notify first, so the repository reads a clean end."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            if isinstance(sock, ssl.SSLSocket):
                sock.settimeout(1.0)
                sock = sock.unwrap()
        except (OSError, ValueError):
            pass  # the connection is gone already: nothing to be polite to
        finally:
            sock.close()
