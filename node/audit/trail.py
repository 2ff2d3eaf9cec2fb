"""The node's audit trail for the hospital's audit record repository (IHE ATNA): one method per audited event.

Events are handed to one background thread, so no DICOM handler ever waits on the repository. That thread keeps
them in a backlog (``node.audit.backlog``: files under the spool folder for ``serve``) until the repository has
taken them, oldest first. While it cannot be reached they wait (up to ``audit.queue_size``) and are sent once it is
back, or at the next start; the outage is logged once when it starts and once when it ends. A full backlog drops
new messages, counted in the log; so is a message the transport can never carry (over UDP's size limit), which
would otherwise hold up all the others. The ledger records every step whether or not audit messages are sent.
"""

from __future__ import annotations

import getpass
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

from node.audit import messages as m
from node.audit.backlog import Backlog, FolderBacklog, MemoryBacklog
from node.audit.syslog import StreamTransport, Transport, UdpTransport, Undeliverable, frame
from node.config import AuditSettings
from node.errors import LungnodeError
from node.logs import kv
from node.tls import audit_tls

log = logging.getLogger(__name__)

_RETRY_FIRST_S, _RETRY_MAX_S = 1.0, 30.0


def transport_for(settings: AuditSettings) -> Transport:
    """The configured transport (nothing is connected yet)."""
    assert settings.host is not None
    if settings.transport == "udp":
        return UdpTransport(settings.host, settings.port)
    return StreamTransport(settings.host, settings.port, tls=audit_tls(settings), timeout_s=settings.timeout_s)


def _os_user() -> str:
    """Who started the node; a container's user may have no name (no passwd entry): then its uid."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def check_repository(settings: AuditSettings) -> tuple[bool, str]:
    """(reachable, what was found) for ``lungnode echo --audit``: a connection as the trail makes it (TLS handshake
    with our certificate included), closed again without sending anything."""
    if settings.host is None:
        return False, "audit.host is not set: no audit messages are sent"
    where = f"audit repository {settings.host}:{settings.port} ({settings.transport})"
    if settings.transport == "udp":
        return True, f"{where}: UDP has no connection to check; messages are sent blind (RFC 5426)"
    try:
        transport = transport_for(settings)
        assert isinstance(transport, StreamTransport)
        transport.connect()
        transport.close()
    except (OSError, LungnodeError) as exc:
        return False, f"{where}: cannot connect: {exc}"
    return True, f"{where} accepted a connection" + (" and the TLS handshake" if settings.transport == "tls" else "")


class AuditTrail:
    """Audit messages of one node process; every method is a no-op when ``audit.host`` is not set."""

    def __init__(self, settings: AuditSettings, *, ae_title: str, backlog_dir: Path | None = None) -> None:
        """``backlog_dir``: where messages wait for the repository across restarts; None: in memory."""
        self.settings = settings
        self.enabled = settings.host is not None
        self.ae_title = ae_title
        self.hostname = socket.gethostname()
        self.backlog_dir = backlog_dir
        self._queue: queue.Queue[bytes] = queue.Queue(maxsize=settings.queue_size)  # handlers to the thread
        self._backlog: Backlog = MemoryBacklog(settings.queue_size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dropped = 0
        self._dropped_logged = 0.0

    @property
    def node(self) -> m.Participant:
        return m.Participant(self.ae_title, requestor=False, role=m.ROLE_APPLICATION,
                             alternative_user_id=f"AETITLES={self.ae_title}", address=self.hostname)

    def _peer(self, ae_title: str | None, host: str | None, *, requestor: bool,
              role: m.Code | None = None) -> m.Participant:
        return m.Participant(ae_title or host or "unknown", requestor=requestor, role=role,
                             alternative_user_id=f"AETITLES={ae_title}" if ae_title else None, address=host)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        if not self.enabled:
            log.info(kv("audit_off", reason="audit.host is not set: no audit messages are sent (the ledger records "
                                            "every step)"))
            return
        if self.backlog_dir is not None:
            try:
                self._backlog = FolderBacklog(self.backlog_dir, self.settings.queue_size)
            except OSError as exc:
                raise LungnodeError(f"the audit backlog folder {self.backlog_dir} cannot be used ({exc}); it lives "
                                    f"under storage.spool_dir, which the node's user must be able to write") from exc
        transport = transport_for(self.settings)
        log.info(kv("audit_on", host=self.settings.host, port=self.settings.port, transport=self.settings.transport,
                    source_id=self.source_id, backlog=self.backlog_dir or "memory"))
        if len(self._backlog):  # counted before the thread starts sending them
            log.info(kv("audit_backlog", messages=len(self._backlog), folder=self.backlog_dir,
                        effect="messages the repository had not taken before the last stop are sent first"))
        self._thread = threading.Thread(target=self._loop, args=(transport,), name="audit", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is queued (the Application Stop message last), waiting at most ``timeout`` seconds."""
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        while ((not self._queue.empty() or len(self._backlog)) and time.monotonic() < deadline
               and self._thread.is_alive()):
            time.sleep(0.02)
        self._stop.set()
        self._thread.join(max(0.1, deadline - time.monotonic()))
        if self._thread.is_alive():  # held in a send to a silent repository: keep what it has not taken yet
            self._take_handed()
        left = len(self._backlog) + self._queue.qsize()
        if left and self._backlog.durable:
            log.warning(kv("audit_kept", messages=left, folder=self.backlog_dir, reason="the audit repository did "
                           "not take them before the node stopped", effect="sent first at the next start"))
        elif left:
            log.warning(kv("audit_unsent", messages=left, reason="the audit repository did not take them before "
                           "the node stopped"))
        self._thread = None

    @property
    def source_id(self) -> str:
        return self.settings.source_id or self.ae_title

    # -- sending ----------------------------------------------------------------------------------
    def _emit(self, *, event: m.Code, action: m.Action, outcome: str, participants: list[m.Participant],
              event_type: m.Code | None = None, outcome_description: str | None = None,
              studies: list[m.StudyRecord] | None = None) -> None:
        xml = m.build(event=event, action=action, outcome=outcome, participants=participants,
                      source_id=self.source_id, site_id=self.settings.enterprise_site_id, event_type=event_type,
                      outcome_description=outcome_description, studies=studies)
        try:
            self._queue.put_nowait(frame(xml, hostname=self.hostname))
        except queue.Full:
            self._drop()

    def _drop(self) -> None:
        """A message that found the backlog full: counted, and said once a minute."""
        self._dropped += 1
        now = time.monotonic()
        if now - self._dropped_logged >= 60.0:
            self._dropped_logged = now
            log.error(kv("audit_dropped", messages=self._dropped, queue_size=self.settings.queue_size,
                         reason="the audit repository has not taken messages for a while",
                         fix=f"check that {self.settings.host}:{self.settings.port} accepts "
                             f"{self.settings.transport} syslog"))

    def _take_handed(self) -> None:
        """Move the messages the handlers handed over into the backlog, in order."""
        while True:
            try:
                message = self._queue.get_nowait()
            except queue.Empty:
                return
            try:
                kept = self._backlog.add(message)
            except OSError as exc:
                self._dropped += 1
                log.error(kv("audit_message_dropped", folder=self.backlog_dir, reason=f"{type(exc).__name__}: {exc}",
                             fix="free space or permissions under storage.spool_dir"))
                continue
            if not kept:
                self._drop()

    def _pause(self, seconds: float) -> bool:
        """Wait before trying the repository again, taking handed messages meanwhile; True when stopping."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._take_handed()
            if self._stop.wait(min(0.2, max(0.0, deadline - time.monotonic()))):
                return True
        return False

    def _loop(self, transport: Transport) -> None:
        failing_since: float | None = None
        wait_s = _RETRY_FIRST_S
        try:
            while True:
                self._take_handed()
                message = self._backlog.oldest()
                if message is None:
                    if self._stop.is_set():
                        return
                    self._pause(0.1)
                    continue
                try:
                    transport.send(message)
                except Undeliverable as exc:
                    self._dropped += 1
                    self._backlog.remove_oldest()
                    log.error(kv("audit_message_dropped", host=self.settings.host, port=self.settings.port,
                                 transport=self.settings.transport, reason=str(exc),
                                 fix="use audit.transport tls or tcp, which carry messages of any size"))
                    continue
                except (OSError, ValueError) as exc:
                    if failing_since is None:
                        failing_since = time.monotonic()
                        log.warning(kv("audit_send_failed", host=self.settings.host, port=self.settings.port,
                                       transport=self.settings.transport, reason=f"{type(exc).__name__}: {exc}",
                                       effect="audit messages wait in the backlog and are sent once it answers"))
                    if self._pause(wait_s):
                        return
                    wait_s = min(wait_s * 2, _RETRY_MAX_S)
                    continue
                self._backlog.remove_oldest()
                if failing_since is not None:
                    log.info(kv("audit_restored", host=self.settings.host,
                                seconds=f"{time.monotonic() - failing_since:.0f}", queued=len(self._backlog)))
                    failing_since, wait_s = None, _RETRY_FIRST_S
        finally:
            self._take_handed()
            transport.close()

    # -- the audited events ------------------------------------------------------------------------
    def application_activity(self, *, started: bool) -> None:
        """The node started or stopped (Application Activity, A.5.3.1)."""
        if not self.enabled:
            return
        launcher = m.Participant(_os_user(), requestor=True, role=m.ROLE_LAUNCHER)
        self._emit(event=m.APPLICATION_ACTIVITY, action="E", outcome=m.SUCCESS, participants=[self.node, launcher],
                   event_type=m.APPLICATION_START if started else m.APPLICATION_STOP)

    def instances_received(self, *, calling_ae: str, host: str, studies: list[m.StudyRecord], refused: int) -> None:
        """One association's images, one message per patient with its studies (DICOM Instances Transferred,
        A.5.3.4); refusals make each a minor failure (a refused instance's patient is not known)."""
        if not self.enabled or not (studies or refused):
            return
        source = self._peer(calling_ae, host, requestor=True, role=m.ROLE_SOURCE)
        us = replace(self.node, role=m.ROLE_DESTINATION)
        for group in _per_patient(studies):
            self._emit(event=m.INSTANCES_TRANSFERRED, action="C", outcome=m.MINOR_FAILURE if refused else m.SUCCESS,
                       outcome_description=f"{refused} instance(s) refused" if refused else None,
                       participants=[source, us], studies=group)

    def instances_sent(self, *, destination_ae: str | None, host: str, calling_ae: str, studies: list[m.StudyRecord],
                       failed: int, error: str | None, url: str | None = None) -> None:
        """Results sent to a destination in one association, or by STOW-RS to ``url`` (DICOM Instances
        Transferred), one message per patient: new objects for the receiver, hence action C. Nothing delivered is
        a serious failure, some of it a minor one (said in each message: failed objects are not told apart by
        patient)."""
        if not self.enabled or not (studies or failed):
            return
        delivered = sum(sum(s.sop_classes.values()) for s in studies)
        outcome = m.SUCCESS if not failed else m.MINOR_FAILURE if delivered else m.SERIOUS_FAILURE
        us = m.Participant(calling_ae, requestor=True, role=m.ROLE_SOURCE,
                           alternative_user_id=f"AETITLES={calling_ae}", address=self.hostname)
        dest = self._peer(destination_ae, host, requestor=False, role=m.ROLE_DESTINATION)
        if url is not None:
            dest = replace(dest, user_id=url)
        for group in _per_patient(studies):
            self._emit(event=m.INSTANCES_TRANSFERRED, action="C", outcome=outcome,
                       outcome_description=f"{failed} object(s) not delivered: {error}" if failed else None,
                       participants=[us, dest], studies=group)

    def instances_deleted(self, *, study: m.StudyRecord, reason: str) -> None:
        """Received images deleted (DICOM Instances Accessed, action D, A.5.3.2)."""
        if not self.enabled:
            return
        us = replace(self.node, requestor=True)
        self._emit(event=m.INSTANCES_ACCESSED, action="D", outcome=m.SUCCESS, outcome_description=reason,
                   participants=[us], studies=[study])

    def node_authentication_failed(self, *, host: str, calling_ae: str | None, reason: str) -> None:
        """A caller refused: an AE title, address or certificate not allowed, or a failed TLS handshake (Security
        Alert, Node Authentication, A.5.3.11)."""
        if not self.enabled:
            return
        self._emit(event=m.SECURITY_ALERT, action="E", outcome=m.MINOR_FAILURE, event_type=m.NODE_AUTHENTICATION,
                   outcome_description=reason, participants=[self._peer(calling_ae, host, requestor=True), self.node])


def _per_patient(studies: list[m.StudyRecord]) -> list[list[m.StudyRecord]]:
    """The studies grouped by patient, in the order first seen; one empty group when there are none. IHE ATNA wants
    one patient per message: a repository files a message under its patient, and one naming two misfiles one."""
    groups: dict[tuple[str | None, str | None], list[m.StudyRecord]] = {}
    for study in studies:
        groups.setdefault((study.patient_id, study.patient_name), []).append(study)
    return list(groups.values()) or [[]]


#: The trail of a process that sends no audit messages (tests, commands other than ``serve``).
def no_audit(ae_title: str = "LUNGNODE") -> AuditTrail:
    return AuditTrail(AuditSettings(), ae_title=ae_title)
