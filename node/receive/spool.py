"""The spool: where received instances live on disk, written so that an acknowledged one survives a crash.

Layout under ``storage.spool_dir``::

    incoming/                       files being received (pynetdicom writes here); never acknowledged
    instances/<SeriesUID>/<SOPUID>.dcm   committed instances
    quarantine/                     files found unreadable at start-up (never acknowledged)
    results/job-N/                  analysis results
    serve.lock                      held by the one ``lungnode serve`` using the spool (``claim_spool``)

An instance is committed by fsync of the file, an atomic link into ``instances/`` (then the
temporary name is removed) and fsync of the directory; only then is its row inserted and the
success status sent.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import socket
from pathlib import Path

from node.errors import InstanceRejected, LungnodeError
from node.logs import kv
from node.receive.gate import SeriesGate
from node.receive.inspect import STATUS_OUT_OF_RESOURCES

log = logging.getLogger(__name__)


def results_path(spool_dir: Path, job_id: int) -> Path:
    """Where job ``job_id`` writes its results (result.json, outputs.json and the DICOM objects)."""
    return spool_dir / "results" / f"job-{job_id}"


#: The file ``serve`` holds a lock on while it runs, naming its host and pid.
LOCK_FILE = "serve.lock"


def claim_spool(spool_dir: Path) -> int:
    """Lock the spool for this ``serve`` process (an open file descriptor to keep until it exits), or raise naming
    the one that has it. A second node on the same spool (started by hand beside the service, say) would, at its
    start, take the first one's transfers in progress for a crash's leftovers: its reconciliation would delete
    their files and mark their associations aborted. Remote workers share the spool and take no lock."""
    try:
        spool_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(spool_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o640)
    except OSError as exc:
        raise LungnodeError(f"cannot create {spool_dir / LOCK_FILE}: {exc.strerror}. Check storage.spool_dir and "
                            "its permissions") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise LungnodeError(f"cannot lock {spool_dir / LOCK_FILE}: {exc.strerror}") from exc
        raise LungnodeError(f"another lungnode serve ({holder}) is using the spool {spool_dir}: stop it first "
                            "(systemctl stop lungnode, docker stop), or give this node its own storage.spool_dir "
                            "and storage.database_url") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


class Spool:
    def __init__(self, root: Path, *, min_free_bytes: int, fsync: bool = True) -> None:
        self.root = root.resolve()
        self.incoming = self.root / "incoming"
        self.instances = self.root / "instances"
        self.min_free_bytes = min_free_bytes
        self.fsync = fsync
        self.gate = SeriesGate()  # the receive path's stores against retention's deletions
        try:
            self.incoming.mkdir(parents=True, exist_ok=True)
            self.instances.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LungnodeError(f"cannot create the spool in {self.root}: {exc.strerror}. Check storage.spool_dir.") from exc

    def path_for(self, series_uid: str, sop_uid: str) -> Path:
        return self.instances / series_uid / f"{sop_uid}.dcm"

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self) -> None:
        """Refuse with 0xA700 before writing when the disk is nearly full."""
        free = self.free_bytes()
        if free < self.min_free_bytes:
            raise InstanceRejected(
                STATUS_OUT_OF_RESOURCES,
                f"spool disk nearly full: {free // 2**20} MiB free, at least {self.min_free_bytes // 2**20} MiB required",
            )

    def open_received(self, received: Path) -> int:
        """A read descriptor on a received file, for ``sync_data``."""
        try:
            return os.open(received, os.O_RDONLY)
        except OSError as exc:
            raise _write_error(exc) from exc

    def sync_data(self, fd: int) -> None:
        """fsync a received file's content through ``fd``, then close it.

        Through a descriptor opened beforehand, so ``commit`` may give the file its final name
        meanwhile: the SCP runs the two at once, and acknowledges only when both are done.
        """
        try:
            if self.fsync:
                os.fsync(fd)
        except OSError as exc:
            raise _write_error(exc) from exc
        finally:
            os.close(fd)

    def commit(self, received: Path, series_uid: str, sop_uid: str, *, sync_data: bool = True) -> Path | None:
        """Make a received file durable at its final place and return that place.

        Returns None when an instance with this SOP Instance UID is already in the spool: the
        first copy is kept (a re-send is idempotent). ``link`` + ``unlink`` instead of ``rename``
        makes that check atomic even for two associations sending the same instance at once.
        ``sync_data=False`` when the caller runs ``sync_data`` itself and waits for it before
        acknowledging (the order of the two fsyncs does not matter; both precede the answer).
        """
        final = self.path_for(series_uid, sop_uid)
        if sync_data:
            self.sync_data(self.open_received(received))
        try:
            new_dir = not final.parent.exists()
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(received, final)
            except FileExistsError:
                return None
            os.unlink(received)
            if self.fsync:
                fsync_dir(final.parent)
                if new_dir:
                    fsync_dir(self.instances)
        except OSError as exc:
            raise _write_error(exc) from exc
        return final

    def discard_incoming(self) -> int:
        """Delete partial files left by a crash; none of them was ever acknowledged."""
        count = 0
        for path in self.incoming.iterdir():
            if path.is_file():
                path.unlink(missing_ok=True)
                count += 1
        if count:
            log.info(kv("spool_discard_incoming", files=count))
        return count

    def quarantine(self, path: Path) -> Path:
        """Move a file that cannot be an instance out of ``instances/`` (kept for inspection)."""
        target = self.root / "quarantine" / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        return target

    def committed_files(self) -> list[Path]:
        return [p for p in self.instances.glob("*/*.dcm") if p.is_file()]

    def results_dir(self, job_id: int) -> Path:
        return results_path(self.root, job_id)

    def remove_results(self, job_id: int) -> int:
        """Delete a job's result files (retention); returns how many were removed."""
        folder = self.results_dir(job_id)
        if not folder.is_dir():
            return 0
        count = sum(1 for p in folder.rglob("*") if p.is_file())
        shutil.rmtree(folder)
        return count

    def remove_files(self, paths: list[Path]) -> int:
        """Delete these instance files (retention; the caller holds the series' gate), and their series folder once
        it is empty; returns how many were removed."""
        removed = 0
        for path in paths:
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
        for folder in {p.parent for p in paths}:
            try:
                folder.rmdir()
            except OSError:  # not empty (a file the ledger does not name: left for reconciliation) or gone
                pass
        return removed


def _write_error(exc: OSError) -> InstanceRejected:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InstanceRejected(STATUS_OUT_OF_RESOURCES, f"spool disk full while writing: {exc.strerror}")
    return InstanceRejected(STATUS_OUT_OF_RESOURCES, f"cannot write to spool: {exc.strerror}")


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (the folder's entry, not only the file's data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
