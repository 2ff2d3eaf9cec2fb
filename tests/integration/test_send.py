"""Sending results through real sockets on 127.0.0.1 to real peers (dcmtk storescp, Orthanc, a
pynetdicom SCP whose answers the test chooses) from a real SQLite ledger: statuses recorded,
transfer syntax fallback, retries with backoff, refusal then operator retry, storage commitment."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.uid import ImplicitVRLittleEndian, JPEGLSLossless
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from node.config import Config, Destination
from node.db.models import Event, OutboxItem, SendState
from node.send.outbox import enqueue_results
from tests.helpers.dcmtk import storescp_running
from tests.helpers.net import free_port
from tests.helpers.orthanc import Modality, OrthancFactory, OrthancServer, orthanc, orthanc_factory  # noqa: F401
from tests.helpers.outbox import RecordingSCP, make_job, write_results
from tests.helpers.prometheus import assert_prometheus_text
from tests.helpers.wait import wait_until

FAST_RETRY = {"retry_base_s": 0.2, "retry_factor": 2.0, "retry_max_delay_s": 1.0, "poll_interval_s": 0.1,
              "connect_timeout_s": 5}


def make_config(dest: Destination, **sending: Any) -> Config:
    return Config.model_validate({"dicom": {"ae_title": "LUNGNODE", "bind_address": "127.0.0.1"},
                                  "destinations": [dest.model_dump()], "sending": {**FAST_RETRY, **sending}})


def outbox_rows(sessions: sessionmaker[Session]) -> list[OutboxItem]:
    with sessions() as s:
        return list(s.scalars(select(OutboxItem).order_by(OutboxItem.id)))


def wait_states(sessions: sessionmaker[Session], state: SendState, *, count: int, timeout: float = 30) -> list[OutboxItem]:
    def check() -> list[OutboxItem] | None:
        rows = outbox_rows(sessions)
        return rows if len(rows) == count and all(r.state == state for r in rows) else None
    return wait_until(check, timeout=timeout, interval=0.1,
                      what=f"{count} outbox rows {state.value} (now: {[(r.state.value, r.last_error) for r in outbox_rows(sessions)]})")


@pytest.fixture
def scp_factory() -> Iterator[Any]:
    scps: list[RecordingSCP] = []

    def make(port: int, **kw: Any) -> RecordingSCP:
        scp = RecordingSCP(port, **kw)
        scps.append(scp)
        return scp

    yield make
    for scp in scps:
        scp.stop()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """dcmtk's storescp accepting Implicit VR Little Endian only: a peer that takes no compression."""
    with storescp_running(tmp_path / "storescp", "+xi") as port:
        yield port, tmp_path / "storescp"


# -- tests ----------------------------------------------------------------------------------------
def test_jpeg_ls_to_a_peer_without_compression_is_sent_decompressed(
    sessions: sessionmaker[Session], sender_factory: Any, storescp: tuple[int, Path], tmp_path: Path,
) -> None:
    port, out = storescp
    objects = write_results(tmp_path / "results", jpegls=True)
    dest = Destination(name="store", ae_title="STORESCP", host="127.0.0.1", port=port)
    enqueue_results(sessions, job_id=make_job(sessions), results_dir=tmp_path / "results", destinations=[dest])
    sender_factory(make_config(dest))
    rows = wait_states(sessions, SendState.sent, count=3)
    assert all(r.last_status == 0 and r.attempts == 1 for r in rows)
    key = next(r for r in rows if r.kind == "key_image")
    assert key.transfer_syntax_uid == JPEGLSLossless and key.last_error == "sent decompressed"
    received = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in out.iterdir())}
    assert set(received) == {o.sop_instance_uid for o in objects}
    original = pydicom.dcmread(next(o.path for o in objects if o.kind == "key_image"))
    arrived = received[original.SOPInstanceUID]
    assert arrived.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert (arrived.pixel_array == original.pixel_array).all(), "lossless: the decoded pixels arrive unchanged"


def test_orthanc_receives_every_object_in_its_own_transfer_syntax(
    sessions: sessionmaker[Session], sender_factory: Any, orthanc: OrthancServer, tmp_path: Path,  # noqa: F811
) -> None:
    objects = write_results(tmp_path / "results", jpegls=True)
    dest = Destination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port,
                       objects=["seg", "key_image"])  # profile: this PACS gets no SR
    enqueue_results(sessions, job_id=make_job(sessions), results_dir=tmp_path / "results", destinations=[dest])
    sender_factory(make_config(dest))
    rows = wait_states(sessions, SendState.sent, count=2)
    assert {r.kind for r in rows} == {"seg", "key_image"}
    for obj in objects:
        found = orthanc.find_instance(obj.sop_instance_uid)
        if obj.kind == "sr":
            assert found is None
            continue
        assert found is not None, obj
        assert orthanc.metadata(found, "TransferSyntax") == obj.transfer_syntax_uid
        assert orthanc.metadata(found, "RemoteAET") == "LUNGNODE"


def test_peer_down_then_up_is_retried_and_delivered_exactly_once(
    sessions: sessionmaker[Session], sender_factory: Any, scp_factory: Any, tmp_path: Path,
) -> None:
    port = free_port()
    objects = write_results(tmp_path / "results")
    dest = Destination(name="peer", ae_title="PEER", host="127.0.0.1", port=port)
    enqueue_results(sessions, job_id=make_job(sessions), results_dir=tmp_path / "results", destinations=[dest])
    sender_factory(make_config(dest, max_attempts=30))

    def retried() -> bool:
        rows = outbox_rows(sessions)
        return all(r.state == SendState.pending and r.attempts >= 2 for r in rows)
    wait_until(retried, timeout=20, what="two failed attempts while the peer is down")
    row = outbox_rows(sessions)[0]
    assert row.last_error is not None and "no association with PEER@127.0.0.1" in row.last_error
    assert row.next_attempt_at > row.updated_at  # backoff: the next attempt is in the future
    scp = scp_factory(port).start()
    rows = wait_states(sessions, SendState.sent, count=3)
    assert scp.received == Counter({o.sop_instance_uid: 1 for o in objects})
    assert all(r.last_error is None and r.last_status == 0 for r in rows)


def test_a_slow_pacs_is_waited_for_up_to_the_response_timeout_not_the_connect_timeout(
    sessions: sessionmaker[Session], sender_factory: Any, scp_factory: Any, tmp_path: Path,
) -> None:
    """The PACS takes 1.5 s to answer each C-STORE: with a 1 s connect timeout the results still arrive once each;
    past response_timeout_s the association is given up and the objects wait for their retry."""
    port = free_port()
    objects = write_results(tmp_path / "results")
    dest = Destination(name="peer", ae_title="PEER", host="127.0.0.1", port=port)
    enqueue_results(sessions, job_id=make_job(sessions), results_dir=tmp_path / "results", destinations=[dest])
    scp = scp_factory(port, delay_s=1.5).start()
    sender = sender_factory(make_config(dest, connect_timeout_s=1, response_timeout_s=0.5, max_attempts=30))
    wait_until(lambda: any("no C-STORE response" in (r.last_error or "") for r in outbox_rows(sessions)),
               timeout=20, what="an attempt given up for want of an answer")
    sender.stop()
    assert all(r.state == SendState.pending for r in outbox_rows(sessions)), "waiting for their retry"
    sender_factory(make_config(dest, connect_timeout_s=1, response_timeout_s=5, max_attempts=30))
    wait_states(sessions, SendState.sent, count=3)
    assert set(scp.stored) == {o.sop_instance_uid for o in objects}


def test_giving_up_on_a_destination_is_an_error_in_the_log(
    sessions: sessionmaker[Session], sender_factory: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Retries are warnings; the last one, after which nothing more is tried, is what IT alerts on: ERROR."""
    dest = Destination(name="peer", ae_title="PEER", host="127.0.0.1", port=free_port())
    write_results(tmp_path / "results")
    job = make_job(sessions)
    enqueue_results(sessions, job_id=job, results_dir=tmp_path / "results", destinations=[dest])
    with caplog.at_level(logging.INFO, logger="node"):
        sender_factory(make_config(dest, max_attempts=2))
        wait_states(sessions, SendState.failed, count=3)
        wait_until(lambda: any("event=send_failed" in r.getMessage() for r in caplog.records), timeout=10,
                   what="event=send_failed in the log")
    failed = [r for r in caplog.records if "event=send_failed" in r.getMessage()]
    assert [r.levelname for r in failed] == ["ERROR"]
    # which study's results failed, and the command that sends them again
    assert f"objects=3 jobs={job} " in failed[0].getMessage() and f'"lungnode retry {job} once' in failed[0].getMessage()
    retries = [r for r in caplog.records if "event=send_association_failed" in r.getMessage()]
    assert len(retries) == 2 and {r.levelname for r in retries} == {"WARNING"}
    assert all(f"jobs={job} " in r.getMessage() for r in retries)


def test_resend_queues_a_job_s_results_for_a_destination_configured_after_it_ran(
    sessions: sessionmaker[Session], tmp_path: Path,
) -> None:
    """The node analysed studies before IT added the PACS as a destination: retry JOB --resend sends them there
    (it said "nothing requeued", and only a reanalysis, minutes of CPU, would do)."""
    from node.pipeline.worker import results_dir
    from tests.helpers.node_proc import run_cli

    job = make_job(sessions)
    config_file = tmp_path / "config.yaml"
    spool = tmp_path / "spool"
    config_file.write_text(yaml.safe_dump({
        "storage": {"database_url": str(sessions.kw["bind"].url), "spool_dir": str(spool)},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}]}))
    write_results(results_dir(Config.model_validate({"storage": {"spool_dir": str(spool)}}), job))
    proc = run_cli("retry", str(job), "--resend", "--config", config_file)
    assert proc.returncode == 0, proc.stderr
    assert f"queued 3 object(s) of job {job} for pacs, which never had them" in proc.stdout, proc.stdout
    assert [r.state for r in outbox_rows(sessions)] == [SendState.pending] * 3
    again = run_cli("retry", str(job), "--resend", "--config", config_file)
    assert "which never had them" not in again.stdout and "requeued 3 send(s)" in again.stdout, again.stdout


def test_refused_objects_fail_with_the_reason_and_retry_failed_delivers(
    sessions: sessionmaker[Session], sender_factory: Any, scp_factory: Any, tmp_path: Path,
) -> None:
    from tests.helpers.node_proc import run_cli

    port = free_port()
    objects = write_results(tmp_path / "results")
    dest = Destination(name="peer", ae_title="PEER", host="127.0.0.1", port=port)
    job = make_job(sessions)
    enqueue_results(sessions, job_id=job, results_dir=tmp_path / "results", destinations=[dest])
    scp = scp_factory(port, status=0xA700).start()
    sender_factory(make_config(dest, max_attempts=3))
    rows = wait_states(sessions, SendState.failed, count=3)
    assert all(r.attempts == 3 and r.last_status == 0xA700 for r in rows)
    assert all("C-STORE refused with status 0xA700 (Failure)" in (r.last_error or "") for r in rows)
    assert scp.received == Counter({o.sop_instance_uid: 3 for o in objects})
    with sessions() as s:
        assert s.scalar(select(Event).where(Event.kind == "send_failed").limit(1)) is not None

    # The operator fixes the peer and requeues through the command line on the same database.
    scp.status = 0xB000  # a warning: counts as sent, recorded
    db_url = str(sessions.kw["bind"].url)
    config = tmp_path / "config.yaml"
    config.write_text(f"storage: {{database_url: '{db_url}'}}\n"  # the node's own configuration, as IT runs it
                      f"destinations: [{{name: peer, ae_title: PEER, host: 127.0.0.1, port: {port}}}]\n")
    proc = run_cli("retry", "--failed", "--config", config)
    assert proc.returncode == 0, proc.stderr
    assert "requeued 3 failed or waiting send(s) to peer" in proc.stdout
    rows = wait_states(sessions, SendState.sent, count=3)
    assert all(r.last_status == 0xB000 and "warning 0xB000" in (r.last_error or "") for r in rows)
    assert scp.stored == Counter({o.sop_instance_uid: 1 for o in objects})
    again = run_cli("retry", str(job), "--config", config)
    assert again.returncode == 0 and "nothing requeued" in again.stdout
    # The PACS lost them: the operator sends everything of the job once more, delivered ones included.
    resend = run_cli("retry", str(job), "--resend", "--config", config)
    assert resend.returncode == 0 and "requeued 3 send(s), delivered ones included, to peer" in resend.stdout
    wait_until(lambda: scp.stored == Counter({o.sop_instance_uid: 2 for o in objects}), timeout=20,
               what="the results stored a second time")
    assert run_cli("retry", "--failed", "--resend", "--config", config).returncode == 2
    status = run_cli("status", "--config", config)
    assert status.returncode == 0 and "peer" in status.stdout
    assert f"database: {db_url}" in status.stdout  # the operator sees which node's ledger this is
    metrics = run_cli("status", "--metrics", "--config", config)  # for node_exporter's textfile collector
    assert metrics.returncode == 0, metrics.stderr
    assert 'lungnode_sends{destination="peer",state="sent"} 3\n' in metrics.stdout
    assert 'lungnode_sends{destination="peer",state="failed"} 0\n' in metrics.stdout
    assert_prometheus_text(metrics.stdout)
    missing = run_cli("retry", str(job + 1000), "--config", config)
    assert missing.returncode == 2 and f"there is no job {job + 1000}" in missing.stderr


def test_storage_commitment_with_orthanc(
    sessions: sessionmaker[Session], sender_factory: Any, orthanc_factory: OrthancFactory, tmp_path: Path,  # noqa: F811
) -> None:
    commit_port = free_port()
    pacs = orthanc_factory(modalities={"lungnode": Modality("LUNGNODE_SC", commit_port)})
    objects = write_results(tmp_path / "results")
    dest = Destination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=pacs.dicom_port,
                       storage_commitment=True, calling_ae_title="LUNGNODE_SC")
    job = make_job(sessions)
    enqueue_results(sessions, job_id=job, results_dir=tmp_path / "results", destinations=[dest])
    # One object the PACS never received: pretend it was sent, so its commitment is refused.
    missing = next(o for o in objects if o.kind == "sr")
    with sessions.begin() as s:
        s.execute(update(OutboxItem).where(OutboxItem.sop_instance_uid == missing.sop_instance_uid)
                  .values(state=SendState.sent, attempts=1, last_status=0))
    sender = sender_factory(make_config(dest, commitment_port=commit_port, max_attempts=5))
    assert sender.commitment_port == commit_port
    rows = wait_states(sessions, SendState.committed, count=3, timeout=40)
    assert all(r.committed_at is not None and r.commitment_uid for r in rows)
    assert pacs.sop_instance_uids() == {o.sop_instance_uid for o in objects}
    refused = next(r for r in rows if r.sop_instance_uid == missing.sop_instance_uid)
    assert refused.attempts == 2, "refused commitment: sent again, then committed"
    with sessions() as s:
        failed = s.scalars(select(Event).where(Event.kind == "commitment_failed")).all()
    assert [e.data["sop_instance_uid"] for e in failed if e.data] == [missing.sop_instance_uid]
    assert "Failure Reason 0x0112" in failed[0].message  # no such object instance


def test_a_destination_that_cannot_commit_ends_in_send_failed(
    sessions: sessionmaker[Session], sender_factory: Any, scp_factory: Any, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Storage commitment asked of a peer that stores but does not commit: the objects are sent again until the
    attempts are used up, and the give-up is the same ERROR line and ``send_failed`` event as a refused C-STORE."""
    port = free_port()
    write_results(tmp_path / "results")
    dest = Destination(name="peer", ae_title="PEER", host="127.0.0.1", port=port, storage_commitment=True)
    job = make_job(sessions)
    enqueue_results(sessions, job_id=job, results_dir=tmp_path / "results", destinations=[dest])
    scp = scp_factory(port).start()
    with caplog.at_level(logging.INFO, logger="node"):
        sender_factory(make_config(dest, max_attempts=2, commitment_port=0))
        rows = wait_states(sessions, SendState.failed, count=3)
        wait_until(lambda: any("event=send_failed" in r.getMessage() for r in caplog.records), timeout=10,
                   what="event=send_failed in the log")
    assert all(r.attempts == 2 and "commitment" in (r.last_error or "") for r in rows)
    assert set(scp.received.values()) == {2}, "stored twice: the commitment failure sends them again"
    failed = [r for r in caplog.records if "event=send_failed" in r.getMessage()]
    assert [r.levelname for r in failed] == ["ERROR"] and f"objects=3 jobs={job} " in failed[0].getMessage()
    with sessions() as s:
        assert len(s.scalars(select(Event).where(Event.kind == "send_failed")).all()) == 3


def test_orthanc_helper_stores_serves_and_pushes(orthanc_factory: OrthancFactory, scp_factory: Any,  # noqa: F811
                                                 tmp_path: Path) -> None:
    """The Orthanc helper other tests rely on: upload, find, file download and a push to a modality."""
    peer = scp_factory(free_port()).start()
    pacs = orthanc_factory(modalities={"peer": Modality("PEER", peer.port)})
    (obj,) = write_results(tmp_path / "results", kinds=("key_image",))
    stored = pacs.upload(obj.path)
    assert pacs.instances() == [stored["ID"]] and pacs.find_instance(obj.sop_instance_uid) == stored["ID"]
    assert pacs.get_file(stored["ID"]) == obj.path.read_bytes()
    pacs.push("peer", [stored["ParentStudy"]])
    assert peer.received == Counter({obj.sop_instance_uid: 1})


def test_orthanc_helper_picks_new_ports_when_its_own_are_taken(tmp_path: Path) -> None:
    """Picked ports can be taken before Orthanc binds them; once the kernel even handed out one port for both
    the DICOM and the HTTP server. The helper then picks again and starts; ports given by the caller stay."""
    pacs = OrthancServer(tmp_path / "pacs")
    assert pacs.dicom_port != pacs.http_port  # picked together, never the same
    pacs.http_port = pacs.dicom_port  # what the kernel once did
    try:
        pacs.start()
        assert pacs.get("/system")["DicomAet"] == "ORTHANC"
        assert pacs.http_port != pacs.dicom_port
        assert "already in use" in pacs.log  # the first try really met the taken port
    finally:
        pacs.stop()
    port = free_port()
    fixed = OrthancServer(tmp_path / "fixed", dicom_port=port, http_port=port)
    with pytest.raises(Exception, match="already in use"):
        fixed.start()
    assert (fixed.dicom_port, fixed.http_port) == (port, port)


def test_lungnode_echo_checks_the_way_to_each_destination(orthanc: OrthancServer, tmp_path: Path) -> None:  # noqa: F811
    """Before the first study: C-ECHO each destination as the sender will associate (its calling AE title)."""
    import yaml

    from tests.helpers.node_proc import run_cli

    closed = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"destinations": [
        {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port,
         "calling_ae_title": "LUNGNODE_SC"},
        {"name": "gone", "ae_title": "GONE", "host": "127.0.0.1", "port": closed},
        # refused by the name lookup itself, without a DNS query (an empty label): a traceback before
        {"name": "typo", "ae_title": "TYPO", "host": "pacs..hospital", "port": 104},
    ]}))
    ok = run_cli("echo", "--destination", "pacs", "--config", config)
    assert ok.returncode == 0, ok.stderr
    assert (f"destination pacs (ORTHANC@127.0.0.1:{orthanc.dicom_port}, called as LUNGNODE_SC) answered C-ECHO"
            in ok.stdout)
    both = run_cli("echo", "--destination", "all", "--timeout", "3", "--config", config)
    assert both.returncode == 1 and "destination pacs" in both.stdout
    assert f"destination gone (GONE@127.0.0.1:{closed}, called as LUNGNODE)" in both.stderr
    assert "cannot connect (peer down, wrong host or port, or a firewall)" in both.stderr
    assert ("destination typo (TYPO@pacs..hospital:104, called as LUNGNODE): no association with "
            "TYPO@pacs..hospital:104: cannot resolve host 'pacs..hospital'") in both.stderr, both.stderr
    assert "destinations[typo].host" in both.stderr and "Traceback" not in both.stderr
    unknown = run_cli("echo", "--destination", "nope", "--config", config)
    assert unknown.returncode == 2 and "no destination named 'nope'" in unknown.stderr and "pacs, gone" in unknown.stderr


def test_a_destination_that_accepts_and_stays_silent_is_named_as_such(tmp_path: Path) -> None:
    """Before: "aborted by the peer during negotiation; check its AE configuration", though the peer never said a
    word (the abort was our own, at the timeout): IT looked at the wrong thing."""
    import socket
    import threading

    from pynetdicom.presentation import build_context
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from node.send.scu import associate

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        held: list[socket.socket] = []
        threading.Thread(target=lambda: held.append(silent.accept()[0]), daemon=True).start()
        dest = Destination(name="hung", ae_title="HUNG", host="127.0.0.1", port=silent.getsockname()[1])
        answer = associate(dest, [build_context(Verification, ["1.2.840.10008.1.2"])], calling_ae="LUNGNODE",
                           timeout_s=1.0)
        for conn in held:
            conn.close()
    assert isinstance(answer, str)
    assert "accepted the connection but did not answer the association request" in answer, answer
