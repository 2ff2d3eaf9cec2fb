"""The ledger on a real PostgreSQL server: migrations, receiving, assembly and the job queue.

A private cluster is created with Debian's initdb in a temporary folder and listens on 127.0.0.1
only. Skipped, with the reason, where the PostgreSQL server binaries or psycopg are missing.
"""

from __future__ import annotations

import datetime as dt
import glob
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError

from node.config import AssemblySettings
from node.db.ingest import IngestLedger, Outcome
from node.db.jobs import JobQueue
from node.db.models import AssociationState, Job, JobState, Series, SeriesState, utcnow
from node.db.session import (
    POSTGRES_CONNECT,
    claim_ledger,
    clock_skew_s,
    make_engine,
    make_sessionmaker,
    release_ledger,
    upgrade_schema,
    warn_on_clock_skew,
)
from node.db.status import storage_summary
from node.db.trace import trace
from node.errors import LungnodeError
from node.receive.assembler import Assembler
from node.receive.inspect import CT_IMAGE_STORAGE, InstanceHeader
from tests.conftest import NodeFactory
from tests.helpers.dcmtk import have_dcmtk, storescu
from tests.helpers.series import make_series

PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    bindir: Path
    port: int
    data: Path
    pg_ctl: list[str]  # pg_ctl as the cluster's owner, with the folder and options
    options: str

    def stop(self) -> None:
        """Stop the server the way a restart by systemd does (connections are cut)."""
        _run([*self.pg_ctl, "-m", "fast", "stop"])

    def start(self) -> None:
        _run([*self.pg_ctl, "-o", self.options, "-l", str(self.data.parent / "log"), "-w", "start"])


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PgServer]:
    if not PG_BIN:
        pytest.skip("PostgreSQL server binaries not installed (Debian package postgresql)")
    pytest.importorskip("psycopg", reason="psycopg not installed (pip install -e '.[postgres]')")
    bindir = Path(PG_BIN[-1])
    # Not under pytest's tmp folder: its parents are private to root and the postgres user must reach it.
    root = Path(tempfile.mkdtemp(prefix="lungnode-pg-"))
    data = root / "data"
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL")
        shutil.chown(root, "postgres")
        os.chmod(root, 0o700)
        run_as = ["runuser", "-u", "postgres", "--"]
    _run([*run_as, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "lungnode"])
    port = _free_port()
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    server = PgServer(bindir, port, data, [*run_as, str(bindir / "pg_ctl"), "-D", str(data)], opts)
    server.start()
    try:
        yield server
    finally:
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: PgServer, request: pytest.FixtureRequest) -> str:
    """A fresh, empty database for each test."""
    bindir, port = pg_server.bindir, pg_server.port
    name = request.node.name.lower()[:60]
    _run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "lungnode", name])
    return f"postgresql+psycopg://lungnode@127.0.0.1:{port}/{name}"


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}")


def _header(series: str, sop: str, study: str = "1.2.3.1") -> InstanceHeader:
    return InstanceHeader(
        sop_class_uid=CT_IMAGE_STORAGE, sop_instance_uid=sop, study_instance_uid=study, series_instance_uid=series,
        transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CT", series_number=1, series_description="chest",
        # Non-conformant lengths from old senders (a 10-character date, a 20-character accession) must
        # not make PostgreSQL refuse the row.
        instance_number=1, patient_id="P", accession_number="A" * 20, study_date="2026.01.01", manufacturer="x",
        software_versions=None,
    )


def test_connections_name_the_node_and_a_silent_server_is_given_up_on(
    pg_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The DBA sees whose sessions these are; a server that accepts TCP and never answers (a host switched off
    behind a proxy, a hung server) fails the connection after connect_timeout instead of holding it."""
    engine = make_engine(pg_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT current_setting('application_name')").scalar() == "lungnode"
    engine.dispose()

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nothing ever answers
        port = silent.getsockname()[1]
        monkeypatch.setitem(POSTGRES_CONNECT, "connect_timeout", 2)  # the node's default is 10 s
        outcome: list[BaseException | None] = []

        def connect() -> None:
            try:
                make_engine(f"postgresql+psycopg://lungnode@127.0.0.1:{port}/x").connect()
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
                outcome.append(exc)

        thread = threading.Thread(target=connect, daemon=True)
        thread.start()
        thread.join(30)
    assert outcome and isinstance(outcome[0], OperationalError), "the connection was still waiting after 30 s"


def test_a_clock_off_the_database_servers_is_named_at_start(pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Workers on several machines compare their times through the ledger: the server's clock is the reference."""
    engine = make_engine(pg_url)
    try:
        assert abs(clock_skew_s(engine) or 99) < 2  # this machine is the server's
        behind = clock_skew_s(engine, now=utcnow() - dt.timedelta(minutes=3))
        assert behind is not None and 178 < behind < 182, behind
        with caplog.at_level(logging.WARNING, logger="node.db.session"):
            warn_on_clock_skew(engine)
        assert "clock_skew" not in caplog.text, "a synchronised clock is not named"
        with caplog.at_level(logging.WARNING, logger="node.db.session"):
            warn_on_clock_skew(engine, now=utcnow() - dt.timedelta(minutes=3))
        assert "event=clock_skew database_ahead_s=+18" in caplog.text and "NTP" in caplog.text, caplog.text
    finally:
        engine.dispose()
    assert clock_skew_s(make_engine("sqlite://")) is None, "SQLite: one machine, one clock"


def test_a_second_node_on_the_same_ledger_is_refused_and_the_lock_holds_no_transaction_open(pg_url: str) -> None:
    """Two nodes with their own spools on one PostgreSQL ledger would each take the other's open associations and
    running jobs for a crash's leftovers at start. The lock is the session's: no transaction stays open for days."""
    first, second = make_engine(pg_url), make_engine(pg_url)
    try:
        held = claim_ledger(first)
        assert held is not None
        backend = held.connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
        with second.connect() as conn:
            state = conn.scalar(text("SELECT state FROM pg_stat_activity WHERE pid = :pid"), {"pid": backend})
        assert state == "idle", state
        with pytest.raises(LungnodeError, match="another lungnode serve is using the database"):
            claim_ledger(second)
        release_ledger(held)  # the node stopped (or died: the server ends its session and the lock with it)
        again = claim_ledger(second)
        assert again is not None
        release_ledger(again)
    finally:
        first.dispose()
        second.dispose()
    assert claim_ledger(make_engine("sqlite://")) is None  # one machine: the spool lock covers it


def test_serve_on_postgresql_receives_and_a_second_node_on_its_ledger_is_refused(
        pg_url: str, tmp_path: Path, node_factory: NodeFactory) -> None:
    """The whole node on PostgreSQL (`lungnode serve`, status from the CLI), and the ledger's lock in the real
    start-up path: another node with its own spool but the same database stops before it repairs anything."""
    if not have_dcmtk("storescu"):
        pytest.skip("dcmtk's storescu is not installed")
    node = node_factory(settings={"storage": {"database_url": pg_url}})
    series = make_series(tmp_path / "ct", slices=5, matrix=32)
    assert storescu(node.port, series.folder).returncode == 0
    status = node.status()
    assert status["database"].startswith("postgresql+psycopg://") and status["counts"]["series"] == 1
    second = node_factory("second", settings={"storage": {"database_url": pg_url}}, start=False)
    with pytest.raises(AssertionError, match="another lungnode serve is using the database"):
        second.start()
    assert second.exit_codes == [2] and node.running
    assert node.stop() == 0  # its lock goes with it: the other node may now start on the ledger
    second.start()
    assert second.status()["counts"]["series"] == 1


def test_ledger_on_postgresql(pg_url: str, tmp_path: Path) -> None:
    engine = make_engine(pg_url)
    upgrade_schema(engine)
    upgrade_schema(engine)  # idempotent
    sessions = make_sessionmaker(engine)
    ledger = IngestLedger(sessions)
    assoc = ledger.open_association(calling_ae="SCU", called_ae="LUNGNODE", host="127.0.0.1", port=1)
    for i in range(5):
        rec = ledger.record_instance(_header("1.2.3.10", f"1.2.3.10.{i}"), path=tmp_path / f"{i}.dcm", size_bytes=1,
                                     association_id=assoc, own_output=False)
        assert rec.outcome == Outcome.stored and rec.revision == 1
    dup = ledger.record_instance(_header("1.2.3.10", "1.2.3.10.0"), path=tmp_path / "0.dcm", size_bytes=1,
                                 association_id=assoc, own_output=False)
    assert dup.outcome == Outcome.duplicate
    ledger.close_association(assoc, AssociationState.released)

    assembler = Assembler(AssemblySettings(quiet_period_s=60, release_grace_s=0), sessions)
    assert assembler.complete_due() == 1
    assert assembler.complete_due() == 0
    # A late instance opens revision 2 and, once complete, a second job.
    late = ledger.record_instance(_header("1.2.3.10", "1.2.3.10.99"), path=tmp_path / "99.dcm", size_bytes=1,
                                  association_id=None, own_output=False)
    assert late.revision == 2 and late.new_revision
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=120)
    assert assembler.complete_due(now=later) == 1
    with sessions() as s:
        series = s.query(Series).one()
        assert series.state == SeriesState.complete and series.revision == 2 and series.instance_count == 6
        assert sorted(j.revision for j in s.query(Job)) == [1, 2]
        # lungnode status: the list with the images held, and one study's trace, on PostgreSQL's SQL
        assert storage_summary(s, tmp_path, 0)["images_bytes"] == 6
        [study] = trace(s, series="1.2.3.10")["studies"]
        [traced] = study["series"]
        assert [a["calling_ae"] for a in traced["senders"]] == ["SCU"] and traced["senders"][0]["instances"] == 5
        assert [j["revision"] for j in traced["jobs"]] == [1, 2]
        assert [e["kind"] for e in traced["events"]].count("series_complete") == 2
    engine.dispose()


def test_two_workers_never_claim_the_same_job(pg_url: str, tmp_path: Path) -> None:
    engine = make_engine(pg_url)
    upgrade_schema(engine)
    sessions = make_sessionmaker(engine)
    ledger = IngestLedger(sessions)
    for n in range(20):
        ledger.record_instance(_header(f"1.2.4.{n}", f"1.2.4.{n}.1", study="1.2.4"), path=tmp_path / f"{n}",
                               size_bytes=1, association_id=None, own_output=False)
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=120)
    Assembler(AssemblySettings(quiet_period_s=60), sessions).complete_due(now=later)
    with sessions() as s:
        queued = {j.id for j in s.query(Job).filter(Job.state == JobState.queued)}
    assert len(queued) == 20

    claims: dict[str, list[int]] = {"a": [], "b": []}

    def work(name: str) -> None:
        q = JobQueue(sessions, worker=name)
        while (job := q.claim()) is not None:
            claims[name].append(job.job_id)
            time.sleep(0.005)
            q.finish(job.job_id, JobState.done)

    threads = [threading.Thread(target=work, args=(n,)) for n in claims]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    both = claims["a"] + claims["b"]
    assert sorted(both) == sorted(queued), "every job claimed exactly once"
    assert claims["a"] and claims["b"], "both workers got work (SKIP LOCKED lets them proceed in parallel)"
    engine.dispose()


def test_values_postgresql_cannot_hold_are_cleaned_before_they_reach_the_ledger(pg_url: str, tmp_path: Path) -> None:
    """A 12-digit Instance Number (IS allows it) or a NUL in a Patient ID made PostgreSQL refuse the row: the
    instance was refused as 'database unavailable' and its spool file stopped every later start."""
    from pydicom import dcmread

    from node.receive.inspect import inspect_instance
    from tests.helpers.series import make_ct_dataset

    ds = make_ct_dataset(study_uid="1.2.3.7", series_uid="1.2.3.70")
    ds.InstanceNumber, ds.SeriesNumber, ds.PatientID = "999999999999", "-3000000000", "P\x00X"
    path = tmp_path / "odd.dcm"
    ds.save_as(path, enforce_file_format=True)
    header = inspect_instance(path, sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID))
    assert (header.instance_number, header.series_number, header.patient_id) == (None, None, "PX")
    engine = make_engine(pg_url)
    upgrade_schema(engine)
    ledger = IngestLedger(make_sessionmaker(engine))
    rec = ledger.record_instance(header, path=path, size_bytes=1, association_id=None, own_output=False)
    assert rec.outcome == Outcome.stored
    assert dcmread(path).PatientID == "P\x00X"  # the file keeps what was sent
    engine.dispose()


def test_retention_a_series_sent_again_and_the_settled_claim_on_postgresql(pg_url: str, tmp_path: Path) -> None:
    """Retention and resend statements on PostgreSQL's SQL: retention marks instances purged, an instance sent again
    restores its row under a row lock and opens a new revision, a job waits for its study to settle, a UID known
    for another study is refused, and the patient identifiers are blanked after their days."""
    from node.errors import InstanceRejected
    from node.receive.retention import forget_identifiers, purge_expired
    from node.receive.spool import Spool

    engine = make_engine(pg_url)
    upgrade_schema(engine)
    sessions = make_sessionmaker(engine)
    ledger = IngestLedger(sessions)
    for i in range(3):
        ledger.record_instance(_header("1.2.3.20", f"1.2.3.20.{i}"), path=tmp_path / f"{i}.dcm", size_bytes=1,
                               association_id=None, own_output=False)
    assembler = Assembler(AssemblySettings(quiet_period_s=1, release_grace_s=0), sessions)
    now = dt.datetime.now(dt.timezone.utc)
    assert assembler.complete_due(now=now + dt.timedelta(seconds=5)) == 1
    queue = JobQueue(sessions, worker="w", study_settle_s=3600)
    assert queue.claim() is None, "its study received an image a moment ago"
    claimed = JobQueue(sessions, worker="w", study_settle_s=0).claim()
    assert claimed is not None
    assert queue.finish(claimed.job_id, JobState.done)
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    assert purge_expired(spool, sessions, days=1, now=now + dt.timedelta(days=2)) == 1
    again = ledger.record_instance(_header("1.2.3.20", "1.2.3.20.1"), path=tmp_path / "1.dcm", size_bytes=1,
                                   association_id=None, own_output=False)
    assert (again.outcome, again.restored, again.revision, again.new_revision) == (Outcome.stored, True, 2, True)
    with pytest.raises(InstanceRejected):
        ledger.record_instance(_header("1.2.3.21", "1.2.3.20.0", study="1.2.3.9"), path=tmp_path / "x.dcm",
                               size_bytes=1, association_id=None, own_output=False)
    with sessions() as s:
        assert s.query(Series).filter(Series.series_instance_uid == "1.2.3.21").count() == 0
    assert assembler.complete_due(now=now + dt.timedelta(seconds=10)) == 1
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE jobs SET state = 'done'")
    assert purge_expired(spool, sessions, days=1, now=now + dt.timedelta(days=4)) == 1
    assert forget_identifiers(sessions, days=1, now=now + dt.timedelta(hours=12)) == 0, "its images went just now"
    assert forget_identifiers(sessions, days=1, now=now + dt.timedelta(days=6)) == 1
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT patient_id, accession_number FROM studies").all() == [(None, None)]
        purged = conn.exec_driver_sql("SELECT count(*) FROM instances WHERE purged_at IS NOT NULL").scalar()
    assert purged == 3
    engine.dispose()


def test_rejection_notes_on_postgresql(pg_url: str, tmp_path: Path) -> None:
    """Replaced results found, noted once and never superseded, with PostgreSQL's row locks and NOT IN."""
    from tests.helpers.outbox import make_job, write_results
    from tests.unit.test_rejections import claim, deliver, finish, next_revision, notes

    engine = make_engine(pg_url)
    upgrade_schema(engine)
    sessions = make_sessionmaker(engine)
    first = make_job(sessions, study_uid="1.2.826.0.1.3680043.8.498.9")
    old = write_results(tmp_path / "r1", study_uid="1.2.826.0.1.3680043.8.498.9")
    assert finish(sessions, first, tmp_path / "r1") == 0
    deliver(sessions, first)
    second = next_revision(sessions, first)
    write_results(tmp_path / "r2", study_uid="1.2.826.0.1.3680043.8.498.9")
    assert finish(sessions, second, tmp_path / "r2") == 1
    assert finish(sessions, second, tmp_path / "r2") == 0
    [note] = notes(sessions)
    with engine.connect() as conn:
        named = conn.exec_driver_sql(f"SELECT sop_instance_uid FROM outbox WHERE rejected_by = {note.id}").scalars()
        assert set(named) == {o.sop_instance_uid for o in old}
    # The claim's EXISTS under FOR UPDATE SKIP LOCKED: the results go, the note waits; a newer revision drops it.
    assert {kind for kind, _ in claim(sessions)} == {"seg", "sr", "key_image"}
    assert claim(sessions) == []
    with engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE outbox SET state = 'pending' WHERE job_id = {second} AND kind <> 'rejection'")
    next_revision(sessions, first)
    assert claim(sessions) == []
    assert notes(sessions)[0].state.value == "superseded"
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM outbox WHERE rejected_by IS NOT NULL").scalar() == 0
    engine.dispose()


def test_priorities_on_postgresql(pg_url: str) -> None:
    """A job's priority from its associations, and the claim order, with PostgreSQL's IN and ORDER BY ... DESC; a low
    job that waited past the limit comes before the medium one (CASE in ORDER BY under FOR UPDATE SKIP LOCKED)."""
    from tests.unit.test_assembler import at
    from tests.unit.test_priority import send_series

    engine = make_engine(pg_url)
    upgrade_schema(engine)
    sessions = make_sessionmaker(engine)
    ledger = IngestLedger(sessions)
    rules = AssemblySettings(quiet_period_s=10, priority_by_caller={"RESEARCH": "low"})
    low = send_series(ledger, 0, caller="RESEARCH")
    medium = send_series(ledger, 1, caller="PACS")
    high = send_series(ledger, 2, caller="PACS", cstore_level=1)
    assert Assembler(rules, sessions).complete_due(now=at(60)) == 3
    queue = JobQueue(sessions, worker="w", study_settle_s=0)
    with sessions() as s:
        ids = [s.scalar(select(Series.id).where(Series.series_instance_uid == x.series_uid)) for x in (high, medium, low)]
    claimed = [job.series_id for job in iter(queue.claim, None)]
    assert claimed == ids
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE jobs SET state = 'queued', created_at = created_at - interval '2 hours' "
                             "WHERE series_id = %s", (ids[2],))
        conn.exec_driver_sql("UPDATE jobs SET state = 'queued' WHERE series_id = %s", (ids[1],))
    aged = JobQueue(sessions, worker="w", study_settle_s=0, low_max_wait_s=3600)
    assert [job.series_id for job in iter(aged.claim, None)] == [ids[2], ids[1]]
    engine.dispose()


def test_a_worker_waits_out_a_database_restart_and_runs_the_job_it_lost_again(
        pg_server: PgServer, pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """PostgreSQL restarted while a worker analysed a series: the worker neither exited (the error escaped its
    loop) nor recorded the job failed for it; it waited, said so once, and once the server was back put the job
    it could not record back in the queue and ran it again."""
    import logging

    import pydicom

    from node.config import Config, InferenceSettings, SelectionSettings, StorageSettings, WorkerSettings
    from node.pipeline.worker import Worker
    from node.receive.inspect import inspect_instance
    from tests.helpers.faults import FifoTrap
    from tests.helpers.onnx_models import make_models_dir
    from tests.helpers.wait import wait_until
    from tests.integration.test_workers import MIN_SLICES, chest

    engine = make_engine(pg_url)
    upgrade_schema(engine)
    sessions = make_sessionmaker(engine)
    series = chest(tmp_path, "chest")
    ledger = IngestLedger(sessions)
    received = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)
    for path in series.files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        header = inspect_instance(path, sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
                                  check_request=False)
        ledger.record_instance(header, path=path, size_bytes=1, association_id=None, own_output=False,
                               received_at=received)
    assert Assembler(AssemblySettings(quiet_period_s=1), sessions).complete_due(
        now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=5)) == 1
    config = Config(storage=StorageSettings(spool_dir=tmp_path / "spool", database_url=pg_url, min_free_disk_mb=0),
                    inference=InferenceSettings(models_dir=make_models_dir(tmp_path / "models"), device="cpu", threads=1),
                    workers=WorkerSettings(lease_s=120, poll_interval_s=0.05, max_attempts=3),
                    selection=SelectionSettings(min_slices=MIN_SLICES))
    trap = FifoTrap(series.files[len(series.files) // 2])  # the worker blocks reading this file, mid-job
    worker = Worker(config, name="w")
    caplog.set_level(logging.INFO, logger="node.pipeline.worker")
    thread = threading.Thread(target=worker.loop)
    thread.start()
    try:
        def job() -> dict:
            with engine.connect() as conn:
                return dict(conn.exec_driver_sql("SELECT state, attempts, error FROM jobs").mappings().one())

        wait_until(lambda: job()["state"] == "running", timeout=30, what="the worker to claim the job")
        pipe = trap.wait_for_reader()  # the worker has its files from the ledger and is reading them: mid-job
        engine.dispose()
        pg_server.stop()
        try:
            # The blocked reader gets the file through the pipe; the analysis goes on, and recording its outcome
            # meets the stopped server.
            trap.feed(pipe)
            trap.release()
            wait_until(lambda: "event=worker_error " in caplog.text, timeout=30, what="the worker to say the database "
                       "is down")
            time.sleep(2)
            assert thread.is_alive(), "the worker must wait for the database, not exit"
            assert caplog.text.count("event=worker_error ") == 1, "said once, not at every try"
        finally:
            pg_server.start()
        final = wait_until(lambda: (j := job())["state"] not in ("queued", "running") and j, timeout=60,
                           what="the job to run again and finish")
        assert final == {"state": "done", "attempts": 2, "error": None}
        with engine.connect() as conn:
            kinds = conn.exec_driver_sql("SELECT kind FROM events WHERE job_id IS NOT NULL ORDER BY id").scalars().all()
        assert kinds == ["series_complete", "job_started", "job_requeued", "job_started", "job_done"]
        assert "event=worker_error_cleared" in caplog.text
    finally:
        worker.stop.set()
        thread.join(30)
        engine.dispose()
