"""Audit messages the repository has not taken yet, oldest first.

``serve`` keeps them as files in ``<storage.spool_dir>/audit`` (as dcm4che's audit logger spools to a folder): a
repository outage that outlasts the node, a restart or a crash loses none of them, and the next start sends them
first, with their original times. Other commands and tests keep them in memory. Each file is one framed syslog
message, written to a temporary name, flushed to disk and renamed, so a crash leaves whole messages only. Files
are readable by the node's user alone: the messages name patients.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from pathlib import Path
from typing import Protocol

from node.receive.spool import fsync_dir

_SUFFIX, _PARTIAL = ".syslog", ".partial"  # a whole message, one being written
#: The backlog's folder under storage.spool_dir.
SPOOL_FOLDER = "audit"


def waiting(spool_dir: Path) -> int:
    """Messages in ``serve``'s backlog now (for ``lungnode status``; 0 when there is no backlog folder)."""
    try:
        return sum(1 for _ in (spool_dir / SPOOL_FOLDER).glob(f"*{_SUFFIX}"))
    except OSError:
        return 0


class Backlog(Protocol):
    """Messages waiting, oldest first: ``add`` refuses (False) when ``capacity`` are waiting."""

    capacity: int
    durable: bool

    def add(self, message: bytes) -> bool: ...
    def oldest(self) -> bytes | None: ...
    def remove_oldest(self) -> None: ...
    def __len__(self) -> int: ...


class MemoryBacklog:
    """The backlog of a process without a spool folder: lost when it ends."""

    durable = False

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._messages: deque[bytes] = deque()

    def add(self, message: bytes) -> bool:
        if len(self._messages) >= self.capacity:
            return False
        self._messages.append(message)
        return True

    def oldest(self) -> bytes | None:
        return self._messages[0] if self._messages else None

    def remove_oldest(self) -> None:
        self._messages.popleft()

    def __len__(self) -> int:
        return len(self._messages)


class FolderBacklog:
    """The backlog as one file per message in ``folder``, named so that name order is arrival order.

    The trail's sending thread uses it (and ``AuditTrail.stop`` when that thread hangs in a send: names are unique
    per process, and list appends are atomic). Raises OSError when the folder cannot be written (the caller counts
    the message as dropped and says so)."""

    durable = True

    def __init__(self, folder: Path, capacity: int) -> None:
        self.folder = folder
        self.capacity = capacity
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in folder.glob(f"*{_PARTIAL}"):  # a crash while one was written: never a whole message
            stale.unlink(missing_ok=True)
        self._names = sorted(p.name for p in folder.glob(f"*{_SUFFIX}"))
        self._serial = itertools.count()

    def add(self, message: bytes) -> bool:
        if len(self._names) >= self.capacity:
            return False
        stem = f"{time.time_ns():020d}-{next(self._serial):09d}"
        name, partial = stem + _SUFFIX, self.folder / (stem + _PARTIAL)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, message)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, self.folder / name)
        fsync_dir(self.folder)
        self._names.append(name)
        return True

    def oldest(self) -> bytes | None:
        while self._names:
            try:
                return (self.folder / self._names[0]).read_bytes()
            except FileNotFoundError:  # removed by hand: nothing to send
                self._names.pop(0)
        return None

    def remove_oldest(self) -> None:
        (self.folder / self._names.pop(0)).unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self._names)

