"""Which complete series the workers take first: high, medium or low priority, decided when its job is queued.

A backlog (the node back after maintenance, a PACS re-routing a day of studies) must not make the emergency
department's scan wait behind it. The priority of a series is the most urgent of the associations that brought
its images (any revision): the level ``assembly.priority_by_caller`` gives their calling AE title (an emergency
scanner high, a research archive low), else high for a C-STORE Priority HIGH and medium otherwise. A C-STORE LOW
does not lower a series: pynetdicom sends LOW unless told otherwise, so routers built on it would starve. Images
without an association (adopted at start-up) count as medium. Workers take high before medium before low, and the
oldest first within a level.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db.models import Association, Instance, Series

PriorityName = Literal["high", "medium", "low"]
LEVELS: dict[str, int] = {"low": -1, "medium": 0, "high": 1}
NAMES: dict[int, str] = {level: name for name, level in LEVELS.items()}
_CSTORE_HIGH = 0x0001  # PS3.7 C.4.2.1.4 Priority: 0x0000 MEDIUM, 0x0001 HIGH, 0x0002 LOW


def from_cstore(priority: int | None) -> int:
    """The level a C-STORE request's Priority gives: high for HIGH, medium for anything else (LOW included)."""
    return 1 if priority == _CSTORE_HIGH else 0


def priority_name(level: int) -> str:
    """high, medium or low."""
    return NAMES.get(level, "medium")


def series_priority(s: Session, series: Series, by_caller: Mapping[str, PriorityName]) -> int:
    """The series' level: the most urgent of the associations that sent its images, in any revision (late images
    of an urgent series stay urgent)."""
    rows = s.execute(
        select(Association.calling_ae, Association.priority).where(Association.id.in_(
            select(Instance.association_id).where(Instance.series_id == series.id)))
    ).all()
    return max((LEVELS[by_caller[ae]] if ae in by_caller else (prio or 0) for ae, prio in rows), default=0)
