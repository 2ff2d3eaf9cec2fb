"""Resizing for the models: the trilinear resize of the 3D model's input against SimpleITK's resampler."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from node.pipeline.infer import window
from node.pipeline.preprocess import _nearest_index, resize, resize_linear


def sitk_linear(array: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """SimpleITK's linear resampler on the centre-aligned grid: the reference ``resize_linear`` replaces."""
    img = sitk.GetImageFromArray(array)
    out_size = [size[2], size[1], size[0]]
    spacing = [img.GetSize()[i] / out_size[i] for i in range(3)]
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(out_size)
    resampler.SetOutputSpacing(spacing)
    resampler.SetOutputOrigin([(s - 1.0) / 2.0 for s in spacing])
    resampler.SetInterpolator(sitk.sitkLinear)
    return sitk.GetArrayFromImage(resampler.Execute(img))


@pytest.mark.parametrize(
    ("shape", "size"),
    [((50, 70, 90), (16, 32, 32)),  # shrink every axis (the lung box to the 3D model's grid)
     ((9, 20, 30), (16, 48, 40)),  # enlarge every axis (a thick-slice series, a small lung box)
     ((40, 17, 60), (16, 32, 60))],  # mixed, one axis unchanged
)
def test_resize_linear_matches_simpleitk(shape: tuple[int, int, int], size: tuple[int, int, int]) -> None:
    array = np.random.default_rng(0).random(shape, dtype=np.float32)
    ours = resize_linear(array, size)
    assert ours.shape == size and ours.dtype == np.float32 and ours.flags.c_contiguous
    np.testing.assert_allclose(ours, sitk_linear(array, size), atol=1e-5)
    np.testing.assert_array_equal(resize(array, size, linear=True), ours)  # float arrays take this path


def test_resize_linear_applies_a_pointwise_map_as_if_first() -> None:
    """A window applied after the first gather, to fewer voxels, gives what windowing everything first gives."""
    hu = np.random.default_rng(1).integers(-1100, 400, (40, 60, 50)).astype(np.int16)
    def win(v: np.ndarray) -> np.ndarray:
        return window(v, -450.0, 1350.0)
    expected = resize_linear(win(hu), (16, 24, 24))
    np.testing.assert_allclose(resize_linear(hu, (16, 24, 24), win), expected, atol=1e-6)
    mask = hu > 0
    np.testing.assert_allclose(resize_linear(hu, (16, 24, 24), lambda v: v > 0),
                               resize_linear(mask.astype(np.float32), (16, 24, 24)), atol=1e-6)
    same = resize_linear(hu, hu.shape, win)  # nothing to resize: the map still applies
    np.testing.assert_array_equal(same, win(hu))


def test_integer_linear_resize_keeps_simpleitk() -> None:
    """The 2D models were trained on SimpleITK's int16 resampling: integer input stays on it."""
    hu = np.random.default_rng(2).integers(-1024, 1000, (3, 64, 64)).astype(np.int16)
    out = resize(hu, (3, 24, 24), linear=True)
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, sitk_linear(hu, (3, 24, 24)))


@pytest.mark.parametrize(("shape", "size"), [((30, 19, 23), (60, 50, 40)), ((30, 50, 60), (10, 20, 70))])
def test_nearest_resize_is_the_per_axis_gather_in_any_order(shape: tuple[int, int, int],
                                                           size: tuple[int, int, int]) -> None:
    """The label maps' nearest resize reorders its axes for speed: the same voxels as z, y, x in turn."""
    labels = np.random.default_rng(3).integers(0, 3, shape).astype(np.uint8)
    expected = labels
    for axis in range(3):
        expected = np.take(expected, _nearest_index(expected.shape[axis], size[axis]), axis=axis)
    np.testing.assert_array_equal(resize(labels, size, linear=False), expected)
