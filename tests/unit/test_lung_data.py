"""Training data of the lung model: forcing a phantom's lesion pattern leaves the rest of it as drawn.

Runs without torch (data and evaluation helpers only).
"""

from __future__ import annotations

from pathlib import Path

from models.train.data_lung import phantom_volume
from models.train.eval_lung import CONSOLIDATION_CASES, CONSOLIDATION_SELECT, consolidation_summary


def test_forced_pattern_keeps_the_other_draws(tmp_path: Path) -> None:
    _, _, drawn = phantom_volume(7, tmp_path / "a", slices=8, matrix=128)
    kind = "pneumonia" if drawn["kind"] != "pneumonia" else "covid"
    _, _, forced = phantom_volume(7, tmp_path / "b", slices=8, matrix=128, kind=kind)
    assert forced["kind"] == kind and forced["variant"] != drawn["variant"]
    for key in ("kernel", "orientation", "ffs_convention", "matrix"):
        assert forced[key] == drawn[key], key
    _, _, lobar = phantom_volume(7, tmp_path / "c", slices=8, matrix=128, kind="pneumonia", variant="lobar")
    assert (lobar["kind"], lobar["variant"]) == ("pneumonia", "lobar")


def test_consolidation_summary_pools_by_volume() -> None:
    rows = [{"fraction_inside": 1.0, "consolidation_ml": 10.0, "missed_ml": 0.0},
            {"fraction_inside": 0.5, "consolidation_ml": 990.0, "missed_ml": 495.0}]
    assert consolidation_summary(rows) == {"mean": 0.75, "pooled": 0.505}


def test_selection_phantoms_are_not_the_card_phantoms() -> None:
    card = {seed for seed, _ in CONSOLIDATION_CASES}
    select = [seed for seed, _ in CONSOLIDATION_SELECT]
    assert len(select) == 12 and not card & set(select)
    assert [v for _, v in CONSOLIDATION_SELECT].count("lobar") == 6
