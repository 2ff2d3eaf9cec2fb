"""A CT series as a HU volume with its geometry, after the checks that make it safe to analyse.

Slices are ordered by their position along the slice normal (never by InstanceNumber) and the
volume is brought to one canonical orientation, whatever the patient position:

    axis 0 (z): inferior -> superior     axis 1 (y): anterior -> posterior     axis 2 (x): right -> left

which is the usual radiological view of an axial slice (patient's right on the image's left). Flips
bring supine and prone, head- and feet-first series there; images stored turned by a quarter (decubitus
positions, rows running front to back) are transposed first. ``Volume.to_source`` undoes both so masks
can be written back frame by frame against the source images. Images turned in their plane by more
than ``MAX_IN_PLANE_ROTATION_DEG`` from the nearest of these layouts are refused: the models and the
right/left split assume the radiological view.

Problems with the geometry or the pixel values raise SeriesRefused with a human-readable reason;
milder ones are recorded as QA flags on the volume.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from node.errors import LungnodeError, one_line
from node.pipeline.codestream import coded_size, rle_pixels

Severity = Literal["refuse", "flag"]

#: Two slice positions closer than this (mm) are the same position.
DUPLICATE_TOLERANCE_MM = 0.01
#: Relative deviation of a slice gap from the median gap still counted as uniform.
SPACING_TOLERANCE = 0.10
#: Cosine tolerance for "the same orientation" between slices.
ORIENTATION_TOLERANCE = 1e-3
#: Largest in-plane turn (degrees) from the nearest axis-aligned layout analysed (measured: 30 degrees still
#: gives right and left lungs on the right side; past 45 another layout is nearer).
MAX_IN_PLANE_ROTATION_DEG = 30.0
AIR_HU = -1024


@dataclass(frozen=True)
class QAFlag:
    """One finding about a series: ``refuse`` stops analysis, ``flag`` is reported with the results."""

    code: str
    severity: Severity
    reason: str


class SeriesRefused(LungnodeError):
    """The series cannot be analysed; ``flag.reason`` says why in words a radiologist understands."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.flag = QAFlag(code, "refuse", reason)


@dataclass(frozen=True)
class SourceFrame:
    """The source image of one canonical slice: an instance, and its frame for multi-frame objects."""

    sop_instance_uid: str
    sop_class_uid: str
    frame_number: int | None  # 1-based, Enhanced CT only


@dataclass
class Volume:
    hu: np.ndarray  # int16, (z, y, x) canonical orientation
    spacing_mm: tuple[float, float, float]  # (z, y, x)
    origin_lps: np.ndarray  # position of voxel (0, 0, 0), mm
    axes_lps: np.ndarray  # 3x3, rows: unit vectors of canonical x, y, z in patient space
    frames: list[SourceFrame]  # source of each canonical z
    flip_rows: bool  # source image rows (of the transposed image, if transposed) run opposite to canonical y
    flip_cols: bool  # source image columns (of the transposed image, if transposed) run opposite to canonical x
    reference: Dataset  # header of one source image (patient/study modules for outputs)
    qa: list[QAFlag] = field(default_factory=list)
    transposed: bool = False  # source image rows run along canonical x (images turned by a quarter)

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.hu.shape
        return int(z), int(y), int(x)

    @property
    def voxel_ml(self) -> float:
        dz, dy, dx = self.spacing_mm
        return dz * dy * dx / 1000.0

    @property
    def source_matrix(self) -> tuple[int, int]:
        """Rows and columns of the source images."""
        _, y, x = self.shape
        return (x, y) if self.transposed else (y, x)

    def in_source_layout(self, canonical: np.ndarray) -> np.ndarray:
        """A canonical (..., y, x) array in the source images' pixel layout: the flips and transpose undone (a
        view)."""
        out = canonical
        if self.flip_rows:
            out = out[..., ::-1, :]
        if self.flip_cols:
            out = out[..., :, ::-1]
        return np.swapaxes(out, -1, -2) if self.transposed else out

    def to_source(self, mask: np.ndarray) -> list[tuple[SourceFrame, np.ndarray]]:
        """Split a canonical (z, y, x) mask into per-source-frame 2D arrays in source pixel order."""
        return [(frame, np.ascontiguousarray(self.in_source_layout(mask[z]))) for z, frame in enumerate(self.frames)]


@dataclass
class _Plane:
    """One source image plane before sorting."""

    ds: Dataset
    frame_number: int | None
    position: np.ndarray
    row_dir: np.ndarray  # direction of increasing column index (IOP first triplet)
    col_dir: np.ndarray  # direction of increasing row index (IOP second triplet)
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing)
    rows: int
    cols: int
    slope: float
    intercept: float
    thickness: float = 0.0  # reconstructed slice thickness (mm), 0 when not given


#: The widest field of view a CT image can have (mm; scanner bores are 700-850 mm): a Pixel Spacing beyond it
#: (50 mm "pixels") would turn the lungs into cubic metres.
MAX_FIELD_OF_VIEW_MM = 1000.0


def _floats(value: Sequence[object] | None, n: int, what: str) -> np.ndarray:
    if value is None or len(value) != n:
        raise SeriesRefused("geometry_missing", f"images lack {what}: the slice geometry is unknown")
    try:
        numbers = np.array([float(v) for v in value], dtype=np.float64)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        numbers = np.array([np.nan])
    if not np.isfinite(numbers).all():
        raise SeriesRefused("geometry_invalid", f"{what} is not {n} numbers in an image: the slice geometry is unknown")
    if what == "Pixel Spacing" and not (numbers > 0).all():
        raise SeriesRefused("geometry_invalid", f"Pixel Spacing of {numbers[0]:g} x {numbers[1]:g} mm: a spacing must "
                            "be positive")
    return numbers


def _number(ds: Dataset, keyword: str, default: float) -> float:
    """A numeric header value, or a refusal that names it (a bad value must not surface as a Python error)."""
    value = ds.get(keyword, default)
    try:
        number = float(value if value not in (None, "") else default)
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number):
        raise SeriesRefused("header_invalid", f"{keyword} is not a number in an image")
    return number


def _shown(value: object) -> str:
    """A header value quoted in a reason, cut short (it is a count or a size, never patient data)."""
    return repr(str(value)[:16])


def number_of_frames(ds: Dataset) -> int:
    """Number of Frames (1 when absent, empty or 0), or a refusal that names the value: ``int('ab')`` must not
    surface as a Python error, nor fail the job of another series of the study that reads this header."""
    value = ds.get("NumberOfFrames")
    if value in (None, ""):
        return 1
    try:
        number = float(str(value).strip())
    except ValueError:
        number = float("nan")
    if not (np.isfinite(number) and number >= 0 and number.is_integer()):
        raise SeriesRefused("header_invalid", f"NumberOfFrames {_shown(value)} is not a number of frames")
    return int(number) or 1


def _size(ds: Dataset, keyword: str) -> int:
    """Rows or Columns, or a refusal that names it (an image without them was never an image)."""
    value = ds.get(keyword)
    if isinstance(value, int) and value > 0:
        return value
    raise SeriesRefused("header_invalid", f"{keyword} is missing or not a positive number in an image")


def is_localizer(ds: Dataset) -> bool:
    """A localizer (scout, topogram): ImageType holds LOCALIZER (value 3 of a CT image's). It is a projection
    across the body, not a slice of the stack, though scanners file it in the axial series at times."""
    image_type = ds.get("ImageType") or []
    values = [image_type] if isinstance(image_type, str) else list(image_type)
    return any(str(v).strip().upper() == "LOCALIZER" for v in values)


def _planes_classic(ds: Dataset) -> list[_Plane]:
    return [
        _Plane(
            ds=ds,
            frame_number=None,
            position=_floats(ds.get("ImagePositionPatient"), 3, "Image Position (Patient)"),
            row_dir=_floats(ds.get("ImageOrientationPatient"), 6, "Image Orientation (Patient)")[:3],
            col_dir=_floats(ds.get("ImageOrientationPatient"), 6, "Image Orientation (Patient)")[3:],
            pixel_spacing=tuple(_floats(ds.get("PixelSpacing"), 2, "Pixel Spacing")),
            rows=_size(ds, "Rows"),
            cols=_size(ds, "Columns"),
            slope=_number(ds, "RescaleSlope", 1.0) or 1.0,
            intercept=_number(ds, "RescaleIntercept", 0.0),
            thickness=_number(ds, "SliceThickness", 0.0),
        )
    ]


def _group(fg: Dataset | None, shared: Dataset | None, seq: str) -> Dataset | None:
    for source in (fg, shared):
        if source is not None and seq in source and len(source[seq].value) > 0:
            return source[seq].value[0]
    return None


def _planes_enhanced(ds: Dataset) -> list[_Plane]:
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        raise SeriesRefused("geometry_missing", "multi-frame image without per-frame functional groups")
    planes = []
    for i, fg in enumerate(per_frame):
        pos = _group(fg, shared, "PlanePositionSequence")
        ori = _group(fg, shared, "PlaneOrientationSequence")
        meas = _group(fg, shared, "PixelMeasuresSequence")
        trans = _group(fg, shared, "PixelValueTransformationSequence")
        if pos is None or ori is None or meas is None:
            raise SeriesRefused("geometry_missing", f"frame {i + 1} lacks plane position, orientation or pixel spacing")
        iop = _floats(ori.get("ImageOrientationPatient"), 6, "Image Orientation (Patient)")
        planes.append(
            _Plane(
                ds=ds,
                frame_number=i + 1,
                position=_floats(pos.get("ImagePositionPatient"), 3, "Image Position (Patient)"),
                row_dir=iop[:3],
                col_dir=iop[3:],
                pixel_spacing=tuple(_floats(meas.get("PixelSpacing"), 2, "Pixel Spacing")),
                rows=_size(ds, "Rows"),
                cols=_size(ds, "Columns"),
                slope=_number(trans, "RescaleSlope", 1.0) if trans is not None else 1.0,
                intercept=_number(trans, "RescaleIntercept", 0.0) if trans is not None else 0.0,
                thickness=_number(meas, "SliceThickness", 0.0),  # Enhanced CT keeps it per frame group
            )
        )
    return planes


def _planes_of(ds: Dataset) -> list[_Plane]:
    if number_of_frames(ds) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        return _planes_enhanced(ds)
    return _planes_classic(ds)


def read_planes(paths: Sequence[Path]) -> tuple[list[_Plane], int]:
    """Every image plane in the files (multi-frame files give one plane per frame), each with its file's
    data set, pixel data included: the geometry is checked first, then the same data sets are decoded,
    so each file is parsed once (a third of the time of reading a series). Also returns how many localizer
    images were left out: in a series with other images they are not slices of it, whatever order they came in;
    a series of localizers alone is read as it is (and refused for what it is)."""
    planes: list[_Plane] = []
    localizers: list[Dataset] = []
    for path in paths:
        ds = pydicom.dcmread(path)
        if is_localizer(ds):
            localizers.append(ds)
        else:
            planes.extend(_planes_of(ds))
    if not planes:
        planes = [plane for ds in localizers for plane in _planes_of(ds)]
        localizers = []
    if not planes:
        raise SeriesRefused("empty", "the series has no images")
    return planes, len(localizers)


def _check_geometry(planes: list[_Plane]) -> tuple[list[_Plane], np.ndarray, float, list[QAFlag]]:
    """Sort along the normal and check the stack; returns (sorted planes, normal, slice gap, flags)."""
    flags: list[QAFlag] = []
    first = planes[0]
    _check_one_kind(planes)
    sizes = {(int(p.rows), int(p.cols)) for p in planes}
    if len(sizes) > 1:
        raise SeriesRefused("mixed_matrix", f"images of different sizes in one series: {sorted(sizes)}")
    spacings = {tuple(round(float(v), 4) for v in p.pixel_spacing) for p in planes}  # plain floats read well
    if len(spacings) > 1:
        raise SeriesRefused("mixed_pixel_spacing", f"images with different pixel spacing in one series: {sorted(spacings)}")
    fov = max(first.rows * first.pixel_spacing[0], first.cols * first.pixel_spacing[1])
    if fov > MAX_FIELD_OF_VIEW_MM:
        raise SeriesRefused("geometry_invalid", f"Pixel Spacing of {first.pixel_spacing[0]:g} x "
                            f"{first.pixel_spacing[1]:g} mm gives a {fov:.0f} mm field of view, wider than any CT's "
                            f"({MAX_FIELD_OF_VIEW_MM:.0f} mm at most)")
    for p in planes:
        if (abs(np.dot(p.row_dir, first.row_dir) - 1) > ORIENTATION_TOLERANCE
                or abs(np.dot(p.col_dir, first.col_dir) - 1) > ORIENTATION_TOLERANCE):
            raise SeriesRefused("mixed_orientation", "images with different orientations in one series")
    row_dir = first.row_dir / np.linalg.norm(first.row_dir)
    col_dir = first.col_dir / np.linalg.norm(first.col_dir)
    normal = np.cross(row_dir, col_dir)
    if len(planes) < 2:
        raise SeriesRefused("too_few_slices", "a single image is not a volume")

    ordered = sorted(planes, key=lambda p: float(np.dot(p.position, normal)))
    along = np.array([float(np.dot(p.position, normal)) for p in ordered])
    gaps = np.diff(along)
    duplicates = int(np.sum(gaps < DUPLICATE_TOLERANCE_MM))
    if duplicates:
        raise SeriesRefused(
            "duplicate_positions",
            f"{duplicates} slice position(s) occur twice: the series mixes several acquisitions or phases",
        )
    gap = float(np.median(gaps))
    # Tilt: consecutive positions must move along the normal, not sideways (sheared stack).
    steps = np.diff(np.array([p.position for p in ordered]), axis=0)
    sideways = steps - np.outer(steps @ normal, normal)
    shear = float(np.max(np.linalg.norm(sideways, axis=1)))
    if shear > 0.05 * gap + 0.01:
        tilt = float(np.degrees(np.arctan2(shear, gap)))
        raise SeriesRefused("gantry_tilt", f"gantry tilt of about {tilt:.1f} degrees (sheared slices) is not supported")
    off = np.abs(gaps - gap) > SPACING_TOLERANCE * gap
    if np.any(off):
        multiples = gaps[off] / gap
        if np.all(np.abs(multiples - np.round(multiples)) < SPACING_TOLERANCE) and np.all(multiples > 1.5):
            missing = int(np.sum(np.round(multiples) - 1))
            raise SeriesRefused(
                "missing_slices",
                f"{missing} slice(s) missing in {int(np.sum(off))} gap(s) of the stack (slice gap {gap:.2f} mm): "
                f"re-send the complete series",
            )
        raise SeriesRefused(
            "non_uniform_spacing",
            f"slice spacing is not uniform ({float(gaps.min()):.2f} to {float(gaps.max()):.2f} mm)",
        )
    thickness = first.thickness
    if 0 < thickness < gap * 0.5:
        flags.append(QAFlag("slice_gap", "flag", f"slices of {thickness:.2f} mm are {gap:.2f} mm apart (gaps between slices)"))
    return ordered, normal, gap, flags


def _check_one_kind(planes: list[_Plane]) -> None:
    """One series, one kind of image: an MR, a secondary capture or a CR among CT slices is not a CT slice."""
    kinds = Counter((str(p.ds.get("Modality", "") or "?"), UID(str(p.ds.get("SOPClassUID", ""))).name) for p in planes)
    if len(kinds) > 1:
        listed = ", ".join(f"{n} {modality} ({sop_class})" for (modality, sop_class), n in kinds.most_common())
        raise SeriesRefused("mixed_modalities", f"the series mixes images of different kinds: {listed}")
    for p in planes:  # CT numbers are one grey value per pixel; a colour picture of a CT is not a CT
        samples = p.ds.get("SamplesPerPixel", 1)
        photometric = str(p.ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
        if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise SeriesRefused("not_grayscale", f"images with SamplesPerPixel {samples} and PhotometricInterpretation "
                                f"{photometric} are not CT numbers (MONOCHROME1/2, one sample per pixel)")


def _check_stored_range(pixels: np.ndarray, plane: _Plane) -> None:
    """Refuse pixel data that decodes to values its BitsStored cannot hold (a damaged compressed stream decodes
    without an error into such values). A few out-of-range pixels (metal clipped oddly by a scanner) are let be."""
    bits = int(plane.ds.get("BitsStored", 0) or 0)
    if not 0 < bits < 32 or pixels.dtype.kind not in "iu":
        return
    signed = int(plane.ds.get("PixelRepresentation", 0) or 0) == 1
    high = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    above = int(np.count_nonzero(pixels > high))
    if above > 0.05 * pixels.size:
        raise SeriesRefused(
            "unreadable_pixels",
            f"the pixel data of image {plane.ds.get('SOPInstanceUID', '?')} is damaged: "
            f"{100.0 * above / pixels.size:.0f} % of its pixels are above the {high} that BitsStored {bits} allows",
        )


def _frame_pixels(ds: Dataset, cache: dict[int, np.ndarray], frame_number: int | None) -> np.ndarray:
    key = id(ds)
    if key not in cache:
        cache[key] = ds.pixel_array
    arr = cache[key]
    if frame_number is None or arr.ndim == 2:  # pydicom gives a 2D array for a single-frame object
        return arr
    return arr[frame_number - 1]


def _is_decoder_panic(exc: BaseException) -> bool:
    """A panic inside a Rust decoder (pylibjpeg-rle on an RLE frame shorter than Rows x Columns): pyo3 raises it as
    a BaseException, which the worker's ``except Exception`` would not catch."""
    return type(exc).__name__ == "PanicException"


def _declared_mismatch(plane: _Plane) -> SeriesRefused | None:
    """A refusal when a JPEG, JPEG-LS or JPEG 2000 frame declares another size than Rows x Columns: known before
    decoding, which would fail with a numpy broadcast error (or, Rows and Columns swapped, decode the wrong image)."""
    declared = coded_size(plane.ds)
    if declared is None or declared == (plane.rows, plane.cols):
        return None
    return SeriesRefused("matrix_mismatch", f"the compressed pixel data of image {plane.ds.get('SOPInstanceUID', '?')} "
                         f"is {declared[0]} x {declared[1]} pixels, its header says Rows {plane.rows} x Columns "
                         f"{plane.cols}")


def _held_mismatch(plane: _Plane) -> SeriesRefused | None:
    """A refusal when an RLE frame that failed to decode holds another number of pixels than Rows x Columns (RLE
    declares no size: its first segment is measured, on this failure path only)."""
    held = rle_pixels(plane.ds)
    if held is None or held == plane.rows * plane.cols:
        return None
    return SeriesRefused("matrix_mismatch", f"the RLE pixel data of image {plane.ds.get('SOPInstanceUID', '?')} holds "
                         f"{held} pixels a frame, its header says Rows {plane.rows} x Columns {plane.cols} "
                         f"({plane.rows * plane.cols})")


def _plane_pixels(plane: _Plane, cache: dict[int, np.ndarray]) -> np.ndarray:
    """The stored values of one plane, or a refusal in words: a frame whose size disagrees with Rows x Columns, or
    pixel data that cannot be decoded (the decoders' own errors name neither the image nor the cause)."""
    if id(plane.ds) not in cache and (refused := _declared_mismatch(plane)) is not None:
        raise refused
    try:
        pixels = _frame_pixels(plane.ds, cache, plane.frame_number)
    except BaseException as exc:  # pydicom/decoder errors vary by codec; all mean the pixels are unusable
        if not isinstance(exc, Exception) and not _is_decoder_panic(exc):
            raise
        raise _held_mismatch(plane) or SeriesRefused(
            "unreadable_pixels",
            f"the pixel data of image {plane.ds.get('SOPInstanceUID', '?')} cannot be decoded ({one_line(exc)})",
        ) from exc
    if pixels.shape != (plane.rows, plane.cols):
        raise SeriesRefused("matrix_mismatch", f"the pixel data of image {plane.ds.get('SOPInstanceUID', '?')} "
                            f"decodes to {' x '.join(map(str, pixels.shape))} pixels, its header says Rows "
                            f"{plane.rows} x Columns {plane.cols}")
    return pixels


def _release_pixels(ds: Dataset, cache: dict[int, np.ndarray]) -> None:
    """Drop a decoded file's pixel data (its bytes and pydicom's cached array) once the volume holds all of
    its frames: with both kept to the end, reading a 300-slice series peaked at three times the volume's
    size, and the volume's ``reference`` data set would hold an Enhanced CT's pixels for the whole job."""
    cache.pop(id(ds), None)
    if "PixelData" in ds:
        del ds.PixelData


def _to_hu(raw: np.ndarray, plane: _Plane) -> np.ndarray:
    ds = plane.ds
    hu = raw.astype(np.float32) * plane.slope + plane.intercept
    padding = ds.get("PixelPaddingValue")
    if padding is not None:
        limit = ds.get("PixelPaddingRangeLimit")
        lo, hi = sorted((int(padding), int(limit if limit is not None else padding)))
        hu[(raw >= lo) & (raw <= hi)] = AIR_HU
    np.clip(hu, AIR_HU, 32767, out=hu)  # outside-FOV values (-2000, -3024) become air
    return np.rint(hu).astype(np.int16)


def _to_hu_by_table(raw: np.ndarray, plane: _Plane, tables: dict[tuple[str, ...], np.ndarray]) -> np.ndarray:
    """``_to_hu`` for 8- and 16-bit images as one lookup per pixel in a table of every stored value.

    ``_to_hu`` maps each stored value on its own (rescale, padding, clip, rounding), so its table gives
    the same HU; one gather instead of five passes per slice. The table is built once per rescale.
    """
    if raw.dtype.kind not in "iu" or raw.itemsize > 2:
        return _to_hu(raw, plane)
    ds = plane.ds
    index_type = np.dtype(f"u{raw.itemsize}")
    key = (raw.dtype.str, repr(plane.slope), repr(plane.intercept),
           repr(ds.get("PixelPaddingValue")), repr(ds.get("PixelPaddingRangeLimit")))
    if key not in tables:
        every_value = np.arange(2 ** (8 * raw.itemsize), dtype=index_type).view(raw.dtype)
        tables[key] = _to_hu(every_value, plane)
    return tables[key][raw.view(index_type)]


def _check_hu(hu: np.ndarray) -> list[QAFlag]:
    sample = hu[:: max(1, hu.shape[0] // 16), ::4, ::4]
    low = float(np.percentile(sample, 1))
    high = float(np.percentile(sample, 99.5))
    if low > -800:
        raise SeriesRefused(
            "not_hu", f"no air in the images (1st percentile {low:.0f}): the values do not look like Hounsfield units"
        )
    flags = []
    if high < 0:
        flags.append(QAFlag("hu_range", "flag", f"no soft tissue or bone values (99.5th percentile {high:.0f} HU)"))
    return flags


#: Transfer syntaxes that lose information (JPEG baseline/extended, JPEG-LS near-lossless, JPEG 2000 lossy).
LOSSY_TRANSFER_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
                           "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.203"}


def _check_lossy(datasets: Sequence[Dataset]) -> list[QAFlag]:
    """Flag images that were ever lossy compressed: CT numbers and faint ground glass may have been altered."""
    lossy = sum(1 for ds in datasets if str(ds.get("LossyImageCompression", "")).strip() == "01"
                or str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "")) in LOSSY_TRANSFER_SYNTAXES)
    if not lossy:
        return []
    return [QAFlag("lossy_compression", "flag", f"{lossy} of {len(datasets)} images were lossy compressed: CT numbers "
                   "and faint ground glass may be altered")]


def load_volume(paths: Sequence[Path]) -> Volume:
    """Read a series (classic, Enhanced or Legacy Converted Enhanced CT) into a checked canonical HU volume."""
    planes, localizers = read_planes(paths)
    ordered, normal, gap, flags = _check_geometry(planes)
    if localizers:
        flags.append(QAFlag("localizer_left_out", "flag", f"{localizers} localizer image(s) (ImageType LOCALIZER) "
                            "in the series left out of the volume: projections, not slices"))
    first = ordered[0]
    row_dir = first.row_dir / np.linalg.norm(first.row_dir)
    col_dir = first.col_dir / np.linalg.norm(first.col_dir)
    row_sp, col_sp = first.pixel_spacing
    rows, cols = first.rows, first.cols
    # Canonical axes in LPS: x toward patient left (+L), y toward posterior (+P), z toward head (+S).
    # Images whose columns advance front to back (decubitus) are transposed: from here on, row_dir, col_dir, the
    # spacings and the matrix are those of the transposed image, whose columns advance right to left.
    transposed = bool(abs(row_dir[1]) > abs(row_dir[0]))
    if transposed:
        row_dir, col_dir, row_sp, col_sp, rows, cols = col_dir, row_dir, col_sp, row_sp, cols, rows
    in_plane = float(np.hypot(row_dir[0], row_dir[1])) or 1.0  # the row direction's length in the axial plane
    turned = float(np.degrees(np.arccos(min(1.0, abs(float(row_dir[0])) / in_plane))))
    if turned > MAX_IN_PLANE_ROTATION_DEG + 0.01:  # 30 degrees as written in a header reads 30.000001
        raise SeriesRefused("rotated_in_plane", f"images turned {turned:.0f} degrees in their plane (more than "
                            f"{MAX_IN_PLANE_ROTATION_DEG:g}): the models need the patient's right-left along the "
                            "image rows or columns")
    flip_cols = bool(row_dir[0] < 0)
    flip_rows = bool(col_dir[1] < 0)
    if normal[2] < 0:
        ordered = ordered[::-1]
    hu = np.empty((len(ordered), rows, cols), dtype=np.int16)
    cache: dict[int, np.ndarray] = {}
    tables: dict[tuple[str, ...], np.ndarray] = {}
    datasets: dict[int, Dataset] = {}
    frames_left = Counter(id(plane.ds) for plane in ordered)
    for z, plane in enumerate(ordered):
        datasets[id(plane.ds)] = plane.ds
        pixels = _plane_pixels(plane, cache)
        _check_stored_range(pixels, plane)
        img = _to_hu_by_table(pixels, plane, tables)
        if transposed:
            img = img.T
        if flip_rows:
            img = img[::-1, :]
        if flip_cols:
            img = img[:, ::-1]
        hu[z] = img
        frames_left[id(plane.ds)] -= 1
        if not frames_left[id(plane.ds)]:  # every frame of this file is in the volume now
            _release_pixels(plane.ds, cache)
    flags += _check_hu(hu)
    flags += _check_lossy(list(datasets.values()))

    x_axis = -row_dir if flip_cols else row_dir
    y_axis = -col_dir if flip_rows else col_dir
    z_axis = normal if normal[2] >= 0 else -normal
    # Voxel (0,0,0) is at the corner of the lowest slice that the flips brought to index 0.
    base = ordered[0].position.copy()
    if flip_cols:
        base = base + row_dir * col_sp * (cols - 1)
    if flip_rows:
        base = base + col_dir * row_sp * (rows - 1)
    frames = [
        SourceFrame(str(p.ds.SOPInstanceUID), str(p.ds.SOPClassUID), p.frame_number) for p in ordered
    ]
    return Volume(
        hu=hu,
        spacing_mm=(gap, float(row_sp), float(col_sp)),
        origin_lps=base,
        axes_lps=np.stack([x_axis, y_axis, z_axis]),
        frames=frames,
        flip_rows=flip_rows,
        flip_cols=flip_cols,
        reference=first.ds,
        qa=flags,
        transposed=transposed,
    )
