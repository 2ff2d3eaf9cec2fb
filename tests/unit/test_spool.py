"""The spool: an instance is durable (file fsynced, linked into place, folder fsynced) before it is
acknowledged; a second copy of a SOP Instance UID changes nothing; partial files are discarded."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from node.errors import InstanceRejected
from node.receive.inspect import STATUS_OUT_OF_RESOURCES
from node.receive.spool import Spool

SERIES = "1.2.3.4"
SOP = "1.2.3.4.5"


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", min_free_bytes=0)


def received(spool: Spool, name: str = "a.part", data: bytes = b"DICM-ish payload") -> Path:
    path = spool.incoming / name
    path.write_bytes(data)
    return path


def test_layout_is_created(tmp_path: Path) -> None:
    s = Spool(tmp_path / "deep" / "spool", min_free_bytes=0)
    assert s.incoming.is_dir() and s.instances.is_dir()
    assert s.root == (tmp_path / "deep" / "spool").resolve()


def test_commit_moves_the_file_into_place(spool: Spool) -> None:
    src = received(spool, data=b"x" * 1000)
    final = spool.commit(src, SERIES, SOP)
    assert final == spool.instances / SERIES / f"{SOP}.dcm" == spool.path_for(SERIES, SOP)
    assert final.read_bytes() == b"x" * 1000
    assert not src.exists()
    assert list(spool.incoming.iterdir()) == []
    assert spool.committed_files() == [final]


class _Recorder:
    """Wraps os.open/fsync/link/unlink to record the order of the durable-write steps."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, str]] = []
        self._fds: dict[int, str] = {}
        real_open, real_fsync, real_link, real_unlink = os.open, os.fsync, os.link, os.unlink

        def _open(path: object, flags: int, *a: object, **kw: object) -> int:
            fd = real_open(path, flags, *a, **kw)  # type: ignore[arg-type]
            self._fds[fd] = str(path)
            return fd

        def _fsync(fd: int) -> None:
            self.calls.append(("fsync", self._fds.get(fd, f"fd{fd}")))
            real_fsync(fd)

        def _link(src: object, dst: object, *a: object, **kw: object) -> None:
            self.calls.append(("link", f"{src} -> {dst}"))
            real_link(src, dst, *a, **kw)  # type: ignore[arg-type]

        def _unlink(path: object, *a: object, **kw: object) -> None:
            self.calls.append(("unlink", str(path)))
            real_unlink(path, *a, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "open", _open)
        monkeypatch.setattr(os, "fsync", _fsync)
        monkeypatch.setattr(os, "link", _link)
        monkeypatch.setattr(os, "unlink", _unlink)

    def index(self, kind: str, contains: str) -> int:
        for i, (k, what) in enumerate(self.calls):
            if k == kind and contains in what:
                return i
        raise AssertionError(f"no {kind} of {contains} in {self.calls}")


def test_commit_durability_order(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    src = received(spool)
    rec = _Recorder(monkeypatch)
    final = spool.commit(src, SERIES, SOP)
    assert final is not None
    fsync_file = rec.index("fsync", str(src))
    link = rec.index("link", str(final))
    fsync_series_dir = rec.index("fsync", str(spool.instances / SERIES))
    fsync_instances_dir = next(i for i, c in enumerate(rec.calls) if c == ("fsync", str(spool.instances)))
    assert fsync_file < link < fsync_series_dir, rec.calls
    assert link < fsync_instances_dir, "a new series folder must be made durable in its parent too"
    # the second instance of the same series: the series folder exists, its parent need not be synced again
    rec.calls.clear()
    spool.commit(received(spool, "b.part"), SERIES, SOP + ".2")
    assert ("fsync", str(spool.instances / SERIES)) in rec.calls
    assert ("fsync", str(spool.instances)) not in rec.calls


def test_commit_without_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Spool(tmp_path / "spool", min_free_bytes=0, fsync=False)
    rec = _Recorder(monkeypatch)
    assert s.commit(received(s), SERIES, SOP) is not None
    assert [c for c in rec.calls if c[0] == "fsync"] == []


def test_duplicate_returns_none_and_keeps_the_first_copy(spool: Spool) -> None:
    first = spool.commit(received(spool, "1.part", b"first"), SERIES, SOP)
    second_src = received(spool, "2.part", b"second")
    assert spool.commit(second_src, SERIES, SOP) is None
    assert first is not None and first.read_bytes() == b"first"
    # the second file is left where it was: its owner (pynetdicom) deletes it after the handler
    assert second_src.read_bytes() == b"second"
    assert spool.committed_files() == [first]


def test_check_space(tmp_path: Path) -> None:
    Spool(tmp_path / "a", min_free_bytes=0).check_space()
    full = Spool(tmp_path / "b", min_free_bytes=10**9 * 2**20)
    with pytest.raises(InstanceRejected) as exc:
        full.check_space()
    assert exc.value.status == STATUS_OUT_OF_RESOURCES == 0xA700
    assert "nearly full" in exc.value.reason


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_write_errors_become_out_of_resources(spool: Spool, monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    def failing_link(*_a: object, **_kw: object) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "link", failing_link)
    with pytest.raises(InstanceRejected) as exc:
        spool.commit(received(spool), SERIES, SOP)
    assert exc.value.status == STATUS_OUT_OF_RESOURCES
    assert not spool.path_for(SERIES, SOP).exists()


def test_discard_incoming(spool: Spool) -> None:
    kept = spool.commit(received(spool, "keep.part"), SERIES, SOP)
    for i in range(3):
        received(spool, f"partial-{i}.part")
    assert spool.discard_incoming() == 3
    assert list(spool.incoming.iterdir()) == []
    assert kept is not None and kept.is_file()
    assert spool.discard_incoming() == 0


def test_remove_files_deletes_the_named_files_then_their_emptied_folder(spool: Spool) -> None:
    held = [spool.commit(received(spool, f"{i}.part"), SERIES, f"{SOP}.{i}") for i in range(3)]
    other = spool.commit(received(spool, "o.part"), "9.9", "9.9.1")
    assert all(p is not None for p in held) and other is not None
    assert spool.remove_files([p for p in held[:2] if p is not None]) == 2
    assert (spool.instances / SERIES).is_dir(), "a file not named stays, and so does its folder"
    assert spool.remove_files([p for p in held if p is not None]) == 1
    assert not (spool.instances / SERIES).exists()
    assert other.is_file()