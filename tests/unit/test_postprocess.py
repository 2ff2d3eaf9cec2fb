"""node.pipeline.postprocess on hand-built label maps whose answers are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from node.pipeline.postprocess import (
    clean_lesions,
    clean_lungs,
    drop_small,
    keep_largest,
    measure,
    smooth_along_z,
    z_weights,
)


def three_blobs() -> np.ndarray:
    """Separate (face-connected) components of 27, 8 and 1 voxels."""
    m = np.zeros((8, 12, 12), dtype=bool)
    m[0:3, 0:3, 0:3] = True  # 27
    m[5:7, 5:7, 5:7] = True  # 8
    m[7, 11, 11] = True  # 1
    return m


def test_keep_largest() -> None:
    m = three_blobs()
    one = keep_largest(m, 1)
    assert one.sum() == 27 and one[0:3, 0:3, 0:3].all()
    two = keep_largest(m, 2)
    assert two.sum() == 35 and not two[7, 11, 11]
    assert keep_largest(m, 3).sum() == 36
    assert keep_largest(m, 0).sum() == 36  # n <= 0: unchanged
    empty = np.zeros_like(m)
    assert not keep_largest(empty, 2).any()


def test_keep_largest_counts_touching_faces_as_one() -> None:
    m = np.zeros((4, 4, 8), dtype=bool)
    m[1, 1, 0:3] = True
    m[1, 1, 3:5] = True  # touches the first run face to face: one component of 5
    m[1, 3, 7] = True
    assert keep_largest(m, 1).sum() == 5


def test_drop_small() -> None:
    m = three_blobs()
    assert drop_small(m, 2).sum() == 35  # the single voxel goes
    assert drop_small(m, 8).sum() == 35  # a component of exactly min_voxels stays
    assert drop_small(m, 9).sum() == 27
    assert drop_small(m, 1).sum() == 36  # nothing is smaller than one voxel
    assert drop_small(m, 28).sum() == 0


def test_clean_lungs_keeps_each_side_and_drops_specks() -> None:
    labels = np.zeros((6, 20, 20), dtype=np.uint8)
    labels[0:6, 2:18, 1:8] = 1  # right lung, 672 voxels
    labels[0:6, 2:18, 11:19] = 2  # left lung, 768 voxels
    labels[0, 0, 0] = 1  # speck labelled right, away from the lung
    labels[5, 19, 19] = 2  # speck labelled left
    labels[3, 0, 9:11] = 1  # a 2-voxel fragment
    out = clean_lungs(labels, keep=2, min_ml=1.0, voxel_ml=0.25)  # min 4 voxels
    assert out.dtype == np.uint8
    assert (out == 1).sum() == 672 and (out == 2).sum() == 768
    assert out[0, 0, 0] == 0 and out[5, 19, 19] == 0 and not out[3, 0, 9:11].any()
    out = clean_lungs(labels, keep=1, min_ml=0.0, voxel_ml=0.25)
    assert (out == 1).sum() == 672 and (out == 2).sum() == 768


def test_clean_lesions_stay_inside_the_lungs() -> None:
    lungs = np.zeros((4, 10, 10), dtype=np.uint8)
    lungs[:, 2:8, 0:4] = 1
    lungs[:, 2:8, 6:10] = 2
    lesions = np.zeros_like(lungs)
    lesions[1:3, 3:5, 1:3] = 1  # 8 voxels GGO inside the right lung
    lesions[0:2, 0:2, 4:6] = 2  # 8 voxels outside both lungs (mediastinum)
    lesions[2, 5, 7] = 2  # one speck of consolidation inside the left lung
    out = clean_lesions(lesions, lungs, min_ml=1.0, voxel_ml=0.5)  # min 2 voxels
    assert (out == 1).sum() == 8
    assert (out == 2).sum() == 0
    assert out.dtype == np.uint8


def test_clean_lesions_on_a_box_equals_the_whole_volume() -> None:
    """The node cleans lesions on the lung box only (the model sees nothing outside it): the same result."""
    rng = np.random.default_rng(4)
    lungs = np.zeros((30, 40, 40), dtype=np.uint8)
    lungs[3:27, 5:35, 4:19] = 1
    lungs[3:27, 5:35, 21:36] = 2
    box = (slice(2, 28), slice(4, 36), slice(3, 37))
    lesions = np.zeros_like(lungs)
    lesions[box] = (rng.random(lungs[box].shape) < 0.3) * rng.integers(1, 3, lungs[box].shape)
    whole = clean_lesions(lesions, lungs, min_ml=2.0, voxel_ml=0.5)
    assert 0 < (whole > 0).sum() < (lesions > 0).sum()  # specks were dropped, components kept
    on_box = clean_lesions(lesions[box], lungs[box], min_ml=2.0, voxel_ml=0.5)
    np.testing.assert_array_equal(on_box, whole[box])
    assert not whole[lungs == 0].any()


def test_measure_by_hand() -> None:
    # voxel 10 x 10 x 5 mm = 0.5 ml
    lungs = np.zeros((4, 10, 10), dtype=np.uint8)
    lungs[0:4, 2:8, 0:4] = 1  # right: 96 voxels = 48 ml
    lungs[0:4, 3:8, 6:10] = 2  # left: 80 voxels = 40 ml
    lesions = np.zeros_like(lungs)
    lesions[1:3, 3:5, 1:3] = 1  # 8 voxels GGO in the right lung = 4 ml
    lesions[0:2, 4:6, 7:9] = 2  # 8 voxels consolidation in the left lung = 4 ml
    lesions[3, 7, 9] = 1  # 1 voxel GGO in the left lung = 0.5 ml
    m = measure(lungs, lesions, 0.5)
    assert m.lung_ml == {"right": 48.0, "left": 40.0, "total": 88.0}
    assert m.lesion_ml == {"ggo": 4.5, "consolidation": 4.0, "total": 8.5, "right": 4.0, "left": 4.5}
    # right 4 / 48 = 8.333 %, left 4.5 / 40 = 11.25 %, total 8.5 / 88 = 9.659 %
    assert m.involvement_percent == {"right": 8.33, "left": 11.25, "total": 9.66}
    d = m.as_dict()
    assert set(d) == {"lung_volume_ml", "lesion_volume_ml", "involvement_percent"}
    assert d["lung_volume_ml"]["total"] == 88.0


def test_measure_without_lungs_is_unknown_not_zero_nor_a_division_error() -> None:
    empty = np.zeros((2, 4, 4), dtype=np.uint8)
    m = measure(empty, empty, 1.0)
    assert m.involvement_percent == {"right": None, "left": None, "total": None}  # not "0 % involved"
    assert m.lung_ml["total"] == 0.0 and m.lesion_ml["total"] == 0.0
    one = empty.copy()
    one[:, :, :2] = 1  # a right lung only (after a pneumonectomy, say)
    m = measure(one, empty, 1.0)
    assert m.involvement_percent == {"right": 0.0, "left": None, "total": 0.0}


@pytest.mark.parametrize("voxel_ml", [0.001, 0.7])
def test_measure_scales_with_voxel_volume(voxel_ml: float) -> None:
    lungs = np.zeros((2, 10, 10), dtype=np.uint8)
    lungs[:, :, :5] = 1
    lungs[:, :, 5:] = 2
    lesions = np.zeros_like(lungs)
    lesions[:, :, :1] = 2  # 20 voxels in the right lung: 20 % of it
    m = measure(lungs, lesions, voxel_ml)
    assert m.lung_ml["right"] == pytest.approx(round(100 * voxel_ml, 1))
    assert m.involvement_percent["right"] == 20.0 and m.involvement_percent["left"] == 0.0
    assert m.involvement_percent["total"] == 10.0


# ------------------------------------------------------------------ smoothing along z


def test_z_weights_reach_two_and_a_half_sigma() -> None:
    w = z_weights(1.0, 2.0)  # neighbours up to 5 mm: 5 slices each side
    assert w.size == 11 and w[5] == 1.0 and np.allclose(w, w[::-1])
    assert w[0] == pytest.approx(np.exp(-25 / 8))
    assert z_weights(2.5, 1.0).size == 3  # 2.5 mm reach: one neighbour each side
    assert z_weights(5.0, 1.5).size == 1  # thick slices: out of reach, left alone
    assert z_weights(1.0, 0.0).size == 1 and z_weights(0.0, 2.0).size == 1


def _probs(lesion_slices: list[int], n: int = 7) -> np.ndarray:
    """[n, 3, 2, 2] probabilities: background 0.8 / ground glass 0.2, except ``lesion_slices`` (0.3 / 0.7)."""
    p = np.zeros((n, 3, 2, 2), dtype=np.float32)
    p[:, 0], p[:, 1] = 0.8, 0.2
    p[lesion_slices, 0], p[lesion_slices, 1] = 0.3, 0.7
    return p


def test_smoothing_overrules_a_one_slice_flip_and_keeps_a_lesion_several_slices_deep() -> None:
    w = z_weights(1.0, 1.0)  # weights 0.135, 0.607, 1, 0.607, 0.135
    speck = smooth_along_z(_probs([3]), w)
    assert (speck.argmax(axis=1) == 0).all()  # slice 3 alone: background (0.3 + 0.8 * 1.484) / 2.485 = 0.60
    deep = smooth_along_z(_probs([2, 3, 4]), w)
    assert (deep[3].argmax(axis=0) == 1).all()  # in the middle of three lesion slices it stays a lesion
    assert deep[3, 1, 0, 0] == pytest.approx((0.7 * 2.214 + 0.2 * 0.271) / 2.485, abs=1e-4)


def test_smoothing_keeps_distributions_and_renormalises_at_the_ends() -> None:
    rng = np.random.default_rng(0)
    p = rng.random((9, 3, 4, 4)).astype(np.float32)
    p /= p.sum(axis=1, keepdims=True)
    w = z_weights(1.0, 1.5)
    out = smooth_along_z(p, w)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-6)
    k = w.size // 2  # the first slice: itself and its k upper neighbours only
    np.testing.assert_allclose(out[0], np.tensordot(w[k:], p[: k + 1], axes=1) / w[k:].sum(), atol=1e-6)
    uniform = np.repeat(p[:1], 9, axis=0)
    np.testing.assert_allclose(smooth_along_z(uniform, w), uniform, atol=1e-6)


def test_smoothing_a_few_slices_at_a_time_equals_all_at_once() -> None:
    rng = np.random.default_rng(1)
    p = rng.random((11, 3, 3, 3)).astype(np.float16)
    w = z_weights(1.25, 2.0)
    whole = smooth_along_z(p, w)
    parts = np.concatenate([smooth_along_z(p, w, z, min(11, z + 4)) for z in range(0, 11, 4)])
    np.testing.assert_array_equal(whole, parts)
    np.testing.assert_array_equal(smooth_along_z(p, np.ones(1)), p.astype(np.float32))  # nothing in reach
    with pytest.raises(ValueError):
        smooth_along_z(p, w, 8, 13)  # past the last slice
    with pytest.raises(ValueError):
        smooth_along_z(p, np.ones(2))
