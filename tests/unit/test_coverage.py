"""Lung coverage (node.pipeline.coverage) on synthetic series cut to chosen ranges, and on the real
abdomen-only CT of ../shared/data when it is there."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from node.config import Config
from node.pipeline.coverage import MIN_LUNG_ML, check_coverage, estimate_lungs
from node.pipeline.process import EXIT_REJECTED, process, scan
from node.pipeline.select import check
from node.pipeline.volume import SeriesRefused, load_volume
from tests.conftest import SHARED_DATA
from tests.helpers.faults import Synth, phantom, synth_series

ABDOMEN_DIR = SHARED_DATA / "totalsegmentator-abdomen-ct" / "example_ct_dicom"


def lung_slices(s: Synth) -> np.ndarray:
    """Phantom slice indices (feet -> head) that hold any lung."""
    return np.nonzero(s.phantom.lungs.reshape(s.phantom.lungs.shape[0], -1).any(axis=1))[0]


@pytest.fixture(scope="module")
def chest(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    return synth_series(tmp_path_factory.mktemp("cov") / "chest", phantom(slices=40, matrix=96, seed=2))


@pytest.mark.parametrize("seed", [1, 2, 4])  # FOV circle or not, smooth or standard kernel
def test_whole_chest_is_covered(tmp_path: Path, seed: int) -> None:
    s = synth_series(tmp_path / "s", phantom(slices=40, matrix=96, seed=seed))
    vol = load_volume(s.files)
    cov, flags = check_coverage(vol)
    truth_ml = s.phantom.volumes_ml["lungs"]
    assert truth_ml > 1000
    assert abs(cov.lung_ml - truth_ml) / truth_ml < 0.30, (cov.lung_ml, truth_ml)
    assert flags == []
    assert not cov.cut_at_bottom and not cov.cut_at_top
    present = lung_slices(s)
    # the estimate spans the truth's lung range (it may add a little gas or airway beyond it)
    assert cov.first_lung_slice <= present[0] + 1 and cov.last_lung_slice >= present[-1] - 1


def test_estimate_is_inside_the_body_and_mostly_lung(chest: Synth) -> None:
    vol = load_volume(chest.files)
    rough = estimate_lungs(vol)
    truth = chest.phantom.lungs[:, ::4, ::4] > 0
    assert rough.shape == truth.shape
    overlap = (rough & truth).sum() / max(1, rough.sum())
    assert overlap > 0.7  # what it calls lung is lung (not the air around the patient)
    assert not rough[:, 0, :].any() and not rough[:, :, 0].any()


def test_lower_abdomen_is_refused(tmp_path: Path) -> None:
    ph = phantom(slices=60, matrix=64, seed=3, margin_below_mm=300.0, margin_above_mm=10.0)
    s = synth_series(tmp_path / "tall", ph)
    first_lung = int(lung_slices(s)[0])
    assert first_lung >= 25  # the bottom of this phantom is abdomen
    below = s.files_of_indices(range(first_lung - 20, first_lung - 1))
    vol = load_volume(below)
    with pytest.raises(SeriesRefused) as info:
        check_coverage(vol)
    assert info.value.flag.code == "no_lung_coverage"
    assert "do not cover the lungs" in info.value.flag.reason and "chest CT" in info.value.flag.reason
    # ... while the same tall series as a whole is a chest CT
    cov, flags = check_coverage(load_volume(s.files))
    assert cov.lung_ml > MIN_LUNG_ML and flags == []


def test_series_cut_through_the_lungs_is_flagged(chest: Synth) -> None:
    present = lung_slices(chest)
    middle = int((present[0] + present[-1]) // 2)

    cov, flags = check_coverage(load_volume(chest.files_of_indices(range(middle, 40))))  # upper half
    assert cov.cut_at_bottom and not cov.cut_at_top
    assert [f.code for f in flags] == ["partial_lung_coverage"] and flags[0].severity == "flag"
    assert "bases" in flags[0].reason

    cov, flags = check_coverage(load_volume(chest.files_of_indices(range(middle))))  # lower half
    assert cov.cut_at_top and not cov.cut_at_bottom
    assert [f.code for f in flags] == ["partial_lung_coverage"] and "apices" in flags[0].reason


def test_real_abdomen_ct_has_no_lungs(tmp_path: Path) -> None:
    if not ABDOMEN_DIR.is_dir():
        pytest.skip(f"real abdomen CT not available: {ABDOMEN_DIR} is absent")
    files = sorted(p for p in ABDOMEN_DIR.iterdir() if p.is_file())
    vol = load_volume(files)  # JPEG 2000 lossless, 20 x 512 x 512
    assert vol.shape == (20, 512, 512)
    assert (vol.hu > 0).mean() > 0.1  # real soft tissue: the volume path accepted it
    with pytest.raises(SeriesRefused) as info:
        check_coverage(vol)
    assert info.value.flag.code == "no_lung_coverage"

    # Offline, selection refuses it first: 20 slices are fewer than the 40 the rules ask for.
    [(header, _)] = scan(ABDOMEN_DIR).values()
    verdict = check(header, Config().selection)
    assert verdict.rule == "min_slices" and verdict.reason == "20 slices, at least 40 needed"
    assert process(ABDOMEN_DIR, tmp_path / "out", Config()) == EXIT_REJECTED
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["status"] == "rejected" and "20 slices, at least 40 needed" in result["reason"]
