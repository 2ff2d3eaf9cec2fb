"""The DICOM listener: C-ECHO and C-STORE, thin handlers that always answer with a status.

A C-STORE is acknowledged only after the instance is durable in the spool and recorded in the
ledger. pynetdicom writes each incoming dataset straight to a file (chunked receive) in the spool's
``incoming/`` folder, so committing it is a fsync and a rename on the same file system.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association as PnAssociation
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import DataError, SQLAlchemyError

from node import MANUFACTURER
from node.audit import AuditTrail, StudyRecord, no_audit
from node.config import DicomSettings
from node.db.ingest import IngestLedger, Outcome, Recorded, unrecordable
from node.db.models import AssociationState
from node.db.session import db_reason
from node.dicom_ae import node_ae
from node.errors import InstanceRejected, LungnodeError
from node.logs import kv
from node.receive import tuning
from node.receive.inspect import (
    ERROR_COMMENTS,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    InstanceHeader,
    inspect_instance,
)
from node.receive.priority import from_cstore, priority_name
from node.receive.selfcheck import CALLING_AE as CHECK_AE
from node.receive.spool import Spool
from node.receive.walk import same_dataset
from node.tls import LoggedServerContext, listener_tls, peer_certificate_subject, peer_common_name

log = logging.getLogger(__name__)
#: What to do when the spool cannot take an instance (full, below its free-space floor, or not writable).
SPOOL_FIX = ("free space under storage.spool_dir (retention.received_days deletes processed images) or lower "
             "storage.min_free_disk_mb; it must be writable by the node's user")

#: Uncompressed first (preferred when a peer offers several), then the usual lossless and lossy
#: compressions: we store whatever the modality sends, decoding happens later in the pipeline.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
]

_ASSOC_ID = "_lungnode_assoc_id"
#: An association that sent no C-STORE for this long has finished its batch: a stop does not wait for it.
_IDLE_AT_STOP_S = 1.0
_ASSOC_STATS = "_lungnode_assoc_stats"
# Set on the node's own health-check association, recorded only if it stores an image.
_RECORD_ON_STORE = "_lungnode_record_on_store"
#: (result source, diagnostic) of an A-ASSOCIATE-RJ that pynetdicom sends itself -> the reason IT reads in the log
_WRONG_CALLED_AE = (0x01, 0x07)  # A-ASSOCIATE-RJ source service-user, called-AE-title-not-recognized
_REJECT_REASONS: dict[tuple[int | None, int | None], str] = {
    _WRONG_CALLED_AE: "called AE title is not dicom.ae_title",
    (0x01, 0x03): "calling AE title not recognised",
    (0x03, 0x02): "too many associations at once (dicom.max_associations)",
}
_RELEASE_REQUESTED = "_lungnode_release_requested"


@dataclass
class _AssocStats:
    """Per-association throughput, logged when it closes (where the receive time went)."""

    opened: float = field(default_factory=time.perf_counter)
    stored: int = 0
    duplicates: int = 0  # acknowledged again: already held (a re-sent study), nothing new stored
    refused: int = 0
    handler_s: float = 0.0
    last_store: float = field(default_factory=time.monotonic)  # when its latest C-STORE came (the drain at stop)
    bytes: int = 0
    priority: int | None = None  # the most urgent C-STORE Priority of its stored instances (None: none yet)
    studies: dict[str, StudyRecord] = field(default_factory=dict)  # what the audit trail reports at the close

    def saw(self, header: InstanceHeader) -> None:
        study = self.studies.get(header.study_instance_uid)
        if study is None:
            study = self.studies[header.study_instance_uid] = StudyRecord(
                header.study_instance_uid, patient_id=header.patient_id, patient_name=header.patient_name,
                accession=header.accession_number, study_date=header.study_date)
        study.sop_classes[header.sop_class_uid] += 1


def is_own_output(header: InstanceHeader) -> bool:
    """Objects this node wrote (SEG, SR, key image) carry our Manufacturer; never analyse them."""
    return header.manufacturer == MANUFACTURER


def _guard_dimse_decoding() -> None:
    """A request pynetdicom cannot decode (e.g. a C-STORE without AffectedSOPInstanceUID) raises inside its
    DUL thread, which then dies and leaves the association hanging, open in the ledger. Abort it instead: the
    sender sees an abort for an instance that was never acknowledged, and the node logs why.

    ``abort(block=False)`` queues the A-ABORT (this runs in the DUL thread, which must not wait for itself)
    and fires EVT_ABORTED at once, so the ledger records the association aborted now. Sending the PDU
    alone left that to the connection's close, which, when the node's side closed first, never came: the
    association stayed open until network_timeout_s."""
    original = DIMSEMessage.decode_msg
    if getattr(original, "_lungnode_guard", False):
        return

    def decode_msg(self: DIMSEMessage, primitive: Any, assoc: Any = None) -> bool:
        try:
            return original(self, primitive, assoc)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            log.warning(kv("dimse_undecodable", reason=f"{type(exc).__name__}: {exc}",
                           action="association aborted; nothing of it was acknowledged"))
            if assoc is not None:
                assoc.abort(block=False)
            return False

    decode_msg._lungnode_guard = True  # type: ignore[attr-defined]
    DIMSEMessage.decode_msg = decode_msg  # type: ignore[method-assign]


class StorageSCP:
    """C-STORE/C-ECHO listener bound to the spool and the ledger."""

    def __init__(
        self,
        settings: DicomSettings,
        *,
        spool: Spool,
        ledger: IngestLedger,
        on_association_closed: Callable[[], None] | None = None,
        audit: AuditTrail | None = None,
    ) -> None:
        self.settings = settings
        self.audit = audit or no_audit(settings.ae_title)
        self.spool = spool
        self.ledger = ledger
        self.on_association_closed = on_association_closed or (lambda: None)
        self._server: ThreadedAssociationServer | None = None
        self._tls: LoggedServerContext | None = None
        self._allowed = list(settings.allowed_callers)
        self._lock = threading.Lock()
        self._io = ThreadPoolExecutor(max_workers=settings.max_associations, thread_name_prefix="spool-io")
        self._handler = threading.local()  # per association thread: was the instance just handled a duplicate?
        self._resource_alerted = -60.0  # monotonic time of the last store_refused ERROR (a full spool, ...)

    # -- lifecycle ------------------------------------------------------------------------------
    def _make_ae(self) -> AE:
        s = self.settings
        ae = node_ae(s.ae_title)
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = s.max_pdu_size
        ae.acse_timeout = s.acse_timeout_s
        ae.dimse_timeout = s.dimse_timeout_s
        ae.network_timeout = s.network_timeout_s
        ae.require_called_aet = s.require_called_ae_title
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        return ae

    def start(self) -> int:
        """Start listening in background threads; return the bound port (useful with port 0)."""
        _guard_dimse_decoding()
        # Chunked receive: pynetdicom streams each dataset into a file instead of memory. Those files
        # must be in the spool's incoming/ folder so committing is a link on one file system: the
        # tuned path creates them there; stock pynetdicom uses tempfile, so point that there.
        _config.STORE_RECV_CHUNKED_DATASET = True
        # pynetdicom's "standard" event handlers format a log entry for every PDU and DIMSE message
        # even when nothing is logged; keep them for DEBUG only.
        _config.LOG_HANDLER_LEVEL = "standard" if logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG) else "none"
        if not (self.settings.fast_receive and tuning.install(self.spool.incoming)):
            tempfile.tempdir = str(self.spool.incoming)
        tls = self._tls = listener_tls(self.settings, "dicom", on_failure=self._tls_failed)
        handlers: list[Any] = [
            *(tls.handlers if tls else []),  # the TLS handshake first, in the connection's own thread
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACSE_RECV, self._on_acse_recv),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        ae = self._make_ae()
        address = (self.settings.bind_address, self.settings.port)
        try:
            server = ae.start_server(address, block=False, evt_handlers=handlers,
                                     ssl_context=tls)  # type: ignore[arg-type]
        except OSError as exc:
            hint = {errno.EADDRINUSE: "another service (another node, a DICOM server) is using the port: stop it or "
                                      "change dicom.port",
                    errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE (the systemd unit grants it): "
                                  "grant it or use a port above 1023",
                    errno.EADDRNOTAVAIL: "no interface of this machine has that address: change dicom.bind_address"}
            raise LungnodeError(
                f"cannot listen on {address[0]}:{address[1]}: {exc.strerror or exc}. "
                f"{hint.get(exc.errno or 0, 'Check dicom.port and dicom.bind_address')}."
            ) from exc
        assert server is not None  # block=False always returns the server
        self._server = server
        port = int(server.server_address[1])
        log.info(kv("scp_listening", ae_title=self.settings.ae_title, address=self.settings.bind_address, port=port,
                    allow_list=len(self._allowed) or "any", tls="on" if self.settings.tls.enabled else "off"))
        if not self._allowed and not _is_loopback(self.settings.bind_address):
            log.warning(kv("allow_list_open", address=self.settings.bind_address, port=port,
                           note="any host that reaches this port may send images and have results written for them",
                           fix="list the PACS (and scanners) in dicom.allowed_callers, with their host addresses"))
        return port

    def _drain(self) -> None:
        """Let transfers in progress finish (up to ``dicom.stop_drain_s``) with the listening socket closed, so a
        planned restart does not cut a series in two: the part received would be analysed as the whole once the
        quiet period passed, unless the PACS sent the rest again. An association that sent nothing for
        ``_IDLE_AT_STOP_S`` has finished its batch (Orthanc keeps one open for seconds after): it is not waited for."""
        server = self._server
        assert server is not None
        deadline = time.monotonic() + self.settings.stop_drain_s

        def busy() -> list[PnAssociation]:
            now = time.monotonic()
            stats = [(a, getattr(a, _ASSOC_STATS, None)) for a in server.active_associations]
            return [a for a, st in stats
                    if a.is_established and st is not None and now - st.last_store < _IDLE_AT_STOP_S]

        receiving = busy()
        if receiving and self.settings.stop_drain_s > 0:
            log.info(kv("stop_draining", associations=len(receiving), max_wait_s=f"{self.settings.stop_drain_s:g}",
                        note="new associations are refused; transfers in progress may finish"))
            while receiving and time.monotonic() < deadline:
                time.sleep(0.1)
                receiving = busy()
            log.info(kv("stop_drained", still_receiving=len(receiving)))

    def stop(self) -> None:
        """Stop listening, let transfers in progress finish (``_drain``), then abort associations still open
        (their unanswered instances were not acknowledged, so the sender keeps them and re-sends)."""
        if self._server is not None:
            if self._tls is not None:
                self._tls.stop()  # handshakes still pending are cut: no new association is wanted now
            self._server.shutdown()  # no new connections (the accept loop ends, the socket closes); open ones go on
            self._drain()
            waits: dict[PnAssociation, float] = {}
            for assoc in list(self._server.active_associations):
                if assoc.is_established:
                    log.warning(kv("association_aborted_at_stop", assoc=getattr(assoc, _ASSOC_ID, None)))
                    waits[assoc] = 10.0
                    assoc.abort()
                elif assoc.dul.socket is not None:
                    # Never negotiated (half a PDU, a TLS hello on the plain port): nothing is in flight, and
                    # an abort would wait for a reader blocked on bytes that never come. Close the connection.
                    log.warning(kv("connection_closed_at_stop", host=assoc.requestor.address,
                                   reason="no association was negotiated on it"))
                    waits[assoc] = 0.5
                    assoc.dul.socket.close()
            started = time.monotonic()
            for assoc, wait_s in waits.items():  # one deadline for all: many idle connections cost 0.5 s, not each
                if assoc.ident is None:  # accepted an instant ago, its thread not started: nothing runs to wait for
                    continue
                assoc.join(timeout=max(0.0, started + wait_s - time.monotonic()))
            self._server = None
            self._io.shutdown(wait=True)
            log.info(kv("scp_stopped"))

    # -- association events ---------------------------------------------------------------------
    def _on_conn_open(self, event: evt.Event) -> None:
        tuning.tune_association(event.assoc)
        if self.settings.tcp_nodelay:
            sock = event.assoc.dul.socket
            if sock is not None and sock.socket is not None:
                sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _tls_failed(self, peer: str, reason: str) -> None:
        self.audit.node_authentication_failed(host=peer, calling_ae=None, reason=reason)

    def _caller_allowed(self, ae_title: str, host: str, common_name: str | None) -> bool:
        if not self._allowed:
            return True
        return any(c.ae_title == ae_title and c.host in (None, host) and c.certificate_cn in (None, common_name)
                   for c in self._allowed)

    def _on_requested(self, event: evt.Event) -> None:
        assoc: PnAssociation = event.assoc
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title if primitive is not None else "").strip()
        host = str(assoc.requestor.address)
        sock = assoc.dul.socket.socket if assoc.dul.socket else None
        if not self._caller_allowed(calling, host, peer_common_name(sock)):
            # The node's own health check (lungnode echo, every 30 s in the container) is refused like any
            # caller not on the list, which answers its question; it is no security event to log or audit.
            own_check = calling == CHECK_AE and _is_loopback(host)
            log.log(logging.DEBUG if own_check else logging.WARNING,
                    kv("association_rejected", calling_ae=calling, host=host, tls_peer=peer_certificate_subject(sock),
                       reason="calling AE title (or its host or certificate) not in dicom.allowed_callers"))
            # A-ASSOCIATE-RJ: rejected-permanent, service-user, calling-AE-title-not-recognized. Then stop
            # as pynetdicom does for its own rejections: kill() waits until the DUL has sent the RJ, so the
            # caller reads a refusal and not a connection torn down under it (an abort).
            assoc.acse.send_reject(0x01, 0x01, 0x03)
            assoc.kill()
            if not own_check:
                self.audit.node_authentication_failed(
                    host=host, calling_ae=calling, reason="association rejected: calling AE title (or its host or "
                    "certificate) not in dicom.allowed_callers")

    def _on_rejected(self, event: evt.Event) -> None:
        """pynetdicom's own refusals (wrong called AE title, too many associations): say so in the log."""
        assoc: PnAssociation = event.assoc
        rq, rj = assoc.requestor.primitive, assoc.acceptor.primitive
        if rj is None:
            return
        reason = _REJECT_REASONS.get((rj.result_source, rj.diagnostic), str(rj.reason_str))
        calling, called = (str(rq.calling_ae_title if rq else "").strip(), str(rq.called_ae_title if rq else "").strip())
        host = str(assoc.requestor.address)
        log.warning(kv("association_rejected", calling_ae=calling, called_ae=called, host=host, reason=reason))
        if (rj.result_source, rj.diagnostic) == _WRONG_CALLED_AE:
            # A caller guessing AE titles, or a modality set up for another node: the security officer's to see. A
            # full node (too many associations) is capacity, not security: the log says it.
            self.audit.node_authentication_failed(
                host=host, calling_ae=calling, reason=f"association rejected: called AE title {called!r} is not "
                "dicom.ae_title")

    def _on_accepted(self, event: evt.Event) -> None:
        assoc: PnAssociation = event.assoc
        calling = str(assoc.requestor.ae_title).strip()
        if calling == CHECK_AE and _is_loopback(str(assoc.requestor.address)):
            # The node's own health check (lungnode echo, every 30 s in the container): neither a ledger row nor
            # two INFO lines each time (2880 a day). Should it carry an image after all, it is recorded then.
            log.debug(kv("association_accepted", calling_ae=calling, note="the node's own health check"))
            setattr(assoc, _RECORD_ON_STORE, True)
            return
        self._record_association(assoc)

    def _record_association(self, assoc: PnAssociation) -> None:
        """The association's ledger row, its statistics and its INFO line."""
        calling = str(assoc.requestor.ae_title).strip()
        try:
            assoc_id = self.ledger.open_association(
                calling_ae=calling,
                called_ae=str(assoc.acceptor.ae_title).strip(),
                host=str(assoc.requestor.address),
                port=int(assoc.requestor.port),
            )
        except SQLAlchemyError as exc:
            log.error(kv("association_not_recorded", calling_ae=calling, error=exc.__class__.__name__))
            return
        setattr(assoc, _ASSOC_ID, assoc_id)
        setattr(assoc, _ASSOC_STATS, _AssocStats())
        log.info(kv("association_accepted", assoc=assoc_id, calling_ae=calling, host=assoc.requestor.address,
                    tls_peer=peer_certificate_subject(assoc.dul.socket.socket if assoc.dul.socket else None)))

    def _close(self, event: evt.Event, state: AssociationState) -> None:
        assoc_id = getattr(event.assoc, _ASSOC_ID, None)
        if assoc_id is None:
            return
        with self._lock:
            if getattr(event.assoc, _ASSOC_ID, None) is None:
                return
            setattr(event.assoc, _ASSOC_ID, None)
        try:
            self.ledger.close_association(assoc_id, state)
        except SQLAlchemyError as exc:
            log.error(kv("association_close_not_recorded", assoc=assoc_id, error=exc.__class__.__name__))
        stats: _AssocStats | None = getattr(event.assoc, _ASSOC_STATS, None)
        if stats is not None and stats.stored + stats.duplicates + stats.refused:
            wall = time.perf_counter() - stats.opened
            n = stats.stored + stats.duplicates + stats.refused
            log.info(kv(f"association_{state.value}", assoc=assoc_id, stored=stats.stored,
                        duplicates=stats.duplicates or None, refused=stats.refused,
                        priority=priority_name(stats.priority) if stats.priority else None,
                        seconds=f"{wall:.2f}", per_s=f"{n / wall:.0f}", mb_per_s=f"{stats.bytes / 1e6 / wall:.0f}",
                        handler_ms_each=f"{1000 * stats.handler_s / n:.2f}"))
        else:
            log.info(kv(f"association_{state.value}", assoc=assoc_id))
        if stats is not None:
            self.audit.instances_received(calling_ae=str(event.assoc.requestor.ae_title).strip(),
                                          host=str(event.assoc.requestor.address),
                                          studies=list(stats.studies.values()), refused=stats.refused)
        self.on_association_closed()

    def _on_acse_recv(self, event: evt.Event) -> None:
        primitive = getattr(event, "primitive", None)  # set by pynetdicom for EVT_ACSE_RECV
        if isinstance(primitive, A_RELEASE) and primitive.result is None:
            setattr(event.assoc, _RELEASE_REQUESTED, True)

    def _on_released(self, event: evt.Event) -> None:
        self._close(event, AssociationState.released)

    def _on_aborted(self, event: evt.Event) -> None:
        self._close(event, AssociationState.aborted)

    def _on_conn_close(self, event: evt.Event) -> None:
        tuning.untune_association(event.assoc)
        # After a release request the peer closes the connection as soon as it has our answer, which
        # may be before EVT_RELEASED reaches us: that is a release. Any other drop without release
        # or abort (the peer vanished) counts as aborted.
        released = getattr(event.assoc, _RELEASE_REQUESTED, False)
        self._close(event, AssociationState.released if released else AssociationState.aborted)

    @staticmethod
    def _same_as_held(created: bool, received: Path, recorded: Recorded, size: int) -> bool:
        """Whether a duplicate holds the data set already held: compared byte for byte after the File Meta (written
        on receipt, by the node version then running). Only re-sends read the held file. ``created``: the held file
        is the one just linked."""
        if created:
            return True
        same = same_dataset(received, Path(recorded.existing_path)) if recorded.existing_path else None
        return recorded.existing_size == size if same is None else same

    # -- DIMSE ----------------------------------------------------------------------------------
    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int | Dataset:
        """The C-STORE response: its status, with an Error Comment on a refusal (``ERROR_COMMENTS``)."""
        status = self._store_status(event)
        comment = ERROR_COMMENTS.get(status) if status != STATUS_SUCCESS else None
        if comment is None:
            return status
        answer = Dataset()
        answer.Status, answer.ErrorComment = status, comment
        return answer

    def _store_status(self, event: evt.Event) -> int:
        t0 = time.perf_counter()
        if getattr(event.assoc, _RECORD_ON_STORE, False):  # a health check's association that stores after all
            setattr(event.assoc, _RECORD_ON_STORE, False)
            self._record_association(event.assoc)
        self._handler.duplicate = False
        self._handler.header = None
        unwritten = tuning.incoming_error(event.dataset_path)
        if unwritten is not None:
            size = 0
            status = self._refuse_for_resources(event, f"the received data could not be written to the spool "
                                                       f"({unwritten})")
        else:
            size = Path(event.dataset_path).stat().st_size
            status = self._handle_store(event, size)
        stats: _AssocStats | None = getattr(event.assoc, _ASSOC_STATS, None)
        if stats is not None:
            stats.last_store = time.monotonic()
            stats.handler_s += time.perf_counter() - t0
            if status == STATUS_SUCCESS and self._handler.header is not None:
                stats.saw(self._handler.header)
            if status == STATUS_SUCCESS and self._handler.duplicate:
                stats.duplicates += 1
            elif status == STATUS_SUCCESS:
                stats.stored += 1
                stats.bytes += size
                self._note_priority(event, stats)
            else:
                stats.refused += 1
        return status

    def _note_priority(self, event: evt.Event, stats: _AssocStats) -> None:
        """Record the association's most urgent C-STORE Priority when it rises (at most three writes; none for the
        usual MEDIUM): the series' job takes it when queued (``node.receive.priority``). Before the answer, so a
        series completed at the release sees it; a failure only costs the priority."""
        level = from_cstore(getattr(event.request, "Priority", 0))
        before = stats.priority
        if before is not None and level <= before:
            return
        stats.priority = level
        assoc_id = getattr(event.assoc, _ASSOC_ID, None)
        if assoc_id is None or (before is None and level == 0):
            return
        try:
            self.ledger.note_priority(assoc_id, level)
        except SQLAlchemyError as exc:
            log.error(kv("priority_not_recorded", assoc=assoc_id, error=exc.__class__.__name__,
                         effect="its series are queued at medium priority"))

    def _refuse_for_resources(self, event: evt.Event, reason: str, *, fix: str = SPOOL_FIX,
                              status: int = STATUS_OUT_OF_RESOURCES) -> int:
        """Refuse an instance for a fault of the node's own (a full or unwritable spool, a ledger that cannot
        write): a person must act, so it is an ERROR, once a minute; the other refusals meanwhile are WARNINGs."""
        now = time.monotonic()
        alert = now - self._resource_alerted >= 60.0
        if alert:
            self._resource_alerted = now
        log.log(logging.ERROR if alert else logging.WARNING,
                kv("store_refused", assoc=getattr(event.assoc, _ASSOC_ID, None),
                   sop=str(cast(C_STORE, event.request).AffectedSOPInstanceUID), status=f"0x{status:04X}",
                   reason=reason, fix=fix))
        return status

    def _handle_store(self, event: evt.Event, size: int) -> int:
        req = cast(C_STORE, event.request)
        sop_uid = str(req.AffectedSOPInstanceUID)
        assoc_id = getattr(event.assoc, _ASSOC_ID, None)
        received = Path(event.dataset_path)
        data_synced: Future[None] | None = None
        try:
            try:
                self.spool.check_space()
            except InstanceRejected as full:  # ours to fix, not the sender's: a person must free space
                return self._refuse_for_resources(event, full.reason, status=full.status)
            # The content fsync needs nothing from the checks and works through a descriptor: start
            # it now, it overlaps the checks and the commit.
            data_synced = self._io.submit(self.spool.sync_data, self.spool.open_received(received))
            header = inspect_instance(received, sop_class_uid=str(req.AffectedSOPClassUID), sop_instance_uid=sop_uid)
            self._handler.header = header
            return self._store(header, received, size, assoc_id, data_synced)
        except InstanceRejected as rej:
            log.warning(kv("store_refused", assoc=assoc_id, sop=sop_uid, status=f"0x{rej.status:04X}", reason=rej.reason))
            return rej.status
        except SQLAlchemyError as exc:
            # Not acknowledged; the file just linked was removed (``_store``), so a refused image is not
            # analysed behind the sender's back: the sender sends it again.
            return self._refuse_for_resources(event, f"the ledger database could not record it ({db_reason(exc)})",
                                              fix="check the database in storage.database_url (disk space, "
                                                  "server running)")
        finally:
            if data_synced is not None:
                wait([data_synced])  # never leave work on a file pynetdicom deletes after we answer

    def _store(
        self, header: InstanceHeader, received: Path, size: int, assoc_id: int | None, data_synced: Future[None]
    ) -> int:
        """``_store_held`` while retention is held off this series (``SeriesGate``)."""
        with self.spool.gate.storing(header.series_instance_uid):
            return self._store_held(header, received, size, assoc_id, data_synced)

    def _store_held(
        self, header: InstanceHeader, received: Path, size: int, assoc_id: int | None, data_synced: Future[None]
    ) -> int:
        """Make the file durable and record its row, then answer.

        The fsync-bound steps overlap the rest and each other: the content fsync (started before
        the checks), the link and its directory's fsync, and the row written here. Success is
        answered only after all are done. A failure undoes what succeeded: the row is removed and a
        linked file whose content fsync failed is deleted (reconciliation removes rows a crash left
        without a file, and quarantines files it cannot read: none was acknowledged).
        """
        sop_uid = header.sop_instance_uid
        final = self.spool.path_for(header.series_instance_uid, sop_uid)
        file_done = self._io.submit(self.spool.commit, received, header.series_instance_uid, sop_uid, sync_data=False)
        try:
            recorded = self.ledger.record_instance(
                header, path=final, size_bytes=size, association_id=assoc_id, own_output=is_own_output(header)
            )
        except BaseException as exc:
            # Not recorded, so not acknowledged: refused by the ledger (another study's series), a header value the
            # database cannot hold (it would fail again at every start-up reconciliation), or a database down.
            # The file linked here is not the node's to keep: reconciliation would adopt what the sender was told
            # was refused.
            wait([file_done])
            if file_done.exception() is None and file_done.result() is not None:
                final.unlink(missing_ok=True)
            if isinstance(exc, DataError):
                raise unrecordable(exc) from None
            raise
        created = False
        try:
            created = file_done.result() is not None
            data_synced.result()
        except InstanceRejected:
            if created:
                final.unlink(missing_ok=True)
            if recorded.outcome == Outcome.stored:
                self.ledger.forget_instance(sop_uid, restored=recorded.restored)
            raise
        if recorded.outcome == Outcome.duplicate:
            self._handler.duplicate = True
            if created and recorded.existing_path not in (None, str(final)):
                # Held at another path (the ledger refuses the same UID in another series, so: a spool_dir moved
                # since): one instance, one file. The copy just linked would be an orphan without a row.
                final.unlink(missing_ok=True)
                log.warning(kv("store_duplicate", assoc=assoc_id, sop=sop_uid,
                               note="this SOP Instance UID is already held at another path; the copy held first "
                                    "is kept"))
                return STATUS_SUCCESS
            held_syntax = recorded.existing_transfer_syntax
            if held_syntax not in (None, header.transfer_syntax_uid):
                log.info(kv("store_duplicate", assoc=assoc_id, sop=sop_uid,
                            note=f"sent again in another transfer syntax ({header.transfer_syntax_uid}; held: "
                                 f"{held_syntax}); the copy held first is kept"))
            elif not self._same_as_held(created, received, recorded, size):
                # DICOM: one SOP Instance UID, one content. A corrected image must come with a new UID.
                log.warning(kv("store_duplicate", assoc=assoc_id, sop=sop_uid,
                               note=f"content differs from the instance already held ({size} against "
                                    f"{recorded.existing_size} bytes); the one held first is kept: a corrected "
                                    f"image needs a new SOP Instance UID"))
            else:  # the usual re-push of a study: counted in the association's closing line (duplicates=N)
                log.debug(kv("store_duplicate", assoc=assoc_id, sop=sop_uid))
        elif log.isEnabledFor(logging.DEBUG):  # the hot path: format only when it is written
            log.debug(kv("store_ok", assoc=assoc_id, sop=sop_uid, series=header.series_instance_uid))
        return STATUS_SUCCESS


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.removeprefix("::ffff:")).is_loopback
    except ValueError:
        return False
