"""The objects' creation dates and times are in the study's time zone: the source's UTC offset when it names one
(written with them), else the node's local zone (TZ), one moment for all objects of an analysis."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from node.outputs.clock import creation_moment, source_offset, stamp_creation
from tests.helpers.faults import phantom, synth_series
from tests.helpers.onnx_models import make_models_dir

NOW = dt.datetime(2026, 1, 31, 23, 30, 0, tzinfo=dt.timezone.utc)


def _header(offset: str | None) -> Dataset:
    ds = Dataset()
    if offset is not None:
        ds.TimezoneOffsetFromUTC = offset
    return ds


@pytest.mark.parametrize("value, expected", [("+0100", "+0100"), ("-0530", "-0530"), ("+1400", "+1400"),
                                             ("0100", None), ("+0160", None), ("+1500", None), ("", None), (None, None)])
def test_source_offset(value: str | None, expected: str | None) -> None:
    assert source_offset(_header(value)) == expected


def test_the_source_offset_sets_the_zone_and_is_written() -> None:
    moment, offset = creation_moment(_header("+0100"), NOW)
    assert offset == "+0100" and (moment.date(), moment.hour, moment.minute) == (dt.date(2026, 2, 1), 0, 30)
    ds = Dataset()
    ds.ContentDate, ds.ContentTime, ds.InstanceCreationDate, ds.InstanceCreationTime = "20000101", "000000", "", ""
    stamp_creation(ds, moment, offset)
    assert (ds.ContentDate, ds.ContentTime, ds.InstanceCreationDate) == ("20260201", "003000.000000", "20260201")
    assert ds.TimezoneOffsetFromUTC == "+0100" and "DateOfSecondaryCapture" not in ds


def test_without_a_source_offset_the_local_zone_is_used_and_no_offset_written() -> None:
    moment, offset = creation_moment(_header(None), NOW)
    assert offset is None and moment == NOW and moment.utcoffset() == NOW.astimezone().utcoffset()
    ds = Dataset()
    ds.ContentDate = ds.ContentTime = ""
    stamp_creation(ds, moment, offset)
    assert "TimezoneOffsetFromUTC" not in ds


def _process(series: Path, out: Path, models: Path, tz: str) -> list[pydicom.Dataset]:
    env = {**os.environ, "TZ": tz, "LUNGNODE_INFERENCE__MODELS_DIR": str(models), "LUNGNODE_INFERENCE__DEVICE": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "node.cli", "process", str(series), "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(out.glob("*.dcm"))]


def test_process_dates_the_objects_in_the_node_s_time_zone(tmp_path: Path) -> None:
    """A POSIX TZ string (no tzdata needed): a node on UTC+9 writes UTC+9 times, on UTC UTC times."""
    series = synth_series(tmp_path / "in", phantom(slices=40, matrix=96, seed=2, variant="mixed"))
    models = make_models_dir(tmp_path / "models")
    before = dt.datetime.now(dt.timezone.utc)
    tokyo = _process(series.folder, tmp_path / "tokyo", models, "JST-9")
    utc = _process(series.folder, tmp_path / "utc", models, "UTC0")
    after = dt.datetime.now(dt.timezone.utc)
    for objects, hours in ((tokyo, 9), (utc, 0)):
        assert len(objects) >= 4
        stamps = {(str(ds.ContentDate), str(ds.ContentTime)) for ds in objects}
        assert len(stamps) == 1  # one moment for all objects of the analysis
        assert {(str(ds.SeriesDate), str(ds.SeriesTime)) for ds in objects} == stamps  # shown in PACS series lists
        [(date, time)] = stamps
        when = dt.datetime.strptime(date + time.split(".")[0], "%Y%m%d%H%M%S").replace(
            tzinfo=dt.timezone(dt.timedelta(hours=hours)))
        assert before - dt.timedelta(seconds=1) <= when <= after
        assert all("TimezoneOffsetFromUTC" not in ds for ds in objects)


def test_process_keeps_the_source_offset(tmp_path: Path) -> None:
    series = synth_series(tmp_path / "in", phantom(slices=40, matrix=96, seed=2, variant="mixed"))
    for f in series.folder.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.TimezoneOffsetFromUTC = "-0500"
        ds.save_as(f)
    before = dt.datetime.now(dt.timezone.utc)
    objects = _process(series.folder, tmp_path / "out", make_models_dir(tmp_path / "models"), "JST-9")
    assert {str(ds.TimezoneOffsetFromUTC) for ds in objects} == {"-0500"}
    ds = objects[0]
    when = dt.datetime.strptime(str(ds.ContentDate) + str(ds.ContentTime).split(".")[0], "%Y%m%d%H%M%S").replace(
        tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    assert before - dt.timedelta(seconds=1) <= when <= dt.datetime.now(dt.timezone.utc)
