"""``lungnode serve`` as a real subprocess with its own config, spool and SQLite ledger."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.helpers.net import free_port
from tests.helpers.wait import wait_until

REPO = Path(__file__).resolve().parents[2]
NODE_CMD = [sys.executable, "-m", "node.cli"]
READY = re.compile(r"event=node_ready ae_title=(\S+) port=(\d+)")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without any LUNGNODE_* override, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUNGNODE_")}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def query_sqlite(db_path: Path, sql: str, *params: Any) -> list[sqlite3.Row]:
    """Rows of a SELECT on a SQLite ledger, read directly (safe while a node writes: WAL)."""
    conn = sqlite3.connect(db_path, timeout=30)
    try:
        conn.row_factory = sqlite3.Row
        return list(conn.execute(sql, params))
    finally:
        conn.close()


def run_cli(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``lungnode ARGS`` in a subprocess (``python -m node.cli``), without LUNGNODE_* from outside."""
    return subprocess.run([*NODE_CMD, *map(str, args)], env=clean_env(env), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


class NodeProcess:
    """One node: config file, spool and database under ``workdir``; start/stop/kill/restart it."""

    def __init__(self, workdir: Path, *, port: int | None = None, settings: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self._port_given = port is not None
        self.spool_dir = workdir / "spool"
        self.db_path = workdir / "ledger.sqlite"
        self.db_url = f"sqlite:///{self.db_path}"
        self.config_path = workdir / "config.yaml"
        self.log_path = workdir / "node.log"
        self.env = clean_env(env)
        defaults: dict[str, Any] = {
            "dicom": {"ae_title": "LUNGNODE", "bind_address": "127.0.0.1", "port": self.port},
            "storage": {"spool_dir": str(self.spool_dir), "database_url": self.db_url, "min_free_disk_mb": 0},
            "assembly": {"quiet_period_s": 2.0, "release_grace_s": 0.5, "poll_interval_s": 0.1, "study_settle_s": 0.5},
            # No analysis unless a test asks for workers: receive tests look at queued jobs.
            "workers": {"count": 0},
            "logging": {"level": "INFO"},
        }
        self.settings = deep_merge(defaults, settings or {})
        self.ae_title: str = self.settings["dicom"]["ae_title"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_codes: list[int] = []
        self._write_config()

    # -- configuration ------------------------------------------------------------------------
    def _write_config(self) -> None:
        self.settings["dicom"]["port"] = self.port
        self.config_path.write_text(yaml.safe_dump(self.settings, sort_keys=True), encoding="utf-8")

    def reconfigure(self, settings: dict[str, Any]) -> None:
        """Change the config file (takes effect at the next start)."""
        self.settings = deep_merge(self.settings, settings)
        self._write_config()

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 30.0) -> None:
        assert not self.running, "node already running"
        for attempt in range(3):
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            with open(self.log_path, "ab") as logf:
                self.proc = subprocess.Popen(
                    [*NODE_CMD, "serve", "--config", str(self.config_path)],
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir,
                )
            proc = self.proc

            def ready_or_exited() -> bool:
                return bool(READY.search(self.log[offset:])) or proc.poll() is not None

            wait_until(ready_or_exited, timeout=timeout, interval=0.02, what="event=node_ready in the node log")
            if proc.poll() is None:
                match = READY.search(self.log[offset:])
                assert match is not None and int(match.group(2)) == self.port, self.log[offset:]
                return
            self.exit_codes.append(proc.returncode)
            self.proc = None
            text = self.log[offset:]
            if "Address already in use" in text and not self._port_given and attempt < 2:
                self.port = free_port()  # someone took the port between picking and binding
                self._write_config()
                continue
            raise AssertionError(f"node exited {proc.returncode} during start-up:\n{text}")

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` without waiting (see wait_exit)."""
        assert self.proc is not None, "node not started"
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 15.0) -> int:
        """Wait for the process to end; returns its exit code (raises subprocess.TimeoutExpired)."""
        assert self.proc is not None, "node not started"
        rc = self.proc.wait(timeout=timeout)
        self.exit_codes.append(rc)
        self.proc = None
        return rc

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 15.0) -> int:
        """Send ``sig`` and wait for the process to end; returns its exit code."""
        self.send_signal(sig)
        return self.wait_exit(timeout)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (the orderly stop); returns the exit code, 0 when the node stopped cleanly."""
        return self.kill(signal.SIGTERM, timeout=timeout)

    def restart(self) -> None:
        if self.running:
            rc = self.stop()
            assert rc == 0, f"node exited {rc} on SIGTERM:\n{self.log[-3000:]}"
        self.start()

    def wait_for_log(self, pattern: str, *, timeout: float = 10.0, start: int = 0) -> re.Match[str]:
        rx = re.compile(pattern)
        return wait_until(lambda: rx.search(self.log, start), timeout=timeout, what=f"log line /{pattern}/")

    # -- what the node recorded -----------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """``lungnode status --json --config FILE`` parsed."""
        proc = run_cli("status", "--json", "--limit", "1000", "--config", self.config_path)
        assert proc.returncode == 0, f"lungnode status exited {proc.returncode}:\n{proc.stderr}"
        return json.loads(proc.stdout)

    def query(self, sql: str, *params: Any) -> list[sqlite3.Row]:
        """Run a read-only SELECT on the ledger (safe while the node writes: WAL)."""
        return query_sqlite(self.db_path, sql, *params)

    def series(self, series_uid: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM series WHERE series_instance_uid = ?", series_uid)
        return dict(rows[0]) if rows else None

    def jobs(self, series_uid: str) -> list[dict[str, Any]]:
        rows = self.query(
            "SELECT jobs.* FROM jobs JOIN series ON series.id = jobs.series_id "
            "WHERE series.series_instance_uid = ? ORDER BY jobs.revision", series_uid)
        return [dict(r) for r in rows]

    def instances(self, series_uid: str | None = None) -> list[dict[str, Any]]:
        if series_uid is None:
            return [dict(r) for r in self.query("SELECT * FROM instances ORDER BY id")]
        rows = self.query(
            "SELECT instances.* FROM instances JOIN series ON series.id = instances.series_id "
            "WHERE series.series_instance_uid = ? ORDER BY instances.id", series_uid)
        return [dict(r) for r in rows]

    def count(self, table: str) -> int:
        assert re.fullmatch(r"[a-z_]+", table)
        return int(self.query(f"SELECT count(*) FROM {table}")[0][0])

    def wait_complete(self, series_uid: str, *, revision: int = 1, timeout: float = 20.0) -> dict[str, Any]:
        """Wait until the series' ``revision`` is complete; returns its row."""
        def done() -> dict[str, Any] | None:
            row = self.series(series_uid)
            return row if row and row["state"] == "complete" and row["revision"] == revision else None
        return wait_until(done, timeout=timeout, interval=0.05, what=f"series {series_uid} revision {revision} complete")

    # -- spool ---------------------------------------------------------------------------------
    def spool_path(self, series_uid: str, sop_uid: str) -> Path:
        return self.spool_dir / "instances" / series_uid / f"{sop_uid}.dcm"

    def spool_files(self, series_uid: str | None = None) -> list[Path]:
        pattern = f"{series_uid}/*.dcm" if series_uid else "*/*.dcm"
        return sorted((self.spool_dir / "instances").glob(pattern))

    def incoming_files(self) -> list[Path]:
        folder = self.spool_dir / "incoming"
        return sorted(folder.iterdir()) if folder.exists() else []
