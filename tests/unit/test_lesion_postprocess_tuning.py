"""models.train.tune_lesion_post: the decisions it compares, its placement, its rule and its fold check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.train.data_lesion import MEDSEG_TRAIN, GrayMap
from models.train.tune_lesion_post import choose, decide, medseg_oof, place
from node.pipeline.preprocess import Placement, place_labels

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "lesion_seg"


def _probs(rng: np.random.Generator, n: int = 4, size: int = 16) -> np.ndarray:
    p = rng.random((n, 3, size, size)).astype(np.float32)
    return p / p.sum(axis=1, keepdims=True)


def test_decide_without_threshold_is_argmax_and_a_threshold_moves_the_lesion_border() -> None:
    p = _probs(np.random.default_rng(0))
    assert np.array_equal(decide(p, None), np.argmax(p, axis=1))
    low, high = decide(p, 0.3) > 0, decide(p, 0.7) > 0
    assert high.sum() < low.sum() and not (high & ~low).any()  # a higher threshold only removes lesion pixels
    lesion = decide(p, 0.5)
    assert np.array_equal(lesion > 0, p[:, 1] + p[:, 2] > 0.5)
    assert np.array_equal(lesion[lesion > 0], np.where(p[:, 2] > p[:, 1], 2, 1)[lesion > 0])


def test_linear_placement_agrees_with_nearest_away_from_borders() -> None:
    p = np.zeros((2, 3, 8, 8), dtype=np.float32)
    p[:, 0] = 1.0
    p[:, 0, 2:6, 2:6], p[:, 2, 2:6, 2:6] = 0.1, 0.9  # a consolidation square
    where = Placement((slice(1, 3), slice(4, 36), slice(0, 32)), (2, 8, 8))
    shape = (4, 40, 32)
    near = place(p, None, where, shape, "nearest")
    assert np.array_equal(near, place_labels(np.argmax(p, 1).astype(np.uint8), where, shape))
    lin = place(p, None, where, shape, "linear")
    assert not lin[0].any() and not lin[3].any() and set(np.unique(lin)) == {0, 2}
    assert np.array_equal(lin[1:3, 14:26, 10:22], near[1:3, 14:26, 10:22])  # the square's inside
    assert abs(int((lin > 0).sum()) - int((near > 0).sum())) <= 0.25 * (near > 0).sum()


def test_rule_needs_a_margin_and_no_loss_on_either_metric() -> None:
    base = {"medseg_oof": 0.70, "synthetic_val": 0.74}
    assert choose({"b": base, "x": {"medseg_oof": 0.704, "synthetic_val": 0.744}}, "b") == "b"  # +0.004: noise
    assert choose({"b": base, "x": {"medseg_oof": 0.71, "synthetic_val": 0.75}}, "b") == "x"
    assert choose({"b": base, "x": {"medseg_oof": 0.69, "synthetic_val": 0.80}}, "b") == "b"  # MedSeg lost 0.01


@pytest.mark.skipif(not MEDSEG_TRAIN.is_dir(), reason=f"MedSeg training slices not available: {MEDSEG_TRAIN} is absent")
def test_out_of_fold_scores_need_every_slice_held_out_once(tmp_path: Path) -> None:
    names = sorted(p.stem for p in (MEDSEG_TRAIN / "Imgs").glob("*.jpg"))
    parts = [names[:3], names[3:]]
    for i, part in enumerate(parts, start=1):  # the shipped network stands in for two fold models
        shutil.copy(MODEL_DIR / "model.onnx", tmp_path / f"fold{i}.onnx")
        (tmp_path / f"fold{i}.json").write_text(json.dumps({"held_out": part}))
    gmap = GrayMap(43.0, 214.5)
    (tmp_path / "fold2.json").write_text(json.dumps({"held_out": names[3:6]}))
    with pytest.raises(SystemExit, match="do not hold out each"):
        medseg_oof(tmp_path, [(None, "nearest")], gmap, 192, log=lambda s: None)
    (tmp_path / "fold2.json").write_text(json.dumps({"held_out": parts[1]}))
    scores = medseg_oof(tmp_path, [(None, "nearest"), (0.5, "linear")], gmap, 192, log=lambda s: None)
    assert [len(v) for v in scores.values()] == [len(names)] * 2
    assert 0.5 < np.mean(scores["argmax/nearest"]) <= 1.0  # the shipped model saw these slices in training
