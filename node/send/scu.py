"""C-STORE (and storage commitment N-ACTION) to one destination in one association.

Presentation contexts are proposed per SOP class: the object's own transfer syntax, plus, for a
compressed object, a second context with Explicit/Implicit VR Little Endian so that a peer that
refuses the compression still gets the object (decompressed here before sending).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]
from pynetdicom.status import code_to_category

from node.config import Destination, SendingSettings
from node.dicom_ae import node_ae
from node.errors import LungnodeError
from node.logs import kv
from node.send.outbox import Claimed
from node.tls import destination_tls, diagnose

log = logging.getLogger(__name__)

UNCOMPRESSED: list[str | UID] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
#: The well-known SOP Instance of the Storage Commitment Push Model (PS3.4 J.3.5).
STORAGE_COMMITMENT_INSTANCE = UID("1.2.840.10008.1.20.1.1")
MAX_CONTEXTS = 128  # PS3.8: presentation context ids are odd numbers 1..255


@dataclass(frozen=True)
class StoreOutcome:
    """What happened to one object: ``status`` is the DIMSE status (None: no answer)."""

    item: Claimed
    status: int | None
    delivered: bool
    error: str | None = None
    permanent: bool = False


def _nodelay(event: evt.Event) -> None:
    """Nagle's algorithm delays every small PDU ~40 ms on a peer that delays its ACKs."""
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _uncompressed(ts: str) -> bool:
    return UID(ts) in UNCOMPRESSED or UID(ts) == UID("1.2.840.10008.1.2.2")  # big endian is native too


def propose_contexts(items: Sequence[Claimed], *, commitment: bool) -> list[PresentationContext]:
    """One context per (SOP class, transfer syntax) of the objects, plus an uncompressed fallback
    per SOP class that has compressed objects; the storage commitment context when asked."""
    wanted: dict[str, list[str]] = {}
    for item in items:
        syntaxes = wanted.setdefault(item.sop_class_uid, [])
        if item.transfer_syntax_uid not in syntaxes:
            syntaxes.append(item.transfer_syntax_uid)
    contexts: list[PresentationContext] = []
    for sop_class, syntaxes in sorted(wanted.items()):
        for ts in syntaxes:
            if not _uncompressed(ts):
                contexts.append(build_context(sop_class, [ts]))
        uncompressed = [ts for ts in syntaxes if _uncompressed(ts) and ts not in UNCOMPRESSED]
        contexts.append(build_context(sop_class, [*UNCOMPRESSED, *uncompressed]))
    if commitment:
        contexts.append(build_context(StorageCommitmentPushModel, UNCOMPRESSED))
    if len(contexts) > MAX_CONTEXTS:
        raise ValueError(f"{len(contexts)} presentation contexts: send fewer SOP classes per association")
    return contexts


def _association_error(assoc: Association, dest: Destination, *, connected: bool, timed_out: bool) -> str:
    """Why no association was made, and what to check. ``timed_out``: the ACSE timeout ran out, so an abort is
    pynetdicom's own after a silent peer, not the peer's answer."""
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    if connected and timed_out and not assoc.is_rejected:
        return (f"no association with {where}: it accepted the connection but did not answer the association "
                f"request within sending.connect_timeout_s; check that the port is the destination's DICOM port and "
                f"that the service is not hung")
    if not connected:
        return f"no association with {where}: cannot connect (peer down, wrong host or port, or a firewall)"
    if assoc.is_rejected:
        prim = assoc.acceptor.primitive
        result = getattr(prim, "result_str", "?")
        source = getattr(prim, "source_str", "?")
        reason = getattr(prim, "reason_str", "?")
        return (f"association rejected by {where} ({result}, {source}: {reason}); check the destination's AE title "
                f"and that it accepts our calling AE title")
    if assoc.is_aborted:
        return f"association aborted by {where} during negotiation; check the destination's AE configuration"
    return f"no association with {where}: connected, but the peer did not answer the association request in time"


def _load(item: Claimed) -> Dataset:
    return pydicom.dcmread(item.path)


def _pick_context(assoc: Association, item: Claimed) -> tuple[str, bool] | None:
    """The accepted transfer syntax to send ``item`` with, and whether it must be decompressed first."""
    accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == item.sop_class_uid]
    for cx in accepted:
        if cx.transfer_syntax and cx.transfer_syntax[0] == item.transfer_syntax_uid:
            return item.transfer_syntax_uid, False
    for cx in accepted:
        if cx.transfer_syntax and UID(cx.transfer_syntax[0]) in UNCOMPRESSED:
            return str(cx.transfer_syntax[0]), not _uncompressed(item.transfer_syntax_uid)
    return None


def _status_text(status: int) -> str:
    return f"0x{status:04X}"


def associate(dest: Destination, contexts: Sequence[PresentationContext], *, calling_ae: str,
              timeout_s: float, response_timeout_s: float | None = None) -> Association | str:
    """An established association with ``dest`` proposing ``contexts``, or why there is none (what to check).
    ``timeout_s`` bounds getting there; ``response_timeout_s`` (default: the same) each answer afterwards."""
    ae = node_ae(calling_ae)
    # connection_timeout bounds the TCP connect and, with TLS, the handshake (unbounded otherwise: a
    # destination that accepts and stays silent would hold the sender, and every destination, forever).
    ae.connection_timeout = ae.acse_timeout = timeout_s
    ae.dimse_timeout = ae.network_timeout = response_timeout_s or timeout_s
    try:
        tls = destination_tls(dest)
    except LungnodeError as exc:
        return str(exc)
    opened: list[bool] = []
    started = time.monotonic()
    try:
        assoc = ae.associate(dest.host, dest.port, contexts=list(contexts), ae_title=dest.ae_title, tls_args=tls,
                             evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay),
                                           (evt.EVT_CONN_OPEN, lambda _e: opened.append(True))])
    except (socket.gaierror, UnicodeError) as exc:  # the name lookup, before any connection
        reason = exc.strerror if isinstance(exc, socket.gaierror) else "not a valid host name"
        return (f"no association with {dest.ae_title}@{dest.host}:{dest.port}: cannot resolve host {dest.host!r} "
                f"({reason}); check destinations[{dest.name}].host, or this machine's DNS")
    if not assoc.is_established:
        if tls is not None and not assoc.is_rejected:
            why = diagnose(tls[0], dest.host, dest.port, tls[1], timeout_s)
            if why is not None:
                return (f"no association with {dest.ae_title}@{dest.host}:{dest.port}: TLS failed ({why}); check "
                        f"destinations[{dest.name}].tls and that the destination listens with TLS on that port")
        return _association_error(assoc, dest, connected=bool(opened),
                                  timed_out=time.monotonic() - started >= 0.95 * timeout_s)
    return assoc


def store_batch(
    dest: Destination,
    items: Sequence[Claimed],
    *,
    calling_ae: str,
    settings: SendingSettings,
    on_outcome: Callable[[StoreOutcome], None],
    should_stop: Callable[[], bool] = lambda: False,
    commitment_items: Sequence[Claimed] = (),
    on_commitment: Callable[[Sequence[Claimed], str | None, str | None], None] | None = None,
) -> str | None:
    """Send ``items`` to ``dest`` in one association, calling ``on_outcome`` for each object as it is
    answered; afterwards request storage commitment for the delivered ones plus ``commitment_items``:
    ``on_commitment(items, transaction_uid, None)`` just before the N-ACTION (the report may arrive
    before its response), ``on_commitment(items, None, error)`` when the request failed.

    Returns None, or why no association could be made (then no object was sent and the caller
    schedules the retries). Objects not attempted because ``should_stop`` turned true get no outcome.
    """
    commitment = dest.storage_commitment and on_commitment is not None
    assoc = associate(dest, propose_contexts([*items, *commitment_items], commitment=commitment),
                      calling_ae=calling_ae, timeout_s=settings.connect_timeout_s,
                      response_timeout_s=settings.response_timeout_s)
    if isinstance(assoc, str):
        return assoc
    delivered: list[Claimed] = []
    try:
        for item in items:
            if should_stop() or not assoc.is_established:
                break
            outcome = _store_one(assoc, item)
            if outcome.delivered:
                delivered.append(item)
            on_outcome(outcome)
        to_commit = [*delivered, *commitment_items]
        if commitment and on_commitment is not None and to_commit and assoc.is_established:
            uid = str(generate_uid())
            on_commitment(to_commit, uid, None)
            error = _request_commitment(assoc, to_commit, uid)
            if error is not None:
                on_commitment(to_commit, None, error)
    finally:
        if assoc.is_established:
            assoc.release()
    return None


def _store_one(assoc: Association, item: Claimed) -> StoreOutcome:
    choice = _pick_context(assoc, item)
    if choice is None:
        return StoreOutcome(item, None, False,
                            f"the destination accepted no presentation context for SOP class {item.sop_class_uid} "
                            f"(neither {item.transfer_syntax_uid} nor uncompressed); check that it supports this object type")
    _ts, decompress = choice  # pynetdicom re-encodes between uncompressed syntaxes itself
    try:
        ds = _load(item)
    except FileNotFoundError:
        return StoreOutcome(item, None, False, f"result file {item.path} is missing; it cannot be sent", permanent=True)
    except Exception as exc:  # a damaged result file will not get better by retrying
        return StoreOutcome(item, None, False, f"cannot read {item.path}: {type(exc).__name__}: {exc}", permanent=True)
    if decompress:
        try:
            ds.decompress(generate_instance_uid=False)  # the same instance, only re-encoded
        except Exception as exc:  # no decoder for this compression: say which one is needed
            return StoreOutcome(item, None, False,
                                f"the destination refused {item.transfer_syntax_uid} and the object could not be "
                                f"decompressed ({type(exc).__name__}: {exc}); install the pydicom decoder plugin",
                                permanent=True)
    try:
        rsp = assoc.send_c_store(ds, priority=0x0000)  # MEDIUM (pynetdicom's default is LOW)
    except (RuntimeError, OSError, ValueError) as exc:
        return StoreOutcome(item, None, False, f"C-STORE not sent: {type(exc).__name__}: {exc}")
    if "Status" not in rsp:
        return StoreOutcome(item, None, False, "no C-STORE response (association lost or DIMSE timeout)")
    status = int(rsp.Status)
    category = code_to_category(status)
    if category == "Success":
        return StoreOutcome(item, status, True, "sent decompressed" if decompress else None)
    if category == "Warning":
        comment = str(rsp.ErrorComment) if "ErrorComment" in rsp else None
        log.warning(kv("send_warning", destination=assoc.acceptor.ae_title, sop=item.sop_instance_uid,
                       status=_status_text(status), comment=comment))
        note = f"stored with warning {_status_text(status)}" + (f": {comment}" if comment else "")
        return StoreOutcome(item, status, True, note)
    comment = str(rsp.ErrorComment) if "ErrorComment" in rsp else ""
    return StoreOutcome(item, status, False,
                        f"C-STORE refused with status {_status_text(status)} ({category})" + (f": {comment}" if comment else ""))


def _request_commitment(assoc: Association, items: Sequence[Claimed], transaction_uid: str) -> str | None:
    """N-ACTION Request Storage Commitment; None, or why it failed."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    refs = []
    for item in items:
        ref = Dataset()
        ref.ReferencedSOPClassUID = item.sop_class_uid
        ref.ReferencedSOPInstanceUID = item.sop_instance_uid
        refs.append(ref)
    ds.ReferencedSOPSequence = refs
    try:
        status, _reply = assoc.send_n_action(ds, 1, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE)
    except (RuntimeError, OSError, ValueError) as exc:
        return f"storage commitment request not sent: {type(exc).__name__}: {exc}"
    if "Status" not in status:
        return "no answer to the storage commitment request"
    code = int(status.Status)
    if code_to_category(code) not in ("Success", "Warning"):
        return f"storage commitment request refused with status {_status_text(code)}"
    return None
