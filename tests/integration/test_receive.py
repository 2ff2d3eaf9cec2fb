"""Receiving over real sockets: a real ``lungnode serve`` subprocess, dcmtk and pynetdicom as peers,
the real SQLite ledger and spool on disk."""

from __future__ import annotations

import re
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian, MRImageStorage, generate_uid

from node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from tests.conftest import NodeFactory
from tests.helpers.dcmtk import echoscu, run_dcmtk, storescu
from tests.helpers.faults import write_legacy_converted_ct
from tests.helpers.node_proc import NodeProcess, run_cli
from tests.helpers.prometheus import assert_prometheus_text
from tests.helpers.scu import SUCCESS, associate, echo, send_files, store_status
from tests.helpers.series import (
    TRANSFER_SYNTAXES,
    SeriesInfo,
    add_slice,
    make_series,
    rewrite_body,
    rewrite_meta,
    truncate_file,
    write_ct_series,
    write_mr_image,
    write_secondary_capture,
)
from tests.helpers.wait import wait_until

pytestmark = pytest.mark.usefixtures("require_dcmtk")


def assert_stored(node: NodeProcess, series: SeriesInfo) -> None:
    """Every instance of ``series`` is in the spool (readable, right UIDs) and has its row."""
    rows = {r["sop_instance_uid"]: r for r in node.instances(series.series_uid)}
    assert set(rows) == set(series.sop_uids)
    files = node.spool_files(series.series_uid)
    assert {p.stem for p in files} == set(series.sop_uids)
    for sop in series.sop_uids:
        path = node.spool_path(series.series_uid, sop)
        assert rows[sop]["path"] == str(path)
        assert rows[sop]["size_bytes"] == path.stat().st_size
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert (ds.SOPInstanceUID, ds.SeriesInstanceUID) == (sop, series.series_uid)
    assert node.incoming_files() == []


def status_series(node: NodeProcess, series_uid: str) -> dict:
    data = node.status()
    matches = [s for s in data["series"] if s["series_instance_uid"] == series_uid]
    assert len(matches) == 1, data
    return matches[0]


# -- C-ECHO ----------------------------------------------------------------------------------------
def test_echoscu(node: NodeProcess) -> None:
    proc = run_dcmtk("echoscu", "-d", "-aet", "ECHOSCU", "-aec", "LUNGNODE", "127.0.0.1", str(node.port), timeout=30)
    assert proc.returncode == 0, proc.stderr
    # The node introduces itself as lungnode (the conformance statement's identity), not as its toolkit.
    said = proc.stdout + proc.stderr
    assert re.search(rf"Their Implementation Class UID:\s+{re.escape(IMPLEMENTATION_CLASS_UID)}\s", said), said
    assert re.search(rf"Their Implementation Version Name:\s+{re.escape(IMPLEMENTATION_VERSION_NAME)}\s", said), said
    node.wait_for_log(r"event=association_released")
    assert "calling_ae=ECHOSCU" in node.log
    assert node.query("SELECT calling_ae, state FROM associations")[0][:] == ("ECHOSCU", "released")


def test_lungnode_echo_says_whether_the_listener_answers(node_factory: NodeFactory, tmp_path: Path) -> None:
    """The container's health check: 0 while the listener answers (even when it refuses this caller), 1 after."""
    node = node_factory(settings={"dicom": {"allowed_callers": ["PACS"]}})
    proc = run_cli("echo", "--config", node.config_path, "--timeout", "5")
    assert proc.returncode == 0 and "is listening; it refused the calling AE title LUNGNODE-CHECK" in proc.stdout
    assert proc.stderr == "", "the finding says it all: no toolkit warnings beside it"
    assert echoscu(node.port, calling="STRANGER").returncode != 0
    node.wait_for_log(r"WARNING .*event=association_rejected calling_ae=STRANGER")
    assert "calling_ae=LUNGNODE-CHECK" not in node.log, "the health check every 30 s is no warning"
    open_node = node_factory(name="open")
    proc = run_cli("echo", "--config", open_node.config_path, "--timeout", "5")
    assert proc.returncode == 0 and f"LUNGNODE at 127.0.0.1:{open_node.port} answered C-ECHO" in proc.stdout
    assert echoscu(open_node.port, calling="ECHOSCU").returncode == 0  # anyone else's echo is logged and recorded
    open_node.wait_for_log(r"event=association_released")
    assert "LUNGNODE-CHECK" not in open_node.log, "the health check every 30 s fills neither the log..."
    assert [tuple(r) for r in open_node.query("SELECT calling_ae FROM associations")] == [("ECHOSCU",)], \
        "...nor the ledger"
    image = make_series(tmp_path / "ct", slices=1, matrix=32).files  # that title storing an image is recorded
    assert [s.status for s in send_files(open_node.port, image, calling="LUNGNODE-CHECK")] == [SUCCESS]
    assert [tuple(r) for r in open_node.query("SELECT a.calling_ae FROM instances i JOIN associations a "
                                              "ON a.id = i.association_id")] == [("LUNGNODE-CHECK",)]
    assert open_node.stop() == 0
    proc = run_cli("echo", "--config", open_node.config_path, "--timeout", "2")
    assert proc.returncode == 1 and f"no DICOM listener answered at 127.0.0.1:{open_node.port}" in proc.stderr


def test_metrics_say_whether_the_listener_and_the_ledger_are_up(node: NodeProcess, tmp_path: Path) -> None:
    """The metrics timer's file is complete whatever happens: with the node down, or its ledger unreadable, it says
    so instead of the collector keeping the last healthy picture. Its probe opens no association."""
    series = make_series(tmp_path / "ct", slices=3, matrix=32)
    assert storescu(node.port, series.folder).returncode == 0
    node.wait_complete(series.series_uid)

    def metrics() -> tuple[int, dict[str, float]]:
        proc = run_cli("status", "--metrics", "--config", node.config_path)
        assert_prometheus_text(proc.stdout)
        return proc.returncode, {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in proc.stdout.splitlines()
                                 if not ln.startswith("#")}

    rc, up = metrics()
    assert rc == 0 and up["lungnode_listener_up"] == 1 and up["lungnode_ledger_up"] == 1
    assert abs(up["lungnode_last_received_timestamp_seconds"] - time.time()) < 120
    assert up['lungnode_jobs{state="queued"}'] == 1 and "lungnode_oldest_queued_job_timestamp_seconds" in up
    assert [up[f'lungnode_queued_jobs{{priority="{p}"}}'] for p in ("high", "medium", "low")] == [0, 1, 0]
    assert node.count("associations") == 1, "the probe is no association"
    assert node.stop() == 0
    rc, down = metrics()
    assert rc == 0 and down["lungnode_listener_up"] == 0 and down["lungnode_ledger_up"] == 1
    node.db_path.rename(node.db_path.with_suffix(".moved"))
    proc = run_cli("status", "--metrics", "--config", node.config_path)
    assert proc.returncode == 1 and "no database at" in proc.stderr
    assert "lungnode_ledger_up 0\n" in proc.stdout and "lungnode_listener_up 0\n" in proc.stdout
    assert_prometheus_text(proc.stdout)


def test_a_second_node_on_the_same_spool_is_refused_before_it_touches_it(node_factory: NodeFactory,
                                                                        tmp_path: Path) -> None:
    """`lungnode serve` started by hand beside the service, on its configuration: refused at once, naming the node
    that runs. Before, its start-up reconciliation took the running node's transfers in progress for a crash's
    leftovers and deleted their files."""
    first = node_factory()
    in_flight = first.spool_dir / "incoming" / "being-received.dcm"  # what a transfer in progress looks like
    in_flight.write_bytes(b"\0" * 128)
    second = node_factory("second", settings={"storage": {"spool_dir": str(first.spool_dir),
                                                          "database_url": first.db_url}}, start=False)
    with pytest.raises(AssertionError, match=rf"another lungnode serve \(pid {first.proc.pid} on \S+\) is using the "
                                             rf"spool {re.escape(str(first.spool_dir))}"):
        second.start()
    assert second.exit_codes == [2] and "event=node_start_failed" in second.log
    assert in_flight.exists(), "the second node cleaned the first one's spool"
    series = make_series(tmp_path / "ct", slices=3, matrix=32)
    assert storescu(first.port, series.folder).returncode == 0 and first.running


def test_environment_overrides_the_config_file(node_factory: NodeFactory) -> None:
    node = node_factory(env={"LUNGNODE_DICOM__AE_TITLE": "ENVNODE", "LUNGNODE_ASSEMBLY__QUIET_PERIOD_S": "7.5",
                             "TZ": "JST-9"})
    assert f"event=node_ready ae_title=ENVNODE port={node.port}" in node.log
    # the zone the results' creation times are written in, so IT sees a node left on UTC
    assert "event=node_starting version=" in node.log and "time_zone=JST utc_offset=+0900" in node.log
    assert '"quiet_period_s": 7.5' in node.log  # the effective configuration is logged once at start
    assert echoscu(node.port, called="ENVNODE").returncode == 0
    assert echoscu(node.port, called="LUNGNODE").returncode != 0


def test_wrong_called_ae_title_is_rejected(node: NodeProcess) -> None:
    proc = echoscu(node.port, called="SOMEONE_ELSE")
    assert proc.returncode != 0
    assert "Association Rejected" in proc.stderr, proc.stderr
    node.wait_for_log(r"event=association_rejected calling_ae=ECHOSCU called_ae=SOMEONE_ELSE host=127.0.0.1 "
                      r"reason=\"called AE title is not dicom.ae_title\"")
    assert node.count("associations") == 0


# -- one series, uncompressed ----------------------------------------------------------------------
def test_series_complete_after_release_with_one_job(node_factory: NodeFactory, tmp_path: Path) -> None:
    # a quiet period far longer than the test: completion can only come from the release rule
    node = node_factory(settings={"assembly": {"quiet_period_s": 120, "release_grace_s": 0.5}})
    series = make_series(tmp_path / "ct", slices=40, matrix=128)
    proc = storescu(node.port, series.folder)
    assert proc.returncode == 0, proc.stderr
    row = node.wait_complete(series.series_uid, timeout=15)
    assert (row["revision"], row["instance_count"], row["origin"]) == (1, 40, "modality")
    assert_stored(node, series)
    assert [(j["revision"], j["state"]) for j in node.jobs(series.series_uid)] == [(1, "queued")]
    st = status_series(node, series.series_uid)
    assert (st["state"], st["revision"], st["instances"], st["origin"]) == ("complete", 1, 40, "modality")
    assert [j["revision"] for j in st["jobs"]] == [1]
    assert node.status()["counts"]["open_associations"] == 0
    assert len(re.findall(r"event=series_complete", node.log)) == 1
    # the headroom IT watches: images held (from the ledger) and the spool disk's free space
    storage = node.status()["storage"]
    assert storage["images_bytes"] == sum(p.stat().st_size for p in node.spool_files(series.series_uid))
    assert storage["disk_free_bytes"] > storage["refuse_below_bytes"]


@pytest.mark.parametrize("ts", ["implicit", "rle", "jpeg-ls", "jpeg2000", "jpeg-lossless"])
def test_series_in_each_transfer_syntax_is_stored_as_sent(node: NodeProcess, tmp_path: Path, ts: str) -> None:
    series = make_series(tmp_path / ts, slices=12, matrix=128, transfer_syntax=ts)
    uid = TRANSFER_SYNTAXES[ts]
    proc = storescu(node.port, series.folder, transfer_syntax=uid)
    assert proc.returncode == 0, proc.stderr
    node.wait_complete(series.series_uid)
    assert_stored(node, series)
    assert {r["transfer_syntax_uid"] for r in node.instances(series.series_uid)} == {uid}
    assert len(node.jobs(series.series_uid)) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in (0, len(series) // 2, len(series) - 1):
            sent = pydicom.dcmread(series.files[i])
            stored = pydicom.dcmread(node.spool_path(series.series_uid, series.sop_uids[i]))
            assert stored.file_meta.TransferSyntaxUID == uid
            assert np.array_equal(stored.pixel_array, sent.pixel_array)


# -- who may associate ------------------------------------------------------------------------------
def test_allow_list_rejects_unknown_callers_and_wrong_hosts(node_factory: NodeFactory, tmp_path: Path) -> None:
    node = node_factory(settings={"dicom": {"allowed_callers": [
        {"ae_title": "PACS"},
        {"ae_title": "CT1", "host": "127.0.0.2"},
    ]}})
    series = make_series(tmp_path / "ct", slices=2, matrix=32)

    assert echoscu(node.port, calling="PACS").returncode == 0
    intruder = echoscu(node.port, calling="INTRUDER")
    # a refusal the sender can read (A-ASSOCIATE-RJ), not a connection dropped under it
    assert intruder.returncode != 0 and "Association Rejected" in intruder.stderr, intruder.stderr
    refused = storescu(node.port, series.folder, calling="INTRUDER")
    assert refused.returncode != 0
    node.wait_for_log(r"event=association_rejected calling_ae=INTRUDER")
    # CT1 is allowed only from 127.0.0.2: from 127.0.0.1 it is refused
    assert echoscu(node.port, calling="CT1").returncode != 0
    node.wait_for_log(r"event=association_rejected calling_ae=CT1 host=127.0.0.1")
    assert echo(node.port, calling="CT1", source_host="127.0.0.1") is None
    assert echo(node.port, calling="CT1", source_host="127.0.0.2") == SUCCESS
    sent = send_files(node.port, series.files, calling="CT1", source_host="127.0.0.2")
    assert [s.status for s in sent] == [SUCCESS, SUCCESS]

    assert len(re.findall(r"event=association_rejected", node.log)) >= 4
    callers = {(r["calling_ae"], r["peer_host"]) for r in node.query("SELECT calling_ae, peer_host FROM associations")}
    assert callers == {("PACS", "127.0.0.1"), ("CT1", "127.0.0.2")}
    assert len(node.instances(series.series_uid)) == 2


# -- bad datasets --------------------------------------------------------------------------------------
def test_garbled_and_truncated_datasets_fail_and_the_node_keeps_serving(node: NodeProcess, tmp_path: Path) -> None:
    series = make_series(tmp_path / "ct", slices=4, matrix=64)
    bad = tmp_path / "bad"
    bad.mkdir()
    garbled = bad / "garbled.dcm"
    rewrite_body(series.files[1], garbled, np.random.default_rng(7).bytes(5000))
    truncated = bad / "truncated.dcm"
    truncate_file(series.files[2], truncated, drop=1000)
    sent = send_files(node.port, [series.files[0], garbled, truncated, series.files[3]])
    statuses = [s.status for s in sent]
    assert statuses[0] == SUCCESS and statuses[3] == SUCCESS, [hex(s or 0) for s in statuses]
    assert statuses[1] is not None and 0xC000 <= statuses[1] <= 0xCFFF, statuses
    assert statuses[2] == 0xC223, statuses
    # a new association works too, and the refused SOP Instance UIDs can still be sent intact
    assert store_status(node.port, series.files[1]) == SUCCESS
    assert store_status(node.port, series.files[2]) == SUCCESS
    assert_stored(node, series)
    assert len(re.findall(r"event=store_refused", node.log)) == 2


def test_a_request_without_sop_instance_uid_aborts_cleanly(node: NodeProcess, tmp_path: Path) -> None:
    """A C-STORE request without AffectedSOPInstanceUID cannot be answered per instance: the association is aborted
    at once (not left hanging), recorded as aborted, nothing is kept, and the node goes on serving."""
    from pynetdicom import _config as scu_config

    series = make_series(tmp_path / "ct", slices=2, matrix=32)
    ds = pydicom.dcmread(series.files[0])
    ds.SOPInstanceUID = ""
    scu_config.LOG_HANDLER_LEVEL = "none"  # this SCU's own request logging trips over the empty UID first
    try:
        assoc = associate(node.port, [series.files[0]])
        assert assoc.is_established
        assoc.send_c_store(ds)
        wait_until(lambda: assoc.is_aborted, timeout=10, what="the node to abort the association")
    finally:
        scu_config.LOG_HANDLER_LEVEL = "standard"
    node.wait_for_log(r"event=dimse_undecodable reason=.*AffectedSOPInstanceUID")
    node.wait_for_log(r"event=association_aborted")
    wait_until(lambda: node.status()["counts"]["open_associations"] == 0, timeout=10, what="no open association")
    assert node.count("instances") == 0
    assert store_status(node.port, series.files[0]) == SUCCESS


def test_a_connection_that_never_negotiated_does_not_hold_up_shutdown(node: NodeProcess) -> None:
    """Half a PDU (here: the start of an A-ASSOCIATE-RQ announcing 64 kB, then silence) leaves an association
    thread waiting out the ACSE timeout; SIGTERM must not wait for it (it did, 10 s per connection)."""
    import socket
    import time

    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.sendall(bytes([0x01, 0x00, 0x00, 0x01, 0x00, 0x00]) + b"\x00" * 20)
        time.sleep(0.5)  # the node has read what there is
        t0 = time.monotonic()
        assert node.stop() == 0
        assert time.monotonic() - t0 < 5.0, node.log[-2000:]
    assert "event=connection_closed_at_stop" in node.log and "event=node_stopped" in node.log


def test_request_uids_differing_from_the_dataset_are_refused(node: NodeProcess, tmp_path: Path) -> None:
    """The C-STORE request (pynetdicom takes it from the file meta) names another instance or class."""
    series = make_series(tmp_path / "ct", slices=2, matrix=32)
    other_instance = tmp_path / "other-instance.dcm"
    rewrite_meta(series.files[0], other_instance, MediaStorageSOPInstanceUID=generate_uid())
    other_class = tmp_path / "other-class.dcm"
    rewrite_meta(series.files[1], other_class, MediaStorageSOPClassUID=MRImageStorage)
    assert store_status(node.port, other_instance) == 0xC222
    assert store_status(node.port, other_class) == 0xA900
    assert node.count("instances") == 0
    assert node.spool_files() == []
    assert node.incoming_files() == []


def _rewritten(src: Path, dst: Path, **values: object) -> Path:
    ds = pydicom.dcmread(src)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def test_a_series_never_mixes_two_studies_or_patients(node: NodeProcess, tmp_path: Path) -> None:
    """An instance naming a known series under another study, or a known study with another PatientID, is refused
    (0xC224, no file, no row): otherwise two patients' images would be analysed and reported as one."""
    series = make_series(tmp_path / "ct", slices=3, matrix=32)
    assert [s.status for s in send_files(node.port, series.files[:2])] == [SUCCESS, SUCCESS]
    other_study = _rewritten(series.files[2], tmp_path / "other-study.dcm", StudyInstanceUID=generate_uid())
    other_patient = _rewritten(series.files[2], tmp_path / "other-patient.dcm", PatientID="SOMEONE_ELSE")
    [(study_refused, study_comment)] = [(s.status, s.comment) for s in send_files(node.port, [other_study])]
    [(patient_refused, patient_comment)] = [(s.status, s.comment) for s in send_files(node.port, [other_patient])]
    assert study_refused == patient_refused == 0xC224
    # the PACS is told why beside the status (Error Comment); the log names which conflict it was
    assert study_comment == patient_comment == "lungnode: conflicts with images held (study, series, PatientID)"
    node.wait_for_log(rf"event=store_refused .*status=0xC224 .*series {series.series_uid} is already held here "
                      "under another study")
    node.wait_for_log(r"event=store_refused .*status=0xC224 .*study \S+ already holds images with another PatientID")
    assert node.count("instances") == 2 and node.count("studies") == 1
    assert len(node.spool_files()) == 2 and node.incoming_files() == []
    assert "SOMEONE_ELSE" not in node.log  # the reason names no patient
    assert store_status(node.port, series.files[2]) == SUCCESS  # the right one still goes in
    assert_stored(node, series)


def test_only_transfer_syntaxes_the_node_can_read_are_accepted(node: NodeProcess, tmp_path: Path) -> None:
    """Deflated data sets are refused at negotiation (the sender then offers another syntax) rather than accepted
    and every image refused afterwards."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(pydicom.uid.CTImageStorage, [DeflatedExplicitVRLittleEndian])
    ae.add_requested_context(pydicom.uid.CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="LUNGNODE")
    try:
        assert assoc.is_established
        assert [cx.transfer_syntax[0] for cx in assoc.accepted_contexts] == [ExplicitVRLittleEndian]
        assert [cx.transfer_syntax[0] for cx in assoc.rejected_contexts] == [DeflatedExplicitVRLittleEndian]
    finally:
        assoc.release()


def test_pixel_data_longer_than_the_image_is_refused(node: NodeProcess, tmp_path: Path) -> None:
    series = make_series(tmp_path / "ct", slices=2, matrix=32)
    ds = pydicom.dcmread(series.files[0])
    ds.PixelData = ds.PixelData * 2
    long = tmp_path / "long.dcm"
    ds.save_as(long, enforce_file_format=True)
    assert store_status(node.port, long) == 0xC223
    node.wait_for_log(r"event=store_refused .*pixel data longer than Rows x Columns")
    assert node.count("instances") == 0 and node.spool_files() == []


def test_an_image_of_no_pixels_is_refused_at_once(node: NodeProcess, tmp_path: Path) -> None:
    """Rows 0 with empty pixel data fits 'Rows x Columns' exactly: it was acknowledged, then refused at analysis."""
    series = make_series(tmp_path / "ct", slices=2, matrix=32)
    ds = pydicom.dcmread(series.files[0])
    ds.Rows, ds.PixelData = 0, b""
    empty = tmp_path / "empty.dcm"
    ds.save_as(empty, enforce_file_format=True)
    assert store_status(node.port, empty) == 0xC223
    node.wait_for_log(r"event=store_refused .*an image of 0 x 32 pixels")
    assert node.count("instances") == 0


def test_an_instance_resent_with_other_content_is_kept_as_first_held_and_said(node: NodeProcess, tmp_path: Path) -> None:
    series = make_series(tmp_path / "ct", slices=2, matrix=32)
    assert store_status(node.port, series.files[0]) == SUCCESS
    changed = _rewritten(series.files[0], tmp_path / "changed.dcm", ImageComments="corrected after the first send")
    assert store_status(node.port, changed) == SUCCESS
    node.wait_for_log(r"WARNING .*event=store_duplicate .*content differs from the instance already held")
    held = pydicom.dcmread(node.spool_path(series.series_uid, series.sop_uids[0]))
    assert held.ImageComments == pydicom.dcmread(series.files[0]).ImageComments != "corrected after the first send"


def test_a_resent_instance_is_compared_by_its_content_not_its_size(node: NodeProcess, tmp_path: Path) -> None:
    """One pixel changed keeps the size: still told apart. The same data set from another sender, or in another
    transfer syntax, is the same instance and no warning."""
    series = make_series(tmp_path / "ct", slices=2, matrix=32)
    original = series.files[0]
    assert store_status(node.port, original, calling="CT1") == SUCCESS
    assert store_status(node.port, original, calling="PACS") == SUCCESS
    implicit = tmp_path / "implicit.dcm"
    ds = pydicom.dcmread(original)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(implicit, implicit_vr=True, little_endian=True, enforce_file_format=True)
    assert store_status(node.port, implicit) == SUCCESS
    node.wait_for_log(r"INFO .*event=store_duplicate .*sent again in another transfer syntax \(1\.2\.840\.10008\.1\.2;")
    assert "content differs" not in node.log
    ds = pydicom.dcmread(original)
    pixels = ds.pixel_array.copy()
    pixels[0, 0] += 1
    ds.PixelData = pixels.tobytes()
    one_pixel = tmp_path / "one-pixel.dcm"
    ds.save_as(one_pixel, enforce_file_format=True)
    assert one_pixel.stat().st_size == original.stat().st_size
    assert store_status(node.port, one_pixel) == SUCCESS
    node.wait_for_log(r"WARNING .*event=store_duplicate .*content differs from the instance already held")
    assert node.log.count("content differs") == 1
    held = node.spool_path(series.series_uid, series.sop_uids[0])
    assert pydicom.dcmread(held).pixel_array[0, 0] == pydicom.dcmread(original).pixel_array[0, 0]


def test_an_instance_uid_held_in_another_series_is_refused_and_leaves_no_orphan_file(node: NodeProcess,
                                                                                    tmp_path: Path) -> None:
    """One SOP Instance UID in two series of a study is two images with one UID: acknowledging the second would drop
    it (its series would then wait for a slice that can never come); refused (0xC224), its file removed."""
    series = make_series(tmp_path / "ct", slices=2, matrix=32)
    assert store_status(node.port, series.files[0]) == SUCCESS
    moved = _rewritten(series.files[0], tmp_path / "moved.dcm", SeriesInstanceUID=generate_uid())
    assert store_status(node.port, moved) == 0xC224
    node.wait_for_log(r"event=store_refused .*status=0xC224 .*already held here in another series of this study")
    assert [p.stem for p in node.spool_files()] == [series.sop_uids[0]]  # one instance, one file
    # the other series' own next instance opens that series; it is not filed under the first one
    sibling = _rewritten(series.files[1], tmp_path / "sibling.dcm", SeriesInstanceUID=str(pydicom.dcmread(moved)
                                                                                           .SeriesInstanceUID))
    assert store_status(node.port, sibling) == SUCCESS
    assert [r["sop_instance_uid"] for r in node.instances(series.series_uid)] == [series.sop_uids[0]]
    node.restart()
    assert "adopted=0" in node.log.rsplit("event=reconcile_done", 1)[1].splitlines()[0]


def test_an_instance_uid_held_for_another_study_is_refused_not_dropped(node: NodeProcess, tmp_path: Path) -> None:
    """Two different images with one SOP Instance UID (a sender's faulty UID generator): acknowledging the second
    would drop it while the sender thinks it delivered; it is refused (0xC224) so the sender's queue shows it."""
    series = make_series(tmp_path / "ct", slices=2, matrix=32)
    assert store_status(node.port, series.files[0]) == SUCCESS
    collision = _rewritten(series.files[0], tmp_path / "collision.dcm", StudyInstanceUID=generate_uid(),
                           SeriesInstanceUID=generate_uid(), PatientID="SOMEONE_ELSE")
    assert store_status(node.port, collision) == 0xC224
    node.wait_for_log(r"event=store_refused .*status=0xC224 .*already known here for another study or PatientID")
    assert [p.stem for p in node.spool_files()] == [series.sop_uids[0]]
    assert node.count("series") == 1 and "SOMEONE_ELSE" not in node.log


def test_what_the_node_keeps_is_closed_to_other_users_of_the_machine(node: NodeProcess, tmp_path: Path) -> None:
    """Images and the ledger hold patient data: whatever the umask the node was started with (the test runner's is
    usually 022), nothing it writes is readable by other users."""
    series = make_series(tmp_path / "ct", slices=3, matrix=32)
    assert storescu(node.port, series.folder).returncode == 0
    node.wait_complete(series.series_uid)
    kept = [node.db_path, *node.spool_files(), *(p for p in node.spool_dir.rglob("*"))]
    assert len(kept) > 5
    opened = [f"{p} {p.stat().st_mode & 0o777:o}" for p in kept if p.stat().st_mode & 0o007]
    assert opened == [], "readable or searchable by other users"


# -- idempotence and revisions -----------------------------------------------------------------------
def test_resending_the_whole_series_changes_nothing(node: NodeProcess, tmp_path: Path) -> None:
    series = make_series(tmp_path / "ct", slices=20, matrix=64)
    assert storescu(node.port, series.folder).returncode == 0
    node.wait_complete(series.series_uid)
    before = node.status()
    mtimes = {p: p.stat().st_mtime_ns for p in node.spool_files()}

    proc = storescu(node.port, series.folder)
    assert proc.returncode == 0, proc.stderr
    node.wait_for_log(r"(?s)(event=association_released.*){2}")
    after = node.status()
    assert after["counts"] == before["counts"]
    assert after["series"] == before["series"]  # same state, revision 1, 20 instances, one job
    assert {p: p.stat().st_mtime_ns for p in node.spool_files()} == mtimes
    assert node.count("instances") == 20
    assert "event=store_duplicate" not in node.log  # identical copies: counted below, not a line each
    released = re.findall(r"event=association_released \S+ stored=(\d+)(?: duplicates=(\d+))?", node.log)
    assert released == [("20", ""), ("0", "20")]  # the second association stored nothing new
    row = node.series(series.series_uid)
    assert row is not None and (row["state"], row["revision"]) == ("complete", 1)


def test_two_associations_sharing_one_series(node: NodeProcess, tmp_path: Path) -> None:
    """A PACS sending one series over two parallel associations: one series, all instances, one job."""
    series = make_series(tmp_path / "ct", slices=30, matrix=64)
    results: dict[int, list[int | None]] = {}

    def send(i: int) -> None:
        results[i] = [s.status for s in send_files(node.port, series.files[i::2], calling=f"PACS{i}")]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {0: [SUCCESS] * 15, 1: [SUCCESS] * 15}
    row = node.wait_complete(series.series_uid)
    assert (row["revision"], row["instance_count"]) == (1, 30)
    assert_stored(node, series)
    assert len(node.jobs(series.series_uid)) == 1
    assert node.count("series") == 1 and node.count("studies") == 1


def test_same_series_resent_by_three_associations_at_once_keeps_every_file(node: NodeProcess, tmp_path: Path) -> None:
    """Three associations send the same instances in lockstep (a re-push racing the first push)."""
    series = make_series(tmp_path / "ct", slices=30, matrix=64)
    barrier = threading.Barrier(3)
    statuses: list[int | None] = []
    lock = threading.Lock()

    def send(i: int) -> None:
        assoc = associate(node.port, series.files, calling=f"PACS{i}")
        try:
            for f in series.files:
                barrier.wait(30)
                rsp = assoc.send_c_store(f)
                with lock:
                    statuses.append(int(rsp.Status) if "Status" in rsp else None)
        finally:
            assoc.release()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == [SUCCESS] * 90
    node.wait_complete(series.series_uid)
    missing = [r["sop_instance_uid"] for r in node.instances(series.series_uid) if not Path(r["path"]).is_file()]
    assert missing == [], f"{len(missing)} acknowledged instances lost their file"
    assert_stored(node, series)
    assert len(node.jobs(series.series_uid)) == 1


def test_late_instance_opens_revision_two_and_a_second_job(node: NodeProcess, tmp_path: Path) -> None:
    series = make_series(tmp_path / "ct", slices=10, matrix=64)
    assert storescu(node.port, series.folder).returncode == 0
    node.wait_complete(series.series_uid, revision=1)
    late = add_slice(series, tmp_path / "late", index=10, matrix=64)
    assert store_status(node.port, late.files[0]) == SUCCESS
    row = node.wait_complete(series.series_uid, revision=2)
    assert row["instance_count"] == 11
    # no worker ran revision 1's job before revision 2 opened: it is superseded, revision 2 (all 11) is analysed
    assert [(j["revision"], j["state"]) for j in node.jobs(series.series_uid)] == [(1, "superseded"), (2, "queued")]
    revisions = [r["revision"] for r in node.instances(series.series_uid)]
    assert revisions.count(1) == 10 and revisions.count(2) == 1
    st = status_series(node, series.series_uid)
    assert (st["revision"], st["instances"], len(st["jobs"])) == (2, 11, 2)


# -- what is stored but never analysed -----------------------------------------------------------------
def test_own_output_is_stored_without_a_job(node: NodeProcess, tmp_path: Path) -> None:
    key_image = write_secondary_capture(tmp_path / "own" / "key.dcm", manufacturer="lungnode")
    own_ct = write_ct_series(tmp_path / "own-ct", slices=2, matrix=32, manufacturer="lungnode")
    assert [s.status for s in send_files(node.port, [key_image.files[0], *own_ct.files])] == [SUCCESS] * 3
    for series in (key_image, own_ct):
        row = node.wait_complete(series.series_uid)
        assert row["origin"] == "own_output"
        assert node.jobs(series.series_uid) == []
        assert_stored(node, series)
    assert node.status()["counts"]["jobs"] == {}


def test_non_ct_storage_class_is_stored_without_a_job(node: NodeProcess, tmp_path: Path) -> None:
    mr = write_mr_image(tmp_path / "mr" / "mr.dcm")
    sc = write_secondary_capture(tmp_path / "sc" / "sc.dcm", manufacturer="OTHERVENDOR")
    assert store_status(node.port, mr.files[0]) == SUCCESS
    assert store_status(node.port, sc.files[0]) == SUCCESS
    for series in (mr, sc):
        row = node.wait_complete(series.series_uid)
        assert row["origin"] == "other"
        assert node.jobs(series.series_uid) == []
        assert_stored(node, series)
    assert node.status()["counts"]["jobs"] == {}
    notes = {s["series_instance_uid"]: s["note"] for s in node.status()["series"]}
    assert notes[sc.series_uid] == ("storage class Secondary Capture Image Storage (1.2.840.10008.5.1.4.1.1.7) is "
                                    "stored but not analysed")  # named, not only numbered


def test_a_ct_series_whose_first_instance_is_not_ct_still_gets_a_job(node: NodeProcess, tmp_path: Path) -> None:
    """The first instance sets a series' origin; CT images after a stray MR image must not leave the series
    unanalysed and silent. It gets its job, whose analysis refuses the mix with the reason."""
    series = make_series(tmp_path / "ct", slices=3, matrix=32)
    mr = write_mr_image(tmp_path / "mr" / "mr.dcm")
    stray = _rewritten(mr.files[0], tmp_path / "stray.dcm", SeriesInstanceUID=series.series_uid,
                       StudyInstanceUID=series.study_uid,
                       PatientID=str(pydicom.dcmread(series.files[0]).get("PatientID", "")))
    assert [s.status for s in send_files(node.port, [stray, *series.files])] == [SUCCESS] * 4
    row = node.wait_complete(series.series_uid)
    assert row["origin"] == "modality"
    assert [j["state"] for j in node.jobs(series.series_uid)] == ["queued"]


def test_legacy_converted_enhanced_ct_gets_a_job(node: NodeProcess, tmp_path: Path) -> None:
    """A PACS that converts classic series may send Legacy Converted Enhanced CT: analysed like Enhanced CT."""
    classic = make_series(tmp_path / "ct", slices=3, matrix=32)
    path, _ = write_legacy_converted_ct(list(classic.files), tmp_path / "lce" / "ct.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert store_status(node.port, path) == SUCCESS
    row = node.wait_complete(str(ds.SeriesInstanceUID))
    assert row["origin"] == "modality"
    assert [j["state"] for j in node.jobs(str(ds.SeriesInstanceUID))] == ["queued"]


# -- out of disk -------------------------------------------------------------------------------------------
def test_out_of_disk_answers_a700_and_records_nothing(node_factory: NodeFactory, tmp_path: Path) -> None:
    node = node_factory(settings={"storage": {"min_free_disk_mb": 10**9}})
    series = make_series(tmp_path / "ct", slices=3, matrix=32)
    sent = send_files(node.port, series.files)
    assert [s.status for s in sent] == [0xA700] * 3
    proc = storescu(node.port, series.folder)
    assert "0xa700" in (proc.stdout + proc.stderr).lower() or proc.returncode != 0, proc.stderr
    assert node.count("instances") == 0
    assert node.count("series") == 0
    assert node.spool_files() == []
    assert node.incoming_files() == []
    refusals = [ln for ln in node.log.splitlines() if "event=store_refused" in ln]
    # a full disk needs a person, and IT alerts on ERROR: one a minute says so and what to do, the rest are WARNING
    assert len(refusals) >= 4 and all("status=0xA700" in ln and "fix=" in ln for ln in refusals)
    assert [" ERROR " in ln for ln in refusals] == [True] + [False] * (len(refusals) - 1)
    text = run_cli("status", "--config", node.config_path).stdout
    assert "LOW: C-STORE is being refused" in text, text


def test_a_spool_that_cannot_be_written_answers_a700_and_the_association_ends_cleanly(
    node: NodeProcess, tmp_path: Path,
) -> None:
    """Before: the write error escaped in pynetdicom's thread, the association was aborted with no status for the
    sender, nothing said why at ERROR, and the ledger kept it open. Here the incoming folder is made unusable
    (a file in its place: as root, permission bits would not stop the node)."""
    incoming = node.spool_dir / "incoming"
    for leftover in incoming.iterdir():
        leftover.unlink()
    incoming.rmdir()
    incoming.write_bytes(b"")
    series = make_series(tmp_path / "ct", slices=3, matrix=32)
    sent = send_files(node.port, series.files)
    assert [s.status for s in sent] == [0xA700] * 3
    refusals = [ln for ln in node.log.splitlines() if "event=store_refused" in ln]
    assert len(refusals) == 3 and all("could not be written to the spool" in ln and "fix=" in ln for ln in refusals)
    assert [" ERROR " in ln for ln in refusals] == [True, False, False]  # IT alerts on the first, not on each
    wait_until(lambda: "event=association_released" in node.log, what="the association released, not aborted")
    assert node.query("SELECT state FROM associations")[-1]["state"] == "released"
    assert node.count("instances") == 0 and node.spool_files() == []
    incoming.unlink()
    incoming.mkdir()  # the spool repaired: the same images are taken without a restart
    assert [s.status for s in send_files(node.port, series.files)] == [SUCCESS] * 3


def test_an_image_the_ledger_cannot_record_is_refused_and_not_kept(node: NodeProcess, tmp_path: Path) -> None:
    """Refused (0xA700) means not taken: before, the file linked into the spool stayed there and the next start
    adopted an image its sender had been told was refused. The ledger fails for real here: its table is renamed
    under the running node."""
    import sqlite3

    series = make_series(tmp_path / "ct", slices=2, matrix=32)
    with sqlite3.connect(node.db_path) as db:
        db.execute("ALTER TABLE instances RENAME TO instances_away")
    sent = send_files(node.port, series.files)
    assert [s.status for s in sent] == [0xA700] * 2
    refusals = [ln for ln in node.log.splitlines() if "event=store_refused" in ln]
    assert len(refusals) == 2 and all("the ledger database could not record it" in ln for ln in refusals)
    assert "no such table" in refusals[0] and "fix=" in refusals[0]
    assert node.spool_files() == [] and node.incoming_files() == []


# -- real CT ----------------------------------------------------------------------------------------------
def test_real_lidc_series(node: NodeProcess, lidc_0001: Path) -> None:
    files = sorted(lidc_0001.rglob("*.dcm"))
    assert len(files) == 133
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    proc = storescu(node.port, lidc_0001)  # a folder: +sd +r +sp '*.dcm' (it also holds an XML file)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = node.wait_complete(series_uid, timeout=30)
    assert (row["instance_count"], row["origin"], row["modality"]) == (133, "modality", "CT")
    assert len(node.spool_files(series_uid)) == 133
    assert [j["revision"] for j in node.jobs(series_uid)] == [1]
    assert node.incoming_files() == []
