"""The sender inside ``lungnode serve``: pending sends survive a restart (rows a stopped node left in
'sending' go back to the queue), are delivered exactly once when the peer is back, and ``lungnode
status --json`` shows the outbox per destination. Also the outbox on a real PostgreSQL."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from node.config import Destination, SendingSettings
from node.db.models import OutboxItem, SendState
from node.db.session import make_engine, make_sessionmaker, upgrade_schema
from node.send.outbox import Outbox, enqueue_results, requeue_failed
from tests.conftest import NodeFactory
from tests.helpers.net import free_port
from tests.helpers.node_proc import run_cli
from tests.helpers.outbox import RecordingSCP, make_job, write_results
from tests.helpers.wait import wait_until
from tests.integration.test_postgres import pg_server, pg_url  # noqa: F401


@pytest.fixture
def peer_port() -> Iterator[int]:
    yield free_port()


def test_pending_sends_survive_a_restart_and_are_delivered_once(node_factory: NodeFactory, tmp_path: Path,
                                                                 peer_port: int) -> None:
    dest = {"name": "peer", "ae_title": "PEER", "host": "127.0.0.1", "port": peer_port}
    node = node_factory(settings={
        "destinations": [dest], "workers": {"count": 0},
        "sending": {"retry_base_s": 0.2, "retry_max_delay_s": 0.5, "poll_interval_s": 0.1, "max_attempts": 100},
    })
    node.wait_for_log(r"event=sender_started destinations=peer")
    engine = make_engine(node.db_url)
    sessions = make_sessionmaker(engine)
    objects = write_results(tmp_path / "results")
    enqueue_results(sessions, job_id=make_job(sessions), results_dir=tmp_path / "results",
                    destinations=[Destination.model_validate(dest)])
    engine.dispose()

    def attempted() -> bool:
        rows = node.query("SELECT attempts, last_error FROM outbox")
        return len(rows) == 3 and all(r["attempts"] >= 1 and "cannot connect" in (r["last_error"] or "") for r in rows)
    wait_until(attempted, timeout=20, what="failed attempts while the peer is down")
    status = node.status()["outbox"]["peer"]
    assert status["counts"]["pending"] + status["counts"]["sending"] == 3 and "cannot connect" in status["last_error"]
    assert node.stop() == 0
    assert "event=sender_stopped" in node.log

    # As if the node had died mid-send: one row still marked 'sending'.
    import sqlite3

    with sqlite3.connect(node.db_path) as conn:
        conn.execute("UPDATE outbox SET state = 'sending' WHERE id = (SELECT min(id) FROM outbox)")
    scp = RecordingSCP(peer_port).start()
    try:
        node.start()
        node.wait_for_log(r"event=send_interrupted_requeued count=1")

        def delivered() -> bool:
            return [r["state"] for r in node.query("SELECT state FROM outbox")] == ["sent"] * 3
        wait_until(delivered, timeout=30, what="all rows sent after the restart")
        assert scp.received == Counter({o.sop_instance_uid: 1 for o in objects})
        assert node.status()["outbox"]["peer"]["counts"]["sent"] == 3
    finally:
        scp.stop()


def test_outbox_on_postgresql(pg_url: str, tmp_path: Path, peer_port: int) -> None:  # noqa: F811
    engine = make_engine(pg_url)
    upgrade_schema(engine)
    sessions = make_sessionmaker(engine)
    dests = [Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=peer_port),
             Destination(name="viewer", ae_title="V", host="127.0.0.1", port=peer_port, objects=["key_image"])]
    write_results(tmp_path / "results")
    job = make_job(sessions)
    assert enqueue_results(sessions, job_id=job, results_dir=tmp_path / "results", destinations=dests) == 4
    assert enqueue_results(sessions, job_id=job, results_dir=tmp_path / "results", destinations=dests) == 0
    outbox = Outbox(sessions, SendingSettings(max_attempts=1))
    first = outbox.claim("pacs", limit=2)
    second = outbox.claim("pacs", limit=10)  # SKIP LOCKED / state: the claimed rows are not handed out again
    assert len(first) == 2 and len(second) == 1
    for item in first + second:
        assert outbox.mark_retry(item.id, error="refused") == SendState.failed
    # the failed rows with a fresh set of attempts, and the viewer's row (never tried yet) due now
    assert requeue_failed(sessions) == [("pacs", 3), ("viewer", 1)]
    with sessions() as s:
        states = sorted((r.destination, r.state.value) for r in s.scalars(select(OutboxItem)))
    assert states == [("pacs", "pending")] * 3 + [("viewer", "pending")]
    engine.dispose()


def test_a_series_sent_in_two_parts_puts_only_the_whole_series_results_in_the_pacs(
        node_factory: NodeFactory, tmp_path: Path, peer_port: int) -> None:
    """A scanner still reconstructing sends half a series, then the rest: both parts are analysed as they
    complete, but only the whole series' results may reach the PACS (they were both sent before)."""
    import json

    from tests.helpers.dcmtk import storescu
    from tests.helpers.onnx_models import make_models_dir
    from tests.helpers.series import make_series

    models = make_models_dir(tmp_path / "models")
    node = node_factory(settings={
        "destinations": [{"name": "peer", "ae_title": "PEER", "host": "127.0.0.1", "port": peer_port}],
        "inference": {"models_dir": str(models), "device": "cpu", "threads": 1},
        "workers": {"count": 1, "poll_interval_s": 0.2}, "selection": {"min_slices": 10},
        "sending": {"retry_base_s": 0.2, "retry_max_delay_s": 0.5, "poll_interval_s": 0.1, "max_attempts": 1000},
    })
    series = make_series(tmp_path / "ct", slices=40, matrix=96)
    files = sorted(series.folder.rglob("*.dcm"))
    for f in files:  # the number IT will ask about
        ds = pydicom.dcmread(f)
        ds.AccessionNumber = "ACC-TRACE-7"
        ds.save_as(f)

    def job_done(revision: int) -> dict:
        def done() -> dict | None:
            jobs = [j for j in node.jobs(series.series_uid) if j["revision"] == revision]
            return jobs[0] if jobs and jobs[0]["state"] in ("done", "rejected", "failed", "superseded") else None
        return wait_until(done, timeout=90, what=f"the job of revision {revision} to finish")

    assert storescu(node.port, *files[:20]).returncode == 0  # the destination is down meanwhile
    first = job_done(1)
    assert first["state"] == "done", first
    assert storescu(node.port, *files[20:]).returncode == 0
    second = job_done(2)
    assert second["state"] == "done", second
    scp = RecordingSCP(peer_port).start()
    try:
        def listed(job: dict) -> set[str]:
            out = node.spool_dir / "results" / f"job-{job['id']}" / "outputs.json"
            return {o["sop_instance_uid"] for o in json.loads(out.read_text())["objects"]}

        wanted = listed(second)
        wait_until(lambda: set(scp.received) == wanted, timeout=30, what="revision 2's results at the destination")
        rows = node.query("SELECT job_id, state FROM outbox")
        assert {r["state"] for r in rows if r["job_id"] == first["id"]} == {"superseded"}
        assert not set(scp.received) & listed(first)  # the half series' answer never reached the PACS
        assert "event=send_superseded" in node.log
    finally:
        scp.stop()

    # IT's question "where are the results of accession X?", answered from the ledger, the number never echoed
    trace = run_cli("status", "--config", node.config_path, "--accession", "ACC-TRACE-7")
    assert trace.returncode == 0, trace.stderr
    out = trace.stdout
    assert f"study {series.study_uid}" in out and f"series {series.series_uid}" in out and "ACC-TRACE-7" not in out
    assert out.count("sent by STORESCU from 127.0.0.1") == 2  # two associations: the two parts
    assert "series_complete" in out and f"job #{first['id']}" in out and f"job #{second['id']}" in out
    first_block = out.split(f"job #{first['id']} (revision 1)")[1].split(f"job #{second['id']} (revision 2)")[0]
    second_block = out.split(f"job #{second['id']} (revision 2)")[1]
    assert "superseded" in first_block and " sent " not in first_block
    assert second_block.count(" sent ") == len(wanted) and "status 0x0000" in second_block
    as_json = json.loads(run_cli("status", "--config", node.config_path, "--job", str(first["id"]), "--json").stdout)
    [study] = as_json["studies"]
    [traced] = study["series"]
    assert [j["id"] for j in traced["jobs"]] == [first["id"], second["id"]]
    assert {o["state"] for o in traced["jobs"][1]["sends"]} == {"sent"}
    missing = run_cli("status", "--config", node.config_path, "--accession", "NOT-HERE")
    assert missing.returncode == 1 and "nothing received matches --accession" in missing.stderr
