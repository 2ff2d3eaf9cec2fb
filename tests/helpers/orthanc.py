"""A private Orthanc (Debian's /usr/sbin/Orthanc, started by node.orthanc) as a real PACS for tests.

Usage::

    with OrthancServer(tmp_path / "pacs", modalities={"lungnode": Modality("LUNGNODE", node_port)}) as pacs:
        pacs.upload(path)                                # POST /instances
        pacs.push("lungnode", [study_id])                # POST /modalities/lungnode/store (synchronous)
        pacs.instances()                                 # Orthanc ids of every instance it holds
        pacs.find_instance(sop_uid)                      # Orthanc id of one SOP Instance UID, or None
        pacs.get_file(orthanc_id)                        # the stored Part 10 bytes

or the pytest fixture ``orthanc`` (module scope, AE title ORTHANC, no modalities; use
``orthanc_factory`` for your own modalities): import them into the test module,
``from tests.helpers.orthanc import orthanc, orthanc_factory  # noqa: F401``. Every server gets free 127.0.0.1 ports (``dicom_port``,
``http_port``), its own config JSON, storage and log under its folder, and ``TCP_NODELAY=1`` in its
environment (Debian's build leaves Nagle's algorithm on: ~44 ms per C-STORE otherwise). ``stop()``
ends it with SIGTERM and waits. Skips (not fails) when Orthanc is not installed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from node.orthanc import ORTHANC_BIN, Modality, have_orthanc
from node.orthanc import OrthancServer as _OrthancServer

__all__ = ["Modality", "OrthancFactory", "OrthancServer", "have_orthanc", "orthanc", "orthanc_factory"]


class OrthancServer(_OrthancServer):
    """node.orthanc.OrthancServer that skips the test, instead of failing, when Orthanc is not installed."""

    def start(self, timeout: float = 30.0) -> OrthancServer:
        if not have_orthanc():
            pytest.skip(f"Orthanc is not installed ({ORTHANC_BIN}; Debian package orthanc)")
        super().start(timeout)
        return self


OrthancFactory = Callable[..., OrthancServer]


@pytest.fixture(scope="module")
def orthanc_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancFactory]:
    """Start Orthancs: ``orthanc_factory(modalities={...}, ae_title="ORTHANC", extra_config={...})``; all
    are stopped at the end of the module."""
    if not have_orthanc():
        pytest.skip(f"Orthanc is not installed ({ORTHANC_BIN}; Debian package orthanc)")
    servers: list[OrthancServer] = []

    def make(**kw: Any) -> OrthancServer:
        server = OrthancServer(tmp_path_factory.mktemp("orthanc"), **kw)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def orthanc(orthanc_factory: OrthancFactory) -> OrthancServer:
    """One Orthanc for the module: AE title ORTHANC, accepts C-STORE from anyone, knows no modality."""
    return orthanc_factory()
