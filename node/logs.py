"""Logging set-up: one line per event, ``key=value`` fields, UTC timestamps, easy to grep.

Lines never carry patient names, ids or dates unless ``logging.include_phi`` is set; UIDs and AE
titles are logged because IT needs them to trace a study through the PACS.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pydicom.config

from node.errors import LungnodeError

_PHI = {"enabled": False}


class _UTCFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def setup_logging(level: str = "INFO", file: Path | None = None, include_phi: bool = False) -> None:
    """Configure the root logger once for the process (idempotent)."""
    _PHI["enabled"] = include_phi
    fmt = _UTCFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file is not None:
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            # Watched: when logrotate (or an admin) moves the file away, every process opens a new one by itself,
            # with no signal needed and none of the node's processes writing on into the moved file.
            handlers.append(logging.handlers.WatchedFileHandler(file, encoding="utf-8"))
        except OSError as exc:
            why = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
            raise LungnodeError(f"cannot write the log file {file} (logging.file): {why}. Make its "
                                f"folder writable by the node's user, or set logging.file to another path") from None
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        h.setFormatter(fmt)
        h.addFilter(_library_lines)
        root.addHandler(h)
    root.setLevel(level)
    # pydicom warns about a malformed value by quoting it (a birth date, a name): patient data on stderr. The
    # node checks what it uses itself and names attributes, never values.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    # pynetdicom logs every PDU at INFO/DEBUG; keep its warnings and errors only.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if level != "DEBUG" else logging.INFO)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _library_lines(record: logging.LogRecord) -> bool:
    """pynetdicom's own lines in the node's ``event=`` format, at WARNING at most: the node logs each outcome
    itself (a refused connection there is one the sender retries, not an error of the node)."""
    if record.name.startswith("pynetdicom") and not str(record.msg).startswith("event="):
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = kv("pynetdicom", message=record.getMessage()), ()
    return True


def _one_line(text: str) -> str:
    """Control characters (a driver's multi-line message, say) as escapes: one event stays one line to grep."""
    if text.isprintable():
        return text
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return "".join(c if c.isprintable() else named.get(c, f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
                   for c in text)


def kv(event: str, **fields: Any) -> str:
    """Format an event and its fields as ``event=name key=value ...`` (values quoted when needed)."""
    parts = [f"event={event}"]
    for key, value in fields.items():
        if value is None:
            continue
        text = _one_line(str(value))
        if not text or any(c in text for c in ' ="'):
            text = '"' + text.replace('"', "'") + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def phi(value: Any) -> str:
    """Patient-identifying value for a log line: shown only when include_phi is enabled."""
    return str(value) if _PHI["enabled"] else "[redacted]"


def redacted_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` for an ERROR line: where it was raised (files, lines, code), and its message only
    where logging.include_phi allows (it may quote a header value, as ``error_reason``)."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    return f"Traceback (most recent call last):\n{frames}{type(exc).__name__}: {phi(exc)}"


def error_reason(exc: BaseException) -> str:
    """An error in a few words for a log line: a database error as ``db_reason`` gives it (never the statement and
    its values), anything else by its class and, where logging.include_phi allows, its message."""
    from sqlalchemy.exc import SQLAlchemyError

    from node.db.session import db_reason

    if isinstance(exc, SQLAlchemyError):
        return f"{type(exc).__name__}: {db_reason(exc)}"
    return f"{type(exc).__name__}: {phi(exc)}"


class LoopErrors:
    """The failures of a loop that runs every few seconds (a database gone, a disk full): the first in full, with
    its traceback; the same failure again only once a minute, with how often it repeated; and one line when the
    loop works again. One error must not become a screen of tracebacks every poll."""

    def __init__(self, logger: logging.Logger, event: str, every_s: float = 60.0) -> None:
        self.logger, self.event, self.every_s = logger, event, every_s
        self._reason: str | None = None
        self._logged_at = 0.0
        self._repeated = 0

    def failed(self, exc: BaseException) -> None:
        reason = error_reason(exc)
        now = time.monotonic()
        if reason != self._reason:
            self._reason, self._logged_at, self._repeated = reason, now, 0
            self.logger.error(kv(self.event, reason=reason), exc_info=exc)
        elif now - self._logged_at >= self.every_s:
            self.logger.error(kv(self.event, reason=reason, repeated=self._repeated + 1,
                                 seconds=f"{now - self._logged_at:.0f}"))
            self._logged_at, self._repeated = now, 0
        else:
            self._repeated += 1

    def ok(self) -> None:
        if self._reason is not None:
            self.logger.info(kv(f"{self.event}_cleared", reason=self._reason))
            self._reason, self._repeated = None, 0
