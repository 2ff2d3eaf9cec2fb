"""Which series of a study are worth analysing, and which one is best.

Rules come from the ``selection`` section of the config and work on header values only (no pixel
data), so a study's candidates are ranked before any volume is read. Each skipped series carries
the rule that skipped it, in words.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from pydicom.dataset import Dataset

from node.config import SelectionSettings
from node.pipeline.volume import SeriesRefused, is_localizer, number_of_frames
from node.receive.inspect import ANALYSABLE_SOP_CLASSES

#: How the reason of a series passed over for a better one of its study begins; it ends with that one's UID.
NOT_BEST = "another series of the study is preferred"


@dataclass(frozen=True)
class SeriesHeader:
    """What selection needs from one series, taken from one of its images."""

    series_instance_uid: str
    modality: str
    sop_class_uid: str
    image_type: tuple[str, ...]
    slice_thickness_mm: float | None
    slice_count: int
    series_description: str
    body_part: str
    convolution_kernel: str
    normal_z: float | None  # |z component| of the slice normal, 1.0 for a true axial series
    study_date: dt.date | None = None  # Study Date (else Series or Acquisition Date); None: absent or not a date
    problem: str | None = None  # a header value selection needs that cannot be read, in words (skips the series)

    @classmethod
    def from_dataset(cls, ds: Dataset, *, slice_count: int) -> SeriesHeader:
        def text(keyword: str) -> str:
            value = ds.get(keyword)
            if value is None:
                return ""
            if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(value, str):
                return "\\".join(str(v) for v in value)
            return str(value)

        normal_z = None
        iop = ds.get("ImageOrientationPatient")
        shared = _first_item(ds.get("SharedFunctionalGroupsSequence"))
        if iop is None and shared is not None:
            orientation = _first_item(shared.get("PlaneOrientationSequence"))
            iop = orientation.get("ImageOrientationPatient") if orientation is not None else None
        numbers = _finite(iop) if iop is not None and len(iop) == 6 else None
        if numbers is not None:
            r, c = numbers[:3], numbers[3:]
            nz = r[0] * c[1] - r[1] * c[0]
            norm = math.sqrt(
                (r[1] * c[2] - r[2] * c[1]) ** 2 + (r[2] * c[0] - r[0] * c[2]) ** 2 + nz**2
            )
            normal_z = abs(nz) / norm if norm else None
        thickness = ds.get("SliceThickness")
        if thickness in (None, "") and shared is not None:
            groups = [g for g in (shared, _first_item(ds.get("PerFrameFunctionalGroupsSequence"))) if g is not None]
            for group in groups:
                measures = _first_item(group.get("PixelMeasuresSequence"))
                if measures is not None and measures.get("SliceThickness") not in (None, ""):
                    thickness = measures.SliceThickness
                    break
        try:
            frames, problem = number_of_frames(ds), None
        except SeriesRefused as refused:  # judged like any other rule: this series skipped, its siblings not harmed
            frames, problem = 1, refused.flag.reason
        return cls(
            series_instance_uid=str(ds.SeriesInstanceUID),
            modality=str(ds.get("Modality", "")),
            sop_class_uid=str(ds.SOPClassUID),
            image_type=tuple(str(v).upper() for v in (ds.get("ImageType") or [])),
            slice_thickness_mm=_first_finite(thickness),
            slice_count=max(slice_count, frames),
            series_description=text("SeriesDescription"),
            body_part=text("BodyPartExamined"),
            convolution_kernel=text("ConvolutionKernel"),
            normal_z=normal_z,
            study_date=next((d for d in map(_date, (ds.get(k) for k in ("StudyDate", "SeriesDate", "AcquisitionDate")))
                             if d is not None), None),
            problem=problem,
        )


def _first_item(sequence: object) -> Dataset | None:
    """The first item of a sequence value, or None when it is absent or empty."""
    return sequence[0] if isinstance(sequence, Sequence) and len(sequence) and isinstance(sequence[0], Dataset) else None


def header_image(datasets: Iterable[Dataset]) -> Dataset | None:
    """The image a series is judged by, whatever order its images came in: the first CT image that is not a
    localizer, else the first CT image, else the first image (None for none). Reads ``datasets`` only up to it.

    A stray image of another kind must not decide the selection of a CT series (the analysis refuses the mix,
    ``mixed_modalities``, with its reason), and a localizer filed in an axial series is left out of its volume.
    """
    first = first_ct = None
    for ds in datasets:
        first = first if first is not None else ds
        if str(ds.get("SOPClassUID", "")) in ANALYSABLE_SOP_CLASSES:
            if not is_localizer(ds):
                return ds
            first_ct = first_ct if first_ct is not None else ds
    return first_ct if first_ct is not None else first


def _date(value: object) -> dt.date | None:
    """A DICOM DA value (YYYYMMDD) as a date, or None."""
    try:
        return dt.datetime.strptime(str(value).strip(), "%Y%m%d").date() if value else None
    except ValueError:
        return None


def _first_finite(value: object) -> float | None:
    """A header value as a finite number, or None when it is absent, empty or not a finite number."""
    numbers = _finite([value]) if value not in (None, "") else None
    return numbers[0] if numbers else None


def _finite(values: Sequence[object]) -> list[float] | None:
    """The values as numbers, or None when one is not a finite number (a NaN or a letter in a header)."""
    try:
        numbers = [float(v) for v in values]  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return numbers if all(math.isfinite(v) for v in numbers) else None


@dataclass(frozen=True)
class Verdict:
    series_instance_uid: str
    eligible: bool
    rule: str | None  # the rule that skipped it
    reason: str | None  # the same in words


def _match_any(patterns: Sequence[str], value: str) -> bool:
    return any(re.search(p, value) for p in patterns)


def check(header: SeriesHeader, rules: SelectionSettings, *, today: dt.date | None = None) -> Verdict:
    """Apply the rules in a fixed order; the first one that fails is reported. ``today``: the date study ages count
    to (default: today, in the node's time zone, as the hospital dates its studies)."""
    uid = header.series_instance_uid

    def skip(rule: str, reason: str) -> Verdict:
        return Verdict(uid, False, rule, reason)

    if header.problem is not None:
        return skip("header_invalid", header.problem)
    if header.modality not in rules.modalities:
        return skip("modality", f"modality {header.modality or '(none)'} is not one of {', '.join(rules.modalities)}")
    if rules.max_study_age_days is not None and header.study_date is not None:
        age = ((today or dt.date.today()) - header.study_date).days
        if age > rules.max_study_age_days:
            return skip("study_age", f"the study is dated {header.study_date.isoformat()}, {age} days ago: older than "
                                     f"selection.max_study_age_days ({rules.max_study_age_days})")
    missing = [t for t in rules.image_type_required if t not in header.image_type]
    if missing:
        return skip("image_type", f"ImageType {'/'.join(header.image_type) or '(none)'} lacks {'/'.join(missing)}")
    present = [t for t in rules.image_type_excluded if t in header.image_type]
    if present:
        return skip("image_type", f"ImageType {'/'.join(header.image_type)} holds {'/'.join(present)}")
    if header.normal_z is None:
        return skip("orientation", "image orientation unknown (ImageOrientationPatient missing or not six numbers)")
    tilt = math.degrees(math.acos(min(1.0, header.normal_z)))
    if tilt > rules.axial_tolerance_deg:
        return skip("orientation", f"not axial: slices are {tilt:.0f} degrees off the axial plane")
    t = header.slice_thickness_mm
    if t is None:
        return skip("slice_thickness", "SliceThickness is missing or not a number")
    if not rules.slice_thickness_mm.min <= t <= rules.slice_thickness_mm.max:
        return skip(
            "slice_thickness",
            f"slice thickness {t:g} mm outside {rules.slice_thickness_mm.min:g}-{rules.slice_thickness_mm.max:g} mm",
        )
    if header.slice_count < rules.min_slices:
        return skip("min_slices", f"{header.slice_count} slices, at least {rules.min_slices} needed")
    for name, value in (
        ("series_description", header.series_description),
        ("body_part", header.body_part),
        ("convolution_kernel", header.convolution_kernel),
    ):
        rule = getattr(rules, name)
        if rule.include and not _match_any(rule.include, value):
            return skip(name, f"{name.replace('_', ' ')} '{value}' matches none of the include patterns")
        if rule.exclude and _match_any(rule.exclude, value):
            return skip(name, f"{name.replace('_', ' ')} '{value}' matches an exclude pattern")
    return Verdict(uid, True, None, None)


def rank_key(header: SeriesHeader, rules: SelectionSettings) -> tuple[int, float, int, int]:
    """Sort key, best first: lung kernel, then thinnest slices, then most slices, then PRIMARY before
    SECONDARY (a reconstruction made at the scan before one made later from its raw data)."""
    lung = 0 if rules.prefer_kernel and _match_any(rules.prefer_kernel, header.convolution_kernel) else 1
    primary = 0 if "PRIMARY" in header.image_type else 1
    return (lung, header.slice_thickness_mm or math.inf, -header.slice_count, primary)


def choose(headers: Sequence[SeriesHeader], rules: SelectionSettings,
           *, today: dt.date | None = None) -> tuple[SeriesHeader | None, list[Verdict]]:
    """The best eligible series of a study (or None) and a verdict for every series.

    Eligible series that lose to a better one get the rule ``not_best`` naming the chosen series.
    """
    verdicts = {h.series_instance_uid: check(h, rules, today=today) for h in headers}
    eligible = sorted((h for h in headers if verdicts[h.series_instance_uid].eligible), key=lambda h: rank_key(h, rules))
    best = eligible[0] if eligible else None
    out = []
    for h in headers:
        v = verdicts[h.series_instance_uid]
        if v.eligible and best is not None and h is not best:
            v = Verdict(
                h.series_instance_uid,
                False,
                "not_best",
                f"{NOT_BEST} ({best.slice_thickness_mm:g} mm, "
                f"kernel '{best.convolution_kernel}'): {best.series_instance_uid}",
            )
        out.append(v)
    return best, out


def passed_over_for(reason: str | None) -> str | None:
    """The UID of the series a job was passed over for (its recorded reason is ``choose``'s ``not_best``), or None."""
    if not reason or not reason.startswith(NOT_BEST) or ": " not in reason:
        return None
    return reason.rsplit(": ", 1)[1]
