"""Loopback ports: the node's own helper (``node.orthanc``), which ``lungnode demo`` uses too."""

from __future__ import annotations

import socket

from node.orthanc import free_port, free_ports

__all__ = ["free_port", "free_ports", "listening"]


def listening(port: int) -> bool:
    """Something accepts TCP connections on 127.0.0.1:``port``."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
