"""A pynetdicom C-STORE SCU that sends files byte for byte (a path given to ``send_c_store`` is sent
raw after its file meta), records every status, and can stop or abort on demand."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

SUCCESS = 0x0000

# A path given to send_c_store is sent as the file's bytes after its file meta, unparsed (and so
# unrepaired): exactly what a broken sender would put on the wire.
_config.STORE_SEND_CHUNKED_DATASET = True


@dataclass(frozen=True)
class Sent:
    path: Path
    sop_uid: str
    status: int | None  # None: no response (association lost)
    comment: str | None = None  # the response's Error Comment, if any


def _nodelay(event: evt.Event) -> None:
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def associate(port: int, files: Iterable[Path] = (), *, calling: str = "PYSCU", called: str = "LUNGNODE",
              source_host: str = "127.0.0.1") -> Association:
    """Open an association proposing one context per (SOP class, transfer syntax) of ``files``.

    ``source_host`` is the local address to connect from (any 127.x.y.z works on loopback).
    """
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    pairs = set()
    for path in files:
        meta = read_file_meta_info(path)
        pairs.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    assert len(pairs) < 127, "too many presentation contexts"
    for sop_class, ts in sorted(pairs):
        ae.add_requested_context(sop_class, [ts])
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=called, bind_address=(source_host, 0),
                        evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])


def send_files(
    port: int,
    files: Iterable[Path],
    *,
    calling: str = "PYSCU",
    called: str = "LUNGNODE",
    on_sent: Callable[[Sent], None] | None = None,
    abort: bool = False,
    source_host: str = "127.0.0.1",
    priority: int = 0x0000,
) -> list[Sent]:
    """Send ``files`` in one association; returns one Sent per attempted file (stops when the link dies).

    The association is released at the end (aborted with ``abort=True``). ``priority``: the C-STORE Priority
    (0 MEDIUM, 1 HIGH, 2 LOW)."""
    files = list(files)
    assoc = associate(port, files, calling=calling, called=called, source_host=source_host)
    assert assoc.is_established, f"association to port {port} not established"
    results: list[Sent] = []
    try:
        for path in files:
            meta = read_file_meta_info(path)
            sop = str(meta.MediaStorageSOPInstanceUID)
            try:
                rsp = assoc.send_c_store(path, priority=priority)
            except (RuntimeError, OSError):
                results.append(Sent(path, sop, None))
                break
            status = int(rsp.Status) if "Status" in rsp else None
            sent = Sent(path, sop, status, str(rsp.ErrorComment) if "ErrorComment" in rsp else None)
            results.append(sent)
            if on_sent is not None:
                on_sent(sent)
            if status is None or not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.abort() if abort else assoc.release()
    return results


def store_status(port: int, path: Path, **kw: object) -> int | None:
    """Send one file in its own association; the C-STORE status (None when no response)."""
    (sent,) = send_files(port, [path], **kw)  # type: ignore[arg-type]
    return sent.status


def echo(port: int, *, calling: str = "PYSCU", called: str = "LUNGNODE", source_host: str = "127.0.0.1") -> int | None:
    """C-ECHO in its own association: the status, or None when the association was not accepted."""
    assoc = associate(port, calling=calling, called=called, source_host=source_host)
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if "Status" in rsp else None
    finally:
        assoc.release()
