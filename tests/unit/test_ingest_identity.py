"""Two patients are never mixed in one series, and two images never share one SOP Instance UID, on a real SQLite
ledger with real files: what the receive path refuses (0xC224) instead of acknowledging."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.db.ingest import IngestLedger, Outcome, Recorded
from node.db.models import Instance, Study
from node.errors import InstanceRejected
from node.receive.inspect import STATUS_OTHER_STUDY, inspect_instance
from tests.helpers.series import make_ct_dataset


def record(ledger: IngestLedger, folder: Path, ds: Dataset) -> Recorded:
    path = folder / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    header = inspect_instance(path, sop_class_uid="", sop_instance_uid=path.stem, check_request=False)
    return ledger.record_instance(header, path=path, size_bytes=path.stat().st_size, association_id=None,
                                  own_output=False)


def slices(n: int, *, study: str | None = None, series: str | None = None) -> list[Dataset]:
    study, series = study or generate_uid(), series or generate_uid()
    return [make_ct_dataset(study_uid=study, series_uid=series, index=i, matrix=16) for i in range(n)]


@pytest.mark.parametrize("first", ["absent", "empty"])
def test_a_study_whose_first_image_has_no_patient_id_takes_the_first_one_given(
        ledger: IngestLedger, sessions: sessionmaker[Session], tmp_path: Path, first: str) -> None:
    series = slices(5)
    if first == "absent":
        del series[0].PatientID
    else:
        series[0].PatientID = ""
    for ds, pid in zip(series[1:], ["PAT-A", "PAT-A", "PAT-B", ""]):
        ds.PatientID = pid
    assert record(ledger, tmp_path, series[0]).outcome == Outcome.stored
    assert record(ledger, tmp_path, series[1]).outcome == Outcome.stored
    assert record(ledger, tmp_path, series[2]).outcome == Outcome.stored  # the cached, fast path
    with pytest.raises(InstanceRejected) as refused:
        record(ledger, tmp_path, series[3])
    assert refused.value.status == STATUS_OTHER_STUDY
    assert record(ledger, tmp_path, series[4]).outcome == Outcome.stored  # no PatientID: not another patient
    with sessions() as s:
        assert s.scalars(select(Study.patient_id)).one() == "PAT-A"
        assert len(list(s.scalars(select(Instance)))) == 4


def test_another_series_of_the_study_cannot_bring_a_second_patient(
        ledger: IngestLedger, tmp_path: Path) -> None:
    first = slices(2)
    first[0].PatientID = ""
    first[1].PatientID = ""
    second = slices(2, study=first[0].StudyInstanceUID)
    second[0].PatientID, second[1].PatientID = "PAT-A", "PAT-B"
    for ds in first:
        record(ledger, tmp_path, ds)
    assert record(ledger, tmp_path, second[0]).outcome == Outcome.stored
    first_more = make_ct_dataset(study_uid=first[0].StudyInstanceUID, series_uid=first[0].SeriesInstanceUID,
                                 index=2, matrix=16)
    first_more.PatientID = "PAT-B"
    for ds in (second[1], first_more):  # the study is PAT-A's now, whichever series names PAT-B
        with pytest.raises(InstanceRejected) as refused:
            record(ledger, tmp_path, ds)
        assert refused.value.status == STATUS_OTHER_STUDY


def test_one_sop_instance_uid_for_two_images_in_two_series_of_a_study_is_refused(
        ledger: IngestLedger, sessions: sessionmaker[Session], tmp_path: Path) -> None:
    a = slices(2)
    b = slices(2, study=a[0].StudyInstanceUID)
    for ds in a:
        record(ledger, tmp_path, ds)
    record(ledger, tmp_path, b[0])
    b[1].SOPInstanceUID = b[1].file_meta.MediaStorageSOPInstanceUID = a[1].SOPInstanceUID
    with pytest.raises(InstanceRejected, match="already held here in another series of this study") as refused:
        record(ledger, tmp_path, b[1])
    assert refused.value.status == STATUS_OTHER_STUDY
    again = record(ledger, tmp_path, a[1])  # the same image sent again to its own series: a plain duplicate
    assert again.outcome == Outcome.duplicate
    with sessions() as s:
        assert len(list(s.scalars(select(Instance)))) == 3
