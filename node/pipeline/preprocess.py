"""Turn a canonical HU volume into the tensors a model's manifest asks for, and back.

2D models (NCHW) see every axial slice, windowed and resized in-plane to ``input.size``, optionally
cropped first to the lung box (``preprocessing.crop_to_lung_box``). 3D models (NCDHW) see the lung
box resized to ``input.size`` (D, H, W). A ``Placement`` remembers where the model's grid sits in
the volume so outputs are put back voxel for voxel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from node.pipeline.infer import window
from node.pipeline.manifest import ModelManifest

Box = tuple[slice, slice, slice]  # a region of a volume, (z, y, x) index slices


@dataclass(frozen=True)
class Placement:
    """The model grid's source region: ``box`` in volume indices (z, y, x slices)."""

    box: tuple[slice, slice, slice]
    model_size: tuple[int, ...]


def full_box(shape: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    return (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))


def lung_box(mask: np.ndarray, margin: tuple[int, int, int] = (2, 8, 8)) -> tuple[slice, slice, slice]:
    """Bounding box of a mask with a margin (voxels), clipped to the volume; whole volume if empty."""
    if not mask.any():
        return full_box(mask.shape)
    box = []
    for axis, m in enumerate(margin):
        other = tuple(a for a in range(3) if a != axis)
        present = np.nonzero(mask.any(axis=other))[0]
        box.append(slice(max(0, int(present[0]) - m), min(mask.shape[axis], int(present[-1]) + 1 + m)))
    return (box[0], box[1], box[2])


def resize(array: np.ndarray, size: tuple[int, ...], *, linear: bool) -> np.ndarray:
    """Resize a 3D float/int array to ``size`` (z, y, x), voxel centres aligned (linear or nearest).

    Linear on an integer array goes through SimpleITK (multi-threaded, keeps the integer type: the 2D
    models were trained on its rounding); linear on a float array is ``resize_linear``. Nearest is
    plain index arithmetic on the same grid, six times faster for the label maps put back into a
    512x512 volume (a source position exactly halfway between two voxels may round the other way
    than SimpleITK's).
    """
    if tuple(array.shape) == tuple(size):
        return array
    if not linear:
        return _resize_nearest(array, size)
    if np.issubdtype(array.dtype, np.floating):
        return resize_linear(array, size)
    img = sitk.GetImageFromArray(array)
    out_size = [int(size[2]), int(size[1]), int(size[0])]
    in_size = img.GetSize()
    spacing = [in_size[i] / out_size[i] for i in range(3)]
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(out_size)
    resampler.SetOutputSpacing(spacing)
    resampler.SetOutputOrigin([(spacing[i] - 1.0) / 2.0 for i in range(3)])  # align voxel centres
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(0.0)
    return sitk.GetArrayFromImage(resampler.Execute(img))


Pointwise = Callable[[np.ndarray], np.ndarray]


def resize_linear(array: np.ndarray, size: tuple[int, ...], pointwise: Pointwise | None = None) -> np.ndarray:
    """Trilinear resize of ``pointwise(array)`` to ``size`` (z, y, x), voxel centres aligned, as floats
    (float32 unless float64 in).

    The same values as SimpleITK's linear resampler on the same grid (to float rounding), one axis at
    a time, the most shrunk axis first. The first pass gathers only the planes it reads before
    converting to float or applying ``pointwise`` (a per-voxel map such as a window, so applying it
    to fewer voxels changes nothing): the 3D model's lung box, tens of millions of voxels, is never
    copied whole as float32.
    """
    dtype = np.float64 if array.dtype == np.float64 else np.float32
    out = array
    pending = pointwise
    order = sorted(range(3), key=lambda axis: size[axis] / array.shape[axis])
    for axis in order:
        n_in, n_out = out.shape[axis], int(size[axis])
        if n_in == n_out:
            continue
        lo, hi, weight = _linear_index(n_in, n_out)
        shape = [1, 1, 1]
        shape[axis] = n_out
        below, above = np.take(out, lo, axis=axis), np.take(out, hi, axis=axis)
        if pending is not None:
            below, above, pending = pending(below), pending(above), None
        below = below.astype(dtype, copy=False)
        above = above.astype(dtype, copy=False)
        above -= below
        above *= weight.astype(dtype).reshape(shape)
        below += above
        out = below
    if pending is not None:  # nothing was resized
        out = pending(out)
    return np.ascontiguousarray(out, dtype=dtype)


def _linear_index(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two source indices and the weight of the upper one for each output position (centre-aligned).

    Positions beyond the first or last voxel centre (when enlarging) take the edge voxel, as SimpleITK
    does within half a voxel of the image.
    """
    step = n_in / n_out
    pos = np.clip((step - 1.0) / 2.0 + np.arange(n_out) * step, 0.0, n_in - 1.0)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, pos - lo


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output position on a centre-aligned grid (input voxel = 1 unit)."""
    step = n_in / n_out
    pos = (step - 1.0) / 2.0 + np.arange(n_out) * step
    return np.clip(np.floor(pos + 0.5), 0, n_in - 1).astype(np.intp)


def _resize_nearest(array: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    # Shrinking axes first, then enlarging ones from the last axis back: the per-element gather along
    # x runs on the smallest array, and the y and z gathers copy whole rows (a third faster 192 -> 512).
    out = array
    for axis in sorted(range(3), key=lambda axis: (size[axis] / array.shape[axis], -axis)):
        if out.shape[axis] != size[axis]:
            out = np.take(out, _nearest_index(out.shape[axis], int(size[axis])), axis=axis)
    return np.ascontiguousarray(out)


def _windowed(hu: np.ndarray, manifest: ModelManifest) -> np.ndarray:
    w = manifest.input.window
    return window(hu, w.level, w.width)


def slices_input(hu: np.ndarray, manifest: ModelManifest, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, Placement]:
    """NCHW float32 for a 2D model: each slice of ``box``, windowed and resized to input.size."""
    region = hu[box]
    h, w = manifest.input.size[-2], manifest.input.size[-1]
    target = (region.shape[0], h or region.shape[1], w or region.shape[2])
    # Resample the int16 HU first (a quarter of the bytes of float32), then window.
    x = _windowed(resize(region, target, linear=True), manifest)[:, None, :, :]
    return x.astype(np.float32, copy=False), Placement(box, target)


def volume_input(
    channels: list[np.ndarray],
    manifest: ModelManifest,
    box: tuple[slice, slice, slice],
    pointwise: Sequence[Pointwise | None] | None = None,
) -> np.ndarray:
    """NCDHW float32 for a 3D model: each channel's ``box`` resized to input.size (D, H, W), after its
    ``pointwise`` map (a window, say) where one is given."""
    size = tuple(int(s) for s in manifest.input.size if s is not None)
    maps = list(pointwise) if pointwise is not None else [None] * len(channels)
    stacked = [resize_linear(c[box], size, f) for c, f in zip(channels, maps, strict=True)]
    return np.stack(stacked)[None].astype(np.float32, copy=False)


def labels_in_box(labels: np.ndarray, placement: Placement) -> np.ndarray:
    """Labels on the model grid (z, h, w) resized (nearest) to the volume region they came from."""
    region_shape = tuple(s.stop - s.start for s in placement.box)
    return resize(labels.astype(np.uint8, copy=False), region_shape, linear=False)


def place_labels(labels: np.ndarray, placement: Placement, shape: tuple[int, int, int]) -> np.ndarray:
    """Labels on the model grid (z, h, w) put back into a zero volume of ``shape`` (nearest)."""
    out = np.zeros(shape, dtype=np.uint8)
    out[placement.box] = labels_in_box(labels, placement)
    return out


def windowed_volume(hu: np.ndarray, manifest: ModelManifest) -> np.ndarray:
    """The whole volume in the model's window, [0, 1] float32."""
    return _windowed(hu, manifest)
