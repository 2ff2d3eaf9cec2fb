"""`lungnode status` text on a real SQLite ledger: a refused, failed or superseded job shows its reason."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from node.db.models import Job, JobState, Series, SeriesOrigin, SeriesState, Study
from node.db.status import render_text, summary


def test_a_job_that_did_not_finish_well_shows_why(sessions: sessionmaker[Session]) -> None:
    reasons = {JobState.rejected: "not axial: slices are 90 degrees off the axial plane",
               JobState.failed: "DICOM outputs not built: seg: ValueError", JobState.done: None}
    with sessions.begin() as s:
        study = Study(study_instance_uid="1.2.3")
        for n, (state, error) in enumerate(reasons.items()):
            series = Series(study=study, series_instance_uid=f"1.2.3.{n}", modality="CT",
                            origin=SeriesOrigin.modality, state=SeriesState.complete)
            s.add(Job(series=series, revision=1, state=state, error=error))
    with sessions() as s:
        text = render_text(summary(s, limit=10))
    for state, error in reasons.items():
        if error:
            assert f": {error}" in text, text
    assert text.count(": ") >= 2 and "job #3:" not in text  # the done job has nothing to explain
