#!/usr/bin/env python3
"""Receive speed: lungnode's C-STORE SCP against dcmtk's storescp, in one run.

Sends the same 300-slice 512x512 CT series (uncompressed, Explicit VR Little Endian) with dcmtk's
storescu over one association on loopback to
  - dcmtk storescp (writes files, no fsync): the reference,
  - lungnode serve with durability on (fsync, ledger commit before each acknowledgement),
  - lungnode serve with pynetdicom's stock receive loop (dicom.fast_receive: false), for scale,
alternating the targets each round so machine noise hits all of them alike. Every run starts a
fresh receiver (for lungnode: empty spool and database, so no instance is a duplicate) and first
receives an untimed warm-up series of as many 256x256 slices, so the timed series meets a node in
its steady state (imports done, SQLite's write-ahead log at its working size), as a node that has
been running for a while is. Prints slices per second (median over rounds) and the ratio to
storescp: the median over rounds of storescp's time divided by the target's in the same round,
the figure to compare (pairing the runs of a round cancels most of the drift of a noisy machine).

Both receivers write under ``--workdir`` (default var/bench, where the node's default spool is).
Not /tmp: where thousands of files were deleted in the last minutes (a test run's temporary
folders), ext4 creates files slowly while it steps over recently freed inodes (measured here 0.3 to
0.8 ms per file in /tmp against 0.02 to 0.08 ms in var/). That slows storescp, whose work is mostly
one file per slice, far more than the node, and so flatters the ratio.

With ``--tls`` every transfer uses DICOM TLS (a throw-away CA from tests/helpers/certs.py; storescu
and storescp with ``+tls``, the node with dicom.tls and client certificates required), so the ratio
says what the node costs over dcmtk when both encrypt.

With ``--audit`` a fourth target is the node with its IHE ATNA audit trail on (audit.transport udp, to a socket of
this script that reads and counts the messages), so the two lungnode ratios show what auditing costs the receive
path; the script checks that one DICOM Instances Transferred message arrived per timed association.

    .venv/bin/python bench/receive.py [--rounds 5] [--slices 300] [--matrix 512] [--tls] [--audit] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def make_series(out: Path, slices: int, matrix: int, seed: int = 7) -> Path:
    from node.synthetic import PhantomSpec, SeriesOptions, make_phantom, write_series

    phantom = make_phantom(PhantomSpec(kind="covid", slices=slices, matrix=matrix, seed=seed))
    write_series(out, phantom, SeriesOptions(transfer_syntax="explicit", seed=seed, write_truth=False))
    return out


TLS: Any = None  # a tests.helpers.certs.Pki with --tls


def send(port: int, ae: str, series: Path) -> float:
    files = sorted(str(p) for p in series.glob("IM*.dcm"))
    env = dict(os.environ, TCP_NODELAY="1")
    tls = ["+tls", str(TLS.client_key), str(TLS.client_cert), "+cf", str(TLS.ca)] if TLS else []
    t0 = time.perf_counter()
    proc = subprocess.run([STORESCU, *tls, "-aec", ae, "127.0.0.1", str(port), *files], env=env,
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"storescu failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed


def run_storescp(series: Path, warmup: Path, work: Path) -> float:
    out = work / "storescp"
    out.mkdir()
    port = free_port()
    tls = ["+tls", str(TLS.server_key), str(TLS.server_cert), "+cf", str(TLS.ca)] if TLS else []
    proc = subprocess.Popen([STORESCP, *tls, "-od", str(out), str(port)], env=dict(os.environ, TCP_NODELAY="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        send(port, "ANY-SCP", warmup)
        return send(port, "ANY-SCP", series)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(out)


HANDLER_MS: dict[str, list[float]] = {}


def _handler_ms(log_text: str) -> float | None:
    """Time our C-STORE handler took per instance in the last association (from its release line)."""
    found = re.findall(r"event=association_released .*handler_ms_each=([0-9.]+)", log_text)
    return float(found[-1]) if found else None


class AuditSink:
    """A UDP socket that takes the node's audit messages and counts the DICOM Instances Transferred ones."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])

    def transferred(self, wait_for: int, timeout: float = 10.0) -> int:
        count, deadline = 0, time.monotonic() + timeout
        while count < wait_for and time.monotonic() < deadline:
            try:
                count += b'csd-code="110104"' in self.sock.recv(65535)
            except TimeoutError:
                continue
        return count


def run_node(series: Path, warmup: Path, work: Path, *, fast: bool, audit: AuditSink | None = None) -> float:
    home = work / "node"
    home.mkdir()
    port = free_port()
    env = dict(
        os.environ,
        LUNGNODE_DICOM__PORT=str(port),
        LUNGNODE_DICOM__BIND_ADDRESS="127.0.0.1",
        LUNGNODE_DICOM__FAST_RECEIVE=str(fast).lower(),
        LUNGNODE_STORAGE__SPOOL_DIR=str(home / "spool"),
        LUNGNODE_STORAGE__DATABASE_URL=f"sqlite:///{home / 'ledger.db'}",
        LUNGNODE_STORAGE__MIN_FREE_DISK_MB="0",
        LUNGNODE_LOGGING__LEVEL="INFO",
        LUNGNODE_WORKERS__COUNT="0",
    )
    if audit is not None:
        env.update(LUNGNODE_AUDIT__HOST="127.0.0.1", LUNGNODE_AUDIT__PORT=str(audit.port),
                   LUNGNODE_AUDIT__TRANSPORT="udp")
    if TLS:
        env.update(LUNGNODE_DICOM__TLS__ENABLED="true", LUNGNODE_DICOM__TLS__CERTIFICATE=str(TLS.server_cert),
                   LUNGNODE_DICOM__TLS__PRIVATE_KEY=str(TLS.server_key), LUNGNODE_DICOM__TLS__CA_CERTIFICATES=str(TLS.ca))
    log = home / "node.log"
    with log.open("w") as log_fh:
        proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve"], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=log_fh)
    try:
        wait_port(port)
        try:
            send(port, "LUNGNODE", warmup)
            elapsed = send(port, "LUNGNODE", series)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\nlungnode log (tail):\n{log.read_text()[-3000:]}") from exc
        wait_log(log, "event=association_released", count=2)
        if audit is not None and audit.transferred(2) != 2:  # the warm-up's and the timed association's
            raise RuntimeError("the audited node did not send one Instances Transferred message per association")
        handler = _handler_ms(log.read_text())
        if handler is not None:
            HANDLER_MS.setdefault("audit" if audit else "fast" if fast else "stock", []).append(handler)
        return elapsed
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"lungnode exited {proc.returncode}: {log.read_text()[-2000:]}")
        shutil.rmtree(home)


def wait_log(log: Path, needle: str, *, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and log.read_text().count(needle) < count:
        time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="rounds; each sends once to every target (default 5)")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--matrix", type=int, default=512)
    ap.add_argument("--skip-stock", action="store_true", help="do not measure pynetdicom's stock receive loop")
    ap.add_argument("--series", type=Path, help="send this folder of IM*.dcm files instead of a synthetic series")
    ap.add_argument("--tls", action="store_true", help="every transfer over DICOM TLS (needs the openssl command)")
    ap.add_argument("--audit", action="store_true", help="also measure the node with its audit trail on (UDP)")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    ap.add_argument("--workdir", type=Path, default=ROOT / "var" / "bench",
                    help="where both receivers write (default: var/bench, beside the node's default spool)")
    args = ap.parse_args()
    for tool in (STORESCU, STORESCP):
        if not Path(tool).exists():
            sys.exit(f"{tool} not found: install Debian's dcmtk (bash deploy/install.sh --test)")

    targets: dict[str, bool | None] = {"storescp": None, "lungnode": True}
    if not args.skip_stock:
        targets["lungnode-stock-pynetdicom"] = False
    sink = AuditSink() if args.audit else None
    if sink is not None:
        targets["lungnode-audit"] = True
    times: dict[str, list[float]] = {name: [] for name in targets}
    args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lungnode-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        if args.series:
            series = args.series
            args.slices = len(list(series.glob("IM*.dcm")))
        else:
            print(f"generating a {args.slices}-slice {args.matrix}x{args.matrix} series...", file=sys.stderr)
            series = make_series(work / "series", args.slices, args.matrix)
        print("generating the warm-up series...", file=sys.stderr)
        warmup = make_series(work / "warmup", len(list(series.glob("IM*.dcm"))), 256, seed=8)
        if args.tls:
            global TLS
            sys.path.insert(0, str(ROOT))
            from tests.helpers.certs import make_pki

            TLS = make_pki(work / "pki")
        mb = sum(p.stat().st_size for p in series.glob("IM*.dcm")) / 1e6
        for r in range(args.rounds):
            for name, fast in targets.items():
                t = (run_storescp(series, warmup, work) if fast is None else
                     run_node(series, warmup, work, fast=fast, audit=sink if name == "lungnode-audit" else None))
                times[name].append(t)
                print(f"round {r + 1}/{args.rounds} {name:28} {t:6.2f} s  {args.slices / t:7.0f} slices/s",
                      file=sys.stderr)

    ref = statistics.median(times["storescp"])
    paired = {name: statistics.median(r / t for r, t in zip(times["storescp"], ts)) for name, ts in times.items()}
    result = {
        "series": {"slices": args.slices, "matrix": args.matrix, "megabytes": round(mb, 1)},
        "tls": args.tls,
        "audit": args.audit,
        "rounds": args.rounds,
        "targets": {
            name: {
                "median_s": round(statistics.median(ts), 3),
                "handler_ms_per_instance": (
                    round(statistics.median(HANDLER_MS[key]), 2)
                    if (key := {"lungnode": "fast", "lungnode-stock-pynetdicom": "stock",
                                "lungnode-audit": "audit"}.get(name)) in HANDLER_MS
                    else None
                ),
                "slices_per_s": round(args.slices / statistics.median(ts), 1),
                "ratio_of_medians": round(ref / statistics.median(ts), 3),
                "ratio_to_storescp": round(paired[name], 3),
                "runs_s": [round(t, 3) for t in ts],
            }
            for name, ts in times.items()
        },
    }
    print(f"\n{args.slices} slices of {args.matrix}x{args.matrix} ({mb:.0f} MB), one association"
          f"{' over TLS' if args.tls else ''}, median of {args.rounds}"
          f" (ratio: median over rounds of storescp's time / the target's, in the same round):")
    print(f"{'target':30} {'seconds':>8} {'slices/s':>9} {'ratio to storescp':>18} {'our handler ms/slice':>21}")
    for name, row in result["targets"].items():
        handler = row["handler_ms_per_instance"]
        print(f"{name:30} {row['median_s']:8.2f} {row['slices_per_s']:9.0f} {row['ratio_to_storescp']:17.2f}x"
              f" {handler if handler is not None else '-':>21}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
