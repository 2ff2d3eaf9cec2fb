"""Debian's rsyslogd as the hospital's audit record repository: UDP, TCP and TLS (mutual, x509/certvalid) inputs on
127.0.0.1, every message it parses written to one file with its RFC 5424 header fields."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.certs import Pki
from tests.helpers.net import free_port, listening
from tests.helpers.wait import wait_until

RSYSLOGD = "/usr/sbin/rsyslogd"


def have_rsyslog() -> bool:
    """rsyslogd with its GnuTLS driver (Debian's rsyslog and rsyslog-gnutls)."""
    return shutil.which(RSYSLOGD) is not None and any(Path("/usr/lib").glob("*/rsyslog/lmnsd_gtls.so"))


@dataclass(frozen=True)
class Repository:
    udp: int
    tcp: int
    tls: int
    log: Path


@dataclass(frozen=True)
class Received:
    """One message as rsyslog parsed it."""

    msgid: str
    app_name: str
    procid: str
    hostname: str
    pri: str
    timestamp: str
    xml: str


_CONF = """\
global(workDirectory="{work}" maxMessageSize="64k")
module(load="imudp")
module(load="imtcp" maxSessions="50")
template(name="audit" type="string"
         string="%msgid%|%app-name%|%procid%|%hostname%|%pri%|%timereported:::date-rfc3339%|%msg%\\n")
ruleset(name="audit") {{ action(type="omfile" file="{log}" template="audit") }}
input(type="imudp" address="127.0.0.1" port="{udp}" ruleset="audit")
input(type="imtcp" address="127.0.0.1" port="{tcp}" ruleset="audit")
input(type="imtcp" address="127.0.0.1" port="{tls}" ruleset="audit" streamDriver.name="gtls" streamDriver.mode="1"
      streamDriver.authMode="x509/certvalid" streamDriver.CAFile="{ca}" streamDriver.CertFile="{cert}"
      streamDriver.KeyFile="{key}")
"""


@contextmanager
def rsyslog_running(folder: Path, pki: Pki) -> Iterator[Repository]:
    """rsyslogd in the foreground; its TLS input presents the PKI's server certificate and wants a client
    certificate from the PKI's CA."""
    folder.mkdir(parents=True, exist_ok=True)
    repo = Repository(udp=free_port(), tcp=free_port(), tls=free_port(), log=folder / "received.log")
    conf = folder / "rsyslog.conf"
    conf.write_text(_CONF.format(work=folder, log=repo.log, udp=repo.udp, tcp=repo.tcp, tls=repo.tls, ca=pki.ca,
                                 cert=pki.server_cert, key=pki.server_key), encoding="utf-8")
    proc = subprocess.Popen([RSYSLOGD, "-n", "-f", str(conf), "-i", str(folder / "rsyslogd.pid")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: proc.poll() is not None or (listening(repo.tcp) and listening(repo.tls)), timeout=20,
                   interval=0.05, what="rsyslogd listening")
        if proc.poll() is not None:
            raise RuntimeError(f"rsyslogd exited: {proc.stdout.read() if proc.stdout else ''}")
        yield repo
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def received(repo: Repository) -> list[Received]:
    if not repo.log.exists():
        return []
    out = []
    for line in repo.log.read_text(encoding="utf-8").splitlines():
        fields = line.split("|", 6)
        out.append(Received(*fields[:6], xml=fields[6].removeprefix("\ufeff")))
    return out


def wait_received(repo: Repository, count: int, *, timeout: float = 20) -> list[Received]:
    """At least ``count`` messages (rsyslog writes its file asynchronously)."""
    def enough() -> list[Received] | None:
        got = received(repo)
        return got if len(got) >= count else None
    return wait_until(enough, timeout=timeout, interval=0.1,
                      what=f"{count} audit messages at the repository (now {len(received(repo))})")


def settle(seconds: float = 0.3) -> None:
    """rsyslog's file action flushes after each batch; give a batch in flight the time to land."""
    time.sleep(seconds)
