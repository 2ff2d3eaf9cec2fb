"""The shipped lung model (models/lung_seg) on data it never saw, run the way the node runs it.

Held-out phantoms in the three patient positions: per-lung Dice against the exact truth and never a
left/right swap. LIDC-IDRI-0003 (validation only, real CT): per-lung Dice against the classical
reference labels (skipped without ../shared/data). The full evaluation is
``python -m models.train.eval_lung``; these are its small, fast cases.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from models.train.eval_lung import POSITIONS, TEST_SEED0, lidc_check, phantom_check
from node.pipeline.infer import Model, check_role, load_model
from tests.conftest import SHARED_DATA

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "lung_seg"
LIDC_0003 = SHARED_DATA / "lidc-idri-0003-ct.tar.xz"


@pytest.fixture(scope="module")
def model() -> Model:
    m = load_model(MODEL_DIR, device="cpu", threads=2)
    check_role(m.manifest, "lung")
    return m


@pytest.mark.parametrize("seed", [TEST_SEED0 + 50, TEST_SEED0 + 51])
def test_held_out_phantom_in_every_patient_position(model: Model, seed: int, tmp_path: Path) -> None:
    rows = phantom_check(model, seed, tmp_path, slices=40, matrix=192, positions=POSITIONS)
    assert [r["position"] for r in rows] == ["HFS/radiological", "FFS/radiological", "FFS/mirrored"]
    for row in rows:
        assert not row["swapped"], row
        assert row["dice_right"] >= 0.93 and row["dice_left"] >= 0.93, row


@pytest.mark.skipif(not LIDC_0003.is_file(), reason=f"real CT not available: {LIDC_0003} is absent")
def test_lidc_0003_against_the_classical_reference(model: Model) -> None:
    row = lidc_check(model, LIDC_0003)
    assert not row["swapped"], row
    assert row["dice_right"] >= 0.95 and row["dice_left"] >= 0.95, row
