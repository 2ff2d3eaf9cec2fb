"""The outbox on a real SQLite ledger: backoff, enqueue (profiles, idempotency, bad outputs.json),
claim / retry / fail, interrupted sends and operator requeue."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.config import Destination, SendingSettings
from node.db.jobs import JobQueue
from node.db.models import Event, Job, JobState, OutboxItem, SendState, Series, SeriesState, utcnow
from node.errors import LungnodeError
from node.send.outbox import CommitmentOutcome, Outbox, backoff_delay, enqueue_results, outbox_summary, requeue_failed
from tests.helpers.outbox import make_job, open_next_revision, write_results

PACS = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)
VIEWER = Destination(name="viewer", ae_title="VIEWER", host="127.0.0.1", port=105, objects=["key_image"])


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("results")
    write_results(folder)
    return folder


def rows(sessions: sessionmaker[Session]) -> list[OutboxItem]:
    with sessions() as s:
        return list(s.scalars(select(OutboxItem).order_by(OutboxItem.id)))


def test_backoff_grows_exponentially_and_is_capped() -> None:
    st = SendingSettings(retry_base_s=10, retry_factor=3, retry_max_delay_s=200)
    assert [backoff_delay(n, st) for n in range(0, 6)] == [0.0, 10.0, 30.0, 90.0, 200.0, 200.0]
    assert backoff_delay(10_000, st) == 200.0  # no overflow on absurd attempt counts


def test_enqueue_follows_profiles_and_is_idempotent(sessions: sessionmaker[Session], results: Path) -> None:
    job = make_job(sessions)
    assert enqueue_results(sessions, job_id=job, results_dir=results, destinations=[PACS, VIEWER]) == 4
    got = rows(sessions)
    assert sorted((r.destination, r.kind) for r in got) == [
        ("pacs", "key_image"), ("pacs", "seg"), ("pacs", "sr"), ("viewer", "key_image")]
    assert all(r.state == SendState.pending and r.attempts == 0 and Path(r.path).is_file() for r in got)
    # Enqueued again (a worker re-running the outputs step, or both calls racing): nothing new.
    assert enqueue_results(sessions, job_id=job, results_dir=results, destinations=[PACS, VIEWER]) == 0
    with sessions.begin() as s:  # the Session form joins the caller's transaction
        assert enqueue_results(s, job_id=job, results_dir=results, destinations=[PACS]) == 0
    assert len(rows(sessions)) == 4


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ("{not json", "not a valid outputs list"),
    (json.dumps({"objects": [{"kind": "video", "file": "x"}]}), "objects.0.kind"),
    (json.dumps({"objects": [{"kind": "sr", "file": "../etc/passwd", "sop_class_uid": "1", "sop_instance_uid": "2",
                              "series_instance_uid": "3", "study_instance_uid": "4", "transfer_syntax_uid": "5"}]}),
     "relative to the results folder"),
    (json.dumps({"objects": [{"kind": "sr", "file": "missing.dcm", "sop_class_uid": "1", "sop_instance_uid": "2",
                              "series_instance_uid": "3", "study_instance_uid": "4", "transfer_syntax_uid": "5"}]}),
     "does not exist"),
])
def test_enqueue_refuses_a_bad_outputs_list(sessions: sessionmaker[Session], tmp_path: Path, content: str | None,
                                            message: str) -> None:
    if content is not None:
        (tmp_path / "outputs.json").write_text(content)
    with pytest.raises(LungnodeError, match=message):
        enqueue_results(sessions, job_id=make_job(sessions), results_dir=tmp_path, destinations=[PACS])
    assert rows(sessions) == []


def test_retry_with_backoff_then_failed_then_requeued(sessions: sessionmaker[Session], results: Path) -> None:
    settings = SendingSettings(retry_base_s=60, retry_factor=2, max_attempts=3)
    outbox = Outbox(sessions, settings)
    job = make_job(sessions)
    enqueue_results(sessions, job_id=job, results_dir=results, destinations=[VIEWER])
    now = utcnow()
    states = []
    for attempt in range(1, 4):
        (item,) = outbox.claim("viewer", limit=10, now=now)
        assert item.attempt == attempt
        assert outbox.claim("viewer", limit=10, now=now) == []  # claimed rows are not handed out twice
        failed_at = utcnow()
        states.append(outbox.mark_retry(item.id, error="peer down", status=None))
        (row,) = rows(sessions)
        if row.state == SendState.pending:
            delay = (row.next_attempt_at - failed_at).total_seconds()
            assert 60 * 2 ** (attempt - 1) <= delay < 60 * 2 ** (attempt - 1) + 5
            assert outbox.claim("viewer", limit=10, now=now) == []  # not due yet
            now = row.next_attempt_at + dt.timedelta(seconds=1)
    assert states == [SendState.pending, SendState.pending, SendState.failed]
    (row,) = rows(sessions)
    assert row.last_error == "peer down" and row.attempts == 3
    with sessions() as s:
        assert s.scalar(select(Event.message).where(Event.kind == "send_failed")).endswith("peer down")
    with sessions() as s:
        summary = outbox_summary(s)
    assert summary["viewer"]["counts"]["failed"] == 1 and summary["viewer"]["last_error"] == "peer down"

    assert requeue_failed(sessions, job_id=job + 1000) == []  # another job: nothing
    assert requeue_failed(sessions, job_id=job) == [("viewer", 1)]
    (row,) = rows(sessions)
    assert row.state == SendState.pending and row.attempts == 0
    assert len(outbox.claim("viewer", limit=10)) == 1
    # the error keeps the time it happened, not that of the requeue or of the attempt now in flight
    with sessions() as s:
        summary = outbox_summary(s)
    assert summary["viewer"]["last_error_at"] == row.last_error_at.isoformat(timespec="seconds")
    assert row.last_error_at is not None and row.last_error_at < row.updated_at


def test_rows_that_failed_together_are_tried_again_and_given_up_together(sessions: sessionmaker[Session],
                                                                        results: Path) -> None:
    """An association that could not be made fails every row of its batch at once: one retry time for all, so the
    next poll cannot split them and IT gets one send_failed for the batch, not one per split."""
    outbox = Outbox(sessions, SendingSettings(retry_base_s=60, max_attempts=2))
    enqueue_results(sessions, job_id=make_job(sessions), results_dir=results, destinations=[PACS])
    batch = outbox.claim("pacs", limit=10)
    assert len(batch) == 3
    assert outbox.mark_retry_all([c.id for c in batch], error="peer down") == [SendState.pending] * 3
    due = {r.next_attempt_at for r in rows(sessions)}
    assert len(due) == 1
    again = outbox.claim("pacs", limit=10, now=due.pop())
    assert sorted(c.id for c in again) == sorted(c.id for c in batch)
    assert outbox.mark_retry_all([c.id for c in again], error="peer down") == [SendState.failed] * 3


def test_sent_warning_and_permanent_failure(sessions: sessionmaker[Session], results: Path) -> None:
    outbox = Outbox(sessions, SendingSettings(max_attempts=5))
    enqueue_results(sessions, job_id=make_job(sessions), results_dir=results, destinations=[PACS])
    a, b, c = outbox.claim("pacs", limit=10)
    outbox.mark_sent(a.id, status=0x0000)
    outbox.mark_sent(b.id, status=0xB000, note="stored with warning 0xB000")
    assert outbox.mark_retry(c.id, error="result file missing", permanent=True) == SendState.failed
    got = {r.id: r for r in rows(sessions)}
    assert got[a.id].state == SendState.sent and got[a.id].last_status == 0 and got[a.id].sent_at is not None
    assert got[b.id].state == SendState.sent and got[b.id].last_status == 0xB000
    assert got[c.id].state == SendState.failed and got[c.id].attempts == 1


def test_interrupted_sends_go_back_to_pending(sessions: sessionmaker[Session], results: Path) -> None:
    outbox = Outbox(sessions, SendingSettings())
    enqueue_results(sessions, job_id=make_job(sessions), results_dir=results, destinations=[PACS])
    claimed = outbox.claim("pacs", limit=2)
    assert len(claimed) == 2
    outbox.release([claimed[1].id])  # not attempted (stopping): attempt not counted
    assert outbox.reset_interrupted() == 1  # the node stopped with claimed[0] in flight
    got = {r.id: r for r in rows(sessions)}
    assert all(r.state == SendState.pending for r in got.values())
    assert got[claimed[0].id].attempts == 1 and got[claimed[1].id].attempts == 0
    assert len(outbox.claim("pacs", limit=10)) == 3


def test_commitment_report_and_timeout(sessions: sessionmaker[Session], results: Path) -> None:
    outbox = Outbox(sessions, SendingSettings(max_attempts=2, commitment_timeout_s=30))
    enqueue_results(sessions, job_id=make_job(sessions), results_dir=results, destinations=[PACS])
    a, b, c = outbox.claim("pacs", limit=10)
    for item in (a, b, c):
        outbox.mark_sent(item.id, status=0)
    assert {i.id for i in outbox.commitment_due("pacs", limit=10)} == {a.id, b.id, c.id}
    outbox.mark_commitment_requested([a.id, b.id], "1.2.3.4")
    assert [i.id for i in outbox.commitment_due("pacs", limit=10)] == [c.id]
    assert outbox.record_commitment("1.2.3.4", committed=[a.sop_instance_uid],
                                    failed={b.sop_instance_uid: 0x0112}) == CommitmentOutcome(1, 1, [])
    assert outbox.record_commitment("9.9.9", committed=[a.sop_instance_uid], failed={}) == CommitmentOutcome()
    outbox.mark_commitment_requested([c.id], "1.2.3.5")
    assert outbox.expire_commitments(now=utcnow() + dt.timedelta(seconds=10)) == []
    assert outbox.expire_commitments(now=utcnow() + dt.timedelta(seconds=60)) == [("pacs", c.job_id, SendState.pending)]
    got = {r.id: r for r in rows(sessions)}
    assert got[a.id].state == SendState.committed and got[a.id].committed_at is not None
    assert got[b.id].state == SendState.pending and "0x0112" in (got[b.id].last_error or "")
    assert got[c.id].state == SendState.pending and "no storage commitment report" in (got[c.id].last_error or "")


def test_commitment_give_ups_are_send_failed_events(sessions: sessionmaker[Session], results: Path) -> None:
    """A commitment refused or never reported on the last attempt ends the delivery like a refused C-STORE: a
    ``send_failed`` event that ``status`` and the alerting see, not a row quietly turned ``failed``."""
    outbox = Outbox(sessions, SendingSettings(max_attempts=1, commitment_timeout_s=30))
    job = make_job(sessions)
    enqueue_results(sessions, job_id=job, results_dir=results, destinations=[PACS])
    a, b, c = outbox.claim("pacs", limit=10)
    for item in (a, b, c):
        outbox.mark_sent(item.id, status=0)
    outbox.mark_commitment_requested([a.id, b.id], "1.2.3.4")
    outbox.mark_commitment_requested([c.id], "1.2.3.5")
    assert outbox.record_commitment("1.2.3.4", committed=[a.sop_instance_uid],
                                    failed={b.sop_instance_uid: 0x0112}) == CommitmentOutcome(1, 1, [("pacs", job)])
    assert outbox.expire_commitments(now=utcnow() + dt.timedelta(seconds=60)) == [("pacs", job, SendState.failed)]
    got = {r.id: r for r in rows(sessions)}
    assert [got[i.id].state for i in (a, b, c)] == [SendState.committed, SendState.failed, SendState.failed]
    with sessions() as s:
        messages = s.scalars(select(Event.message).where(Event.kind == "send_failed")).all()
    assert len(messages) == 2
    assert any("0x0112" in m for m in messages) and any("no storage commitment report within 30 s" in m
                                                           for m in messages)
    assert all("failed after 1 attempts" in m for m in messages)


def test_rows_of_unconfigured_destinations_are_reported(sessions: sessionmaker[Session], results: Path) -> None:
    enqueue_results(sessions, job_id=make_job(sessions), results_dir=results, destinations=[PACS, VIEWER])
    outbox = Outbox(sessions, SendingSettings())
    assert outbox.orphaned(["pacs", "viewer"]) == {}
    assert outbox.orphaned(["pacs"]) == {"viewer": 1}


def test_destination_names_must_be_unique() -> None:
    from pydantic import ValidationError

    from node.config import Config

    with pytest.raises(ValidationError, match="destination names must be unique"):
        Config(destinations=[PACS, PACS.model_copy(update={"ae_title": "OTHER"})])


def test_results_of_a_superseded_revision_are_not_sent(sessions: sessionmaker[Session], results: Path,
                                                       tmp_path: Path) -> None:
    outbox = Outbox(sessions, SendingSettings())
    old, current = make_job(sessions), make_job(sessions)
    write_results(tmp_path)  # other objects (other UIDs) for the other series
    enqueue_results(sessions, job_id=old, results_dir=results, destinations=[PACS])
    enqueue_results(sessions, job_id=current, results_dir=tmp_path, destinations=[PACS])
    open_next_revision(sessions, old)  # e.g. the PACS sent the rest of the series after revision 1 was analysed
    claimed = outbox.claim("pacs", limit=10)
    assert {c.job_id for c in claimed} == {current} and len(claimed) == 3
    states = {(r.job_id, r.state) for r in rows(sessions)}
    assert states == {(old, SendState.superseded), (current, SendState.sending)}
    assert all("revision 2" in (r.last_error or "") for r in rows(sessions) if r.job_id == old)
    assert requeue_failed(sessions) == []  # an operator's retry does not bring them back
    with sessions() as s:
        assert s.scalar(select(Event.message).where(Event.kind == "send_superseded", Event.job_id == old))
    assert outbox_summary(sessions())["pacs"]["counts"]["superseded"] == 3


def test_a_job_whose_series_moved_on_while_it_ran_queues_nothing(sessions: sessionmaker[Session]) -> None:
    queue = JobQueue(sessions, worker="w1")
    job_id = make_job(sessions)
    with sessions.begin() as s:
        row = s.get(Job, job_id)
        assert row is not None
        row.state = JobState.queued
    claimed = queue.claim()
    assert claimed is not None and claimed.job_id == job_id
    open_next_revision(sessions, job_id)
    called: list[bool] = []
    assert queue.finish(job_id, JobState.done, also=lambda s: called.append(True))
    assert called == []  # nothing queued for sending
    with sessions() as s:
        row = s.get(Job, job_id)
        assert row is not None and row.state == JobState.superseded
        assert "revision 2 of the series arrived while it ran" in (row.error or "")


def test_retry_makes_waiting_sends_due_now(sessions: sessionmaker[Session], results: Path) -> None:
    """The operator fixed the destination: sends still in their backoff go now, with a fresh set of attempts."""
    outbox = Outbox(sessions, SendingSettings(retry_base_s=3600, max_attempts=5))
    job = make_job(sessions)
    enqueue_results(sessions, job_id=job, results_dir=results, destinations=[VIEWER])
    (item,) = outbox.claim("viewer", limit=10)
    outbox.mark_retry(item.id, error="peer down")
    assert outbox.claim("viewer", limit=10) == []  # an hour's backoff
    assert requeue_failed(sessions, job_id=job) == [("viewer", 1)]
    (again,) = outbox.claim("viewer", limit=10)
    assert again.attempt == 1


def test_results_superseded_by_a_revision_that_came_to_nothing_go_out_after_all(sessions: sessionmaker[Session],
                                                                                results: Path) -> None:
    from node.db.jobs import restore_superseded

    outbox = Outbox(sessions, SendingSettings())
    job = make_job(sessions)
    enqueue_results(sessions, job_id=job, results_dir=results, destinations=[VIEWER])
    open_next_revision(sessions, job)
    assert outbox.claim("viewer", limit=10) == []  # superseded
    with sessions.begin() as s:  # revision 2's only image was never acknowledged: back to revision 1
        row = s.get(Job, job)
        assert row is not None
        series = s.get(Series, row.series_id)
        assert series is not None
        series.revision, series.state = 1, SeriesState.complete
        restore_superseded(s, series_id=series.id, revision=1)
    assert [c.job_id for c in outbox.claim("viewer", limit=10)] == [job]


def test_resend_starts_a_fresh_delivery_and_refuses_a_superseded_revision(sessions: sessionmaker[Session],
                                                                          results: Path) -> None:
    outbox = Outbox(sessions, SendingSettings())
    job = make_job(sessions)
    enqueue_results(sessions, job_id=job, results_dir=results, destinations=[VIEWER])
    (item,) = outbox.claim("viewer", limit=10)
    outbox.mark_sent(item.id, status=0)
    outbox.mark_commitment_requested([item.id], "1.2.3.4")
    assert requeue_failed(sessions, job_id=job, resend=True) == [("viewer", 1)]
    (row,) = rows(sessions)
    assert row.state == SendState.pending and (row.commitment_uid, row.commitment_requested_at, row.sent_at) == (
        None, None, None)
    assert outbox.expire_commitments(now=utcnow() + dt.timedelta(days=1)) == []  # no stale request to time out
    open_next_revision(sessions, job)
    with pytest.raises(LungnodeError, match="revision 2 has superseded"):
        requeue_failed(sessions, job_id=job, resend=True)
