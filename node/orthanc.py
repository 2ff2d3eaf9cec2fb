"""A private Orthanc (Debian's /usr/sbin/Orthanc) as a local PACS: for ``lungnode demo`` and the tests.

    with OrthancServer(workdir, modalities={"lungnode": Modality("LUNGNODE", 11112)}) as pacs:
        pacs.upload(path)                       # POST /instances
        pacs.push("lungnode", [study_id])       # POST /modalities/lungnode/store (synchronous)
        pacs.find_instance(sop_uid)             # Orthanc id of one SOP Instance UID, or None

Every server gets free 127.0.0.1 ports (``dicom_port``, ``http_port``) unless given, its own config
JSON, storage and log under its folder, and ``TCP_NODELAY=1`` in its environment (Debian's build
leaves Nagle's algorithm on: ~44 ms per C-STORE otherwise). ``stop()`` ends it with SIGTERM.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.errors import LungnodeError

ORTHANC_BIN = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class OrthancError(LungnodeError):
    """Orthanc is missing, did not start, or refused a request."""


class _PortTaken(OrthancError):
    """Orthanc could not bind a port: someone took it after it was picked."""


def have_orthanc() -> bool:
    return os.access(ORTHANC_BIN, os.X_OK)


def have_dicomweb() -> bool:
    """Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb)."""
    return have_orthanc() and DICOMWEB_PLUGIN.is_file()


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now.

    All ``n`` sockets stay bound until every port is chosen: picked one at a time, the kernel may hand
    the same port out twice (as it once did for an Orthanc's DICOM and HTTP ports).
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            socks.append(socket.socket())
            socks[-1].bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    return free_ports(1)[0]


@dataclass(frozen=True)
class Modality:
    """A DICOM peer Orthanc knows (``DicomModalities``): it pushes to it and accepts its requests.

    ``storage_commitment`` allows N-ACTION / N-EVENT-REPORT with it (Orthanc sends the commitment
    report in a new association to this AE title, host and port).
    """

    ae_title: str
    port: int
    host: str = "127.0.0.1"
    storage_commitment: bool = True
    tls: bool = False  # Orthanc calls it with DICOM TLS (its DicomTls* options must be set)

    def entry(self) -> dict[str, Any]:
        return {"AET": self.ae_title, "Host": self.host, "Port": self.port,
                "AllowStorageCommitment": self.storage_commitment, **({"UseDicomTls": True} if self.tls else {})}


class OrthancServer:
    """One Orthanc process with its own folder, ports and configuration."""

    def __init__(self, workdir: Path, *, ae_title: str = "ORTHANC", modalities: dict[str, Modality] | None = None,
                 extra_config: dict[str, Any] | None = None, dicom_port: int | None = None,
                 http_port: int | None = None, name: str = "TESTPACS", dicomweb: bool = False,
                 http_user: tuple[str, str] | None = None) -> None:
        """``extra_config`` is merged over the generated configuration (any Orthanc option, e.g.
        ``{"AcceptedTransferSyntaxes": ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]}``). ``dicomweb`` loads the
        DICOMweb plugin (Debian package orthanc-dicomweb) at ``/dicom-web``; ``http_user`` (name, password)
        requires HTTP Basic authentication, which this class's own requests then send."""
        self.workdir = Path(workdir)
        self.ae_title = ae_title
        self.name = name
        self.modalities = dict(modalities or {})
        self.extra_config = dict(extra_config or {})
        self.dicomweb = dicomweb
        self.http_user = http_user
        self._fixed_ports = (dicom_port, http_port)
        self.dicom_port, self.http_port = self._pick_ports()
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _pick_ports(self) -> tuple[int, int]:
        """The ports given, and distinct free ones for those not given."""
        dicom, http = self._fixed_ports
        picked = iter(free_ports(2))
        return dicom or next(picked), http or next(picked)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        storage = self.workdir / "db"
        cfg: dict[str, Any] = {
            "Name": self.name, "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "DicomAet": self.ae_title, "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomAssociationCloseDelay": 0,
            "DicomCheckCalledAet": True, "DicomScuTimeout": 10, "StorageCompression": False, "SyncStorageArea": False,
            "Plugins": [], "HttpThreadsCount": 4, "ConcurrentJobs": 2,
            "DicomModalities": {name: m.entry() for name, m in self.modalities.items()},
        }
        if self.dicomweb:
            cfg["Plugins"] = [str(DICOMWEB_PLUGIN)]
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        if self.http_user is not None:
            cfg["AuthenticationEnabled"] = True
            cfg["RegisteredUsers"] = {self.http_user[0]: self.http_user[1]}
        cfg.update(self.extra_config)
        return cfg

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> OrthancServer:
        """Write the config, start Orthanc and wait until its REST API answers.

        If a port it picked itself was taken between picking and binding (another process on the
        machine), it picks new ones and tries again, up to three times; ports given are never changed.
        """
        for _ in range(0 if all(self._fixed_ports) else 2):
            try:
                return self._start_once(timeout)
            except _PortTaken:
                self.dicom_port, self.http_port = self._pick_ports()
        return self._start_once(timeout)

    def _start_once(self, timeout: float) -> OrthancServer:
        if not have_orthanc():
            raise OrthancError(f"Orthanc is not installed ({ORTHANC_BIN}): run `bash deploy/install.sh`, "
                               "which installs Debian's orthanc package")
        if self.proc is not None:
            raise OrthancError("this Orthanc is already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = dict(os.environ, TCP_NODELAY="1")
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen([str(ORTHANC_BIN), str(self.config_path)], stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                new_log = self.log_path.read_bytes()[log_start:].decode("utf-8", "replace")
                error = _PortTaken if "already in use" in new_log else OrthancError
                raise error(f"Orthanc exited {code} at start (log: {self.log_path}):\n{new_log[-3000:]}")
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise OrthancError(f"Orthanc's REST API did not answer in {timeout:g} s (log: {self.log_path})")
                time.sleep(0.1)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``); the exit code, None when not running."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        return proc.returncode

    def restart(self) -> None:
        """Stop and start again with the same ports, config and storage (e.g. after changing modalities)."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- REST -------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json",
                 timeout: float = 60.0) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if self.http_user is not None:
            token = base64.b64encode(":".join(self.http_user).encode()).decode("ascii")
            req.add_header("Authorization", f"Basic {token}")
        if body is not None:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            return bytes(rsp.read())

    def get(self, path: str) -> Any:
        """GET ``path`` (e.g. ``/instances``) and parse the JSON answer."""
        return json.loads(self._request("GET", path))

    def get_bytes(self, path: str) -> bytes:
        """GET ``path`` as raw bytes (files, rendered PNGs)."""
        return self._request("GET", path)

    def post(self, path: str, payload: Any) -> Any:
        """POST a JSON payload and parse the JSON answer."""
        return json.loads(self._request("POST", path, json.dumps(payload).encode()) or b"null")

    def instances(self) -> list[str]:
        """Orthanc ids of all stored instances."""
        return list(self.get("/instances"))

    def sop_instance_uids(self) -> set[str]:
        """SOP Instance UIDs of all stored instances."""
        return {self.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in self.instances()}

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """The Orthanc id of the instance with this SOP Instance UID, or None."""
        found = self.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}})
        return found[0] if found else None

    def get_file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file (Part 10 bytes) of an instance."""
        return self._request("GET", f"/instances/{orthanc_id}/file")

    def metadata(self, orthanc_id: str, name: str) -> str:
        """An instance's metadata item, e.g. ``TransferSyntax`` or ``RemoteAET``."""
        return self._request("GET", f"/instances/{orthanc_id}/metadata/{name}").decode()

    def upload(self, path: Path) -> dict[str, Any]:
        """Store a DICOM file through REST (``POST /instances``); Orthanc's answer (ID, ParentStudy...)."""
        return dict(json.loads(self._request("POST", "/instances", Path(path).read_bytes(), "application/dicom")))

    def push(self, modality: str, resources: list[str], *, timeout: float = 120.0) -> Any:
        """C-STORE Orthanc resources (ids of studies, series or instances) to a configured modality and wait."""
        body = json.dumps({"Resources": resources, "Synchronous": True}).encode()
        return json.loads(self._request("POST", f"/modalities/{modality}/store", body, timeout=timeout) or b"null")
