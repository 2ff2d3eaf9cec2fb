"""The node's log format as IT greps it: one ``event=`` line per record, library lines included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_library_lines_are_events_and_never_errors(tmp_path: Path) -> None:
    """pynetdicom reports a refused connection at ERROR in free text; the node's own event says what happens next, so
    the library's line becomes ``event=pynetdicom`` at WARNING (an alert on ERROR is not woken by a retry)."""
    log_file = tmp_path / "node.log"
    code = (
        "import logging; from pathlib import Path; from node.logs import setup_logging, kv;"
        f"setup_logging('INFO', Path({str(log_file)!r}), False);"
        "logging.getLogger('pynetdicom.transport').error('TCP Initialisation Error: [Errno 111] Connection refused');"
        "logging.getLogger('pynetdicom.assoc').warning('Association Aborted');"
        "logging.getLogger('node.send').error(kv('send_failed', destination='pacs'))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = log_file.read_text().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith(
        "WARNING pynetdicom.transport event=pynetdicom "
        "message=\"TCP Initialisation Error: [Errno 111] Connection refused\"")
    assert lines[1].endswith("WARNING pynetdicom.assoc event=pynetdicom message=\"Association Aborted\"")
    assert lines[2].endswith("ERROR node.send event=send_failed destination=pacs")


def test_a_multi_line_value_stays_on_one_line() -> None:
    from node.logs import kv

    line = kv("node_start_failed", reason='connection refused\n\tIs the server running on "db"?\r\x07')
    assert "\n" not in line and "\t" not in line and "\r" not in line and "\x07" not in line
    assert line == ("event=node_start_failed reason=\"connection refused\\n\\tIs the server running on 'db'?"
                    "\\r\\x07\"")
    assert kv("x", ae="Ünïcode") == "event=x ae=Ünïcode"  # printable text is left alone


def test_a_loop_that_keeps_failing_logs_once_a_minute_and_says_when_it_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: the assembler logged a 40-line traceback every 0.5 s while the ledger's disk was full. A real SQLite
    error here (a write to a read-only connection), with the driver's message as the reason."""
    import logging
    import sqlite3

    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    from node.db.session import db_reason
    from node.logs import LoopErrors

    path = tmp_path / "x.sqlite"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.commit()
    engine = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    with pytest.raises(OperationalError) as caught, engine.begin() as conn:
        conn.execute(text("INSERT INTO t VALUES (1)"))
    assert db_reason(caught.value) == "attempt to write a readonly database"
    logger = logging.getLogger("node.test_loop")
    errors = LoopErrors(logger, "thing_error", every_s=3600)
    with caplog.at_level(logging.INFO, logger="node.test_loop"):
        for _ in range(20):
            errors.failed(caught.value)
        errors.ok()
        errors.ok()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ['event=thing_error reason="OperationalError: attempt to write a readonly database"',
                     'event=thing_error_cleared reason="OperationalError: attempt to write a readonly database"']
    assert caplog.records[0].exc_info is not None and caplog.records[0].levelname == "ERROR"
    errors.every_s = 0  # a minute later: the same failure again, with how often it repeated meanwhile
    errors.failed(caught.value)
    errors.failed(caught.value)
    assert "repeated=1" in caplog.records[-1].getMessage() and caplog.records[-1].exc_info is None


def test_a_log_file_that_cannot_be_written_is_a_start_error_not_a_traceback(tmp_path: Path) -> None:
    """serve used to die in setup_logging with a traceback and exit 1; now exit 2 and what to change."""
    from tests.helpers.node_proc import run_cli

    (tmp_path / "a-file").write_text("")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"logging:\n  file: {tmp_path / 'a-file' / 'node.log'}\nstorage:\n  spool_dir: {tmp_path / 'spool'}\n"
                   f"  database_url: sqlite:///{tmp_path / 'db.sqlite'}\n", encoding="utf-8")
    proc = run_cli("serve", "--config", cfg, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "cannot write the log file" in proc.stderr and "(logging.file)" in proc.stderr
    assert "Traceback" not in proc.stderr
