"""Run dcmtk tools (always by absolute path: the venv's pynetdicom installs scripts with the same
names) with TCP_NODELAY=1 (else every C-STORE stalls ~44 ms on Nagle's algorithm)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

DCMTK_BIN = Path("/usr/bin")


def dcmtk_path(tool: str) -> Path:
    return DCMTK_BIN / tool


def have_dcmtk(*tools: str) -> bool:
    return all(os.access(dcmtk_path(t), os.X_OK) for t in tools or ("storescu",))


def run_dcmtk(tool: str, *args: str | Path, timeout: float = 120.0, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``/usr/bin/<tool> args...``; returns the completed process (stdout/stderr as text)."""
    env = dict(os.environ, TCP_NODELAY="1")
    proc = subprocess.run(
        [str(dcmtk_path(tool)), *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


#: storescu's option that proposes a compressed transfer syntax (plus the uncompressed ones): without
#: it storescu proposes only uncompressed syntaxes and fails on files it cannot decode itself.
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2.5": "-xr",  # RLE Lossless
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG Lossless SV1
}


def echoscu(port: int, *, calling: str = "ECHOSCU", called: str = "LUNGNODE") -> subprocess.CompletedProcess[str]:
    return run_dcmtk("echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(port), timeout=30)


def storescu(
    port: int, *paths: str | Path, calling: str = "STORESCU", called: str = "LUNGNODE", transfer_syntax: str | None = None,
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """Send files (or folders: scanned recursively for ``*.dcm``) in one association.

    Only the SOP classes of the files are proposed (-R); ``transfer_syntax`` (a UID) adds the
    storescu option that proposes that compressed syntax so compressed files travel as they are.
    """
    propose = [STORESCU_PROPOSE[transfer_syntax]] if transfer_syntax in STORESCU_PROPOSE else []
    args: list[str] = ["-aet", calling, "-aec", called, "-R", *propose, *extra]
    if any(Path(p).is_dir() for p in paths):
        args += ["+sd", "+r", "+sp", "*.dcm"]
    return run_dcmtk("storescu", *args, "127.0.0.1", str(port), *paths)


def dcmdump(path: str | Path) -> str:
    return run_dcmtk("dcmdump", path, check=True).stdout


def which_dcmtk() -> str | None:
    return shutil.which(str(dcmtk_path("storescu")))


@contextmanager
def storescp_running(out: Path, *options: str | Path) -> Iterator[int]:
    """dcmtk's storescp (AE title STORESCP) writing what it receives to ``out``, on a free 127.0.0.1 port
    it yields; ``options`` before the port, e.g. ``+xi`` (Implicit VR only) or ``+tls KEY CERT +cf CA``."""
    from tests.helpers.net import free_port, listening
    from tests.helpers.wait import wait_until

    if not have_dcmtk("storescp"):
        pytest.skip("dcmtk's storescp (/usr/bin/storescp) is not installed")
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([str(dcmtk_path("storescp")), "-aet", "STORESCP", *map(str, options), "-od", str(out),
                             str(port)], env=dict(os.environ, TCP_NODELAY="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: listening(port), timeout=10, what="storescp listening")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
