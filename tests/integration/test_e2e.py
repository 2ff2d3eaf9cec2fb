"""The whole loop against a real PACS: Orthanc sends a CT to ``lungnode serve`` (real models), and the
SEG, SR and key image come back into Orthanc — once, whatever goes down on the way.

Orthanc runs a Lua ``OnStoredInstance`` callback that logs every instance it stores, a repeated
C-STORE of the same instance included: counting those lines per SOP Instance UID is how "exactly
once" is checked at the PACS, not only in the node's outbox.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import generate_uid

from node.synthetic import PhantomSpec, SeriesOptions, make_phantom, write_series
from tests.conftest import LIDC_0001, NodeFactory
from tests.helpers.audit import parse, schema, udp_repository, xml_of
from tests.helpers.dcmtk import storescu
from tests.helpers.net import free_port
from tests.helpers.node_proc import NodeProcess, query_sqlite
from tests.helpers.orthanc import Modality, OrthancServer, have_orthanc
from tests.helpers.wait import wait_until

pytestmark = pytest.mark.skipif(not have_orthanc(), reason="Orthanc is not installed (Debian package orthanc)")

PACS_AE, NODE_AE = "PACS", "LUNGNODE"
KINDS = {"seg", "sr", "key_image", "kos"}


def node_settings(pacs: OrthancServer) -> dict[str, Any]:
    return {
        "dicom": {"ae_title": NODE_AE, "allowed_callers": [{"ae_title": PACS_AE}]},
        "destinations": [{"name": "pacs", "ae_title": PACS_AE, "host": "127.0.0.1", "port": pacs.dicom_port}],
        "sending": {"retry_base_s": 0.5, "retry_max_delay_s": 1.0, "poll_interval_s": 0.2, "max_attempts": 1000},
        "workers": {"count": 1, "poll_interval_s": 0.2},
    }


COUNT_STORES = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  print("stored-instance " .. tags["SOPInstanceUID"])
end
"""


def start_pacs(workdir: Path, node_port: int) -> OrthancServer:
    workdir.mkdir(parents=True)
    (workdir / "count.lua").write_text(COUNT_STORES, encoding="utf-8")
    return OrthancServer(workdir, ae_title=PACS_AE, modalities={"lungnode": Modality(NODE_AE, node_port)},
                         extra_config={"LuaScripts": [str(workdir / "count.lua")]}).start()


def synthetic_study(out: Path, seed: int) -> list[Path]:
    ph = make_phantom(PhantomSpec(kind="covid", slices=48, matrix=256, seed=seed))
    opts = SeriesOptions(seed=seed, write_truth=False, manufacturer="SYNTHETIC", study_instance_uid=generate_uid(),
                         series_instance_uid=generate_uid())
    return sorted(write_series(out, ph, opts).files)


def upload(pacs: OrthancServer, files: list[Path]) -> str:
    """Upload a series as a modality would; Orthanc's study id."""
    return str([pacs.upload(f) for f in files][-1]["ParentStudy"])


def received(pacs: OrthancServer) -> dict[str, int]:
    """How many times Orthanc stored each SOP Instance UID (its log, across restarts)."""
    counts: dict[str, int] = {}
    for uid in re.findall(r"Lua says: stored-instance (\S+)", pacs.log):
        counts[uid] = counts.get(uid, 0) + 1
    return counts


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie has stopped


def send_as_pacs(node: NodeProcess, files: list[Path]) -> None:
    """The series sent to the node under the PACS's AE title, while that PACS itself is down."""
    proc = storescu(node.port, *files, calling=PACS_AE, called=NODE_AE)
    assert proc.returncode == 0, proc.stderr


def outputs_of(node: NodeProcess, series_uid: str) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """result.json and outputs.json of the last job of a series, once both are published."""
    rows = query_sqlite(node.db_path, "SELECT j.id, j.state FROM jobs j JOIN series s ON s.id = j.series_id "
                                      "WHERE s.series_instance_uid = ? ORDER BY j.id DESC", series_uid)
    assert rows, f"no job for series {series_uid}"
    out = node.spool_dir / "results" / f"job-{rows[0]['id']}"
    return (json.loads((out / "result.json").read_text()),
            json.loads((out / "outputs.json").read_text())["objects"])


def wait_results_at(pacs: OrthancServer, node: NodeProcess, series_uid: str, timeout: float = 240) -> list[dict[str, str]]:
    def ready() -> list[dict[str, str]] | None:
        try:
            _, objects = outputs_of(node, series_uid)
        except (AssertionError, FileNotFoundError):
            return None
        uids = received(pacs)
        return objects if all(o["sop_instance_uid"] in uids for o in objects) else None

    return wait_until(ready, timeout=timeout, what=f"results of {series_uid} in Orthanc", log=lambda: node.log[-4000:])


def assert_exactly_once(pacs: OrthancServer, node: NodeProcess, objects: list[dict[str, str]],
                        kinds: set[str] = KINDS) -> None:
    assert {o["kind"] for o in objects} == kinds
    uids = {o["sop_instance_uid"] for o in objects}

    def all_sent() -> list[dict[str, Any]] | None:
        rows = query_sqlite(node.db_path, "SELECT sop_instance_uid, state FROM outbox")
        mine = [r for r in rows if r["sop_instance_uid"] in uids]
        return mine if mine and {r["state"] for r in mine} == {"sent"} else None

    # Orthanc stores an object before the node has read its C-STORE response and recorded it: wait for the record.
    mine = wait_until(all_sent, timeout=30, what="the outbox rows of the results recorded as sent",
                      log=lambda: node.log[-4000:])
    assert sorted(r["sop_instance_uid"] for r in mine) == sorted(uids)
    counts = received(pacs)
    for obj in objects:
        assert counts.get(obj["sop_instance_uid"]) == 1, (obj, counts.get(obj["sop_instance_uid"]))


@pytest.fixture
def audit_sink() -> Iterator[tuple[int, socket.socket]]:
    """A UDP socket standing in for the hospital's audit repository (the node's audit trail sends there)."""
    with udp_repository() as sink:
        yield sink


@pytest.fixture
def loop(tmp_path: Path, node_factory: NodeFactory,
         audit_sink: tuple[int, socket.socket]) -> Iterator[tuple[OrthancServer, NodeProcess]]:
    port = free_port()
    pacs = start_pacs(tmp_path / "pacs", port)
    audit = {"audit": {"host": "127.0.0.1", "port": audit_sink[0], "transport": "udp"}}
    node = node_factory("node", port=port, settings={**node_settings(pacs), **audit})
    yield pacs, node
    pacs.stop()


def audit_messages(sink: socket.socket) -> list[Any]:
    """The audit messages the node sent so far, parsed, each checked against the DICOM schema."""
    rng, out = schema(), []
    sink.settimeout(1.0)
    while True:
        try:
            doc = parse(xml_of(sink.recv(65535)))
        except TimeoutError:
            return out
        assert rng.validate(doc), rng.error_log.last_error
        out.append(doc)


def transfers(messages: list[Any]) -> dict[str, dict[str, int]]:
    """DICOM Instances Transferred messages by their source's AE title: SOP class UID -> instances."""
    out: dict[str, dict[str, int]] = {}
    for doc in messages:
        if doc.find("EventIdentification/EventID").get("csd-code") != "110104":
            continue
        source = next(p for p in doc.findall("ActiveParticipant") if p.find("RoleIDCode").get("csd-code") == "110153")
        counts = out.setdefault(source.get("UserID"), {})
        for c in doc.iter("SOPClass"):
            counts[c.get("UID")] = counts.get(c.get("UID"), 0) + int(c.get("NumberOfInstances"))
    return out


def check_objects_from_pacs(pacs: OrthancServer, objects: list[dict[str, str]], result: dict[str, Any],
                            source: pydicom.Dataset) -> None:
    """Read every object back from Orthanc and check it against the node's result."""

    for obj in objects:
        oid = pacs.find_instance(obj["sop_instance_uid"])
        assert oid is not None
        ds = pydicom.dcmread(io.BytesIO(pacs.get_file(oid)))
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
        assert ds.Manufacturer == "lungnode"
        if obj["kind"] == "seg":
            seg = hd.seg.Segmentation.from_dataset(ds)
            assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
            labels = {d.SegmentLabel.lower() for d in seg.SegmentSequence}
            assert any("right" in x for x in labels) and any("left" in x for x in labels)
        elif obj["kind"] == "sr":
            sr = hd.sr.EnhancedSR.from_dataset(ds)
            text = str(sr)
            for name, p in (result.get("probabilities") or {}).items():
                assert f"{p:g}"[:4] in text or str(round(p, 2)) in text, (name, p)
        elif obj["kind"] == "kos":  # marks slices of the analysed series, held by the PACS too
            flagged = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                       for i in ds.ContentSequence if i.ValueType == "IMAGE"}
            assert flagged and all(pacs.find_instance(uid) is not None for uid in flagged)
            evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
            assert evidence.SeriesInstanceUID == source.SeriesInstanceUID
        else:
            assert ds.SOPClassUID.startswith("1.2.840.10008.5.1.4.1.1.7")
            png = pacs.get_bytes(f"/instances/{oid}/preview")
            assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_synthetic_study_round_trip_and_a_repush_adds_nothing(loop: tuple[OrthancServer, NodeProcess],
                                                               tmp_path: Path,
                                                               audit_sink: tuple[int, socket.socket]) -> None:
    pacs, node = loop
    files = synthetic_study(tmp_path / "ct", seed=3)
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    study = upload(pacs, files)
    pacs.push("lungnode", [study])
    objects = wait_results_at(pacs, node, source.SeriesInstanceUID)
    result, _ = outputs_of(node, source.SeriesInstanceUID)
    assert result["status"] == "ok"
    check_objects_from_pacs(pacs, objects, result, source)
    assert_exactly_once(pacs, node, objects)
    # The audit trail (IHE ATNA) told the repository both transfers: the CT in from the PACS, the results out.
    moved = transfers(audit_messages(audit_sink[1]))
    assert moved[PACS_AE] == {str(source.SOPClassUID): len(files)}
    sent: dict[str, int] = {}
    for obj in objects:
        sent[obj["sop_class_uid"]] = sent.get(obj["sop_class_uid"], 0) + 1
    assert moved[NODE_AE] == sent

    # Orthanc re-pushes the whole study, our results included: nothing new is analysed or sent.
    jobs_before = query_sqlite(node.db_path, "SELECT COUNT(*) AS n FROM jobs")[0]["n"]
    instances_before = set(pacs.instances())
    pacs.push("lungnode", [study])
    wait_until(lambda: query_sqlite(node.db_path, "SELECT COUNT(*) AS n FROM associations WHERE state != 'open'")[0]["n"] >= 2,
               timeout=60, what="the re-push to be received")
    time.sleep(4.0)  # longer than the quiet period (2 s) and the release grace: any new job would exist now
    assert query_sqlite(node.db_path, "SELECT COUNT(*) AS n FROM jobs")[0]["n"] == jobs_before
    assert set(pacs.instances()) == instances_before
    assert_exactly_once(pacs, node, objects)


def test_pacs_down_while_results_are_ready_then_up(loop: tuple[OrthancServer, NodeProcess], tmp_path: Path) -> None:
    pacs, node = loop
    files = synthetic_study(tmp_path / "ct", seed=4)
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    pacs.stop()  # down before the results exist (a stopping Orthanc still takes C-STOREs for a while)
    send_as_pacs(node, files)
    wait_until(lambda: query_sqlite(node.db_path, "SELECT COUNT(*) AS n FROM outbox WHERE attempts >= 2")[0]["n"] >= 3,
               timeout=240, what="failed send attempts while the PACS is down", log=lambda: node.log[-4000:])
    pacs.start()
    objects = wait_results_at(pacs, node, series_uid)
    assert_exactly_once(pacs, node, objects)


def test_node_killed_between_inference_and_send(loop: tuple[OrthancServer, NodeProcess], tmp_path: Path) -> None:
    pacs, node = loop
    files = synthetic_study(tmp_path / "ct", seed=5)
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    pacs.stop()  # the results cannot leave: the node is killed with them analysed but unsent
    send_as_pacs(node, files)
    wait_until(lambda: query_sqlite(node.db_path, "SELECT COUNT(*) AS n FROM outbox")[0]["n"] >= 3,
               timeout=240, what="results queued for sending", log=lambda: node.log[-4000:])
    assert not query_sqlite(node.db_path, "SELECT 1 FROM outbox WHERE state IN ('sent', 'committed')")
    workers = [int(pid) for pid in re.findall(r"event=worker_ready worker=\S+:(\d+)", node.log)]
    assert workers
    node.kill()
    # The killed node's worker processes notice and stop: no stray workers beside the restarted node's.
    wait_until(lambda: not any(pid_alive(pid) for pid in workers), timeout=30, what="orphaned workers to stop")
    pacs.start()
    node.start()
    objects = wait_results_at(pacs, node, series_uid)
    assert_exactly_once(pacs, node, objects)
    assert query_sqlite(node.db_path, "SELECT COUNT(*) AS n FROM jobs")[0]["n"] == 1


@pytest.mark.skipif(not LIDC_0001.is_file(), reason=f"real CT not available: {LIDC_0001} is absent")
def test_real_lidc_series_round_trip(loop: tuple[OrthancServer, NodeProcess], tmp_path: Path) -> None:
    pacs, node = loop
    with tarfile.open(LIDC_0001) as tar:
        tar.extractall(tmp_path / "lidc", filter="data")
    files = sorted((tmp_path / "lidc").rglob("*.dcm"))
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    pacs.push("lungnode", [upload(pacs, files)])
    objects = wait_results_at(pacs, node, source.SeriesInstanceUID, timeout=300)
    result, _ = outputs_of(node, source.SeriesInstanceUID)
    assert result["status"] == "ok", result.get("reason")
    assert result["slice_rule"]["decision"] == "no_pneumonia"
    assert max(result["probabilities"], key=result["probabilities"].get) == "no_pneumonia"
    check_objects_from_pacs(pacs, objects, result, source)
    # called no pneumonia: no key-slice marks on the study (the KOS would announce a finding the SR does not make)
    assert_exactly_once(pacs, node, objects, kinds=KINDS - {"kos"})
