"""The sender: a thread of ``lungnode serve`` that delivers the outbox to the destinations.

Each pass takes, per destination, the due rows (at most ``sending.batch_size``), sends them in one
association and records every instance's status. Sending is network-bound, so a thread beside the
DICOM listener is enough; the queue itself is the database, so nothing is lost when the node stops.

Storage commitment: the destination answers an N-ACTION with an N-EVENT-REPORT in a new association
to our calling AE title (PS3.4 J.3). Those reports are received by a small listener of the sender on
``sending.commitment_port``; the PACS must know our calling AE title with that port.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from node.audit import AuditTrail, no_audit
from node.audit.studies import studies_of
from node.config import Config, Destination, WebDestination
from node.db.models import SendState
from node.dicom_ae import node_ae
from node.errors import LungnodeError
from node.logs import LoopErrors, kv
from node.send.outbox import Claimed, Outbox
from node.send.scu import UNCOMPRESSED, StoreOutcome, store_batch
from node.send.stow import stow_batch
from node.tls import LoggedServerContext, listener_tls

log = logging.getLogger(__name__)


class CommitmentListener:
    """Receives storage commitment reports (N-EVENT-REPORT) and records them in the outbox."""

    def __init__(self, outbox: Outbox, *, bind_address: str, port: int, ae_title: str,
                 tls: LoggedServerContext | None = None) -> None:
        self.outbox = outbox
        self.tls = tls
        self.address = (bind_address, port)
        self.ae_title = ae_title
        self._server: ThreadedAssociationServer | None = None
        self.port: int | None = None

    def start(self) -> int:
        ae = node_ae(self.ae_title)
        ae.require_called_aet = False  # reports are addressed to whichever calling AE title a destination used
        # The PACS is the Storage Commitment SCP but the association requestor here: accept its SCP role.
        ae.add_supported_context(StorageCommitmentPushModel, UNCOMPRESSED, scu_role=True, scp_role=True)
        try:
            server = ae.start_server(self.address, block=False, ssl_context=self.tls,  # type: ignore[arg-type]
                                     evt_handlers=[*(self.tls.handlers if self.tls else []),
                                                   (evt.EVT_N_EVENT_REPORT, self._on_report)])
        except OSError as exc:
            raise LungnodeError(
                f"cannot listen for storage commitment reports on {self.address[0]}:{self.address[1]}: "
                f"{exc.strerror}. Change sending.commitment_port."
            ) from exc
        assert server is not None
        self._server = server
        self.port = int(server.server_address[1])
        log.info(kv("commitment_listening", port=self.port, tls="on" if self.tls else "off"))
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            if self.tls is not None:
                self.tls.stop()
            self._server.shutdown()
            self._server = None

    def _on_report(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """Event Type 1: all committed; 2: some failed (Failed SOP Sequence with Failure Reason)."""
        info: Dataset = event.event_information
        uid = str(info.get("TransactionUID", ""))
        committed = [str(r.ReferencedSOPInstanceUID) for r in info.get("ReferencedSOPSequence", [])]
        failed = {str(r.ReferencedSOPInstanceUID): int(r.get("FailureReason", 0x0110))
                  for r in info.get("FailedSOPSequence", [])}
        try:
            outcome = self.outbox.record_commitment(uid, committed=committed, failed=failed)
        except SQLAlchemyError as exc:
            log.error(kv("commitment_not_recorded", transaction=uid, error=exc.__class__.__name__))
            return 0x0110, None  # processing failure: the PACS keeps the report and retries
        calling = str(event.assoc.requestor.ae_title).strip()
        if outcome.committed + outcome.refused == 0:
            log.warning(kv("commitment_report_unknown", transaction=uid, calling_ae=calling,
                           reason="no sent object waits for this transaction (already recorded, or expired)"))
        else:
            level = logging.WARNING if outcome.refused else logging.INFO
            log.log(level, kv("commitment_report", transaction=uid, calling_ae=calling, committed=outcome.committed,
                              failed=outcome.refused))
        _log_given_up(outcome.given_up, reason="storage commitment refused by the destination")
        return 0x0000, None


class Sender:
    """Delivers the outbox in a background thread; ``start()`` and ``stop()`` from the composition root."""

    def __init__(self, config: Config, sessions: sessionmaker[Session], audit: AuditTrail | None = None) -> None:
        self.config = config
        self.audit = audit or no_audit(config.dicom.ae_title)
        self.settings = config.sending
        self.outbox = Outbox(sessions, config.sending)
        self.destinations = {d.name: d for d in config.destinations}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.listener: CommitmentListener | None = None

    @property
    def commitment_port(self) -> int | None:
        return self.listener.port if self.listener is not None else None

    def start(self) -> None:
        """Requeue rows a stopped node left in 'sending', start the commitment listener when a
        destination asks for commitment, and start the send loop."""
        self.outbox.reset_interrupted()
        for name, count in self.outbox.orphaned(list(self.destinations)).items():
            log.warning(kv("send_destination_unknown", destination=name, pending=count,
                           fix="add the destination back to `destinations`, or they are never sent"))
        committing = [d for d in self.destinations.values() if isinstance(d, Destination) and d.storage_commitment]
        if committing:
            self.listener = CommitmentListener(self.outbox, bind_address=self.config.dicom.bind_address,
                                               port=self.settings.commitment_port, ae_title=self.config.dicom.ae_title,
                                               tls=listener_tls(self.config.dicom, "commitment",
                                                                on_failure=self._tls_failed))
            self.listener.start()
            for d in committing:  # the one set-up step the PACS side needs; say it where IT looks
                log.info(kv("commitment_setup", destination=d.name,
                            report_to=f"{d.calling_ae_title or self.config.dicom.ae_title}@port {self.listener.port}",
                            hint="the destination must know this AE title with this port"))
        self._thread = threading.Thread(target=self._loop, name="sender", daemon=True)
        self._thread.start()
        log.info(kv("sender_started", destinations=",".join(self.destinations) or "none",
                    commitment_port=self.commitment_port))

    def _tls_failed(self, peer: str, reason: str) -> None:
        """A caller of the commitment listener refused at the TLS handshake: a security alert, as on dicom.port."""
        self.audit.node_authentication_failed(host=peer, calling_ae=None, reason=reason)

    def wake(self) -> None:
        """Look for due objects now (e.g. right after results were queued)."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the object being sent, release the association, and stop; objects not reached stay
        pending with their attempt not counted."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning(kv("sender_stop_timeout", seconds=timeout,
                               effect="objects being sent are requeued at the next start"))
            self._thread = None
        if self.listener is not None:
            self.listener.stop()
            self.listener = None
        log.info(kv("sender_stopped"))

    def _loop(self) -> None:
        errors = LoopErrors(log, "sender_error")
        while not self._stop.is_set():
            try:
                busy = self.run_once()
                errors.ok()
            except Exception as exc:  # the sender must keep running
                errors.failed(exc)
                busy = 0
            if not busy:
                self._wake.wait(self.settings.poll_interval_s)
                self._wake.clear()

    def run_once(self) -> int:
        """One pass over every destination; the number of objects attempted."""
        expired = self.outbox.expire_commitments()
        if expired:
            log.warning(kv("commitment_timeout", objects=len(expired), jobs=_job_list(j for _, j, _ in expired),
                           sent_again=sum(state == SendState.pending for *_, state in expired)))
            _log_given_up([(d, j) for d, j, state in expired if state == SendState.failed],
                          reason="no storage commitment report in time")
        total = 0
        for dest in self.destinations.values():
            if self._stop.is_set():
                break
            total += self._send_destination(dest)
        return total

    def _send_destination(self, dest: Destination | WebDestination) -> int:
        items = self.outbox.claim(dest.name, limit=self.settings.batch_size)
        pending_commit = (self.outbox.commitment_due(dest.name, limit=self.settings.batch_size)
                          if isinstance(dest, Destination) and dest.storage_commitment else [])
        if not items and not pending_commit:
            return 0
        # C-STORE calls from an AE title; STOW-RS has none (the audit trail names the node's own).
        calling = (dest.calling_ae_title or self.config.dicom.ae_title) if isinstance(dest, Destination) else None
        outcomes: list[StoreOutcome] = []
        started = time.perf_counter()
        stats = {"sent": 0, "retry": 0, "failed": 0}

        def on_outcome(outcome: StoreOutcome) -> None:
            outcomes.append(outcome)
            self._record(dest, outcome, stats)

        try:
            if isinstance(dest, WebDestination):
                # one socket timeout covers the connect and every read: the longer of the two settings
                timeout_s = max(self.settings.connect_timeout_s, self.settings.response_timeout_s)
                error = stow_batch(dest, items, timeout_s=timeout_s, on_outcome=on_outcome,
                                   should_stop=self._stop.is_set)
            else:
                assert calling is not None
                error = store_batch(dest, items, calling_ae=calling, settings=self.settings, on_outcome=on_outcome,
                                    should_stop=self._stop.is_set, commitment_items=pending_commit,
                                    on_commitment=self._on_commitment)
        except Exception as exc:  # anything unexpected: the claimed rows must not stay in 'sending'
            error = f"{type(exc).__name__}: {exc}"
            log.exception(kv("send_batch_error", destination=dest.name))
        answered = {o.item.id for o in outcomes}
        left = [item for item in items if item.id not in answered]
        if error is not None:
            log.warning(kv("send_association_failed", destination=dest.name, objects=len(left),
                           jobs=_jobs(left), reason=error))
            given_up: list[tuple[str, int]] = []
            for item, state in zip(left, self.outbox.mark_retry_all([item.id for item in left], error=error)):
                stats["failed" if state == SendState.failed else "retry"] += 1
                if state == SendState.failed:
                    given_up.append((dest.name, item.job_id))
            _log_given_up(given_up, reason=error)
        elif left:  # stopped between objects: not an attempt
            self.outbox.release([item.id for item in left])
        if items:
            log.info(kv("send_batch", destination=dest.name, calling_ae=calling, jobs=_jobs(items),
                        objects=len(items), sent=stats["sent"], retry=stats["retry"], failed=stats["failed"],
                        seconds=f"{time.perf_counter() - started:.2f}"))
            self._audit(dest, calling, outcomes, failed=stats["retry"] + stats["failed"], error=error)
        return len(items)

    def _audit(self, dest: Destination | WebDestination, calling: str | None, outcomes: list[StoreOutcome], *,
               failed: int,
               error: str | None) -> None:
        """One audit message per batch: the studies of what was delivered, and how many objects were not."""
        if not self.audit.enabled:
            return
        reason = error or next((o.error for o in outcomes if not o.delivered), None)
        if isinstance(dest, WebDestination):
            ae_title, host, url = None, urlsplit(dest.url).hostname or "", dest.url
        else:
            ae_title, host, url = dest.ae_title, dest.host, None
        self.audit.instances_sent(destination_ae=ae_title, host=host, url=url,
                                  calling_ae=calling or self.config.dicom.ae_title,
                                  studies=studies_of(o.item.path for o in outcomes if o.delivered),
                                  failed=failed, error=reason)

    def _record(self, dest: Destination | WebDestination, outcome: StoreOutcome, stats: dict[str, int]) -> None:
        item = outcome.item
        if outcome.delivered:
            assert outcome.status is not None
            self.outbox.mark_sent(item.id, status=outcome.status, note=outcome.error)
            stats["sent"] += 1
            log.debug(kv("send_ok", destination=dest.name, sop=item.sop_instance_uid, status=f"0x{outcome.status:04X}"))
            return
        state = self.outbox.mark_retry(item.id, error=outcome.error or "unknown error", status=outcome.status,
                                       permanent=outcome.permanent)
        stats["failed" if state == SendState.failed else "retry"] += 1
        log.log(logging.ERROR if state == SendState.failed else logging.WARNING,
                kv("send_failed" if state == SendState.failed else "send_retry", destination=dest.name,
                   job=item.job_id, kind=item.kind, sop=item.sop_instance_uid, attempt=item.attempt,
                   status=None if outcome.status is None else f"0x{outcome.status:04X}", reason=outcome.error))

    def _on_commitment(self, items: Sequence[Claimed], transaction_uid: str | None, error: str | None) -> None:
        if transaction_uid is not None:  # recorded before the request: the report may come before its response
            self.outbox.mark_commitment_requested([i.id for i in items], transaction_uid)
            log.info(kv("commitment_requested", destination=items[0].destination, transaction=transaction_uid,
                        objects=len(items)))
            return
        error = error or "storage commitment request failed"
        log.warning(kv("commitment_request_failed", destination=items[0].destination, objects=len(items), reason=error))
        states = self.outbox.mark_retry_all([i.id for i in items], error=error)
        _log_given_up([(i.destination, i.job_id) for i, state in zip(items, states) if state == SendState.failed],
                      reason=error)


def _jobs(items: Sequence[Claimed]) -> str:
    """The job ids of ``items`` for a log line ("12" or "12,13"): what `lungnode status` and `retry JOB` take."""
    return _job_list(item.job_id for item in items)


def _job_list(job_ids: Iterable[int]) -> str:
    return ",".join(str(j) for j in sorted(set(job_ids)))


def _log_given_up(given_up: Sequence[tuple[str, int]], *, reason: str) -> None:
    """The end of the retries, one ERROR line per destination: what IT alerts on (``event=send_failed``)."""
    for destination in sorted({d for d, _ in given_up}):
        jobs = _job_list(j for d, j in given_up if d == destination)
        log.error(kv("send_failed", destination=destination, objects=sum(d == destination for d, _ in given_up),
                     jobs=jobs, reason=reason,
                     fix=f"lungnode retry {jobs} once the destination is back" if "," not in jobs
                     else "lungnode retry --failed once the destination is back"))

