"""Poll a condition instead of sleeping."""

from __future__ import annotations

import time
from typing import Callable, TypeVar, cast

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T | None], *, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"
) -> T:
    """Call ``predicate`` until it returns something truthy and return that; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last = predicate()
    while not last:
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last value: {last!r})")
        time.sleep(interval)
        last = predicate()
    return cast(T, last)
