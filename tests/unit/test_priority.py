"""Job priority on a real SQLite ledger: a series' job takes the most urgent level of the associations that sent
its images (calling AE rule first, then C-STORE Priority HIGH), and workers take high before medium before low,
the oldest first within a level."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.config import AssemblySettings
from node.db.ingest import IngestLedger
from node.db.jobs import JobQueue
from node.db.models import Job, Series
from node.receive.assembler import Assembler
from node.receive.priority import from_cstore, priority_name
from tests.unit.test_assembler import Sender, at


def test_cstore_priority_levels() -> None:
    assert [from_cstore(p) for p in (0x0000, 0x0001, 0x0002, None, 7)] == [0, 1, 0, 0, 0]  # LOW: medium
    assert [priority_name(level) for level in (1, 0, -1)] == ["high", "medium", "low"]


def send_series(ledger: IngestLedger, t: float, *, caller: str | None, cstore_level: int | None = None,
                images: int = 2) -> Sender:
    """A series of ``images`` images sent at ``t`` over one association from ``caller`` (None: adopted at start-up,
    no association); ``cstore_level`` as the SCP records it (None: only MEDIUM requests, nothing written)."""
    sender = Sender(ledger)
    assoc = None
    if caller is not None:
        assoc = ledger.open_association(calling_ae=caller, called_ae="LUNGNODE", host="127.0.0.1", port=40000)
        if cstore_level is not None:
            ledger.note_priority(assoc, cstore_level)
    for i in range(images):
        sender.send(t + i * 0.1, assoc=assoc)
    return sender


def job_priority(sessions: sessionmaker[Session], sender: Sender) -> int:
    with sessions() as s:
        level = s.scalar(select(Job.priority).join(Series).where(Series.series_instance_uid == sender.series_uid))
        assert level is not None
        return int(level)


def claim_all(queue: JobQueue) -> list[int]:
    claimed = []
    while (job := queue.claim()) is not None:
        claimed.append(job.series_id)
    return claimed


@pytest.mark.parametrize(("caller", "cstore_level", "expected"), [
    ("PACS", None, 0),        # MEDIUM requests, no rule
    ("PACS", 1, 1),           # a HIGH C-STORE
    ("ED_CT", None, 1),       # the rule for its calling AE title
    ("RESEARCH", 1, -1),      # a rule wins over the C-STORE Priority
    (None, None, 0),          # adopted at start-up: no association, medium
])
def test_a_job_takes_the_level_of_the_associations_that_sent_its_images(
        sessions: sessionmaker[Session], ledger: IngestLedger, caller: str | None, cstore_level: int | None,
        expected: int) -> None:
    rules = AssemblySettings(quiet_period_s=10, priority_by_caller={"ED_CT": "high", "RESEARCH": "low"})
    sender = send_series(ledger, 0, caller=caller, cstore_level=cstore_level)
    assert Assembler(rules, sessions).complete_due(now=at(60)) == 1
    assert job_priority(sessions, sender) == expected


def test_the_most_urgent_association_of_the_revision_decides(sessions: sessionmaker[Session],
                                                              ledger: IngestLedger) -> None:
    rules = AssemblySettings(quiet_period_s=10, priority_by_caller={"RESEARCH": "low"})
    sender = send_series(ledger, 0, caller="RESEARCH")
    urgent = ledger.open_association(calling_ae="PACS", called_ae="LUNGNODE", host="127.0.0.1", port=40001)
    ledger.note_priority(urgent, 1)
    sender.send(1, assoc=urgent)
    Assembler(rules, sessions).complete_due(now=at(60))
    assert job_priority(sessions, sender) == 1


def test_workers_take_high_then_medium_then_low_the_oldest_first(sessions: sessionmaker[Session],
                                                                 ledger: IngestLedger) -> None:
    rules = AssemblySettings(quiet_period_s=10, priority_by_caller={"ED_CT": "high", "RESEARCH": "low"})
    order = [("RESEARCH", 0), ("PACS", 1), ("ED_CT", 2), ("PACS", 3), ("ED_CT", 4), ("RESEARCH", 5)]
    senders = [send_series(ledger, t, caller=caller) for caller, t in order]
    assert Assembler(rules, sessions).complete_due(now=at(60)) == len(order)
    claimed = claim_all(JobQueue(sessions, worker="w", study_settle_s=0))
    with sessions() as s:
        ids = {sender.series_uid: s.scalar(select(Series.id).where(Series.series_instance_uid == sender.series_uid))
               for sender in senders}
    expected = [senders[i] for i in (2, 4, 1, 3, 0, 5)]  # ED_CT at 2 and 4, PACS at 1 and 3, RESEARCH at 0 and 5
    assert claimed == [ids[sender.series_uid] for sender in expected]


def test_the_queue_listing_shows_the_order_workers_take(sessions: sessionmaker[Session],
                                                        ledger: IngestLedger) -> None:
    """`lungnode status --queue`: most urgent first, oldest first within a level; a study still arriving waits
    out of turn and says so."""
    from node.db.status import queue, render_queue

    rules = AssemblySettings(quiet_period_s=10, priority_by_caller={"ED_CT": "high", "RESEARCH": "low"})
    senders = [send_series(ledger, t, caller=caller) for caller, t in (("RESEARCH", 0), ("PACS", 1), ("ED_CT", 2))]
    Assembler(rules, sessions).complete_due(now=at(60))
    with sessions() as s:
        listed = queue(s, study_settle_s=30, now=at(30))  # every study had an image less than 30 s before
        later = queue(s, study_settle_s=30, now=at(300))
    assert [j["series_instance_uid"] for j in listed["queued"]] == [senders[i].series_uid for i in (2, 1, 0)]
    assert [(j["position"], j["priority"]) for j in listed["queued"]] == [(1, "high"), (2, "medium"), (3, "low")]
    assert [j["settling"] for j in listed["queued"]] == [True, True, True]
    assert [j["settling"] for j in later["queued"]] == [False, False, False]
    assert later["running"] == 0  # (waiting_s counts from the job's real creation time: see the serve test)
    text = render_queue(later)
    assert text.splitlines()[0] == "queue: 3 waiting, 0 running; workers take them in this order"
    assert text.splitlines()[2].split()[:3] == ["1", f"#{later['queued'][0]['id']}", "high"]
    assert render_queue({"queued": [], "running": 2}) == "queue: empty (2 running)"


@pytest.mark.parametrize("low_max_wait_s", [3600.0, 0.0])
def test_a_low_job_that_waited_long_is_taken_as_medium_never_as_high(
        sessions: sessionmaker[Session], ledger: IngestLedger, low_max_wait_s: float) -> None:
    """Routine traffic must not hold a research backlog back for ever: past ``low_priority_max_wait_s`` a low job
    competes as medium (oldest first), still after any high one; 0 turns this off."""
    from node.db.status import queue, render_queue

    rules = AssemblySettings(quiet_period_s=10, priority_by_caller={"ED_CT": "high", "RESEARCH": "low"})
    order = [("RESEARCH", 0), ("PACS", 1), ("ED_CT", 2), ("RESEARCH", 3)]
    senders = [send_series(ledger, t, caller=caller) for caller, t in order]
    Assembler(rules, sessions).complete_due(now=at(60))
    with sessions.begin() as s:
        ids = [s.scalar(select(Series.id).where(Series.series_instance_uid == x.series_uid)) for x in senders]
        old = s.scalar(select(Job).where(Job.series_id == ids[0]))
        assert old is not None
        old.created_at -= dt.timedelta(hours=2)  # the first research job has waited two hours
        old_medium = s.scalar(select(Job).where(Job.series_id == ids[1]))
        assert old_medium is not None
        old_medium.created_at -= dt.timedelta(hours=3)  # a medium job is never lifted above the high one
    with sessions() as s:
        listed = queue(s, study_settle_s=0, low_max_wait_s=low_max_wait_s)
    aged = low_max_wait_s > 0
    assert [(j["priority"], j["taken_as"]) for j in listed["queued"]] == (
        [("high", "high"), ("low", "medium"), ("medium", "medium"), ("low", "low")] if aged
        else [("high", "high"), ("medium", "medium"), ("low", "low"), ("low", "low")])
    assert ("as medium" in render_queue(listed)) is aged
    claimed = claim_all(JobQueue(sessions, worker="w", study_settle_s=0, low_max_wait_s=low_max_wait_s))
    assert claimed == [ids[i] for i in ((2, 0, 1, 3) if aged else (2, 1, 0, 3))]
    by_uid = {x.series_uid: series_id for x, series_id in zip(senders, ids)}
    assert claimed == [by_uid[j["series_instance_uid"]] for j in listed["queued"]]  # the order the listing showed
