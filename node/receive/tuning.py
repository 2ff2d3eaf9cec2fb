"""Receive-speed tuning of pynetdicom 3.0.4, measured in bench/receive.py.

Out of the box pynetdicom receives about 0.17x as fast as dcmtk's storescp on loopback. Two
causes dominate, both in its I/O loop rather than in our handler:

1. ``AssociationSocket.recv`` reads a PDU 4096 bytes at a time into a growing bytearray: a 512x512
   slice costs ~130 ``recv`` calls and as many copies. We read it with ``recv_into`` into one
   preallocated buffer (same contract: returns what was read, short on a closed connection).
2. Each incoming dataset is streamed into a ``tempfile.NamedTemporaryFile`` in the system temp
   folder (~0.3 ms to create, and on another file system than the spool). We create a plain file
   in the spool's ``incoming/`` folder instead, so committing it is a link on the same file system.
3. Both reactor threads poll: the association thread sleeps 1 ms between looks at the DIMSE queue,
   the DUL thread sleeps 1 ms whenever a loop found nothing. Every C-STORE waits on both. We shorten
   the sleeps to ``poll_s`` (100 us); the idle cost is a few percent of one core per open
   association, gone when it closes.

The replacements are installed only on the exact pynetdicom version they were written against;
on any other version nothing is patched and a warning says so (correct, only slower).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import types
from pathlib import Path
from typing import Any, BinaryIO

import pynetdicom
import pynetdicom.association
import pynetdicom.dimse_messages
from pynetdicom.transport import AssociationSocket

from node.logs import kv

log = logging.getLogger(__name__)

SUPPORTED_VERSION = "3.0.4"
_ORIGINAL_POLL_S = 0.001
_state: dict[str, Any] = {"installed": False, "poll_s": _ORIGINAL_POLL_S, "incoming": None}
_counter = itertools.count()


class _IncomingFile:
    """What pynetdicom uses of a NamedTemporaryFile (name, write, file.flush, close), in the spool."""

    def __init__(self, **_ignored: Any) -> None:
        folder: Path = _state["incoming"]
        self.name = str(folder / f"{os.getpid()}-{time.monotonic_ns()}-{next(_counter)}.part")
        self.file: BinaryIO = open(self.name, "xb")  # noqa: SIM115 - closed by pynetdicom

    def write(self, data: bytes) -> int:
        return self.file.write(data)

    def close(self) -> None:
        self.file.close()


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


def _make_time_module() -> types.SimpleNamespace:
    """A stand-in for the ``time`` module inside pynetdicom.association with a shorter poll sleep."""
    shim = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})

    def sleep(seconds: float) -> None:
        time.sleep(_state["poll_s"] if seconds == _ORIGINAL_POLL_S else seconds)

    shim.sleep = sleep
    return shim


def install(incoming: Path, poll_s: float = 0.0001) -> bool:
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
    _state["poll_s"] = poll_s
    AssociationSocket.recv = _recv_exact  # type: ignore[method-assign]
    setattr(pynetdicom.association, "time", _make_time_module())
    setattr(pynetdicom.dimse_messages, "NamedTemporaryFile", _IncomingFile)
    _state["installed"] = True
    log.info(kv("pynetdicom_tuning_installed", version=SUPPORTED_VERSION, poll_us=int(poll_s * 1e6)))
    return True


def tune_association(assoc: pynetdicom.association.Association) -> None:
    """Per association (EVT_CONN_OPEN): shorten the DUL thread's idle sleep."""
    if _state["installed"]:
        assoc.dul._run_loop_delay = _state["poll_s"]
