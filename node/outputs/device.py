"""This installation's Device UID, kept beside its spool.

The SR and the KOS name their observer, this node, by a Device Observer UID, which DICOM wants unique
per device. One derived from the Device Serial Number alone would be the same for every installation
that keeps the default serial, so each node makes a random UID once, in ``<spool_dir>/device-uid``,
and keeps it: results made before and after a restart or an upgrade name the same device. Keep the
file with the spool in backups. ``lungnode process`` (no node, no spool) falls back to the UID derived
from the serial number.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path

from node.logs import kv

log = logging.getLogger(__name__)

FILE_NAME = "device-uid"
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")


def installation_device_uid(spool_dir: Path) -> str | None:
    """The UID in ``spool_dir/device-uid``, made on first use; None (with a warning) when it cannot be kept."""
    path = Path(spool_dir) / FILE_NAME
    try:
        existing = _read(path)
        if existing is not None:
            return existing
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{FILE_NAME}.{os.getpid()}.{uuid.uuid4().hex}")
        tmp.write_text(f"2.25.{uuid.uuid4().int}\n", encoding="ascii")
        try:
            os.link(tmp, path)  # exclusive: of two workers starting at once, one UID wins and both read it
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        return _read(path)
    except OSError as exc:
        log.warning(kv("device_uid_not_kept", path=str(path), reason=exc.strerror or str(exc),
                       effect="the SR and KOS name this node by a UID derived from outputs.device_serial_number"))
        return None


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    if not (len(text) <= 64 and _UID.fullmatch(text)):
        raise OSError(f"{path} holds no valid UID; delete it to make a new one")
    return text
