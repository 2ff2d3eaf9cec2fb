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


def test_late_images_withdraw_the_results_the_pacs_had_with_an_iocm_rejection_note(
        node_factory: NodeFactory, tmp_path: Path, peer_port: int) -> None:
    """The first part of a series is analysed and its results reach the PACS; the rest comes later. The whole
    series' results follow, and, since this PACS acts on IOCM (reject_replaced), a rejection note withdrawing
    exactly what it had of the first answer; it is a valid KOS in the same study."""
    import json
    import shutil
    import subprocess

    from tests.helpers.dcmtk import storescu
    from tests.helpers.onnx_models import make_models_dir
    from tests.helpers.series import make_series

    models = make_models_dir(tmp_path / "models")
    node = node_factory(settings={
        "destinations": [{"name": "pacs", "ae_title": "PEER", "host": "127.0.0.1", "port": peer_port,
                          "reject_replaced": True}],
        "inference": {"models_dir": str(models), "device": "cpu", "threads": 1},
        "workers": {"count": 1, "poll_interval_s": 0.2}, "selection": {"min_slices": 10},
        "sending": {"retry_base_s": 0.2, "retry_max_delay_s": 0.5, "poll_interval_s": 0.1},
    })
    series = make_series(tmp_path / "ct", slices=40, matrix=96)
    files = sorted(series.folder.rglob("*.dcm"))
    scp = RecordingSCP(peer_port).start()
    try:
        def results_of(revision: int) -> tuple[dict, set[str]]:
            def done() -> dict | None:
                jobs = [j for j in node.jobs(series.series_uid) if j["revision"] == revision]
                return jobs[0] if jobs and jobs[0]["state"] in ("done", "rejected", "failed") else None
            job = wait_until(done, timeout=90, what=f"the job of revision {revision} to finish")
            assert job["state"] == "done", job
            out = node.spool_dir / "results" / f"job-{job['id']}" / "outputs.json"
            return job, {o["sop_instance_uid"] for o in json.loads(out.read_text())["objects"]}

        assert storescu(node.port, *files[:20]).returncode == 0
        first, first_uids = results_of(1)
        wait_until(lambda: first_uids <= set(scp.received), timeout=30, what="revision 1's results at the PACS")
        assert storescu(node.port, *files[20:]).returncode == 0
        second, second_uids = results_of(2)

        def note() -> pydicom.Dataset | None:
            found = [ds for uid, ds in scp.datasets.items() if uid not in first_uids | second_uids]
            return found[0] if found and second_uids <= set(scp.received) else None
        rejection = wait_until(note, timeout=30, what="revision 2's results and the rejection note at the PACS")
    finally:
        scp.stop()
    title = rejection.ConceptNameCodeSequence[0]
    assert (rejection.Modality, title.CodeValue, title.CodingSchemeDesignator) == ("KO", "113001", "DCM")
    assert rejection.StudyInstanceUID == series.study_uid and rejection.SeriesNumber == 9705
    withdrawn = {str(i.ReferencedSOPInstanceUID) for st in rejection.CurrentRequestedProcedureEvidenceSequence
                 for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert withdrawn == first_uids  # all of the first answer, none of the second
    assert len(scp.received) == len(first_uids) + len(second_uids) + 1
    rows = node.query("SELECT id, job_id, kind, state, rejected_by FROM outbox")
    [note_row] = [r for r in rows if r["kind"] == "rejection"]
    assert note_row["job_id"] == second["id"] and note_row["state"] == "sent"
    assert {r["rejected_by"] for r in rows if r["job_id"] == first["id"]} == {note_row["id"]}
    assert {r["rejected_by"] for r in rows if r["job_id"] == second["id"]} == {None}
    assert "event=rejection_queued" in node.log
    trace = run_cli("status", "--config", node.config_path, "--job", str(first["id"])).stdout
    first_block = trace.split(f"job #{first['id']} (revision 1)")[1].split(f"job #{second['id']} (revision 2)")[0]
    second_block = trace.split(f"job #{second['id']} (revision 2)")[1]
    assert first_block.count("withdrawn by a rejection note") == len(first_uids)
    assert "withdrawn" not in second_block and "rejection" in second_block
    if shutil.which("dciodvfy"):
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian

        path = tmp_path / "rejection.dcm"
        rejection.file_meta = FileMetaDataset()
        rejection.file_meta.MediaStorageSOPClassUID = rejection.SOPClassUID
        rejection.file_meta.MediaStorageSOPInstanceUID = rejection.SOPInstanceUID
        rejection.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        rejection.save_as(path, enforce_file_format=True)
        report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert not errors, report.stdout + report.stderr
