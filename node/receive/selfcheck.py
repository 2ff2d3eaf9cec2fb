"""Is the node's DICOM listener answering, and do its destinations? (``lungnode echo``.)

A C-ECHO to the node as configured, from this machine: the container's health check. A refusal of
this check's calling AE title (``dicom.allowed_callers``) also shows that the listener answers, which
is the question; with ``dicom.tls`` only the TCP connection is checked, since a TLS association would
need a client certificate the node trusts.

``--destination``: a C-ECHO to a configured destination exactly as the sender will associate (its
calling AE title, TLS settings and timeout), so IT can check the way back to the PACS before the
first study rather than from a failed send.
"""

from __future__ import annotations

import socket

from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import Destination, DicomSettings, WebDestination
from node.dicom_ae import node_ae

#: The calling AE title of the check (in the node's log as the caller of an association_rejected, if refused).
CALLING_AE = "LUNGNODE-CHECK"


def listener_host(dicom: DicomSettings) -> str:
    """Where to reach the listener from this machine: its bind address, or loopback when it listens on all."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(dicom.bind_address, dicom.bind_address)


def listener_accepts(dicom: DicomSettings, *, timeout_s: float = 3.0) -> bool:
    """Whether the listener accepts TCP connections: the metrics' probe, every minute, so it opens no association
    (nothing for the node to record or log)."""
    try:
        with socket.create_connection((listener_host(dicom), dicom.port), timeout=timeout_s):
            return True
    except OSError:
        return False


def echo_listener(dicom: DicomSettings, *, timeout_s: float = 10.0) -> tuple[bool, str]:
    """(answered, what was found) for the listener ``dicom`` describes."""
    host, port = listener_host(dicom), dicom.port
    where = f"{dicom.ae_title} at {host}:{port}"
    if dicom.tls.enabled:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                pass
        except OSError as exc:
            return False, f"no listener at {host}:{port}: {exc.strerror or exc}"
        return True, f"{host}:{port} accepts connections (a TLS listener: the connection was checked, not C-ECHO)"
    ae = node_ae(CALLING_AE)
    ae.add_requested_context(Verification)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    assoc = ae.associate(host, port, ae_title=dicom.ae_title)
    if assoc.is_established:
        status = assoc.send_c_echo()
        assoc.release()
        if status and status.get("Status") == 0x0000:
            return True, f"{where} answered C-ECHO"
        return False, f"{where} accepted the association but C-ECHO got no success status"
    if assoc.is_rejected:
        return True, f"{where} is listening; it refused the calling AE title {CALLING_AE} (dicom.allowed_callers)"
    return False, f"no DICOM listener answered at {host}:{port} within {timeout_s:g} s"


def echo_destination(dest: Destination | WebDestination, *, ae_title: str, timeout_s: float) -> tuple[bool, str]:
    """(answered, what was found) for one destination, reaching it as the sender does: an association and C-ECHO,
    or for a DICOMweb destination a search with the configured credentials."""
    from pynetdicom.presentation import build_context

    from node.send.scu import UNCOMPRESSED, associate

    if isinstance(dest, WebDestination):
        from node.send.stow import check_service

        problem = check_service(dest, timeout_s=timeout_s)
        where = f"destination {dest.name} ({dest.url})"
        return (True, f"{where} answered a DICOMweb search") if problem is None else (False, problem)
    calling_ae = dest.calling_ae_title or ae_title
    where = f"destination {dest.name} ({dest.ae_title}@{dest.host}:{dest.port}, called as {calling_ae})"
    assoc = associate(dest, [build_context(Verification, UNCOMPRESSED)], calling_ae=calling_ae, timeout_s=timeout_s)
    if isinstance(assoc, str):
        return False, f"{where}: {assoc}"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if status and status.get("Status") == 0x0000:
        return True, f"{where} answered C-ECHO"
    return False, f"{where} accepted the association but did not answer C-ECHO with success"
