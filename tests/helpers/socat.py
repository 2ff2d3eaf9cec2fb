"""Debian's socat as a TLS front (the reverse proxy a hospital puts before a DICOMweb server): HTTPS on a free
127.0.0.1 port, forwarded in plain HTTP to a local port."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.helpers.net import free_port, listening
from tests.helpers.wait import wait_until


def have_socat() -> bool:
    return shutil.which("socat") is not None


@contextmanager
def tls_front(target_port: int, *, certificate: Path, private_key: Path, folder: Path) -> Iterator[int]:
    """The HTTPS port; the server presents ``certificate`` and asks nothing of clients."""
    folder.mkdir(parents=True, exist_ok=True)
    pem = folder / "front.pem"
    pem.write_text(certificate.read_text() + private_key.read_text())
    port = free_port()
    proc = subprocess.Popen(["socat", f"OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={pem},verify=0",
                             f"TCP:127.0.0.1:{target_port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: listening(port), timeout=10, what="socat listening")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
