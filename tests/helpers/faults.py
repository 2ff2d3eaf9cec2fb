"""Synthetic series with planted faults, for the volume/QA, selection, worker and process tests.

Everything starts from the project's phantom (node.synthetic): ``synth_series`` writes a real
series (with its ground truth in ``truth/``), and the planters below rewrite the files the way a
broken scanner, PACS or network would leave them: a slice missing, a position twice, a sheared
(tilted) stack, a mixed matrix, uneven spacing, no rescale, pixel padding, a multi-frame Enhanced
CT object, a scout. ``fifo_trap`` turns one file of a series into a named pipe so a worker that
reads it blocks mid-job until the test lets it go (or kills it).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from node.synthetic import Phantom, PhantomSpec, SeriesOptions, make_phantom, write_series
from tests.helpers.series import file_meta

ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


@functools.lru_cache(maxsize=16)
def _phantom_cached(spec: PhantomSpec) -> Phantom:
    return make_phantom(spec)


def phantom(kind: str = "covid", *, slices: int = 40, matrix: int = 96, seed: int = 1, **spec: Any) -> Phantom:
    """A phantom, rendered once per process for each spec (treat it as read-only)."""
    return _phantom_cached(PhantomSpec(kind=kind, slices=slices, matrix=matrix, seed=seed, **spec))  # type: ignore[arg-type]


@dataclass
class Synth:
    """A written synthetic series and its truth."""

    folder: Path
    phantom: Phantom
    files: list[Path]  # instance number order (IM00001 is the head end)
    series_uid: str
    study_uid: str
    truth: dict[str, Any]

    def file_of_index(self, k: int) -> Path:
        """The file holding phantom slice ``k`` (0 = feet)."""
        return self.folder / self.truth["files"][self.truth["sop_instance_uids"][k]]

    def files_of_indices(self, ks: Any) -> list[Path]:
        return [self.file_of_index(int(k)) for k in ks]

    def truth_labels(self, name: str = "lungs") -> np.ndarray:
        """truth/<name>.nii.gz as (k, row, column) in DICOM pixel layout, k from feet to head."""
        return sitk.GetArrayFromImage(sitk.ReadImage(str(self.folder / "truth" / f"{name}.nii.gz")))


def synth_series(outdir: Path, ph: Phantom | None = None, **options: Any) -> Synth:
    """Write ``ph`` (default: ``phantom()``) as a DICOM series with fresh UIDs and its truth."""
    ph = ph if ph is not None else phantom()
    options.setdefault("seed", None)
    written = write_series(outdir, ph, SeriesOptions(**options))
    truth = json.loads((outdir / "truth" / "truth.json").read_text())
    return Synth(outdir, ph, list(written.files), written.series_instance_uid, written.study_instance_uid, truth)


def dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.dcm"))


def rewrite(paths: list[Path], edit: Callable[[Dataset, int], None]) -> None:
    """Read each file, let ``edit(ds, i)`` change it, and save it in place (uncompressed)."""
    for i, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        edit(ds, i)
        ds.save_as(path, enforce_file_format=True)


def set_pixels(ds: Dataset, stored: np.ndarray) -> None:
    """Replace the (native) pixel data, keeping the header consistent."""
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.PixelData = np.ascontiguousarray(stored).tobytes()


def _position(ds: Dataset) -> list[float]:
    return [float(v) for v in ds.ImagePositionPatient]


# -- planted geometry faults ----------------------------------------------------------------------
def scramble_instance_numbers(paths: list[Path], seed: int = 0) -> None:
    """InstanceNumbers shuffled: they no longer say anything about the slice order."""
    numbers = list(range(1, len(paths) + 1))
    random.Random(seed).shuffle(numbers)
    rewrite(paths, lambda ds, i: setattr(ds, "InstanceNumber", numbers[i]))


def duplicate_position(src: Path, dst: Path) -> None:
    """A second image at the same position (another phase/acquisition), with its own UID."""
    ds = pydicom.dcmread(src)
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.AcquisitionNumber = 2
    ds.InstanceNumber = 9999
    ds.save_as(dst, enforce_file_format=True)


def shear_tilt(paths: list[Path], degrees: float) -> None:
    """Gantry tilt as scanners write it: IPP moves along y by gap*tan(tilt) per slice, IOP axial."""
    ds0 = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    z = np.array([_position(d)[2] for d in ds0])
    z_min = float(z.min())
    shift = np.tan(np.radians(degrees))

    def edit(ds: Dataset, i: int) -> None:
        x, y, zz = _position(ds)
        ds.ImagePositionPatient = [x, y + (zz - z_min) * shift, zz]
        ds.GantryDetectorTilt = f"{degrees:g}"

    rewrite(paths, edit)


def shift_positions(paths: list[Path], dz: float) -> None:
    """Move these slices along z by ``dz`` mm (uneven spacing when only part of the stack moves)."""

    def edit(ds: Dataset, i: int) -> None:
        x, y, z = _position(ds)
        ds.ImagePositionPatient = [x, y, z + dz]
        ds.SliceLocation = f"{z + dz:g}"

    rewrite(paths, edit)


def halve_matrix(path: Path) -> None:
    """One image reconstructed at half the matrix (same field of view)."""

    def edit(ds: Dataset, i: int) -> None:
        arr = ds.pixel_array[::2, ::2]
        ds.PixelSpacing = [float(v) * 2 for v in ds.PixelSpacing]
        set_pixels(ds, arr)

    rewrite([path], edit)


def to_hfp(paths: list[Path]) -> None:
    """Re-encode as head first prone: IOP [-1,0,0, 0,-1,0], pixels rotated 180 degrees, IPP at the
    opposite corner. Every pixel still lands on the same patient point, so a correct reader gives
    the same canonical volume as for HFS."""

    def edit(ds: Dataset, i: int) -> None:
        x, y, z = _position(ds)
        row_sp, col_sp = (float(v) for v in ds.PixelSpacing)
        arr = ds.pixel_array
        ds.ImagePositionPatient = [x + col_sp * (ds.Columns - 1), y + row_sp * (ds.Rows - 1), z]
        ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]
        ds.PatientPosition = "HFP"
        set_pixels(ds, arr[::-1, ::-1])

    rewrite(paths, edit)


def to_decubitus(paths: list[Path], side: str) -> None:
    """Re-encode as lying on one side, images stored turned by a quarter: columns advance front to back (HFDR: IOP
    [0,1,0, -1,0,0], rows toward the patient's right) or back to front (HFDL: [0,-1,0, 1,0,0], rows toward the
    left). Every pixel still lands on the same patient point, so a correct reader gives the HFS volume."""

    def edit(ds: Dataset, i: int) -> None:
        x, y, z = _position(ds)
        row_sp, col_sp = (float(v) for v in ds.PixelSpacing)
        arr = ds.pixel_array
        if side == "HFDR":  # first pixel: the source's top-right corner (patient's left, front)
            ds.ImagePositionPatient = [x + col_sp * (ds.Columns - 1), y, z]
            ds.ImageOrientationPatient = [0, 1, 0, -1, 0, 0]
            turned = arr.T[::-1, :]
        else:  # first pixel: the source's bottom-left corner (patient's right, back)
            ds.ImagePositionPatient = [x, y + row_sp * (ds.Rows - 1), z]
            ds.ImageOrientationPatient = [0, -1, 0, 1, 0, 0]
            turned = arr.T[:, ::-1]
        ds.PixelSpacing = [col_sp, row_sp]
        ds.PatientPosition = side
        set_pixels(ds, turned)

    rewrite(paths, edit)


def crop_columns(paths: list[Path], n: int) -> None:
    """Keep the first ``n`` columns of every image (a rectangular matrix; positions unchanged)."""

    def edit(ds: Dataset, i: int) -> None:
        set_pixels(ds, ds.pixel_array[:, :n])

    rewrite(paths, edit)


def orientation_noise(paths: list[Path], size: float = 1e-6) -> None:
    """Image Orientation (Patient) off by a different few millionths in each file, as some exporters round it."""

    def edit(ds: Dataset, i: int) -> None:
        ds.ImageOrientationPatient = [float(v) + (size * (i % 3) if k in (1, 3) else 0.0)
                                      for k, v in enumerate(ds.ImageOrientationPatient)]

    rewrite(paths, edit)


def turn_in_plane(paths: list[Path], degrees: float) -> None:
    """Image Orientation (Patient) turned about the slice normal (headers only: the pixels are not resampled)."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))

    def edit(ds: Dataset, i: int) -> None:
        ds.ImageOrientationPatient = [float(c), float(s), 0.0, float(-s), float(c), 0.0]

    rewrite(paths, edit)


# -- planted pixel-value faults -------------------------------------------------------------------
def rescale(paths: list[Path], *, slope: float, intercept: float) -> None:
    """Store HU as (HU - intercept) / slope in 16 bits (exact for the slopes used in the tests)."""

    def edit(ds: Dataset, i: int) -> None:
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        stored = np.rint((hu - intercept) / slope)
        assert stored.min() >= 0 and stored.max() <= 65535
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 0
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        set_pixels(ds, stored.astype(np.uint16))

    rewrite(paths, edit)


def outside_circle(rows: int, cols: int) -> np.ndarray:
    yy, xx = np.mgrid[0:rows, 0:cols]
    cy, cx = (rows - 1) / 2.0, (cols - 1) / 2.0
    return ((yy - cy) ** 2 + (xx - cx) ** 2) > (min(rows, cols) / 2.0) ** 2


def plant_padding(paths: list[Path], *, value: int, range_limit: int | None = None, seed: int = 0) -> None:
    """Pixels outside the reconstruction circle set to the padding value (or anything in the
    padding range), 16-bit unsigned, so that without padding handling they read as very dense."""
    rng = np.random.default_rng(seed)

    def edit(ds: Dataset, i: int) -> None:
        arr = ds.pixel_array.astype(np.uint16)
        out = outside_circle(ds.Rows, ds.Columns)
        hi = value if range_limit is None else range_limit
        arr[out] = rng.integers(min(value, hi), max(value, hi) + 1, int(out.sum()))
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 0
        ds.PixelPaddingValue = value
        ds["PixelPaddingValue"].VR = "US"
        if range_limit is not None:
            ds.PixelPaddingRangeLimit = range_limit
            ds["PixelPaddingRangeLimit"].VR = "US"
        set_pixels(ds, arr)

    rewrite(paths, edit)


def drop_rescale(paths: list[Path]) -> None:
    """Stored values (HU + 1024, all >= 0) without Rescale Slope/Intercept: not Hounsfield units."""

    def edit(ds: Dataset, i: int) -> None:
        for keyword in ("RescaleIntercept", "RescaleSlope", "RescaleType"):
            if keyword in ds:
                delattr(ds, keyword)

    rewrite(paths, edit)


# -- other objects --------------------------------------------------------------------------------
def write_enhanced_ct(classic: list[Path], out: Path, *, order_seed: int = 0, frames_per_file: int | None = None
                      ) -> list[tuple[Path, list[int]]]:
    """Enhanced CT Image Storage object(s) holding the classic slices as frames, in shuffled order.

    Returns, per file written, its path and the classic slice (index into ``classic``) of each frame.
    ``frames_per_file=1`` writes one single-frame Enhanced CT object per slice.
    """
    sources = [pydicom.dcmread(p) for p in classic]
    order = list(range(len(sources)))
    random.Random(order_seed).shuffle(order)
    per_file = frames_per_file or len(order)
    groups = [order[i:i + per_file] for i in range(0, len(order), per_file)]
    first = sources[0]
    series_uid = generate_uid()
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for g, members in enumerate(groups):
        sop_uid = generate_uid()
        ds = Dataset()
        ds.file_meta = file_meta(ENHANCED_CT_IMAGE_STORAGE, sop_uid, ExplicitVRLittleEndian)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                        "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "Manufacturer",
                        "FrameOfReferenceUID", "PositionReferenceIndicator", "BodyPartExamined", "PatientPosition"):
            if keyword in first:
                setattr(ds, keyword, first.get(keyword))
        ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "CT"
        ds.SeriesNumber = 7
        ds.InstanceNumber = g + 1
        ds.SeriesDescription = "Enhanced CT chest"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
        ds.ContentQualification = "PRODUCT"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = first.Rows, first.Columns
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = first.PixelRepresentation
        ds.NumberOfFrames = len(members)
        ds.ContentDate, ds.ContentTime = first.StudyDate, first.StudyTime
        ds.AcquisitionDateTime = f"{first.StudyDate}{first.StudyTime}"
        ds.BurnedInAnnotation = "NO"
        ds.PresentationLUTShape = "IDENTITY"
        ds.LossyImageCompression = "00"

        orientation = Dataset()
        orientation.ImageOrientationPatient = list(first.ImageOrientationPatient)
        measures = Dataset()
        measures.PixelSpacing = list(first.PixelSpacing)
        measures.SliceThickness = first.SliceThickness
        transform = Dataset()
        transform.RescaleIntercept = first.RescaleIntercept
        transform.RescaleSlope = first.RescaleSlope
        transform.RescaleType = "HU"
        shared = Dataset()
        shared.PlaneOrientationSequence = Sequence([orientation])
        shared.PixelMeasuresSequence = Sequence([measures])
        shared.PixelValueTransformationSequence = Sequence([transform])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])

        per_frame = []
        for i, k in enumerate(members):
            position = Dataset()
            position.ImagePositionPatient = list(sources[k].ImagePositionPatient)
            content = Dataset()
            content.FrameAcquisitionNumber = 1
            content.InStackPositionNumber = i + 1
            fg = Dataset()
            fg.PlanePositionSequence = Sequence([position])
            fg.FrameContentSequence = Sequence([content])
            per_frame.append(fg)
        ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
        pixels = np.stack([sources[k].pixel_array for k in members])
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        path = out if len(groups) == 1 else out.with_name(f"{out.stem}-{g + 1:03d}{out.suffix}")
        ds.save_as(path, enforce_file_format=True)
        written.append((path, members))
    return written


def write_legacy_converted_ct(classic: list[Path], out: Path) -> tuple[Path, list[int]]:
    """A Legacy Converted Enhanced CT object made from the classic slices by highdicom's converter (as a PACS
    that converts legacy series would send it). Returns its path and the classic slice of each frame, read from
    the frames' Conversion Source Attributes, which name the classic image each frame came from."""
    import highdicom as hd

    sources = [pydicom.dcmread(p) for p in classic]
    index = {str(ds.SOPInstanceUID): k for k, ds in enumerate(sources)}
    converted = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=sources, series_instance_uid=generate_uid(), series_number=8,
        sop_instance_uid=generate_uid(), instance_number=1)
    members = [index[str(fg.ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID)]
               for fg in converted.PerFrameFunctionalGroupsSequence]
    out.parent.mkdir(parents=True, exist_ok=True)
    converted.save_as(out, enforce_file_format=True)
    return out, members


def write_scout(path: Path, *, study_uid: str | None = None, matrix: int = 64) -> Path:
    """A CT localizer (topogram): one coronal projection image, as scanners send it with a study."""
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = file_meta(CTImageStorage, sop_uid, ExplicitVRLittleEndian)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "SCOUT^ONLY", "SCOUT1", "", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20240101", "1000", "1", "", ""
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.SeriesDescription = "Topogram 0.6 T20f"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SliceThickness = "1"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.ImagePositionPatient = [-250, 0, 100]
    ds.PixelSpacing = [2, 2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    set_pixels(ds, (np.arange(matrix * matrix).reshape(matrix, matrix) % 2000).astype(np.uint16))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# -- a trap for workers ---------------------------------------------------------------------------
class FifoTrap:
    """Replace ``path`` by a named pipe: whoever opens it for reading blocks until ``release``.

    ``release`` puts the real file back (atomically replacing the pipe), so a later reader gets
    the real data; a reader already blocked in open() stays blocked (it was killed in the tests).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.saved = path.with_name(path.name + ".real")
        os.replace(path, self.saved)
        os.mkfifo(path)

    def wait_for_reader(self, timeout: float = 30.0) -> int:
        """Wait until someone opens the pipe for reading; return our writing end. The reader's open() then
        returns and it waits in read() for ``feed``: a point in its work the test knows it has reached."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while nobody reads
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                if time.monotonic() > deadline:
                    raise AssertionError(f"nobody opened {self.path} for reading within {timeout:g} s") from None
                time.sleep(0.02)
                continue
            os.set_blocking(fd, True)
            return fd

    def feed(self, fd: int) -> None:
        """Give the reader the real file's bytes through ``fd`` (from ``wait_for_reader``), then close it."""
        with contextlib.suppress(BrokenPipeError), open(fd, "wb") as pipe:
            pipe.write(self.saved.read_bytes())

    def release(self) -> None:
        os.replace(self.saved, self.path)
