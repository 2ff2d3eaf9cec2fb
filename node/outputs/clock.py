"""When the objects were made, in the study's time zone.

DICOM dates and times are local times without a zone, unless the object carries Timezone Offset
From UTC (0008,0201), which then holds for all of them. The objects copy the study's date and time
from the source images, so the node's own times (Instance Creation, Content, Date/Time of Secondary
Capture, and the Contribution DateTime highdicom writes when it names itself as contributing equipment)
must be in the same zone: the source's offset when it names one (copied with it), else the
node's local time zone. The node must therefore run in the hospital's time zone (TZ; the Docker
image defaults to UTC): a node on UTC in Berlin would date its results an hour or two early.
"""

from __future__ import annotations

import datetime as dt
import re

from pydicom.dataset import Dataset

#: (date, time) pairs the node writes the creation moment into, where the object has them.
CREATION_TIMES = (("InstanceCreationDate", "InstanceCreationTime"), ("ContentDate", "ContentTime"),
                  ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"))
_OFFSET = re.compile(r"^([+-])(\d\d)(\d\d)$")


def _source_zone(header: Dataset | None) -> tuple[str, dt.timezone] | None:
    """The source's Timezone Offset From UTC and its zone, or None when absent or not valid."""
    value = str(header.get("TimezoneOffsetFromUTC", "") or "").strip() if header is not None else ""
    m = _OFFSET.match(value)
    if m is None or int(m.group(3)) >= 60:
        return None
    minutes = (1 if m.group(1) == "+" else -1) * (int(m.group(2)) * 60 + int(m.group(3)))
    if not -12 * 60 <= minutes <= 14 * 60:
        return None
    return value, dt.timezone(dt.timedelta(minutes=minutes))


def source_offset(header: Dataset | None) -> str | None:
    """The source's Timezone Offset From UTC (``+HHMM`` or ``-HHMM``), or None when absent or not valid."""
    zone = _source_zone(header)
    return zone[0] if zone is not None else None


def creation_moment(header: Dataset | None, now: dt.datetime | None = None) -> tuple[dt.datetime, str | None]:
    """Now, in the source's zone when it names one (and that offset), else in the local zone (and None)."""
    moment = now or dt.datetime.now(dt.timezone.utc)
    zone = _source_zone(header)
    if zone is None:
        return moment.astimezone(), None
    offset, tz = zone
    return moment.astimezone(tz), offset


def stamp_creation(ds: Dataset, moment: dt.datetime, offset: str | None) -> None:
    """Write ``moment`` (an aware datetime) into the creation dates and times ``ds`` has, and the offset. Series Date
    and Time are written in any case: PACS series lists show them, and every object of one analysis is made at once
    (the same moment for the whole series)."""
    ds.SeriesDate, ds.SeriesTime = moment.strftime("%Y%m%d"), moment.strftime("%H%M%S.%f")
    for date_kw, time_kw in CREATION_TIMES:
        if date_kw in ds:
            setattr(ds, date_kw, moment.strftime("%Y%m%d"))
        if time_kw in ds:
            setattr(ds, time_kw, moment.strftime("%H%M%S.%f"))
    for item in ds.get("ContributingEquipmentSequence", []):
        # highdicom names itself as contributor, dated in the machine's zone without saying so
        if item.get("ManufacturerModelName") == "highdicom" and "ContributionDateTime" in item:
            item.ContributionDateTime = moment.strftime("%Y%m%d%H%M%S.%f") + (offset or "")
    if offset is not None:
        ds.TimezoneOffsetFromUTC = offset
