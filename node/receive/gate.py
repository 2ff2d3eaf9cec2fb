"""Stores of a series and retention's deletion of it never overlap.

The receive path links a file into ``instances/<series>/`` and then records its row; retention checks
that a series is due and deletes its files. Without a gate an image of that series arriving between
retention's check and its deletion (a PACS sending the study again, say) would be acknowledged and then
deleted. Stores of one series run side by side (several associations may carry it); a deletion waits
until none is in flight and holds new ones back until it is done. Both run in the one ``serve``
process that owns the spool (``claim_spool``), so a lock in memory is enough. Series share one of a
fixed number of stripes, so the gate costs no memory per series.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager


class SeriesGate:
    def __init__(self, stripes: int = 64) -> None:
        self._conditions = [threading.Condition() for _ in range(stripes)]
        self._storing = [0] * stripes
        self._deleting = [False] * stripes

    def _stripe(self, series_uid: str) -> int:
        return zlib.crc32(series_uid.encode()) % len(self._conditions)

    @contextmanager
    def storing(self, series_uid: str) -> Iterator[None]:
        """Held while one instance of the series is linked into the spool and recorded."""
        i = self._stripe(series_uid)
        cond = self._conditions[i]
        with cond:
            while self._deleting[i]:
                cond.wait()
            self._storing[i] += 1
        try:
            yield
        finally:
            with cond:
                self._storing[i] -= 1
                if not self._storing[i]:
                    cond.notify_all()

    @contextmanager
    def deleting(self, series_uid: str, *, timeout_s: float) -> Iterator[bool]:
        """Held while retention checks and deletes the series; yields False (and holds nothing) when stores kept
        running for ``timeout_s``: the series is then left for the next pass."""
        i = self._stripe(series_uid)
        cond = self._conditions[i]
        deadline = time.monotonic() + timeout_s
        with cond:
            while self._deleting[i] or self._storing[i]:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                cond.wait(left)
            got = not (self._deleting[i] or self._storing[i])
            if got:
                self._deleting[i] = True
        try:
            yield got
        finally:
            if got:
                with cond:
                    self._deleting[i] = False
                    cond.notify_all()
