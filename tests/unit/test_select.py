"""Series selection (node.pipeline.select) with the default rules of the config: each rule skips
with its name and a reason in words, and ``choose`` ranks the eligible series of a study."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from node.config import Config, PatternRule, SelectionSettings
from node.pipeline.select import NOT_BEST, SeriesHeader, Verdict, check, choose, header_image, passed_over_for
from tests.helpers.faults import phantom, synth_series, write_enhanced_ct

DEFAULTS = Config().selection


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    s = synth_series(tmp_path_factory.mktemp("select") / "s", phantom(slices=40, matrix=64, seed=2))
    return s.files[0]


@pytest.fixture
def base(written: Path) -> Dataset:
    """The header of a real synthetic chest CT slice (CT, ORIGINAL/PRIMARY/AXIAL, CHEST, axial)."""
    return pydicom.dcmread(written, stop_before_pixels=True)


def header(ds: Dataset, *, slices: int = 120, **changes: Any) -> SeriesHeader:
    ds = copy.deepcopy(ds)
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    for keyword, value in changes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return SeriesHeader.from_dataset(ds, slice_count=slices)


def skipped(h: SeriesHeader, rules: SelectionSettings = DEFAULTS) -> Verdict:
    v = check(h, rules)
    assert not v.eligible, f"expected a skip, got {v}"
    assert v.series_instance_uid == h.series_instance_uid
    assert v.rule and v.reason and len(v.reason) > 10
    return v


def eligible(h: SeriesHeader, rules: SelectionSettings = DEFAULTS) -> None:
    v = check(h, rules)
    assert v.eligible and v.rule is None and v.reason is None, v


def test_defaults_come_from_the_config() -> None:
    assert DEFAULTS == SelectionSettings()
    assert DEFAULTS.min_slices == 40 and DEFAULTS.slice_thickness_mm.max == 5.0


def test_the_synthetic_chest_ct_is_eligible(base: Dataset) -> None:
    h = header(base)
    assert h.modality == "CT" and h.normal_z == pytest.approx(1.0) and h.body_part == "CHEST"
    assert h.image_type == ("ORIGINAL", "PRIMARY", "AXIAL")
    eligible(h)


def test_modality(base: Dataset) -> None:
    v = skipped(header(base, Modality="MR"))
    assert v.rule == "modality" and "MR" in v.reason and "CT" in v.reason


def test_image_type(base: Dataset) -> None:
    v = skipped(header(base, ImageType=["DERIVED", "SECONDARY", "MPR"]))
    assert v.rule == "image_type"
    assert "DERIVED/SECONDARY/MPR" in v.reason and "lacks ORIGINAL" in v.reason
    assert skipped(header(base, ImageType=None)).rule == "image_type"
    v = skipped(header(base, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    assert v.rule == "image_type" and "holds LOCALIZER" in v.reason


def test_a_reconstruction_made_after_the_scan_is_eligible(base: Dataset) -> None:
    # LIDC-IDRI-0002 and retrospective reconstructions from raw data carry ORIGINAL/SECONDARY/AXIAL
    eligible(header(base, ImageType=["ORIGINAL", "SECONDARY", "AXIAL"]))


def test_primary_wins_a_tie_with_secondary(base: Dataset) -> None:
    later = header(base, ImageType=["ORIGINAL", "SECONDARY", "AXIAL"], SeriesInstanceUID="1.2.3.1")
    first = header(base, SeriesInstanceUID="1.2.3.2")
    for order in ([later, first], [first, later]):
        best, verdicts = choose(order, DEFAULTS)
        assert best is first
        assert {v.series_instance_uid: v.rule for v in verdicts}["1.2.3.1"] == "not_best"


def test_orientation(base: Dataset) -> None:
    v = skipped(header(base, ImageOrientationPatient=[1, 0, 0, 0, 0, -1]))  # coronal
    assert v.rule == "orientation" and "90 degrees" in v.reason and "not axial" in v.reason
    v = skipped(header(base, ImageOrientationPatient=[0, 1, 0, 0, 0, -1]))  # sagittal
    assert v.rule == "orientation" and "90 degrees" in v.reason
    v = skipped(header(base, ImageOrientationPatient=None))
    assert v.rule == "orientation" and "unknown" in v.reason
    c, s = math.cos(math.radians(5)), math.sin(math.radians(5))
    eligible(header(base, ImageOrientationPatient=[1, 0, 0, 0, c, s]))  # 5 degrees oblique: within 10
    c, s = math.cos(math.radians(20)), math.sin(math.radians(20))
    v = skipped(header(base, ImageOrientationPatient=[1, 0, 0, 0, c, s]))
    assert v.rule == "orientation" and "20 degrees" in v.reason


@pytest.mark.parametrize("thickness", ["0.3", "7", "10"])
def test_thickness_out_of_range(base: Dataset, thickness: str) -> None:
    v = skipped(header(base, SliceThickness=thickness))
    assert v.rule == "slice_thickness"
    assert f"slice thickness {float(thickness):g} mm outside 0.5-5 mm" == v.reason


def test_thickness_limits_and_missing(base: Dataset) -> None:
    eligible(header(base, SliceThickness="0.5"))
    eligible(header(base, SliceThickness="5"))
    v = skipped(header(base, SliceThickness=None))
    assert v.rule == "slice_thickness" and "missing" in v.reason


def test_too_few_slices(base: Dataset) -> None:
    v = skipped(header(base, slices=39))
    assert v.rule == "min_slices" and v.reason == "39 slices, at least 40 needed"
    eligible(header(base, slices=40))


@pytest.mark.parametrize(
    "description", ["Scout", "Topogram 0.6 T20f", "COR MIP 10mm", "Dose Report", "Patient Protocol Dose Info",
                    "Lung 1.0 MinIP", "SAG 3mm", "Coronal lung 2mm", "3D VRT"],
)
def test_description_excludes(base: Dataset, description: str) -> None:
    v = skipped(header(base, SeriesDescription=description))
    assert v.rule == "series_description"
    assert description in v.reason and "exclude pattern" in v.reason


@pytest.mark.parametrize("description", ["Corona protocol chest 1.0", "CORONA THORAX", "Thorax 1.0 B70f", "Lung"])
def test_description_corona_and_plain_chest_are_not_excluded(base: Dataset, description: str) -> None:
    eligible(header(base, SeriesDescription=description))


def test_low_dose_chest_is_not_a_dose_report(base: Dataset) -> None:
    eligible(header(base, SeriesDescription="Low Dose Chest 1.25mm"))


@pytest.mark.parametrize("part", ["HEAD", "BRAIN", "ABDOMEN", "PELVIS"])
def test_body_part_excludes(base: Dataset, part: str) -> None:
    v = skipped(header(base, BodyPartExamined=part))
    assert v.rule == "body_part" and part in v.reason


@pytest.mark.parametrize("part", ["CHEST", "THORAX", "", "HEADNECK_CHEST"])
def test_body_part_accepts(base: Dataset, part: str) -> None:
    eligible(header(base, BodyPartExamined=part))


def test_include_patterns(base: Dataset) -> None:
    rules = SelectionSettings(series_description=PatternRule(include=[r"(?i)lung|thorax"]),
                              convolution_kernel=PatternRule(include=[r"(?i)^b[67]"], exclude=[r"(?i)b70s"]))
    v = skipped(header(base, SeriesDescription="Abdomen 5mm", ConvolutionKernel="B70f"), rules)
    assert v.rule == "series_description" and "matches none of the include patterns" in v.reason
    v = skipped(header(base, SeriesDescription="Thorax 1mm", ConvolutionKernel="B30f"), rules)
    assert v.rule == "convolution_kernel" and "'B30f'" in v.reason
    v = skipped(header(base, SeriesDescription="Thorax 1mm", ConvolutionKernel="B70s"), rules)
    assert v.rule == "convolution_kernel" and "exclude pattern" in v.reason
    eligible(header(base, SeriesDescription="Thorax 1mm", ConvolutionKernel=["B70f", "3"]), rules)


def test_rules_report_the_first_failure_in_order(base: Dataset) -> None:
    h = header(base, Modality="MR", SeriesDescription="Scout", SliceThickness="9", slices=2)
    assert skipped(h).rule == "modality"
    h = header(base, SeriesDescription="Scout", SliceThickness="9", slices=2)
    assert skipped(h).rule == "slice_thickness"


def test_choose_prefers_lung_kernel_then_thinner(base: Dataset) -> None:
    soft_thick = header(base, SliceThickness="5", ConvolutionKernel="STANDARD", slices=60)
    soft_thin = header(base, SliceThickness="1", ConvolutionKernel="STANDARD", slices=300)
    lung = header(base, SliceThickness="2", ConvolutionKernel="LUNG", slices=150)
    lung_thin = header(base, SliceThickness="1.25", ConvolutionKernel=["Br64", "3"], slices=240)
    scout = header(base, SeriesDescription="Scout")
    headers = [soft_thick, scout, lung, soft_thin, lung_thin]
    best, verdicts = choose(headers, DEFAULTS)
    assert best is lung_thin
    assert [v.series_instance_uid for v in verdicts] == [h.series_instance_uid for h in headers]
    by_uid = {v.series_instance_uid: v for v in verdicts}
    assert by_uid[lung_thin.series_instance_uid].eligible
    for loser in (soft_thick, lung, soft_thin):
        v = by_uid[loser.series_instance_uid]
        assert not v.eligible and v.rule == "not_best"
        assert lung_thin.series_instance_uid in v.reason and "1.25 mm" in v.reason
    assert by_uid[scout.series_instance_uid].rule == "series_description"

    # without the sharp ones, a lung kernel still beats a thinner soft-tissue kernel
    best, _ = choose([soft_thin, lung, soft_thick], DEFAULTS)
    assert best is lung
    # same kernel class and thickness: more slices wins
    more = header(base, SliceThickness="2", ConvolutionKernel="LUNG", slices=200)
    assert choose([lung, more], DEFAULTS)[0] is more


def test_choose_without_candidates(base: Dataset) -> None:
    scout = header(base, SeriesDescription="Scout")
    thick = header(base, SliceThickness="8")
    best, verdicts = choose([scout, thick], DEFAULTS)
    assert best is None
    assert [v.rule for v in verdicts] == ["series_description", "slice_thickness"]


def _with_raw(ds: Dataset, tag: int, vr: str, value: bytes) -> Dataset:
    """``ds`` holding an element as read from a file, undecoded (pydicom will not set 'ab' into an IS itself)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = copy.deepcopy(ds)
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    return ds


@pytest.mark.parametrize("value", [b"ab", b"-2", b"1.5 "])
def test_a_number_of_frames_that_is_not_one_skips_the_series_by_name(base: Dataset, value: bytes) -> None:
    """``int('ab')`` failed the job of this series and of every other series of its study that chose among them."""
    bad = SeriesHeader.from_dataset(_with_raw(base, 0x00280008, "IS", value), slice_count=120)
    v = skipped(bad)
    assert (v.rule, v.reason) == ("header_invalid", f"NumberOfFrames {value.decode().strip()!r} is not a number of "
                                                    "frames")
    good = header(base)
    best, verdicts = choose([good, bad], DEFAULTS)
    assert best is good and verdicts[0].eligible and verdicts[1].rule == "header_invalid"
    assert SeriesHeader.from_dataset(_with_raw(base, 0x00280008, "IS", b"1 "), slice_count=120).problem is None


def test_the_reason_of_a_series_passed_over_names_the_one_preferred(base: Dataset) -> None:
    thin, thick = header(base, SliceThickness="1"), header(base, SliceThickness="2.5")
    _, verdicts = choose([thick, thin], DEFAULTS)
    assert verdicts[0].reason and verdicts[0].reason.startswith(NOT_BEST)
    assert passed_over_for(verdicts[0].reason) == thin.series_instance_uid
    assert passed_over_for("1 slice(s) missing in 1 gap(s) of the stack") is None and passed_over_for(None) is None


def _localizer(ds: Dataset) -> Dataset:
    scout = copy.deepcopy(ds)
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    return scout


def test_a_series_is_judged_by_an_axial_image_whatever_order_its_localizer_came_in(base: Dataset) -> None:
    """Judged by its first image in the ledger, a series with its localizer first was refused 'ImageType ... holds
    LOCALIZER', and the same series with the localizer later was not."""
    from pydicom.uid import MRImageStorage

    scout = _localizer(base)
    mr = copy.deepcopy(base)
    mr.SOPClassUID = MRImageStorage
    for images in ([scout, base], [base, scout], [mr, scout, base]):
        assert header_image(iter(images)) is base
    assert header_image([scout, _localizer(base)]) is scout  # localizers alone: the first, refused for what it is
    assert header_image([mr]) is mr and header_image([]) is None
    assert skipped(SeriesHeader.from_dataset(scout, slice_count=120)).rule == "image_type"


def test_enhanced_ct_header_is_eligible(written: Path, tmp_path: Path) -> None:
    classic = sorted(written.parent.glob("*.dcm"))
    [(path, _)] = write_enhanced_ct(classic, tmp_path / "enhanced.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    h = SeriesHeader.from_dataset(ds, slice_count=1)
    assert h.slice_count == 40 and h.normal_z == pytest.approx(1.0)
    assert h.slice_thickness_mm == pytest.approx(float(pydicom.dcmread(written).SliceThickness))
    eligible(h)


def test_a_prior_study_forwarded_with_a_new_one_is_skipped_by_age(base: Dataset) -> None:
    """selection.max_study_age_days: a PACS forwarding priors does not get them analysed; off by default."""
    import datetime as dt

    today = dt.date(2026, 11, 27)
    rules = SelectionSettings(max_study_age_days=30)
    prior = header(base, StudyDate="20250102")
    v = check(prior, rules, today=today)
    assert (v.eligible, v.rule) == (False, "study_age")
    assert "dated 2025-01-02, 694 days ago: older than selection.max_study_age_days (30)" in (v.reason or "")
    assert check(header(base, StudyDate="20261028"), rules, today=today).eligible  # 30 days: still analysed
    assert not check(header(base, StudyDate="20261027"), rules, today=today).eligible
    # no Study Date: the Series Date decides; no date at all, or no valid one: the age is unknown, not a reason
    assert not check(header(base, StudyDate=None, SeriesDate="20200101"), rules, today=today).eligible
    assert check(header(base, StudyDate=None, SeriesDate=None, AcquisitionDate=None), rules, today=today).eligible
    assert check(header(base, StudyDate="2026-11-01", SeriesDate=None, AcquisitionDate=None), rules,
                 today=today).eligible
    assert check(prior, DEFAULTS, today=today).eligible
    best, verdicts = choose([prior, header(base, StudyDate="20261127")], rules, today=today)
    assert best is not None and best.study_date == today and verdicts[0].rule == "study_age"
