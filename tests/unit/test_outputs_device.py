"""Each installation names itself by its own Device UID, made once and kept beside the spool."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydicom.uid import UID

from node.outputs.device import FILE_NAME, installation_device_uid
from node.outputs.sr import device_observer


def test_made_once_and_kept(tmp_path: Path) -> None:
    first = installation_device_uid(tmp_path / "spool")
    assert first is not None and first.startswith("2.25.") and UID(first).is_valid
    assert installation_device_uid(tmp_path / "spool") == first  # after a restart: the same device
    assert (tmp_path / "spool" / FILE_NAME).read_text().strip() == first
    assert [p.name for p in (tmp_path / "spool").iterdir()] == [FILE_NAME]  # no temporary file left
    assert installation_device_uid(tmp_path / "other") != first  # another installation: another device


def test_a_damaged_file_is_not_replaced_silently(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / FILE_NAME).write_text("not a uid\n")
    with caplog.at_level(logging.WARNING, logger="node"):
        assert installation_device_uid(tmp_path) is None
    assert "event=device_uid_not_kept" in caplog.text and "delete it to make a new one" in caplog.text


def test_a_spool_that_cannot_hold_it_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "spool"
    blocked.write_text("a file where the spool folder should be")
    with caplog.at_level(logging.WARNING, logger="node"):
        assert installation_device_uid(blocked) is None
    assert "event=device_uid_not_kept" in caplog.text and "outputs.device_serial_number" in caplog.text


def test_the_observer_uses_it_and_falls_back_to_the_serial() -> None:
    def uid_of(ctx: object) -> str:
        return next(str(i.UID) for i in ctx if i.ConceptNameCodeSequence[0].CodeValue == "121012")  # type: ignore[attr-defined]

    assert uid_of(device_observer("1", "2.25.12345")) == "2.25.12345"
    derived = uid_of(device_observer("1"))
    assert derived == uid_of(device_observer("1")) != uid_of(device_observer("2"))
