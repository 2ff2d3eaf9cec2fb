"""Loopback ports: the node's own helper (``node.orthanc``), which ``lungnode demo`` uses too."""

from __future__ import annotations

from node.orthanc import free_port, free_ports

__all__ = ["free_port", "free_ports"]
