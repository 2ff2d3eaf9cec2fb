"""The slice-evidence rule: truncation at apex and base, per-slice thresholds, minimum share."""

from __future__ import annotations

import numpy as np
import pytest

from node.config import SliceRuleSettings
from node.pipeline.slice_rule import apply_slice_rule, slice_evidence

RULE = SliceRuleSettings()  # head 10 %, tail 14 %, share 20 %, 1 % of lung and 20 mm2 per slice


def lungs_with_slices(n_lung: int, *, below: int = 5, above: int = 5) -> np.ndarray:
    """A canonical label map (z feet -> head) with ``n_lung`` slices of lung between empty slabs."""
    lungs = np.zeros((below + n_lung + above, 32, 32), dtype=np.uint8)
    lungs[below : below + n_lung, 4:28, 2:15] = 1
    lungs[below : below + n_lung, 4:28, 17:30] = 2
    return lungs


def lesion_on(lungs: np.ndarray, zs: list[int], px: int = 40) -> np.ndarray:
    lesions = np.zeros_like(lungs)
    for z in zs:
        lesions[z, 6 : 6 + px // 5, 4:9] = 1
    return lesions


def test_no_lesion_is_no_pneumonia() -> None:
    lungs = lungs_with_slices(100)
    r = apply_slice_rule(lungs, np.zeros_like(lungs), pixel_mm2=1.0, rule=RULE)
    assert (r.decision, r.abnormal_slices, r.lung_slices) == ("no_pneumonia", 0, 100)
    assert r.slices_considered == 100 - 10 - 14


def test_share_threshold_is_inclusive_and_counts_only_considered_slices() -> None:
    lungs = lungs_with_slices(100)  # lung at z 5..104; apex is z 104
    # considered: apex-first indices 10..85, i.e. z = 104-10 .. 104-85 = 94 .. 19 (76 slices)
    need = int(np.ceil(0.20 * 76))  # 16
    r = apply_slice_rule(lungs, lesion_on(lungs, list(range(19, 19 + need))), pixel_mm2=1.0, rule=RULE)
    assert (r.decision, r.abnormal_slices, r.slices_considered) == ("pneumonia", need, 76)
    r = apply_slice_rule(lungs, lesion_on(lungs, list(range(19, 19 + need - 1))), pixel_mm2=1.0, rule=RULE)
    assert r.decision == "no_pneumonia"


def test_lesions_in_the_truncated_apex_and_base_do_not_count() -> None:
    lungs = lungs_with_slices(100)
    apex = list(range(95, 105))  # the 10 apical slices
    base = list(range(5, 19))  # the 14 basal slices
    r = apply_slice_rule(lungs, lesion_on(lungs, apex + base), pixel_mm2=1.0, rule=RULE)
    assert (r.abnormal_slices, r.decision) == (0, "no_pneumonia")
    # The same 24 slices inside the considered range are a positive call (24/76 >= 20 %).
    r = apply_slice_rule(lungs, lesion_on(lungs, list(range(40, 64))), pixel_mm2=1.0, rule=RULE)
    assert (r.abnormal_slices, r.decision) == (24, "pneumonia")


def test_small_specks_are_not_evidence() -> None:
    lungs = lungs_with_slices(10, below=0, above=0)
    tiny = np.zeros_like(lungs)
    tiny[:, 10, 5] = 1  # 1 px = 1 mm2: under 20 mm2 and under 1 % of 624 px of lung
    assert not slice_evidence(lungs, tiny, 1.0, RULE).any()
    assert slice_evidence(lungs, tiny, 25.0, SliceRuleSettings(min_lesion_percent=0)).all()  # 25 mm2 with big pixels


def test_lesion_outside_the_lungs_is_ignored() -> None:
    lungs = lungs_with_slices(10, below=0, above=0)
    outside = np.zeros_like(lungs)
    outside[:, 0:4, :] = 1
    assert not slice_evidence(lungs, outside, 1.0, RULE).any()


def test_no_lung_means_nothing_considered_and_no_call() -> None:
    lungs = np.zeros((20, 32, 32), dtype=np.uint8)
    lesions = np.ones_like(lungs)
    r = apply_slice_rule(lungs, lesions, pixel_mm2=1.0, rule=RULE)
    assert (r.decision, r.lung_slices, r.slices_considered) == ("no_pneumonia", 0, 0)


@pytest.mark.parametrize(("n", "considered"), [(3, 3), (10, 8), (50, 38)])
def test_truncation_rounds_down(n: int, considered: int) -> None:
    lungs = lungs_with_slices(n)
    assert apply_slice_rule(lungs, np.zeros_like(lungs), pixel_mm2=1.0, rule=RULE).slices_considered == considered
