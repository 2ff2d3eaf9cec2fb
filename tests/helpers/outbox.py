"""Result objects for the sender's tests: a real SEG (highdicom), a minimal Comprehensive 3D SR and a
Secondary Capture key image (optionally JPEG-LS), written with an ``outputs.json`` in the agreed
format, and a job row for them to belong to."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import Job, JobState, Series, SeriesOrigin, SeriesState, Study
from node.send.outbox import dump_outputs
from tests.helpers.series import file_meta, make_ct_dataset, write_secondary_capture


@dataclass(frozen=True)
class ResultObject:
    kind: str
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def make_job(sessions: sessionmaker[Session], *, study_uid: str | None = None) -> int:
    """A done job (with its study and series) for outbox rows to refer to; its id."""
    with sessions.begin() as s:
        study = Study(study_instance_uid=study_uid or generate_uid())
        series = Series(study=study, series_instance_uid=generate_uid(), modality="CT", origin=SeriesOrigin.modality,
                        state=SeriesState.complete)
        job = Job(series=series, revision=1, state=JobState.done)
        s.add_all([study, series, job])
        s.flush()
        return int(job.id)


def open_next_revision(sessions: sessionmaker[Session], job_id: int, *, analysed: bool = False) -> int | None:
    """Late images opened the next revision of the job's series (what the ingest ledger does); with ``analysed``,
    that revision is complete and its job done: the new job's id."""
    with sessions.begin() as s:
        job = s.get(Job, job_id)
        assert job is not None
        series = s.get(Series, job.series_id)
        assert series is not None
        series.revision += 1
        if not analysed:
            series.state = SeriesState.receiving
            return None
        new = Job(series_id=series.id, revision=series.revision, state=JobState.done)
        s.add(new)
        s.flush()
        return int(new.id)


def _seg(path: Path, study_uid: str) -> ResultObject:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    series_uid = generate_uid()
    sources = [make_ct_dataset(study_uid=study_uid, series_uid=series_uid, index=i, slices=3, matrix=32) for i in range(3)]
    mask = np.zeros((3, 32, 32), dtype=bool)
    mask[1, 8:20, 8:20] = True
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lung", segmented_property_category=codes.SCT.Organ,
        segmented_property_type=codes.SCT.Lung, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment], series_instance_uid=generate_uid(), series_number=900,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="lungnode",
        manufacturer_model_name="test", software_versions="0", device_serial_number="1")
    seg.save_as(path)
    return ResultObject("seg", path, str(seg.SOPClassUID), str(seg.SOPInstanceUID), str(seg.file_meta.TransferSyntaxUID))


def _sr(path: Path, study_uid: str) -> ResultObject:
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = file_meta(Comprehensive3DSRStorage, sop_uid, ExplicitVRLittleEndian)
    ds.SOPClassUID, ds.SOPInstanceUID = Comprehensive3DSRStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.PatientName, ds.PatientID, ds.StudyDate, ds.StudyTime = "Test^Phantom", "TEST0001", "20240102", "101010"
    ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "SR", "lungnode", 901, 1
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "126000", "DCM", "Imaging Measurement Report"
    ds.ConceptNameCodeSequence = [title]
    ds.save_as(path, enforce_file_format=True)
    return ResultObject("sr", path, Comprehensive3DSRStorage, sop_uid, ExplicitVRLittleEndian)


def _key_image(path: Path, study_uid: str, *, jpegls: bool) -> ResultObject:
    info = write_secondary_capture(path, study_uid=study_uid)
    ts: UID = ExplicitVRLittleEndian
    if jpegls:
        import pydicom

        ds = pydicom.dcmread(path)
        ds.compress(JPEGLSLossless, encoding_plugin="pyjpegls", generate_instance_uid=False)
        ds.save_as(path, enforce_file_format=True)
        ts = JPEGLSLossless
    return ResultObject("key_image", path, info.sop_class_uid, info.sop_uids[0], str(ts))


def write_results(results_dir: Path, *, kinds: tuple[str, ...] = ("seg", "sr", "key_image"), jpegls: bool = False,
                  study_uid: str | None = None) -> list[ResultObject]:
    """Write one object of each kind into ``results_dir`` and list them in ``outputs.json``."""
    import pydicom

    results_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    objects: list[ResultObject] = []
    for kind in kinds:
        path = results_dir / f"{kind}.dcm"
        if kind == "seg":
            objects.append(_seg(path, study_uid))
        elif kind == "sr":
            objects.append(_sr(path, study_uid))
        else:
            objects.append(_key_image(path, study_uid, jpegls=jpegls))
    dump_outputs(results_dir, [
        {"kind": o.kind, "file": o.path.name, "sop_class_uid": o.sop_class_uid, "sop_instance_uid": o.sop_instance_uid,
         "series_instance_uid": str(pydicom.dcmread(o.path, stop_before_pixels=True).SeriesInstanceUID),
         "study_instance_uid": study_uid, "transfer_syntax_uid": o.transfer_syntax_uid}
        for o in objects
    ])
    return objects


class RecordingSCP:
    """A pynetdicom C-STORE SCP that answers ``self.status`` (after ``delay_s``: a PACS busy filing) and counts what
    it received per SOP Instance UID."""

    def __init__(self, port: int, *, status: int = 0x0000, ae_title: str = "PEER", delay_s: float = 0.0) -> None:
        self.port = port
        self.status = status
        self.delay_s = delay_s
        self.ae_title = ae_title
        self.received: Counter[str] = Counter()
        self.stored: Counter[str] = Counter()
        self.datasets: dict[str, Dataset] = {}  # the last one received per SOP Instance UID
        self._server: ThreadedAssociationServer | None = None
        self._lock = threading.Lock()

    def _on_store(self, event: evt.Event) -> int:
        time.sleep(self.delay_s)
        ds = event.dataset
        with self._lock:
            self.received[str(ds.SOPInstanceUID)] += 1
            self.datasets[str(ds.SOPInstanceUID)] = ds
            if self.status == 0x0000 or self.status & 0xF000 == 0xB000:  # success or warning: stored
                self.stored[str(ds.SOPInstanceUID)] += 1
        return self.status

    def start(self) -> RecordingSCP:
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts  # uncompressed transfer syntaxes only
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
