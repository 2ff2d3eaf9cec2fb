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
