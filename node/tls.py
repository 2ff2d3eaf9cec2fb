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
import threading
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from node.config import AuditSettings, Config, Destination, DicomSettings, WebDestination
from node.errors import LungnodeError
from node.logs import kv

log = logging.getLogger(__name__)

PLAIN_PEER = "the caller did not speak TLS (plain DICOM to a TLS port?)"
HANDSHAKE_TIMEOUT_S = 10.0  # a caller that connects and does not shake hands is cut after this
EXPIRY_WARNING_DAYS = 30
# OpenSSL's verify codes for a chain that ends at no trusted CA: self-signed leaf, self-signed root in
# the chain, unknown issuer (of the leaf or of an intermediate).
UNTRUSTED_ISSUER = frozenset({18, 19, 20, 2})
#: TLS 1.2 suites: forward secrecy and AEAD only, as BCP 195 (RFC 9325 4.2) recommends. Python's default list adds
#: CBC suites (ECDHE-RSA-AES128-SHA256 ...) that security scanners flag; TLS 1.3's suites are all AEAD already.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!aDSS"


def _harden(ctx: ssl.SSLContext, ciphers: str | None = None) -> None:
    """TLS 1.2 or later with the cipher suites above (or the configured ``ciphers``), for every context the node
    makes."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(ciphers or TLS12_CIPHERS)


def check_secret_file(path: Path, setting: str) -> None:
    """Warn (once per file) when a private key, password or token file is readable by every local user: anyone
    on the machine could then impersonate the node. Group-readable is fine (the service's group, mode 0640)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # loading it reports the problem
    if mode & 0o004 and (setting, str(path)) not in _SECRETS_WARNED:
        _SECRETS_WARNED.add((setting, str(path)))
        log.warning(kv("secret_file_readable_by_all", setting=setting, file=path, mode=f"{mode & 0o777:04o}",
                       fix=f"chmod 600 {path} (or 640 with the service's group)"))


_SECRETS_WARNED: set[tuple[str, str]] = set()


def _load_chain(ctx: ssl.SSLContext, certificate: Path, private_key: Path, where: str) -> None:
    try:
        ctx.load_cert_chain(str(certificate), str(private_key))
    except (OSError, ssl.SSLError) as exc:
        raise LungnodeError(f"{where}: cannot load certificate {certificate} with key {private_key}: {_reason(exc)}. "
                            f"Both must be PEM files, the key unencrypted and matching the certificate.") from exc
    _check_dates(certificate, where)
    check_secret_file(private_key, f"{where}.private_key")


def _check_dates(certificate: Path, where: str) -> None:
    """Refuse a certificate outside its validity (every peer would refuse it); warn a month ahead."""
    try:  # the standard library's only certificate parser; skipped where it is missing
        fields = ssl._ssl._test_decode_cert(str(certificate))  # type: ignore[attr-defined]
        not_before = ssl.cert_time_to_seconds(fields["notBefore"])
        not_after = ssl.cert_time_to_seconds(fields["notAfter"])
    except (AttributeError, KeyError, ValueError, OSError, ssl.SSLError):
        return
    now = time.time()
    if now > not_after or now < not_before:
        state = f"expired on {fields['notAfter']}" if now > not_after else f"not valid before {fields['notBefore']}"
        raise LungnodeError(f"{where}: certificate {certificate} {state}; peers refuse it. Install a current one.")
    days = (not_after - now) / 86400
    if days < EXPIRY_WARNING_DAYS and (where, str(certificate), int(days)) not in _WARNED:
        _WARNED.add((where, str(certificate), int(days)))  # once a day per certificate, not at every send
        log.warning(kv("tls_certificate_expiring", setting=where, certificate=certificate, days_left=int(days),
                       not_after=fields["notAfter"]))


_WARNED: set[tuple[str, str, int]] = set()


def _load_cas(ctx: ssl.SSLContext, bundle: Path, where: str) -> None:
    try:
        ctx.load_verify_locations(cafile=str(bundle))
    except (OSError, ssl.SSLError) as exc:
        raise LungnodeError(f"{where}: cannot load CA certificates from {bundle}: {_reason(exc)}. "
                            f"It must be a PEM file of one or more certificates.") from exc


def _reason(exc: BaseException) -> str:
    """OpenSSL's reason in words, with the verifier's detail (expired, wrong host, unknown issuer)."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        detail = exc.verify_message.rstrip(".")
        if exc.verify_code in UNTRUSTED_ISSUER:
            detail = f"not signed by a trusted CA ({detail})"
        return f"certificate verify failed: {detail}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        reason = str(exc.reason).replace("_", " ").lower()
        return PLAIN_PEER if reason in ("wrong version number", "http request") else reason
    if isinstance(exc, TimeoutError):
        return "timed out"
    return getattr(exc, "strerror", None) or str(exc)


def tls_reason(exc: BaseException) -> str:
    """Why a TLS connection failed, in words (for the other senders' error messages)."""
    return _reason(exc)


def _fix(exc: BaseException) -> str:
    """What to change when a caller's handshake with one of our listeners failed."""
    reason = _reason(exc)
    if reason == PLAIN_PEER:
        return "configure the caller for DICOM TLS, or turn dicom.tls off"
    if reason == "timed out":
        return f"the caller connected but did not start TLS within {HANDSHAKE_TIMEOUT_S:g} s"
    if "revoked" in reason:
        return "the caller's certificate is revoked (dicom.tls.crl): it needs a new one"
    if "crl" in reason.lower():  # expired, not yet valid, or not the caller's CA's list: our side
        return "dicom.tls.crl is out of date or not the list of the CA that signed the caller: install its current one"
    if reason.startswith("certificate verify failed") or "did not return a certificate" in reason:
        return "the caller needs a valid certificate signed by a CA in dicom.tls.ca_certificates"
    if "alert" in reason and ("unknown ca" in reason or "bad certificate" in reason or "certificate unknown" in reason):
        return "the caller does not trust our certificate (dicom.tls.certificate): give it the CA that signed it"
    if "protocol" in reason or "cipher" in reason:
        return "the caller must offer TLS 1.2 or later with an AEAD cipher suite (e.g. ECDHE-RSA-AES128-GCM-SHA256)"
    return "check the caller's TLS settings against dicom.tls"


def _peer_certificate(sock: object) -> dict[str, Any] | None:
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        return sock.getpeercert() or {}
    except (OSError, ValueError):
        return {}


def peer_common_name(sock: object) -> str | None:
    """The common name of a TLS caller's (verified) certificate: the last one where there are several,
    as TLS stacks read a name. None without TLS, certificate or common name."""
    cert = _peer_certificate(sock)
    names = [value for rdn in (cert or {}).get("subject", ()) for key, value in rdn if key == "commonName"]
    return str(names[-1]) if names else None


def peer_certificate_subject(sock: object) -> str | None:
    """The caller's certificate for log lines: "CN=...", "no certificate", "no common name"; None without TLS."""
    cert = _peer_certificate(sock)
    if cert is None:
        return None
    if not cert:
        return "no certificate"
    name = peer_common_name(sock)
    return f"CN={name}" if name is not None else "no common name"


def _load_crl(ctx: ssl.SSLContext, crl: Path | None, where: str) -> None:
    """Check the peer's certificate against ``crl`` (the issuing CA's list must be in it)."""
    if crl is None:
        return
    try:
        ctx.load_verify_locations(cafile=str(crl))
    except (OSError, ssl.SSLError) as exc:
        raise LungnodeError(f"{where}: cannot load the revocation list {crl}: {_reason(exc)}. "
                            f"It must be a PEM file (-----BEGIN X509 CRL-----).") from exc
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def server_context(certificate: Path, private_key: Path, ca_certificates: Path | None,
                   crl: Path | None = None, ciphers: str | None = None) -> ssl.SSLContext:
    """For a listener: present ``certificate``; with ``ca_certificates``, require callers' certificates."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx, ciphers)
    _load_chain(ctx, certificate, private_key, "dicom.tls")
    if ca_certificates is not None:
        _load_cas(ctx, ca_certificates, "dicom.tls.ca_certificates")
        _load_crl(ctx, crl, "dicom.tls.crl")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca_certificates: Path | None, certificate: Path | None, private_key: Path | None,
                   check_hostname: bool, where: str, crl: Path | None = None,
                   ciphers: str | None = None) -> ssl.SSLContext:
    """For sending to a destination: trust only ``ca_certificates`` (None: the system's CAs, for a DICOMweb server
    with a public certificate); present ours when the peer asks."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx, ciphers)
    ctx.check_hostname = check_hostname
    if ca_certificates is None:
        ctx.load_default_certs()
    else:
        _load_cas(ctx, ca_certificates, f"{where}.ca_certificates")
    _load_crl(ctx, crl, f"{where}.crl")
    if certificate is not None and private_key is not None:
        _load_chain(ctx, certificate, private_key, where)
    return ctx


class LoggedServerContext:
    """A server context for pynetdicom that shakes hands in the connection's own thread.

    pynetdicom wraps each accepted socket in its accept loop, where a handshake would make every
    other caller wait behind a slow or silent one. Here wrapping does no I/O; ``handshake``, bound to
    EVT_CONN_OPEN (run in the connection's thread before its association starts), does it with a time
    limit, and a failed one is logged and its connection shut, so the association ends at once.
    """

    def __init__(self, ctx: ssl.SSLContext, listener: str,
                 on_failure: Callable[[str, str], None] | None = None) -> None:
        self.ctx = ctx
        self.listener = listener
        self.on_failure = on_failure  # (peer address, reason): the audit trail's Security Alert
        self._pending: set[ssl.SSLSocket] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def wrap_socket(self, sock: socket.socket, server_side: bool = True, **kwargs: Any) -> ssl.SSLSocket:
        return self.ctx.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False)

    def handshake(self, event: Any) -> None:
        """EVT_CONN_OPEN handler: the TLS handshake, at most HANDSHAKE_TIMEOUT_S seconds."""
        sock = event.assoc.dul.socket.socket if event.assoc.dul.socket is not None else None
        if not isinstance(sock, ssl.SSLSocket):
            return
        peer = str(event.address[0]) if event.address else "?"
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        with self._lock:
            self._pending.add(sock)
        try:
            sock.do_handshake()
        except (OSError, ssl.SSLError) as exc:
            if isinstance(exc, ssl.SSLEOFError):
                # Closed without a word: a connection check (lungnode echo, a load balancer, a port monitor), not
                # a caller that tried and failed; a failed TLS caller sends an alert or bytes that are not TLS.
                log.debug(kv("tls_connection_closed", listener=self.listener, peer=peer,
                             reason="closed before the handshake"))
            elif not self._stopping:
                fix = _fix(exc)
                # Our own revocation list at fault locks every caller out: that needs a person (ERROR).
                level = logging.ERROR if fix.startswith("dicom.tls.crl") else logging.WARNING
                log.log(level, kv("tls_handshake_failed", listener=self.listener, peer=peer, reason=_reason(exc),
                                  fix=fix))
                if self.on_failure is not None:
                    self.on_failure(peer, f"TLS handshake failed: {_reason(exc)}")
            _shut(sock)
            # pynetdicom's acceptor would wait acse_timeout for an A-ASSOCIATE-RQ that cannot come,
            # holding a dicom.max_associations slot: make it give up at once.
            event.assoc.acse_timeout = 0
            return
        finally:
            with self._lock:
                self._pending.discard(sock)
        sock.settimeout(None)

    def stop(self) -> None:
        """Cut the handshakes still running (the listener is stopping): their threads end at once."""
        self._stopping = True
        with self._lock:
            pending = list(self._pending)
        for sock in pending:
            _shut(sock)

    @property
    def handlers(self) -> list[tuple[Any, Any]]:
        """Event handlers a listener using this context must bind (first, before any other)."""
        from pynetdicom import evt

        return [(evt.EVT_CONN_OPEN, self.handshake)]


def _shut(sock: socket.socket) -> None:
    """Shut the connection's file descriptor down (the plain socket's shutdown: a handshake blocked in
    another thread then reads end-of-file and fails, where SSLSocket.shutdown would race with it)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def diagnose(ctx: ssl.SSLContext, host: str, port: int, server_hostname: str | None, timeout_s: float) -> str | None:
    """Why TLS to ``host:port`` fails, or None when it is not TLS's fault (no TCP connection at all: the
    usual "cannot connect" applies) or the handshake succeeds. pynetdicom only logs the reason, so the
    sender asks again to put it in the object's record."""
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except OSError:
        return None
    try:
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
    finally:
        raw.close()


def listener_tls(settings: DicomSettings, listener: str,
                 on_failure: Callable[[str, str], None] | None = None) -> LoggedServerContext | None:
    """The TLS context for one of the node's listeners, or None when ``dicom.tls`` is off."""
    tls = settings.tls
    if not tls.enabled:
        return None
    assert tls.certificate is not None and tls.private_key is not None  # the settings' validator insists
    ctx = server_context(tls.certificate, tls.private_key, tls.ca_certificates, tls.crl, tls.ciphers)
    return LoggedServerContext(ctx, listener, on_failure)


def destination_tls(dest: Destination) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for sending to ``dest``: the context and the host name to check, or None."""
    if dest.tls is None:
        return None
    t = dest.tls
    ctx = client_context(t.ca_certificates, t.certificate, t.private_key, t.check_hostname,
                         f"destinations[{dest.name}].tls", t.crl, t.ciphers)
    return ctx, dest.host  # sent as SNI (not for an IP address); checked only with check_hostname


def web_tls(dest: WebDestination) -> ssl.SSLContext | None:
    """The TLS context for an https URL: the configured CA (else the system's), our certificate if given."""
    if urlsplit(dest.url).scheme != "https":
        return None
    return client_context(dest.ca_certificates, dest.certificate, dest.private_key, dest.check_hostname,
                          f"destinations[{dest.name}]")


def audit_tls(settings: AuditSettings) -> ssl.SSLContext | None:
    """The client context for the audit repository (``audit.transport: tls``), or None for tcp and udp."""
    t = settings.tls
    if settings.host is None or settings.transport != "tls" or t is None:
        return None
    return client_context(t.ca_certificates, t.certificate, t.private_key, t.check_hostname, "audit.tls", t.crl,
                          t.ciphers)


def check_tls(cfg: Config) -> None:
    """Load every certificate, key and CA bundle the configuration names (``check-config``), so a key
    that does not match its certificate shows before start-up rather than at the first send."""
    listener_tls(cfg.dicom, "dicom")
    for dest in cfg.destinations:
        if isinstance(dest, WebDestination):
            web_tls(dest)
        else:
            destination_tls(dest)
    audit_tls(cfg.audit)
