"""Coded concepts of the outputs: the four segmented structures and what describes them.

Codes come from pydicom's dictionaries (``pydicom.sr.codedict.codes``) where they exist. SNOMED CT
right lung, left lung, ground glass opacity and lung consolidation are not in those dictionaries;
they are written out here once, with their SNOMED CT identifiers. A model manifest's label codes,
when given, take precedence (the model names what it segments).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

RIGHT_LUNG = Code("3341006", "SCT", "Right lung")
LEFT_LUNG = Code("44029006", "SCT", "Left lung")
GROUND_GLASS_OPACITY = Code("1217294009", "SCT", "Ground glass opacity")
CONSOLIDATION = Code("95436008", "SCT", "Lung consolidation")

ModelRole = Literal["lung", "lesion", "diagnosis"]


@dataclass(frozen=True)
class Structure:
    """One SEG segment: what it is, which label map and value hold it, how a viewer colours it."""

    key: str  # the manifest label name, e.g. right_lung
    label: str  # SegmentLabel, short and human-readable
    category: Code
    type: Code
    role: ModelRole  # the model that segments it
    label_map: Literal["lungs", "lesions"]  # Analysis attribute holding the mask
    value: int  # label value in that map
    rgb: tuple[int, int, int]  # recommended display colour (also the key image overlay)


#: Segment order is segment number order (1-based) and must not change between releases:
#: SR measurement groups and other systems refer to segments by number.
STRUCTURES: tuple[Structure, ...] = (
    Structure("right_lung", "Right lung", codes.SCT.AnatomicalStructure, RIGHT_LUNG, "lung", "lungs", 1,
              (128, 174, 128)),
    Structure("left_lung", "Left lung", codes.SCT.AnatomicalStructure, LEFT_LUNG, "lung", "lungs", 2,
              (111, 184, 210)),
    Structure("ground_glass_opacity", "Ground glass opacity", codes.SCT.MorphologicallyAbnormalStructure,
              GROUND_GLASS_OPACITY, "lesion", "lesions", 1, (241, 214, 69)),
    Structure("consolidation", "Consolidation", codes.SCT.MorphologicallyAbnormalStructure, CONSOLIDATION,
              "lesion", "lesions", 2, (221, 60, 60)),
)

#: Where lesions are (SEG Anatomic Region Sequence of the lesion segments).
LESION_REGION = codes.SCT.Lung


def segment_number(key: str) -> int:
    """1-based SEG segment number of a structure."""
    for number, structure in enumerate(STRUCTURES, start=1):
        if structure.key == key:
            return number
    raise KeyError(f"no segment {key!r}; segments are {[s.key for s in STRUCTURES]}")
