"""node.pipeline.volume on real DICOM files written by the synthetic phantom, with planted faults.

The phantom's arrays are the canonical orientation by construction (z feet -> head, y anterior ->
posterior, x patient right -> left), so a correct reader returns exactly ``phantom.hu``; its truth
label maps in truth/ are in each instance's own pixel layout, keyed by SOP Instance UID.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest

from node.pipeline.volume import AIR_HU, SeriesRefused, Volume, _to_hu, _to_hu_by_table, load_volume
from tests.helpers.faults import (
    Synth,
    drop_rescale,
    duplicate_position,
    halve_matrix,
    outside_circle,
    phantom,
    plant_padding,
    rescale,
    scramble_instance_numbers,
    shear_tilt,
    shift_positions,
    synth_series,
    to_decubitus,
    to_hfp,
    turn_in_plane,
    write_enhanced_ct,
    write_legacy_converted_ct,
)

SLICES, MATRIX = 40, 96


@pytest.fixture
def series(tmp_path: Path) -> Synth:
    """A fresh 40 x 96 x 96 HFS covid phantom series (no FOV circle: corners are body-free air)."""
    return synth_series(tmp_path / "series", phantom(slices=SLICES, matrix=MATRIX, seed=1))


def refused(paths: list[Path]) -> SeriesRefused:
    with pytest.raises(SeriesRefused) as info:
        load_volume(paths)
    flag = info.value.flag
    assert flag.severity == "refuse"
    assert flag.reason and flag.reason == str(info.value)
    return info.value


def canonical_from_source(vol: Volume, source: dict[str, np.ndarray]) -> np.ndarray:
    """Per-SOP source-layout slices stacked in the volume's z order and flipped like the volume."""
    out = np.stack([source[f.sop_instance_uid] for f in vol.frames])
    if vol.flip_rows:
        out = out[:, ::-1, :]
    if vol.flip_cols:
        out = out[:, :, ::-1]
    return out


def truth_by_sop(s: Synth, name: str = "lungs") -> dict[str, np.ndarray]:
    labels = s.truth_labels(name)
    return {uid: labels[k] for uid, k in s.truth["sop_to_index"].items()}


# -- ordering ----------------------------------------------------------------------------------
def test_clean_series_is_the_phantom(series: Synth) -> None:
    vol = load_volume(series.files)
    ph = series.phantom
    assert vol.hu.dtype == np.int16 and vol.shape == ph.hu.shape
    np.testing.assert_array_equal(vol.hu, ph.hu)
    assert vol.spacing_mm == pytest.approx(ph.spacing_mm, abs=1e-4)
    assert vol.origin_lps == pytest.approx(ph.origin_mm, abs=1e-3)
    np.testing.assert_allclose(vol.axes_lps, np.eye(3), atol=1e-6)
    assert [f.sop_instance_uid for f in vol.frames] == series.truth["sop_instance_uids"]
    assert all(f.frame_number is None for f in vol.frames)
    assert not [f for f in vol.qa if f.severity == "refuse"]


def test_shuffled_files_and_scrambled_instance_numbers_give_the_same_volume(series: Synth) -> None:
    reference = load_volume(series.files)
    scramble_instance_numbers(series.files, seed=7)
    numbers = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in series.files]
    assert numbers != sorted(numbers) and numbers != sorted(numbers, reverse=True)
    for seed in (1, 2):
        shuffled = list(series.files)
        random.Random(seed).shuffle(shuffled)
        vol = load_volume(shuffled)
        np.testing.assert_array_equal(vol.hu, reference.hu)
        np.testing.assert_array_equal(vol.hu, series.phantom.hu)
        assert [f.sop_instance_uid for f in vol.frames] == [f.sop_instance_uid for f in reference.frames]
        assert vol.origin_lps == pytest.approx(reference.origin_lps)


# -- geometry refusals -------------------------------------------------------------------------
def test_missing_slice_is_refused(series: Synth) -> None:
    gone = series.file_of_index(SLICES // 2)
    err = refused([p for p in series.files if p != gone])
    assert err.flag.code == "missing_slices"
    assert "1 slice(s) missing" in err.flag.reason


def test_duplicate_position_is_refused(series: Synth) -> None:
    extra = series.folder / "IM09999.dcm"
    duplicate_position(series.file_of_index(10), extra)
    err = refused([*series.files, extra])
    assert err.flag.code == "duplicate_positions"
    assert "occur twice" in err.flag.reason


def test_gantry_tilt_is_refused(series: Synth) -> None:
    shear_tilt(series.files, 20.0)
    err = refused(series.files)
    assert err.flag.code == "gantry_tilt"
    assert "20.0 degrees" in err.flag.reason


def test_mixed_matrix_is_refused(series: Synth) -> None:
    halve_matrix(series.file_of_index(5))
    err = refused(series.files)
    assert err.flag.code == "mixed_matrix"
    assert "(48, 48)" in err.flag.reason and "(96, 96)" in err.flag.reason


def test_mixed_pixel_spacing_is_refused_in_plain_numbers(series: Synth) -> None:
    """The reason goes into result.json and the SR: numbers as a reader writes them."""
    ds = pydicom.dcmread(series.file_of_index(5))
    ds.PixelSpacing = [float(v) * 1.5 for v in ds.PixelSpacing]
    ds.save_as(series.file_of_index(5), enforce_file_format=True)
    err = refused(series.files)
    assert err.flag.code == "mixed_pixel_spacing"
    assert "np." not in err.flag.reason and re.search(r"\(\d+\.\d+, \d+\.\d+\)", err.flag.reason)


def test_non_uniform_spacing_is_refused(series: Synth) -> None:
    gap = series.phantom.spacing_mm[0]
    shift_positions(series.files_of_indices(range(SLICES // 2, SLICES)), 0.4 * gap)  # one gap of 1.4 x
    err = refused(series.files)
    assert err.flag.code == "non_uniform_spacing"
    assert "not uniform" in err.flag.reason


def test_an_image_of_another_kind_in_the_series_is_refused(series: Synth) -> None:
    """An MR image in the gap above the CT stack would otherwise be analysed as one more CT slice."""
    from pydicom.uid import MRImageStorage

    top = pydicom.dcmread(series.file_of_index(SLICES - 1))
    gap = series.phantom.spacing_mm[0]
    top.ImagePositionPatient = [float(v) for v in top.ImagePositionPatient[:2]] + [
        float(top.ImagePositionPatient[2]) + gap]
    top.SOPClassUID = top.file_meta.MediaStorageSOPClassUID = MRImageStorage
    top.SOPInstanceUID = top.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    top.Modality = "MR"
    extra = series.folder / "IM09999.dcm"
    top.save_as(extra, enforce_file_format=True)
    err = refused([*series.files, extra])
    assert err.flag.code == "mixed_modalities"
    assert f"{SLICES} CT (CT Image Storage), 1 MR (MR Image Storage)" in err.flag.reason


def test_pixel_values_beyond_bits_stored_are_refused(series: Synth) -> None:
    """A damaged compressed stream can decode without error into values no 12-bit image holds."""
    from pydicom.uid import JPEGLSLossless

    victim = series.file_of_index(7)
    ds = pydicom.dcmread(victim)
    arr = ds.pixel_array.astype(np.uint16)
    arr[:, : arr.shape[1] // 2] = 40000  # half the slice: what a zeroed JPEG-LS codestream decoded to
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, 16, 15
    ds.compress(JPEGLSLossless, arr)  # its decoder returns the values as coded, unmasked
    ds.BitsStored, ds.HighBit = 12, 11
    ds.save_as(victim, enforce_file_format=True)
    err = refused(series.files)
    assert err.flag.code == "unreadable_pixels"
    assert "is damaged" in err.flag.reason and "BitsStored 12" in err.flag.reason


def test_single_image_is_refused(series: Synth) -> None:
    assert refused(series.files[:1]).flag.code == "too_few_slices"


# -- orientation -------------------------------------------------------------------------------
ORIENTATIONS = [("HFS", "radiological"), ("FFS", "radiological"), ("FFS", "mirrored")]


@pytest.mark.parametrize(("position", "convention"), ORIENTATIONS)
def test_patient_positions_give_one_canonical_orientation(tmp_path: Path, position: str, convention: str) -> None:
    ph = phantom(slices=SLICES, matrix=MATRIX, seed=1)
    s = synth_series(tmp_path / "s", ph, orientation=position, ffs_convention=convention)
    iop = [float(v) for v in pydicom.dcmread(s.files[0], stop_before_pixels=True).ImageOrientationPatient]
    assert iop[0] == (-1.0 if convention == "mirrored" and position == "FFS" else 1.0)
    files = list(s.files)
    random.Random(3).shuffle(files)
    vol = load_volume(files)

    np.testing.assert_array_equal(vol.hu, ph.hu)
    assert vol.origin_lps == pytest.approx(ph.origin_mm, abs=1e-3)
    np.testing.assert_allclose(vol.axes_lps, np.eye(3), atol=1e-6)

    # The truth (in source pixel layout, by SOP UID) mapped like the volume is the canonical truth,
    # and the patient's right lung (label 1) lies at canonical x < middle.
    truth = truth_by_sop(s)
    canonical = canonical_from_source(vol, truth)
    np.testing.assert_array_equal(canonical, ph.lungs)
    xs = np.nonzero(canonical == 1)[2]
    assert xs.size and xs.mean() < MATRIX / 2 - 5
    assert np.nonzero(canonical == 2)[2].mean() > MATRIX / 2 + 5
    assert float(vol.hu[canonical == 1].mean()) < -600  # the labels sit on lung-density pixels

    # to_source puts every canonical slice back in its instance's pixel order.
    back = vol.to_source(ph.lungs)
    assert len(back) == SLICES
    for frame, plane in back:
        np.testing.assert_array_equal(plane, truth[frame.sop_instance_uid], err_msg=frame.sop_instance_uid)
    # ... and against the pixels themselves: lung labels sit on dark source pixels.
    for frame, plane in back[15:17]:
        ds = pydicom.dcmread(s.folder / s.truth["files"][frame.sop_instance_uid])
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert plane.any() and hu[plane > 0].mean() < -600


def test_head_first_prone_layout_flips_rows_and_columns(series: Synth) -> None:
    truth = truth_by_sop(series)
    to_hfp(series.files)
    vol = load_volume(series.files)
    assert vol.flip_rows and vol.flip_cols
    np.testing.assert_array_equal(vol.hu, series.phantom.hu)
    assert vol.origin_lps == pytest.approx(series.phantom.origin_mm, abs=1e-3)
    np.testing.assert_allclose(vol.axes_lps, np.eye(3), atol=1e-6)
    for frame, plane in vol.to_source(series.phantom.lungs):
        np.testing.assert_array_equal(plane, truth[frame.sop_instance_uid][::-1, ::-1])


@pytest.mark.parametrize("side", ["HFDR", "HFDL"])
def test_images_turned_by_a_quarter_are_transposed_so_right_stays_right(series: Synth, side: str) -> None:
    """Decubitus series store the patient's right-left along the image columns: read as they were, the lungs
    would be split front/back and called right and left."""
    truth = truth_by_sop(series)
    to_decubitus(series.files, side)
    vol = load_volume(series.files)
    assert vol.transposed
    np.testing.assert_array_equal(vol.hu, series.phantom.hu)
    assert vol.origin_lps == pytest.approx(series.phantom.origin_mm, abs=1e-3)
    np.testing.assert_allclose(vol.axes_lps, np.eye(3), atol=1e-6)
    for frame, plane in vol.to_source(series.phantom.lungs):  # masks go back in each image's own layout
        expected = truth[frame.sop_instance_uid].T
        np.testing.assert_array_equal(plane, expected[::-1, :] if side == "HFDR" else expected[:, ::-1])


def test_images_turned_past_the_limit_in_their_plane_are_refused(series: Synth) -> None:
    turn_in_plane(series.files, 40)
    error = refused(series.files)
    assert error.flag.code == "rotated_in_plane" and "40 degrees" in str(error)


# -- pixel values ------------------------------------------------------------------------------
@pytest.mark.parametrize(("slope", "intercept"), [(0.5, -1024.0), (1.0, -2048.0), (0.25, -1500.0)])
def test_rescale_slope_and_intercept(series: Synth, slope: float, intercept: float) -> None:
    rescale(series.files, slope=slope, intercept=intercept)
    ds = pydicom.dcmread(series.files[0])
    assert float(ds.RescaleSlope) == slope and ds.pixel_array.max() > 4095 // 2
    np.testing.assert_array_equal(load_volume(series.files).hu, series.phantom.hu)


@pytest.mark.parametrize(("value", "limit"), [(63536, None), (60000, 65535)])
def test_pixel_padding_becomes_air(series: Synth, value: int, limit: int | None) -> None:
    plant_padding(series.files, value=value, range_limit=limit)
    vol = load_volume(series.files)
    out = outside_circle(MATRIX, MATRIX)
    assert (vol.hu[:, out] == AIR_HU).all()
    np.testing.assert_array_equal(vol.hu[:, ~out], series.phantom.hu[:, ~out])


def test_values_without_rescale_are_not_hu(series: Synth) -> None:
    drop_rescale(series.files)
    raw = pydicom.dcmread(series.files[20]).pixel_array
    assert raw.min() >= 0
    err = refused(series.files)
    assert err.flag.code == "not_hu"
    assert "Hounsfield" in err.flag.reason


# -- Enhanced CT -------------------------------------------------------------------------------
def test_enhanced_ct_multiframe_gives_the_classic_volume(series: Synth, tmp_path: Path) -> None:
    classic = load_volume(series.files)
    [(path, members)] = write_enhanced_ct(series.files, tmp_path / "enhanced" / "ct.dcm", order_seed=5)
    assert members != sorted(members)  # frames are not in slice order
    vol = load_volume([path])
    np.testing.assert_array_equal(vol.hu, classic.hu)
    assert vol.origin_lps == pytest.approx(classic.origin_lps, abs=1e-3)
    assert vol.spacing_mm == pytest.approx(classic.spacing_mm)
    # the volume keeps a header for the outputs, not a second copy of the pixels for the whole job
    assert "PixelData" not in vol.reference and "PixelData" not in classic.reference

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert {f.sop_instance_uid for f in vol.frames} == {str(ds.SOPInstanceUID)}
    assert {f.sop_class_uid for f in vol.frames} == {"1.2.840.10008.5.1.4.1.1.2.1"}
    # frame n of the file holds classic slice members[n-1]; canonical z must point at its frame.
    classic_uid_to_frame = {}
    for n, k in enumerate(members, start=1):
        uid = str(pydicom.dcmread(series.files[k], stop_before_pixels=True).SOPInstanceUID)
        classic_uid_to_frame[uid] = n
    expected = [classic_uid_to_frame[f.sop_instance_uid] for f in classic.frames]
    assert [f.frame_number for f in vol.frames] == expected
    # the mask of each frame goes back to that frame
    back = {f.frame_number: plane for f, plane in vol.to_source(series.phantom.lungs)}
    truth = truth_by_sop(series)
    for uid, n in classic_uid_to_frame.items():
        np.testing.assert_array_equal(back[n], truth[uid])


def test_legacy_converted_enhanced_ct_gives_the_classic_volume(series: Synth, tmp_path: Path) -> None:
    """A PACS that converts classic series sends Legacy Converted Enhanced CT: the same volume, each slice
    pointing at its frame."""
    classic = load_volume(series.files)
    path, members = write_legacy_converted_ct(series.files, tmp_path / "lce" / "ct.dcm")
    vol = load_volume([path])
    np.testing.assert_array_equal(vol.hu, classic.hu)
    assert vol.spacing_mm == pytest.approx(classic.spacing_mm)
    assert {f.sop_class_uid for f in vol.frames} == {"1.2.840.10008.5.1.4.1.1.2.2"}
    classic_uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in series.files]
    frame_of = {classic_uids[k]: n for n, k in enumerate(members, start=1)}
    assert [f.frame_number for f in vol.frames] == [frame_of[f.sop_instance_uid] for f in classic.frames]


def test_single_frame_enhanced_ct_objects(series: Synth, tmp_path: Path) -> None:
    classic = load_volume(series.files)
    written = write_enhanced_ct(series.files, tmp_path / "enhanced" / "ct.dcm", frames_per_file=1)
    assert len(written) == SLICES
    vol = load_volume([p for p, _ in written])
    np.testing.assert_array_equal(vol.hu, classic.hu)


def _set_all(files: list[Path], **values: object) -> None:
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize(("values", "code", "words"), [
    ({"PixelSpacing": [50, 50]}, "geometry_invalid", "gives a 4800 mm field of view, wider than any CT's"),
    ({"PixelSpacing": [0, 0]}, "geometry_invalid", "Pixel Spacing of 0 x 0 mm: a spacing must be positive"),
    ({"PixelSpacing": [-0.7, -0.7]}, "geometry_invalid", "Pixel Spacing of -0.7 x -0.7 mm"),
    ({"ImageOrientationPatient": [1, 0, 0, 0, 1, "nan"]}, "geometry_invalid",
     "Image Orientation (Patient) is not 6 numbers"),
    ({"RescaleIntercept": "nan"}, "header_invalid", "RescaleIntercept is not a number"),
])
def test_values_no_chest_ct_can_have_are_refused_by_name(series: Synth, values: dict[str, object], code: str,
                                                         words: str) -> None:
    """Such values ran through as 'ok' (975 litres of lung at 50 mm pixels) or failed as Python errors."""
    _set_all(series.files, **values)
    err = refused(series.files)
    assert (err.flag.code, words in err.flag.reason) == (code, True), err.flag.reason


def test_a_position_that_is_not_a_number_is_refused_by_name(series: Synth) -> None:
    path = series.file_of_index(3)
    raw = path.read_bytes()
    position = bytes(pydicom.dcmread(path).get_item("ImagePositionPatient").value)  # as stored
    bad = b"1\\x\\3".ljust(len(position))  # same length: a DS the file holds but no number
    assert position in raw
    path.write_bytes(raw.replace(position, bad, 1))
    err = refused(series.files)
    assert err.flag.code == "geometry_invalid" and "Image Position (Patient) is not 3 numbers" in err.flag.reason


def test_a_colour_picture_is_not_a_ct(series: Synth) -> None:
    for path in series.files:
        ds = pydicom.dcmread(path)
        gray = ds.pixel_array.astype(np.uint8)
        ds.PixelData = np.repeat(gray[..., None], 3, axis=2).tobytes()
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.save_as(path, enforce_file_format=True)
    err = refused(series.files)
    assert err.flag.code == "not_grayscale" and "PhotometricInterpretation RGB" in err.flag.reason


def test_lossy_compressed_images_are_flagged(series: Synth) -> None:
    assert not [f for f in load_volume(series.files).qa if f.code == "lossy_compression"]
    _set_all(series.files[:3], LossyImageCompression="01")
    (flag,) = [f for f in load_volume(series.files).qa if f.code == "lossy_compression"]
    assert flag.severity == "flag" and flag.reason.startswith(f"3 of {SLICES} images were lossy compressed")


def test_slice_gaps_are_flagged_for_enhanced_ct_too(series: Synth, tmp_path: Path) -> None:
    """Enhanced CT keeps SliceThickness in its frame groups, not at the top level."""
    _set_all(series.files, SliceThickness="0.5")
    [(path, _)] = write_enhanced_ct(series.files, tmp_path / "enhanced" / "ct.dcm")
    assert "SliceThickness" not in pydicom.dcmread(path, stop_before_pixels=True)
    for vol in (load_volume(series.files), load_volume([path])):
        (flag,) = [f for f in vol.qa if f.code == "slice_gap"]
        assert flag.reason.startswith("slices of 0.50 mm are")


def test_hu_by_table_equals_the_formula() -> None:
    """8- and 16-bit images are converted by a table of every stored value: the same HU as the formula."""
    tables: dict[tuple[str, ...], np.ndarray] = {}
    every16 = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    padded = pydicom.Dataset()
    padded.PixelPaddingValue = -2000
    for raw in (every16, every16.view(np.int16), np.arange(256, dtype=np.uint8).reshape(16, 16)):
        for slope, intercept, ds in ((1.0, -1024.0, pydicom.Dataset()), (0.5, -1500.25, pydicom.Dataset()),
                                     (1.0, -1024.0, padded)):
            plane = SimpleNamespace(ds=ds, slope=slope, intercept=intercept)
            np.testing.assert_array_equal(_to_hu_by_table(raw, plane, tables), _to_hu(raw, plane))  # type: ignore[arg-type]
    assert len(tables) == 9  # one table per stored type and rescale
    wide = np.array([[70000, -5]], dtype=np.int32)  # other types take the formula
    plane = SimpleNamespace(ds=pydicom.Dataset(), slope=1.0, intercept=-1024.0)
    np.testing.assert_array_equal(_to_hu_by_table(wide, plane, tables), [[32767, AIR_HU]])  # type: ignore[arg-type]


# -- header values and compressed frames that disagree with the header --------------------------------
def _plant_number_of_frames(path: Path, value: bytes) -> None:
    """Give the file a Number of Frames of two bytes as sent (pydicom will not write 'ab' into an IS itself)."""
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 1
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    element = b"\x28\x00\x08\x00IS\x02\x001 "  # (0028,0008) IS, explicit VR little endian
    assert raw.count(element) == 1
    path.write_bytes(raw.replace(element, element[:8] + value))


def test_a_number_of_frames_that_is_not_a_number_is_refused_by_name(series: Synth) -> None:
    """It failed as ``ValueError: invalid literal for int() with base 10: 'ab'``."""
    _plant_number_of_frames(series.file_of_index(4), b"ab")
    err = refused(series.files)
    assert (err.flag.code, err.flag.reason) == ("header_invalid", "NumberOfFrames 'ab' is not a number of frames")


@pytest.mark.parametrize("ts", ["rle", "jpeg-ls", "jpeg2000", "jpeg-lossless"])
@pytest.mark.parametrize(("rows", "cols"), [(32, 64), (64, 128)])
def test_compressed_frames_of_another_size_than_rows_x_columns_are_refused_in_words(
        tmp_path: Path, ts: str, rows: int, cols: int) -> None:
    """The decoders failed with a numpy broadcast error, or, for an RLE frame longer than the header says, a panic in
    the Rust decoder that ``except Exception`` does not catch (it would have ended the worker process)."""
    from tests.helpers.series import write_ct_series

    files = write_ct_series(tmp_path / ts, slices=4, matrix=64, transfer_syntax=ts).files
    assert load_volume(files).shape == (4, 64, 64)
    _set_all_as_sent(files, Rows=rows, Columns=cols)
    err = refused(files)
    assert err.flag.code == "matrix_mismatch", err.flag.reason
    if ts == "rle":  # RLE declares no size: its first segment is measured
        assert f"holds 4096 pixels a frame, its header says Rows {rows} x Columns {cols} ({rows * cols})" in err.flag.reason
    else:
        assert f"is 64 x 64 pixels, its header says Rows {rows} x Columns {cols}" in err.flag.reason
    assert "broadcast" not in err.flag.reason


def test_swapped_rows_and_columns_of_a_jpeg_frame_are_refused_before_decoding(tmp_path: Path) -> None:
    """Rows and Columns swapped keep the byte count: the frame would decode, into the wrong image."""
    from tests.helpers.series import write_ct_series

    files = write_ct_series(tmp_path / "jls", slices=3, matrix=64, transfer_syntax="jpeg-ls").files
    _set_all_as_sent(files, Rows=32, Columns=128)
    err = refused(files)
    assert err.flag.code == "matrix_mismatch" and "is 64 x 64 pixels" in err.flag.reason


def _set_all_as_sent(files: list[Path], **values: object) -> None:
    """Change header values and keep the pixel data as it is (compressed, not re-encoded)."""
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        ds.save_as(path)


# -- localizers filed in an axial series ----------------------------------------------------------------
def _localizer_in(series: Synth) -> Path:
    """A localizer as scanners file one in the axial series: a coronal projection of another size, ImageType
    ORIGINAL/PRIMARY/LOCALIZER, same series."""
    ds = pydicom.dcmread(series.file_of_index(0))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.InstanceNumber = 0
    pixels = ds.pixel_array[: MATRIX // 2].copy()
    ds.Rows = pixels.shape[0]
    ds.PixelData = pixels.tobytes()
    path = series.folder / "IM00000.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("at", [0, SLICES // 2, SLICES])
def test_a_localizer_in_the_series_is_left_out_of_the_volume_wherever_it_came(series: Synth, at: int) -> None:
    """The verdict depended on the order: refused for the localizer's ImageType when it came first, 'images of
    different sizes' when it came in the middle."""
    reference = load_volume(series.files)
    localizer = _localizer_in(series)
    vol = load_volume([*series.files[:at], localizer, *series.files[at:]])
    np.testing.assert_array_equal(vol.hu, reference.hu)
    assert [f.sop_instance_uid for f in vol.frames] == [f.sop_instance_uid for f in reference.frames]
    (flag,) = [f for f in vol.qa if f.code == "localizer_left_out"]
    assert flag.severity == "flag" and flag.reason.startswith("1 localizer image(s) (ImageType LOCALIZER)")


def test_localizers_alone_are_not_left_out(series: Synth) -> None:
    """Nothing else to read: the localizers are read as they are, and refused for what they are."""
    err = refused([_localizer_in(series)])
    assert err.flag.code == "too_few_slices"
