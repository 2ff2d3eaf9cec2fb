"""DICOM over TLS (PS3.15 Annex B; TLS 1.2 or later as BCP 195 asks): the contexts for the node's
listeners and for sending to a destination, with errors that name the setting to fix.

The listeners accept only TLS when ``dicom.tls.enabled``; a caller that does not speak TLS, or whose
certificate the CA bundle does not vouch for, is dropped during the handshake and logged as
``event=tls_handshake_failed`` (pynetdicom itself drops such connections without a word).
"""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path
from typing import Any

from node.config import Config, Destination, DicomSettings
from node.errors import LungnodeError
from node.logs import kv

log = logging.getLogger(__name__)

PLAIN_PEER = "the caller did not speak TLS (plain DICOM to a TLS port?)"
HANDSHAKE_TIMEOUT_S = 10.0  # pynetdicom shakes hands in its accept loop: a silent caller must not hold it up


def _load_chain(ctx: ssl.SSLContext, certificate: Path, private_key: Path, where: str) -> None:
    try:
        ctx.load_cert_chain(str(certificate), str(private_key))
    except (OSError, ssl.SSLError) as exc:
        raise LungnodeError(f"{where}: cannot load certificate {certificate} with key {private_key}: {_reason(exc)}. "
                            f"Both must be PEM files, the key unencrypted and matching the certificate.") from exc


def _load_cas(ctx: ssl.SSLContext, bundle: Path, where: str) -> None:
    try:
        ctx.load_verify_locations(cafile=str(bundle))
    except (OSError, ssl.SSLError) as exc:
        raise LungnodeError(f"{where}: cannot load CA certificates from {bundle}: {_reason(exc)}. "
                            f"It must be a PEM file of one or more certificates.") from exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        reason = str(exc.reason).replace("_", " ").lower()
        return PLAIN_PEER if reason in ("wrong version number", "http request") else reason
    if isinstance(exc, TimeoutError):
        return "timed out"
    return getattr(exc, "strerror", None) or str(exc)


def peer_certificate_subject(sock: object) -> str | None:
    """The common name of a TLS caller's certificate, for the association log line (None without TLS)."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        cert = sock.getpeercert()
    except (OSError, ValueError):
        return None
    names = [value for rdn in (cert or {}).get("subject", ()) for key, value in rdn if key == "commonName"]
    return f"CN={names[0]}" if names else "no certificate"


def server_context(certificate: Path, private_key: Path, ca_certificates: Path | None) -> ssl.SSLContext:
    """For a listener: present ``certificate``; with ``ca_certificates``, require callers' certificates."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, certificate, private_key, "dicom.tls")
    if ca_certificates is not None:
        _load_cas(ctx, ca_certificates, "dicom.tls.ca_certificates")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca_certificates: Path, certificate: Path | None, private_key: Path | None,
                   check_hostname: bool, where: str) -> ssl.SSLContext:
    """For sending to a destination: trust only ``ca_certificates``; present ours when the peer asks."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    _load_cas(ctx, ca_certificates, f"{where}.ca_certificates")
    if certificate is not None and private_key is not None:
        _load_chain(ctx, certificate, private_key, where)
    return ctx


class LoggedServerContext:
    """Wraps a server context for pynetdicom: handshakes time out, and a failed one is logged and its
    socket closed (pynetdicom would leave both to chance)."""

    def __init__(self, ctx: ssl.SSLContext, listener: str) -> None:
        self.ctx = ctx
        self.listener = listener

    def wrap_socket(self, sock: socket.socket, server_side: bool = True, **kwargs: Any) -> ssl.SSLSocket:
        try:
            peer = sock.getpeername()[0]
        except OSError:
            peer = "?"
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            wrapped = self.ctx.wrap_socket(sock, server_side=server_side, **kwargs)
        except (OSError, ssl.SSLError) as exc:
            log.warning(kv("tls_handshake_failed", listener=self.listener, peer=peer, reason=_reason(exc),
                           fix="the caller must use DICOM TLS with a certificate dicom.tls.ca_certificates trusts"))
            sock.close()
            raise
        wrapped.settimeout(None)
        return wrapped


def diagnose(ctx: ssl.SSLContext, host: str, port: int, server_hostname: str | None, timeout_s: float) -> str | None:
    """Why a TLS connection to ``host:port`` fails, or None when the handshake succeeds (pynetdicom
    only logs the reason, so the sender asks again to put it in the job's record)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            with ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                # With TLS 1.3 the peer judges our certificate after the handshake: listen for its verdict.
                tls.settimeout(min(timeout_s, 2.0))
                try:
                    if tls.recv(1) == b"":
                        return "the destination closed the connection after the handshake (does it want our certificate?)"
                except TimeoutError:
                    pass
                return None
    except (OSError, ssl.SSLError) as exc:
        return _reason(exc)


def listener_tls(settings: DicomSettings, listener: str) -> LoggedServerContext | None:
    """The TLS context for one of the node's listeners, or None when ``dicom.tls`` is off."""
    tls = settings.tls
    if not tls.enabled:
        return None
    assert tls.certificate is not None and tls.private_key is not None  # the settings' validator insists
    return LoggedServerContext(server_context(tls.certificate, tls.private_key, tls.ca_certificates), listener)


def destination_tls(dest: Destination) -> tuple[ssl.SSLContext, str | None] | None:
    """pynetdicom's ``tls_args`` for sending to ``dest``: the context and the host name to check, or None."""
    if dest.tls is None:
        return None
    t = dest.tls
    ctx = client_context(t.ca_certificates, t.certificate, t.private_key, t.check_hostname,
                         f"destinations[{dest.name}].tls")
    return ctx, dest.host if t.check_hostname else None


def check_tls(cfg: Config) -> None:
    """Load every certificate, key and CA bundle the configuration names (``check-config``), so a key
    that does not match its certificate shows before start-up rather than at the first send."""
    listener_tls(cfg.dicom, "dicom")
    for dest in cfg.destinations:
        destination_tls(dest)
