"""SIGTERM and SIGINT ending a loop that waits on a ``threading.Event``, without the deadlock of setting the
event in the handler itself.

Python runs a signal handler in the main thread between two bytecodes, possibly while that thread is inside
``event.wait()`` holding the event's own lock; ``event.set()`` there would wait forever for itself (a node that
never stops, a worker that ignores SIGTERM). A short-lived thread sets the event as soon as the main thread lets
go of the lock.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType


def stop_on_signals(event: threading.Event, *, said: Callable[[int], None] | None = None) -> None:
    """SIGTERM and SIGINT set ``event``; ``said(signum)``, if given, runs first (a log line, say)."""

    def _handler(signum: int, _frame: FrameType | None) -> None:
        if said is not None:
            said(signum)
        threading.Thread(target=event.set, name="stop-signal", daemon=True).start()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
