"""Exceptions that carry a message meant for the person running the node."""


class LungnodeError(Exception):
    """Base class: the message says what went wrong and what to do."""


class ConfigError(LungnodeError):
    """The configuration file or environment is invalid; start-up stops."""


class InstanceRejected(LungnodeError):
    """A received instance cannot be accepted; carries the DICOM status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


#: The most characters of an exception's message that a recorded reason quotes.
REASON_MAX_CHARS = 300


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, for a job's recorded reason (the traceback belongs in the log): a traceback a
    library wrote into its message (pydicom does, for an element it cannot convert) is left out, the lines are
    joined, and a long message is cut."""
    text = str(exc).split("Traceback (most recent call last)")[0]
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    if len(text) > REASON_MAX_CHARS:
        text = text[:REASON_MAX_CHARS - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
