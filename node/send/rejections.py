"""Withdraw replaced results: an IOCM rejection note per destination that received them (``reject_replaced``).

When a job's results are recorded, every object of the same series that a destination received (sent or
committed) and that the new results did not make again has been replaced. For each destination that asks for
it, one note (``node.outputs.rejection``) lists those objects; it is written next to the job's results and queued
like them, and the rows it names remember it (``rejected_by``), so the next results withdraw only what came
after. The sender holds a note back until the job's results reached that destination, and drops it (the rows
it named free again) if they never will (``node.send.outbox``). Objects an archive withdrew are never sent
again under their UIDs: the count of notes is part of the next results' UIDs (``withdrawals``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, KeyObjectSelectionDocumentStorage
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from node.config import Destination, OutputsSettings, WebDestination
from node.db.models import REJECTION_NOTE, Event, Job, OutboxItem, SendState, utcnow
from node.logs import kv
from node.outputs.rejection import Replaced, build_rejection_note
from node.outputs.uids import uuid_uid
from node.outputs.write import save_dataset
from node.send.outbox import OutputObject, insert_outbox_rows, read_outputs

log = logging.getLogger(__name__)

#: States of an object the destination has. One still being sent is withdrawn by the series' next results.
_RECEIVED = (SendState.sent, SendState.committed)


def withdrawals(s: Session, series_id: int) -> int:
    """Rejection notes queued for the series so far (not dropped): part of its next results' UIDs."""
    return int(s.scalar(select(func.count(OutboxItem.id)).join(Job, OutboxItem.job_id == Job.id).where(
        Job.series_id == series_id, OutboxItem.kind == REJECTION_NOTE,
        OutboxItem.state != SendState.superseded)) or 0)


def _replaced(row: OutboxItem) -> Replaced | None:
    """The row's object as the note references it; its series from the ledger, or from its file (rows queued
    before the ledger kept it); None when neither is there."""
    series = row.series_instance_uid
    if not series:
        try:
            series = str(dcmread(row.path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
                         .SeriesInstanceUID)
        except (OSError, InvalidDicomError, AttributeError):
            return None
    return Replaced(sop_class_uid=row.sop_class_uid, sop_instance_uid=row.sop_instance_uid, series_instance_uid=series)


def queue_rejections(s: Session, *, job_id: int, results_dir: Path,
                     destinations: Sequence[Destination | WebDestination], settings: OutputsSettings,
                     device_uid: str | None = None) -> int:
    """Write and queue a rejection note for each ``reject_replaced`` destination holding replaced results of the
    job's series, in the caller's transaction (with the job's outcome); the number of notes queued."""
    asking = [d for d in destinations if d.reject_replaced]
    new: list[OutputObject] = read_outputs(results_dir) if asking else []
    if not new:
        return 0
    job = s.get(Job, job_id)
    assert job is not None
    made = {o.sop_instance_uid for o in new}
    anchor = min(made)  # names the notes' UIDs: a second run of this finish writes the same notes
    like = dcmread(results_dir / new[0].file, stop_before_pixels=True)
    queued = 0
    for dest in asking:
        rows = s.scalars(
            select(OutboxItem).join(Job, OutboxItem.job_id == Job.id)
            .where(Job.series_id == job.series_id, OutboxItem.destination == dest.name,
                   OutboxItem.kind != REJECTION_NOTE, OutboxItem.rejected_by.is_(None),
                   OutboxItem.state.in_(_RECEIVED), OutboxItem.sop_instance_uid.not_in(made))
            .order_by(OutboxItem.id).with_for_update(of=OutboxItem)
        ).all()
        found = [(row, obj) for row in rows if (obj := _replaced(row)) is not None]
        if len(found) < len(rows):
            log.warning(kv("rejection_incomplete", job=job_id, destination=dest.name, missing=len(rows) - len(found),
                           reason="replaced objects queued before this version whose files are gone: their series is "
                                  "unknown, so the note cannot name them"))
        if not found:
            continue
        uids = sorted(obj.sop_instance_uid for _, obj in found)
        note_uid = uuid_uid("\n".join(["rejection", dest.name, anchor, *uids]))
        path = results_dir / f"{REJECTION_NOTE}-{dest.name}-{note_uid}.dcm"  # one file per note: rows keep theirs
        try:
            note = build_rejection_note(
                like=like, replaced=[obj for _, obj in found],
                sop_instance_uid=note_uid,
                series_instance_uid=uuid_uid(f"rejection/series\n{anchor}"),
                series_number=settings.rejection_series_number,
                series_description=settings.rejection_series_description,
                reason=f"Replaced by a later lungnode analysis of the series (revision {job.revision}): "
                       f"{len(found)} result objects withdrawn.",
                device_serial_number=settings.device_serial_number, device_uid=device_uid)
            save_dataset(note, path)
        except (ValueError, TypeError, AttributeError, OSError) as exc:  # the new results go out all the same
            log.error(kv("rejection_failed", job=job_id, destination=dest.name, objects=len(found),
                         error=f"{type(exc).__name__}: {exc}",
                         effect="the replaced results stay at the destination; the next revision tries again"))
            continue
        now = utcnow()
        insert_outbox_rows(s, [{
            "job_id": job_id, "destination": dest.name, "kind": REJECTION_NOTE, "path": str(path.resolve()),
            "sop_instance_uid": str(note.SOPInstanceUID), "sop_class_uid": KeyObjectSelectionDocumentStorage,
            "transfer_syntax_uid": ExplicitVRLittleEndian, "series_instance_uid": str(note.SeriesInstanceUID),
            "state": SendState.pending, "attempts": 0, "next_attempt_at": now, "created_at": now, "updated_at": now,
        }])
        # The same note again (its job analysed again after the note was dropped): queued anew.
        s.execute(update(OutboxItem).where(
            OutboxItem.destination == dest.name, OutboxItem.sop_instance_uid == note_uid,
            OutboxItem.state == SendState.superseded).values(
                state=SendState.pending, attempts=0, next_attempt_at=now, last_error=None, updated_at=now))
        note_id = s.scalar(select(OutboxItem.id).where(OutboxItem.destination == dest.name,
                                                       OutboxItem.sop_instance_uid == note_uid))
        s.execute(update(OutboxItem).where(OutboxItem.id.in_([row.id for row, _ in found]))
                  .values(rejected_by=note_id, updated_at=now))
        jobs = sorted({row.job_id for row, _ in found})
        s.add(Event(kind="rejection_queued", job_id=job_id, series_id=job.series_id,
                    message=f"{len(found)} results {dest.name} received (job {', '.join(map(str, jobs))}) are "
                            f"replaced by this job's: an IOCM rejection note withdrawing them is queued",
                    data={"destination": dest.name, "replaced_jobs": jobs, "objects": len(found)}))
        log.info(kv("rejection_queued", job=job_id, destination=dest.name, objects=len(found),
                    replaced_jobs=",".join(map(str, jobs))))
        queued += 1
    return queued
