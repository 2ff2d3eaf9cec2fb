"""The outbox: every result object to deliver is a row per destination in the ledger's ``outbox`` table.

Rows are written once per (destination, SOP Instance UID), so enqueueing the same results twice
changes nothing. The sender claims due rows (``pending`` and ``next_attempt_at`` passed), marks them
``sending``, and records the outcome of each: ``sent`` (success or warning status), ``committed``
(storage commitment confirmed), or back to ``pending`` with an exponentially growing delay until
``sending.max_attempts`` is reached, then ``failed`` with the reason. Because the queue is the
database, pending sends survive a restart; rows a stopped node left in ``sending`` go back to
``pending`` at the next start.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy import exists, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, aliased, sessionmaker

from node.config import Destination, OutputKind, SendingSettings, WebDestination
from node.db.models import REJECTION_NOTE, Event, Job, OutboxItem, SendState, Series, utcnow
from node.errors import LungnodeError
from node.logs import kv

log = logging.getLogger(__name__)

OUTPUTS_FILE = "outputs.json"


class OutputObject(BaseModel):
    """One entry of ``outputs.json`` (written by the outputs step next to the files it lists)."""

    model_config = ConfigDict(extra="ignore")
    kind: OutputKind
    file: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str


class OutputsManifest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    objects: list[OutputObject]


def read_outputs(results_dir: Path) -> list[OutputObject]:
    """The objects listed in ``results_dir/outputs.json``; LungnodeError naming the problem otherwise."""
    path = results_dir / OUTPUTS_FILE
    try:
        manifest = OutputsManifest.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise LungnodeError(f"cannot read {path}: {exc.strerror}") from exc
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise LungnodeError(f"{path} is not a valid outputs list: {where}") from exc
    for obj in manifest.objects:
        file = Path(obj.file)
        if file.is_absolute() or ".." in file.parts:
            raise LungnodeError(f"{path}: file {obj.file!r} must be a name relative to the results folder")
        if not (results_dir / file).is_file():
            raise LungnodeError(f"{path}: listed file {obj.file} does not exist in {results_dir}")
    return manifest.objects


def insert_outbox_rows(s: Session, rows: list[dict[str, Any]]) -> int:
    """INSERT .. ON CONFLICT DO NOTHING (SQLite and PostgreSQL); the number of new rows."""
    if not rows:
        return 0
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        stmt: Any = pg_insert(OutboxItem).on_conflict_do_nothing(constraint="uq_outbox_destination_sop")
    elif dialect == "sqlite":
        stmt = sqlite_insert(OutboxItem).on_conflict_do_nothing(index_elements=["destination", "sop_instance_uid"])
    else:  # pragma: no cover - only SQLite and PostgreSQL are supported ledgers
        raise LungnodeError(f"outbox: unsupported database {dialect}")
    inserted = 0
    for row in rows:  # RETURNING tells a new row from one already queued (rowcount is -1 with psycopg)
        if s.execute(stmt.values(**row).returning(OutboxItem.id)).first() is not None:
            inserted += 1
    return inserted


def _revive_withdrawn(s: Session, job_id: int, rows: list[dict[str, Any]]) -> int:
    """Rows of this job withdrawn when it was queued for reanalysis (superseded) whose object the new run made
    again, the same instance (same models and content give the same UIDs): queued again, as new."""
    revived = 0
    for row in rows:
        result = s.execute(update(OutboxItem).where(
            OutboxItem.job_id == job_id, OutboxItem.destination == row["destination"],
            OutboxItem.sop_instance_uid == row["sop_instance_uid"], OutboxItem.state == SendState.superseded,
        ).values(state=SendState.pending, attempts=0, next_attempt_at=row["next_attempt_at"], last_error=None,
                 last_status=None, path=row["path"], updated_at=row["updated_at"]))
        revived += int(getattr(result, "rowcount", 0) or 0)
    return revived


def enqueue_results(
    sessions: sessionmaker[Session] | Session,
    *,
    job_id: int,
    results_dir: Path,
    destinations: Sequence[Destination | WebDestination],
) -> int:
    """Queue every object of ``results_dir/outputs.json`` for each destination whose ``objects``
    profile includes its kind; returns the number of new rows (0 when all were queued before).

    With a sessionmaker the rows are committed here; with a Session they join its transaction (the
    caller commits, e.g. together with the job's outcome).
    """
    objects = read_outputs(results_dir)
    now = utcnow()
    rows = [
        {
            "job_id": job_id, "destination": dest.name, "kind": obj.kind,
            "path": str((results_dir / obj.file).resolve()), "sop_instance_uid": obj.sop_instance_uid,
            "sop_class_uid": obj.sop_class_uid, "transfer_syntax_uid": obj.transfer_syntax_uid,
            "series_instance_uid": obj.series_instance_uid, "state": SendState.pending, "attempts": 0,
            "next_attempt_at": now, "created_at": now, "updated_at": now,
        }
        for dest in destinations
        for obj in objects
        if obj.kind in dest.objects
    ]
    if isinstance(sessions, Session):
        added = insert_outbox_rows(sessions, rows) + _revive_withdrawn(sessions, job_id, rows)
    else:
        with sessions.begin() as s:
            added = insert_outbox_rows(s, rows) + _revive_withdrawn(s, job_id, rows)
    log.info(kv("send_enqueued", job=job_id, objects=len(objects), destinations=len(destinations), new=added,
                already_queued=len(rows) - added))
    return added


def _drop_notes_without_replacements(s: Session, destination: str, now: dt.datetime) -> None:
    """Pending rejection notes whose job's results for the destination were superseded (a newer revision came
    first, or the job is analysed again) are superseded too, and what they named is no longer withdrawn: the next
    results of the series withdraw it, once they are there (``queue_rejections`` revives a note that a rerun of
    its job makes again)."""
    sibling = aliased(OutboxItem)
    notes = s.scalars(select(OutboxItem).where(
        OutboxItem.destination == destination, OutboxItem.kind == REJECTION_NOTE, OutboxItem.state == SendState.pending,
        exists().where(sibling.job_id == OutboxItem.job_id, sibling.destination == destination,
                       sibling.kind != REJECTION_NOTE, sibling.state == SendState.superseded))
        .with_for_update(skip_locked=True)).all()
    for note in notes:
        note.state, note.updated_at = SendState.superseded, now
        note.last_error = "not sent: the results it made way for were not sent (superseded)"
        s.execute(update(OutboxItem).where(OutboxItem.rejected_by == note.id).values(rejected_by=None, updated_at=now))
        s.add(Event(kind="rejection_superseded", job_id=note.job_id, data={"destination": destination},
                    message=f"rejection note for {destination} not sent: the results it made way for were superseded; "
                            "what it named stays until the series' next results are delivered"))
        log.info(kv("rejection_superseded", job=note.job_id, destination=destination))


# -- retry policy ---------------------------------------------------------------------------------
def backoff_delay(attempts: int, settings: SendingSettings) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: base * factor^(attempts-1), capped."""
    if attempts < 1:
        return 0.0
    try:
        delay = settings.retry_base_s * settings.retry_factor ** (attempts - 1)
    except OverflowError:
        delay = settings.retry_max_delay_s
    return float(min(delay, settings.retry_max_delay_s))


# -- what the sender does with rows ---------------------------------------------------------------
@dataclass(frozen=True)
class Claimed:
    """A row the sender now owns (state ``sending``)."""

    id: int
    job_id: int
    destination: str
    kind: str
    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    attempt: int


@dataclass
class CommitmentOutcome:
    """What one storage commitment report did: objects committed, refused, and the refused ones given up."""

    committed: int = 0
    refused: int = 0
    given_up: list[tuple[str, int]] = field(default_factory=list)  # (destination, job id)


class Outbox:
    """Queue operations on the ``outbox`` table, one short transaction each."""

    def __init__(self, sessions: sessionmaker[Session], settings: SendingSettings) -> None:
        self.sessions = sessions
        self.settings = settings

    def reset_interrupted(self) -> int:
        """Rows left in ``sending`` by a node that stopped mid-send go back to ``pending`` (due now).

        The peer may have stored some of them already; re-sending the same SOP Instance UID is
        harmless (a PACS keeps one copy), losing them is not.
        """
        with self.sessions.begin() as s:
            result = s.execute(
                update(OutboxItem).where(OutboxItem.state == SendState.sending)
                .values(state=SendState.pending, next_attempt_at=utcnow(), updated_at=utcnow())
            )
            count = int(getattr(result, "rowcount", 0) or 0)
        if count:
            log.warning(kv("send_interrupted_requeued", count=count, reason="the node stopped while sending them"))
        return count

    def claim(self, destination: str, *, limit: int, now: dt.datetime | None = None) -> list[Claimed]:
        """Take up to ``limit`` due rows of one destination (oldest first) and mark them ``sending``.

        Rows of a job whose series has a newer revision by now are marked ``superseded`` instead: the newer
        revision's job sends its own results, and a PACS holding both would show two answers for one series. So
        are rows a rejection note withdrew (a retry after all). A rejection note waits until its job's results
        reached the destination, so the archive never hides the old answer before it holds the new one; it is
        never superseded by a newer revision (what it withdraws stays replaced), only when the results it makes
        way for were not sent (``_drop_notes_without_replacements``).
        """
        now = now or utcnow()
        with self.sessions.begin() as s:
            sibling = aliased(OutboxItem)
            replacements_pending = exists().where(
                sibling.job_id == OutboxItem.job_id, sibling.destination == OutboxItem.destination,
                sibling.kind != REJECTION_NOTE, sibling.state.not_in([SendState.sent, SendState.committed]))
            found = s.execute(
                select(OutboxItem, Job.revision, Series.revision)
                .join(Job, OutboxItem.job_id == Job.id)
                .join(Series, Job.series_id == Series.id)
                .where(OutboxItem.destination == destination, OutboxItem.state == SendState.pending,
                       OutboxItem.next_attempt_at <= now,
                       or_(OutboxItem.kind != REJECTION_NOTE, ~replacements_pending))
                .order_by(OutboxItem.next_attempt_at, OutboxItem.id)
                .limit(limit)
                .with_for_update(skip_locked=True, of=OutboxItem)
            ).all()
            withdrawn = [item for item, _, _ in found if item.rejected_by is not None]
            for item in withdrawn:
                item.state, item.updated_at = SendState.superseded, now
                item.last_error = "not sent again: a rejection note withdrew it (a later analysis replaced it)"
            if withdrawn:
                log.info(kv("send_superseded", destination=destination, count=len(withdrawn),
                            reason="withdrawn by a rejection note"))
            found = [row for row in found if row[0].rejected_by is None]
            current = [series_rev <= job_rev or item.kind == REJECTION_NOTE for item, job_rev, series_rev in found]
            items = [item for (item, _, _), ok in zip(found, current) if ok]
            stale = [(item, series_rev) for (item, _, series_rev), ok in zip(found, current) if not ok]
            for job_id in sorted({item.job_id for item, _ in stale}):
                rows = [(item, rev) for item, rev in stale if item.job_id == job_id]
                newer = rows[0][1]
                for item, _ in rows:
                    item.state = SendState.superseded
                    item.updated_at = now
                    item.last_error = f"not sent: revision {newer} of the series arrived first"
                s.add(Event(kind="send_superseded", job_id=job_id,
                            message=f"{len(rows)} results for {destination} not sent: revision {newer} of the series "
                                    f"arrived first (its job sends its own)", data={"destination": destination}))
                log.info(kv("send_superseded", job=job_id, destination=destination, count=len(rows),
                            newer_revision=newer))
            s.flush()
            _drop_notes_without_replacements(s, destination, now)
            claimed = []
            for item in items:
                item.state = SendState.sending
                item.attempts += 1
                item.updated_at = now
                claimed.append(Claimed(item.id, item.job_id, item.destination, item.kind, Path(item.path),
                                       item.sop_instance_uid, item.sop_class_uid, item.transfer_syntax_uid,
                                       item.attempts))
        return claimed

    def release(self, item_ids: Sequence[int]) -> None:
        """Claimed rows that were not attempted (the sender is stopping): pending again, attempt not counted."""
        with self.sessions.begin() as s:
            s.execute(update(OutboxItem)
                      .where(OutboxItem.id.in_(item_ids), OutboxItem.state == SendState.sending)
                      .values(state=SendState.pending, attempts=OutboxItem.attempts - 1, updated_at=utcnow()))

    def mark_sent(self, item_id: int, *, status: int, note: str | None = None) -> None:
        """C-STORE answered success (0x0000) or a warning (0xB000, 0xB006, 0xB007): delivered."""
        now = utcnow()
        with self.sessions.begin() as s:
            s.execute(update(OutboxItem).where(OutboxItem.id == item_id).values(
                state=SendState.sent, last_status=status, last_error=note, sent_at=now, updated_at=now))

    def mark_retry(self, item_id: int, *, error: str, status: int | None = None, permanent: bool = False) -> SendState:
        """A failed attempt: back to ``pending`` after the backoff delay, or ``failed`` when attempts
        are used up (or ``permanent``). Returns the new state."""
        return self.mark_retry_all([item_id], error=error, status=status, permanent=permanent)[0]

    def mark_retry_all(self, item_ids: Sequence[int], *, error: str, status: int | None = None,
                       permanent: bool = False) -> list[SendState]:
        """``mark_retry`` for rows that failed together (an association that could not be made): one transaction and
        one retry time, so they are tried again together and given up together (one ``send_failed``, not one per
        row that the sender's poll happened to split off). Returns the new states in ``item_ids``' order."""
        now = utcnow()
        with self.sessions.begin() as s:
            states = []
            for item_id in item_ids:
                item = s.get(OutboxItem, item_id)
                assert item is not None
                states.append(self._retry_or_fail(s, item, error=error, status=status, now=now, permanent=permanent))
            return states

    def _retry_or_fail(self, s: Session, item: OutboxItem, *, error: str, now: dt.datetime, status: int | None = None,
                       permanent: bool = False, retry_at: dt.datetime | None = None) -> SendState:
        """The one place a delivery fails (a refused C-STORE, no association, a refused or missing storage
        commitment): ``pending`` again at ``retry_at`` (default: after the backoff delay), or ``failed`` with a
        ``send_failed`` event once attempts are used up, so every give-up reaches ``status`` and the alerting alike."""
        item.last_error = error
        item.last_error_at = now
        item.last_status = status
        item.updated_at = now
        item.commitment_uid = None
        item.commitment_requested_at = None
        if permanent or item.attempts >= self.settings.max_attempts:
            item.state = SendState.failed
            s.add(Event(kind="send_failed", level="error", job_id=item.job_id,
                        message=f"{item.kind} to {item.destination} failed after {item.attempts} attempts: {error}",
                        data={"destination": item.destination, "sop_instance_uid": item.sop_instance_uid,
                              "status": status}))
        else:
            item.state = SendState.pending
            item.next_attempt_at = retry_at or now + dt.timedelta(seconds=backoff_delay(item.attempts, self.settings))
        return item.state

    def mark_commitment_requested(self, item_ids: Sequence[int], transaction_uid: str) -> None:
        now = utcnow()
        with self.sessions.begin() as s:
            s.execute(update(OutboxItem).where(OutboxItem.id.in_(item_ids)).values(
                commitment_uid=transaction_uid, commitment_requested_at=now, updated_at=now))

    def commitment_due(self, destination: str, *, limit: int) -> list[Claimed]:
        """Sent rows of a commitment destination whose commitment was not requested yet."""
        with self.sessions() as s:
            items = s.scalars(
                select(OutboxItem)
                .where(OutboxItem.destination == destination, OutboxItem.state == SendState.sent,
                       OutboxItem.commitment_uid.is_(None))
                .order_by(OutboxItem.id).limit(limit)
            ).all()
            return [Claimed(i.id, i.job_id, i.destination, i.kind, Path(i.path), i.sop_instance_uid,
                            i.sop_class_uid, i.transfer_syntax_uid, i.attempts) for i in items]

    def record_commitment(self, transaction_uid: str, *, committed: Sequence[str],
                          failed: dict[str, int]) -> CommitmentOutcome:
        """Apply a storage commitment report: ``committed`` SOP Instance UIDs are delivered; ``failed``
        (UID -> Failure Reason) are sent again, or failed after max attempts."""
        now = utcnow()
        outcome = CommitmentOutcome()
        with self.sessions.begin() as s:
            items = s.scalars(select(OutboxItem).where(OutboxItem.commitment_uid == transaction_uid,
                                                       OutboxItem.state == SendState.sent)).all()
            for item in items:
                if item.sop_instance_uid in committed:
                    item.state = SendState.committed
                    item.committed_at = now
                    item.updated_at = now
                    outcome.committed += 1
                elif item.sop_instance_uid in failed:
                    outcome.refused += 1
                    error = (f"storage commitment refused by the destination "
                             f"(Failure Reason 0x{failed[item.sop_instance_uid]:04X})")
                    s.add(Event(kind="commitment_failed", level="warning", job_id=item.job_id, message=error,
                                data={"destination": item.destination, "sop_instance_uid": item.sop_instance_uid,
                                      "transaction_uid": transaction_uid}))
                    if self._retry_or_fail(s, item, error=error, now=now) == SendState.failed:
                        outcome.given_up.append((item.destination, item.job_id))
        return outcome

    def expire_commitments(self, *, now: dt.datetime | None = None) -> list[tuple[str, int, SendState]]:
        """Commitment requests without a report after ``commitment_timeout_s``: send the objects again now, or
        give them up after max attempts. Returns (destination, job id, new state) per timed-out row."""
        now = now or utcnow()
        cutoff = now - dt.timedelta(seconds=self.settings.commitment_timeout_s)
        error = f"no storage commitment report within {self.settings.commitment_timeout_s:g} s"
        with self.sessions.begin() as s:
            items = s.scalars(select(OutboxItem).where(OutboxItem.state == SendState.sent,
                                                       OutboxItem.commitment_requested_at < cutoff)).all()
            return [(item.destination, item.job_id, self._retry_or_fail(s, item, error=error, now=now, retry_at=now))
                    for item in items]

    def orphaned(self, known: Sequence[str]) -> dict[str, int]:
        """Undelivered rows of destinations no longer in the configuration (they wait until it has them again)."""
        with self.sessions() as s:
            rows = s.execute(
                select(OutboxItem.destination, func.count())
                .where(OutboxItem.state.in_([SendState.pending, SendState.sending]),
                       OutboxItem.destination.not_in(list(known)))
                .group_by(OutboxItem.destination)
            ).all()
        return {str(dest): int(n) for dest, n in rows}


def requeue_failed(sessions: sessionmaker[Session], *, job_id: int | None = None,
                   resend: bool = False, destinations: Collection[str] | None = None) -> list[tuple[str, int]]:
    """Put ``failed`` rows (all, or one job's) back in the queue with a fresh set of attempts, and make rows
    waiting for their next attempt due now (an operator who just fixed the destination should not wait out the
    backoff); returns (destination, count) pairs for the operator's message. ``resend`` (one job only): also the
    rows already delivered, for a PACS that lost them (a PACS keeps one copy of a SOP Instance UID).
    ``destinations``: only rows for these (the configured ones; a row for another could never be sent)."""
    if resend and job_id is None:
        raise ValueError("resend needs one job")
    states = [SendState.failed, SendState.pending] + ([SendState.sent, SendState.committed] if resend else [])
    now = utcnow()
    with sessions.begin() as s:
        if resend:
            revisions = s.execute(select(Job.revision, Series.revision).join(Series, Job.series_id == Series.id)
                                  .where(Job.id == job_id)).first()
            if revisions is not None and revisions[0] < revisions[1]:
                raise LungnodeError(f"job {job_id} answered revision {revisions[0]} of its series, which revision "
                                    f"{revisions[1]} has superseded: resend the newest revision's job (lungnode status "
                                    "lists it)")
            paths = s.scalars(select(OutboxItem.path).where(OutboxItem.job_id == job_id)).all()
            if paths and not any(Path(p).is_file() for p in paths):
                raise LungnodeError(f"the result files of job {job_id} were deleted with its series' images by the "
                                    "retention rule (retention.received_days): there is nothing left to send")
        query = select(OutboxItem).where(OutboxItem.state.in_(states), OutboxItem.rejected_by.is_(None))
        if job_id is not None:
            query = query.where(OutboxItem.job_id == job_id)
        if destinations is not None:
            query = query.where(OutboxItem.destination.in_(list(destinations)))
        # Not resent: what a rejection note withdrew, and what the job's reanalysis no longer makes (file gone).
        items = [item for item in s.scalars(query.with_for_update()).all()
                 if item.state in (SendState.failed, SendState.pending) or Path(item.path).is_file()]
        counts: dict[str, int] = {}
        for item in items:
            item.state = SendState.pending
            item.attempts = 0
            item.next_attempt_at = now
            item.updated_at = now
            # a fresh delivery: an old storage-commitment request must not time out and send it twice
            item.commitment_uid = item.commitment_requested_at = item.sent_at = item.committed_at = None
            counts[item.destination] = counts.get(item.destination, 0) + 1
        if items:
            s.add(Event(kind="send_requeued", job_id=job_id,
                        message=f"{len(items)} {'' if resend else 'failed or waiting '}sends requeued by an operator",
                        data=counts))
    for dest, n in sorted(counts.items()):
        log.info(kv("send_requeued", destination=dest, count=n, job=job_id))
    return sorted(counts.items())


def unsendable(sessions: sessionmaker[Session], *, destinations: Collection[str], job_id: int | None = None
               ) -> list[tuple[str, int]]:
    """(destination, count) of failed or waiting rows (all, or one job's) for destinations not in
    ``destinations``: nothing sends them until that destination is configured again."""
    query = (select(OutboxItem.destination, func.count())
             .where(OutboxItem.state.in_([SendState.failed, SendState.pending]), OutboxItem.rejected_by.is_(None),
                    OutboxItem.destination.not_in(list(destinations)))
             .group_by(OutboxItem.destination).order_by(OutboxItem.destination))
    if job_id is not None:
        query = query.where(OutboxItem.job_id == job_id)
    with sessions() as s:
        return [(dest, int(n)) for dest, n in s.execute(query)]


def outbox_summary(s: Session) -> dict[str, Any]:
    """Counts per destination and state, with the last error of each destination's failed or retrying rows."""
    per_dest: dict[str, dict[str, Any]] = {}
    for dest, state, n in s.execute(
        select(OutboxItem.destination, OutboxItem.state, func.count()).group_by(OutboxItem.destination, OutboxItem.state)
    ).all():
        entry = per_dest.setdefault(dest, {"counts": {st.value: 0 for st in SendState}, "last_error": None,
                                           "last_error_at": None})
        entry["counts"][state.value] = n
    for dest, entry in per_dest.items():
        row = s.execute(
            select(OutboxItem.last_error, OutboxItem.last_error_at)
            .where(OutboxItem.destination == dest, OutboxItem.last_error.is_not(None),
                   OutboxItem.state.in_([SendState.pending, SendState.failed, SendState.sending]))
            .order_by(OutboxItem.last_error_at.desc().nulls_last()).limit(1)
        ).first()
        if row is not None:
            entry["last_error"] = row.last_error
            entry["last_error_at"] = row.last_error_at.isoformat(timespec="seconds") if row.last_error_at else None
    return per_dest


def dump_outputs(results_dir: Path, objects: Sequence[dict[str, str]]) -> Path:
    """Write ``results_dir/outputs.json`` in the agreed format (for tools and tests)."""
    path = results_dir / OUTPUTS_FILE
    path.write_text(json.dumps({"objects": list(objects)}, indent=2), encoding="utf-8")
    return path
