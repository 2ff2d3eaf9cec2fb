"""Poll a condition instead of sleeping."""

from __future__ import annotations

import time
from typing import Callable, TypeVar, cast

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T | None], *, timeout: float = 10.0, interval: float = 0.05, what: str = "condition",
    log: Callable[[], str] | None = None,
) -> T:
    """Call ``predicate`` until it returns something truthy and return that; fail after ``timeout`` s
    (with the text of ``log()``, e.g. the tail of a server's log, in the message)."""
    deadline = time.monotonic() + timeout
    last = predicate()
    while not last:
        if time.monotonic() >= deadline:
            tail = f"\n{log()}" if log else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last value: {last!r}){tail}")
        time.sleep(interval)
        last = predicate()
    return cast(T, last)
