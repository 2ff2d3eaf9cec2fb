"""The node's log format as IT greps it: one ``event=`` line per record, library lines included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
