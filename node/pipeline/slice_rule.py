"""A series decision from per-slice lesion evidence, reported beside the diagnosis model.

The 3D model gives probabilities; radiologists and auditors also want a rule they can check by
hand: "how many slices show disease?". Over the axial slices that hold lung, ordered from the apex
(head) to the base (tail), the first ``head_skip`` and last ``tail_skip`` fractions are ignored —
apical partial volume and the diaphragm domes are where lesion maps give false evidence. A slice is
abnormal when its lesion area reaches both ``min_lesion_percent`` of that slice's lung area and
``min_lesion_mm2``; the series is called pneumonia when at least ``min_share`` of the considered
slices are abnormal. The thresholds live in ``inference.slice_rule``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from node.config import SliceRuleSettings

Decision = Literal["pneumonia", "no_pneumonia"]


@dataclass(frozen=True)
class SliceRuleResult:
    decision: Decision
    abnormal_slice_share: float
    abnormal_slices: int
    slices_considered: int
    lung_slices: int
    head_skip: float
    tail_skip: float
    min_share: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def slice_evidence(lungs: np.ndarray, lesions: np.ndarray, pixel_mm2: float, rule: SliceRuleSettings) -> np.ndarray:
    """Per canonical slice (z inferior -> superior): True where the slice counts as abnormal."""
    lung_px = (lungs > 0).sum(axis=(1, 2))
    lesion_px = ((lesions > 0) & (lungs > 0)).sum(axis=(1, 2))
    share_ok = lesion_px * 100.0 >= rule.min_lesion_percent * np.maximum(lung_px, 1)
    area_ok = lesion_px * pixel_mm2 >= rule.min_lesion_mm2
    return np.asarray((lesion_px > 0) & share_ok & area_ok)


def apply_slice_rule(
    lungs: np.ndarray, lesions: np.ndarray, *, pixel_mm2: float, rule: SliceRuleSettings
) -> SliceRuleResult:
    """The rule's decision for one series (canonical arrays, z from feet to head)."""
    abnormal = slice_evidence(lungs, lesions, pixel_mm2, rule)
    has_lung = np.nonzero((lungs > 0).any(axis=(1, 2)))[0]
    # Apex (head) first: canonical z runs inferior -> superior, so walk it backwards.
    ordered = abnormal[has_lung[::-1]] if has_lung.size else abnormal[:0]
    n = int(ordered.size)
    head = int(math.floor(n * rule.head_skip))
    tail = int(math.floor(n * rule.tail_skip))
    kept = ordered[head : n - tail] if n - tail > head else ordered[:0]
    count = int(kept.sum())
    share = count / kept.size if kept.size else 0.0
    return SliceRuleResult(
        decision="pneumonia" if kept.size and share >= rule.min_share else "no_pneumonia",
        abnormal_slice_share=round(share, 4),
        abnormal_slices=count,
        slices_considered=int(kept.size),
        lung_slices=n,
        head_skip=rule.head_skip,
        tail_skip=rule.tail_skip,
        min_share=rule.min_share,
    )
