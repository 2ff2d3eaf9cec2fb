"""Receive-speed tuning of pynetdicom 3.0.4, measured in bench/receive.py.

Out of the box pynetdicom receives about 0.17x as fast as dcmtk's storescp on loopback, held back
by its I/O loop and by Python work per message rather than by our handler:

1. ``AssociationSocket.recv`` reads a PDU 4096 bytes at a time into a growing bytearray: a 512x512
   slice costs ~130 ``recv`` calls and as many copies. We read it with ``recv_into`` into one
   preallocated buffer (same contract: returns what was read, short on a closed connection).
2. Each incoming dataset is streamed into a ``tempfile.NamedTemporaryFile`` in the system temp
   folder (~0.3 ms to create, and on another file system than the spool). We create a plain file
   in the spool's ``incoming/`` folder instead, so committing it is a link on the same file system.
   Its File Meta header is written from the three UIDs directly (byte-identical to pydicom's).
3. Both reactor threads poll: the association thread sleeps 1 ms between looks at the DIMSE queue,
   the DUL thread sleeps 1 ms whenever a loop found nothing. Every C-STORE waits on both, and each
   wake-up costs system calls and a turn at the GIL. We make the sleeps waits that end early: the
   association thread waits on its DIMSE queue's condition, the DUL thread in ``select`` on its
   socket and on a wake-up socket that our side pokes when it queues a PDU. At most 1 ms still
   passes between checks of timers and release, as before, and an idle association costs nothing.
4. Every association deep-copies the ~130 supported presentation contexts, rebuilding ~1700 UID
   objects; and pydicom checks every UID object it builds against a regular expression. Contexts
   are copied as what they are (immutable values and one list), and UIDs are no longer checked on
   read in the receiving process (``inspect`` checks the ones that matter).
5. The plain C-STORE-RSP that answers each instance is built as a pydicom Dataset and encoded
   (~0.4 ms); we encode its ~150 bytes directly (byte-identical, tested) when nothing watches
   sent messages.

The replacements are installed only on the exact pynetdicom version they were written against;
on any other version nothing is patched and a warning says so (correct, only slower).
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import select
import socket
import struct
import threading
import time
import types
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import pydicom.config
import pynetdicom
import pynetdicom._config
import pynetdicom.association
import pynetdicom.dimse_messages
import pynetdicom.dul
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket

from node.logs import kv

log = logging.getLogger(__name__)

SUPPORTED_VERSION = "3.0.4"
_ORIGINAL_POLL_S = 0.001
_state: dict[str, Any] = {"installed": False, "incoming": None}
_ORIGINAL: dict[str, Any] = {}
_WAKE = "_lungnode_wake"
_counter = itertools.count()


#: Incoming files that could not be written (the spool full or not writable), by name: the reason, until the
#: C-STORE handler takes it (``incoming_error``) and refuses the instance.
_FAILED: dict[str, str] = {}


class _IncomingFile:
    """What pynetdicom uses of a NamedTemporaryFile (name, write, file.flush, close), in the spool.

    A write error must not escape: raised in pynetdicom's DUL thread it aborts the association with no status
    for the sender, and no release for the ledger. The file then takes the rest of the dataset without writing
    it, and the handler answers Out of Resources with the reason (``incoming_error``).
    """

    def __init__(self, **_ignored: Any) -> None:
        folder: Path = _state["incoming"]
        self.name = str(folder / f"{os.getpid()}-{time.monotonic_ns()}-{next(_counter)}.part")
        self.file = self  # pynetdicom flushes ``.file`` after each fragment
        self._fp: BinaryIO | None = None
        try:
            self._fp = open(self.name, "xb")  # noqa: SIM115 - closed by pynetdicom
        except OSError as exc:
            self._fail(exc)

    def write(self, data: bytes) -> int:
        if self._fp is not None:
            try:
                self._fp.write(data)
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def flush(self) -> None:
        if self._fp is not None:
            try:
                self._fp.flush()
            except OSError as exc:
                self._fail(exc)

    def close(self) -> None:
        if self._fp is not None:
            try:
                self._fp.close()
            except OSError as exc:
                self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        fp, self._fp = self._fp, None
        if fp is not None:
            try:
                fp.close()
            except OSError:
                pass
        try:
            os.unlink(self.name)
        except OSError:
            pass
        if len(_FAILED) > 1000:  # entries of aborted associations nobody took
            _FAILED.clear()
        _FAILED[self.name] = exc.strerror or type(exc).__name__


def incoming_error(path: str | os.PathLike[str]) -> str | None:
    """Why the received dataset at ``path`` could not be written (taken once), or None when it was."""
    return _FAILED.pop(str(path), None)


class _FileMeta(NamedTuple):
    """The File Meta values pynetdicom writes ahead of each received dataset."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    implementation_uid: str
    implementation_version: str


def _create_file_meta(
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    implementation_uid: str = PYNETDICOM_IMPLEMENTATION_UID,
    implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION,
) -> _FileMeta:
    return _FileMeta(sop_class_uid, sop_instance_uid, transfer_syntax, implementation_uid, implementation_version)


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element with a 2-byte length (the File Meta's short VRs)."""
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_file_meta(meta: _FileMeta) -> bytes:
    """The File Meta group exactly as pydicom's ``write_file_meta_info`` writes it for these values."""
    version = meta.implementation_version.encode("ascii")
    body = b"".join((
        b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01",  # (0002,0001) version 00 01
        _element(0x00020002, b"UI", _ui(meta.sop_class_uid)),
        _element(0x00020003, b"UI", _ui(meta.sop_instance_uid)),
        _element(0x00020010, b"UI", _ui(meta.transfer_syntax)),
        _element(0x00020012, b"UI", _ui(meta.implementation_uid)),
        _element(0x00020013, b"SH", version + b" " if len(version) % 2 else version),
    ))
    return struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def _write_file_meta_info(fp: BinaryIO, meta: _FileMeta) -> None:
    fp.write(encode_file_meta(meta))


def _implicit(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def encode_store_response(rsp: C_STORE) -> bytes:
    """The Command Set of a plain C-STORE-RSP (Implicit VR Little Endian), as pynetdicom encodes it."""
    body = b"".join((
        _implicit(0x00000002, _ui(str(rsp.AffectedSOPClassUID))),
        _implicit(0x00000100, struct.pack("<H", 0x8001)),
        _implicit(0x00000120, struct.pack("<H", rsp.MessageIDBeingRespondedTo)),
        _implicit(0x00000800, struct.pack("<H", 0x0101)),  # no data set
        _implicit(0x00000900, struct.pack("<H", rsp.Status)),
        _implicit(0x00001000, _ui(str(rsp.AffectedSOPInstanceUID))),
    ))
    return _implicit(0x00000000, struct.pack("<L", len(body))) + body


def _send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    """``send_msg`` with a short cut for the plain C-STORE-RSP the SCP answers every instance with.

    pynetdicom builds a pydicom Dataset for these ~150 bytes and encodes it (~0.4 ms per instance);
    anything else, and any response carrying an error comment or offending element, goes the
    original way, as do all when a handler or pynetdicom's debug log watches sent messages.
    """
    plain = (
        type(primitive) is C_STORE
        and primitive.MessageIDBeingRespondedTo is not None
        and primitive.Status is not None
        and primitive.AffectedSOPClassUID
        and primitive.AffectedSOPInstanceUID
        and primitive.ErrorComment is None
        and primitive.OffendingElement is None
        and pynetdicom._config.LOG_HANDLER_LEVEL != "standard"
        and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
    )
    command = b""
    if plain:
        try:
            command = encode_store_response(primitive)
        except (UnicodeEncodeError, struct.error):  # a value out of the usual range: the original way
            plain = False
    limit = self.maximum_pdu_size
    if not plain or (limit and len(command) > limit - 6):
        _ORIGINAL["send_msg"](self, primitive, context_id)
        return
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, b"\x03" + command))  # command, last fragment
    self.dul.send_pdu(pdata)


def _copy_context(self: PresentationContext, memo: dict[int, Any]) -> PresentationContext:
    """``deepcopy`` of a presentation context: its only mutable part is the list of transfer
    syntaxes (UIDs are immutable). pynetdicom deep-copies all ~130 supported contexts for every
    association; generically that rebuilds each of their ~1700 UIDs."""
    new = copy.copy(self)
    new._transfer_syntax = list(self._transfer_syntax)
    return new


def _recv_exact(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """Read ``nr_bytes`` with as few system calls as the kernel allows."""
    sock = self.socket
    assert sock is not None
    buf = bytearray(nr_bytes)
    got = 0
    with memoryview(buf) as view:
        while got < nr_bytes:
            n = sock.recv_into(view[got:], nr_bytes - got)
            if n == 0:  # connection closed: return the short read, as pynetdicom does
                break
            got += n
    if got < nr_bytes:
        del buf[got:]
    return buf


def _time_module_with(sleep: Any) -> types.SimpleNamespace:
    """A stand-in for the ``time`` module inside a pynetdicom module, with our ``sleep``."""
    shim = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
    shim.sleep = sleep
    return shim


def _association_sleep(seconds: float) -> None:
    """The association thread's 1 ms poll, ended early when a DIMSE message lands in its queue."""
    thread = threading.current_thread()
    if seconds == _ORIGINAL_POLL_S and isinstance(thread, pynetdicom.association.Association):
        messages = thread.dimse.msg_queue
        with messages.not_empty:
            if not messages.queue:  # (qsize() would take the lock we hold)
                messages.not_empty.wait(seconds)
            if messages.queue:
                # put() wakes one waiter; should it have been us while another thread (a user's
                # blocking get) waits for this message too, pass the wake-up on.
                messages.not_empty.notify()
        return
    time.sleep(seconds)


def _dul_sleep(seconds: float) -> None:
    """The DUL thread's idle sleep, ended early when the peer sends data or our side queues a PDU."""
    thread = threading.current_thread()
    pair = getattr(thread, _WAKE, None)
    wake: socket.socket | None = pair[0] if pair else None
    sock = getattr(getattr(thread, "socket", None), "socket", None)
    if wake is None or sock is None:
        time.sleep(seconds)
        return
    try:
        ready, _, _ = select.select([sock, wake], [], [], seconds)
        if wake in ready:
            wake.recv(4096)
    except (OSError, ValueError):  # closed meanwhile: the reactor notices on its next look
        time.sleep(seconds)


def _send_pdu(self: DULServiceProvider, primitive: Any) -> None:
    """``send_pdu`` that wakes the DUL thread to send at once."""
    _ORIGINAL["send_pdu"](self, primitive)
    wake = getattr(self, _WAKE, None)
    if wake is not None:
        try:
            wake[1].send(b"x")
        except OSError:  # closed with the connection, or a wake-up already pending
            pass


def install(incoming: Path) -> bool:
    """Install the faster receive path (once per process); returns whether it is active.

    ``incoming`` is the folder for datasets being received; a later call only moves it.
    """
    _state["incoming"] = incoming
    if _state["installed"]:
        return True
    if pynetdicom.__version__ != SUPPORTED_VERSION:
        log.warning(kv("pynetdicom_tuning_skipped", version=pynetdicom.__version__, supported=SUPPORTED_VERSION,
                       effect="receiving works but is slower"))
        return False
    AssociationSocket.recv = _recv_exact  # type: ignore[method-assign]
    setattr(pynetdicom.association, "time", _time_module_with(_association_sleep))
    setattr(pynetdicom.dul, "time", _time_module_with(_dul_sleep))
    _ORIGINAL["send_pdu"] = DULServiceProvider.send_pdu
    DULServiceProvider.send_pdu = _send_pdu  # type: ignore[method-assign]
    setattr(pynetdicom.dimse_messages, "NamedTemporaryFile", _IncomingFile)
    setattr(pynetdicom.dimse_messages, "create_file_meta", _create_file_meta)
    setattr(pynetdicom.dimse_messages, "write_file_meta_info", _write_file_meta_info)
    setattr(PresentationContext, "__deepcopy__", _copy_context)
    _ORIGINAL["send_msg"] = DIMSEServiceProvider.send_msg
    DIMSEServiceProvider.send_msg = _send_msg  # type: ignore[method-assign]
    # pydicom checks every UID object it builds against a regular expression, and pynetdicom builds
    # a dozen per C-STORE. The values that matter are checked where they enter (``inspect``); the
    # check on read only warned. (Values the node writes are still checked: writing mode stays.)
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    _state["installed"] = True
    log.info(kv("pynetdicom_tuning_installed", version=SUPPORTED_VERSION))
    return True


def tune_association(assoc: pynetdicom.association.Association) -> None:
    """Per association (EVT_CONN_OPEN): give its DUL thread a wake-up socket pair."""
    if _state["installed"]:
        pair = socket.socketpair()
        for end in pair:
            end.setblocking(False)
        setattr(assoc.dul, _WAKE, pair)


def untune_association(assoc: pynetdicom.association.Association) -> None:
    """Per association (EVT_CONN_CLOSE, in its DUL thread): close the wake-up socket pair."""
    pair = getattr(assoc.dul, _WAKE, None)
    if pair is not None:
        setattr(assoc.dul, _WAKE, None)
        for end in pair:
            end.close()
