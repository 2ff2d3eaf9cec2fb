"""Write a :class:`~node.synthetic.phantom.Phantom` as a DICOM CT series plus its ground truth.

Layout of ``outdir`` (the truth lives in a subfolder so that tools that push "every file in the
folder" to a PACS only find DICOM instances):

* ``IM00001.dcm`` ... one CT Image Storage instance per slice, numbered in acquisition order;
* ``truth/lungs.nii.gz`` (0 background, 1 right lung, 2 left lung) and ``truth/lesions.nii.gz``
  (0 none, 1 ground-glass, 2 consolidation), 8-bit, with the LPS origin, spacing and direction of
  the written DICOM geometry;
* ``truth/truth.json``: kind, seed, spec, resolved parameters, volumes in ml, the SOP Instance UIDs
  in the z order of the label arrays and the UID -> z index mapping.

Label arrays are stored in the *DICOM pixel layout*: ``labels[k]`` lines up pixel for pixel with
the ``pixel_array`` of the instance whose UID is ``sop_instance_uids[k]``; k runs from feet to head.

Patient orientation. DICOM patient coordinates (LPS: +x toward the patient's left, +y toward the
back, +z toward the head; PS3.3 C.7.6.2.1.1) are tied to the patient, not to the table, so the
patient's right lung is always at negative x whatever the position on the table. What changes
with the position is how a scanner lays the pixels out:

* ``HFS`` (head first, supine): Image Orientation (Patient) ``[1,0,0, 0,1,0]``; columns run toward
  the patient's left, so the patient's right is on the image's left (the radiological view).
* ``FFS`` (feet first, supine), ``ffs_convention="radiological"`` (default): diagnostic scanners
  reconstruct feet-first images in the radiological view too and keep ``[1,0,0, 0,1,0]``; only
  Patient Position differs from HFS. Checked on the three GE LightSpeed FFS series of LIDC-IDRI in
  ../shared/data (all ``[1,0,0,0,1,0]``, instance 1 at the head end).
* ``FFS`` with ``ffs_convention="mirrored"``: the pixels stay in the gantry frame, which is
  mirrored left-right for a feet-first patient: ``[-1,0,0, 0,1,0]``, column 0 is the patient's
  left and Image Position (Patient) is the left-most column. This is the feet-first supine row of
  the table used by radiotherapy tools (e.g. pymedphys, after McNoleg, arXiv:1406.0014) and is
  legal DICOM; use it to test readers that wrongly assume an identity orientation.

In every case positions are consistent with the orientation, so mapping any pixel through
IPP/IOP lands on the same patient point, and the truth keeps meaning the patient's right/left.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from .phantom import Phantom

log = logging.getLogger(__name__)

TransferSyntax = Literal["explicit", "implicit", "rle", "jpeg-ls", "jpeg2000", "jpeg-lossless"]
TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg-ls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
    "jpeg-lossless": JPEGLosslessSV1,
}
_PLUGINS = {"rle": "pylibjpeg", "jpeg-ls": "pyjpegls", "jpeg2000": "pylibjpeg"}
DCMCJPEG_CANDIDATES = ("/usr/bin/dcmcjpeg",)
MANUFACTURER = "lungnode synthetic phantom"
KERNEL_NAMES = {"smooth": "SMOOTH", "standard": "STANDARD", "sharp": "SHARP"}


@dataclass(frozen=True)
class SeriesOptions:
    """How to encode the series. UIDs left as ``None`` are generated (deterministically when ``seed`` is set)."""

    patient_id: str = "SYNTH-0001"
    patient_name: str = "SYNTHETIC^PHANTOM"
    patient_sex: str = "O"
    patient_birth_date: str = ""
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    frame_of_reference_uid: str | None = None
    study_id: str = "SYNTH"
    series_number: int = 1
    series_description: str = "Synthetic chest CT (phantom)"
    study_description: str = "Synthetic chest CT"
    accession_number: str = ""
    study_date: str = "20200101"
    study_time: str = "120000"
    orientation: Literal["HFS", "FFS"] = "HFS"
    ffs_convention: Literal["radiological", "mirrored"] = "radiological"
    transfer_syntax: TransferSyntax = "explicit"
    signed: bool = False
    rescale_intercept: float = -1024.0
    instance_order: Literal["head_to_feet", "feet_to_head"] = "head_to_feet"
    seed: int | None = 0
    write_truth: bool = True
    truth_subdir: str = "truth"
    manufacturer: str = MANUFACTURER
    threads: int = 2  # parallel dcmcjpeg processes for jpeg-lossless

    def __post_init__(self) -> None:
        if self.orientation not in ("HFS", "FFS"):
            raise ValueError(f"orientation must be HFS or FFS, got {self.orientation!r}")
        if self.transfer_syntax not in TRANSFER_SYNTAXES:
            raise ValueError(f"transfer_syntax must be one of {sorted(TRANSFER_SYNTAXES)}, got {self.transfer_syntax!r}")
        if self.ffs_convention not in ("mirrored", "radiological"):
            raise ValueError("ffs_convention must be 'mirrored' or 'radiological'")
        if self.instance_order not in ("head_to_feet", "feet_to_head"):
            raise ValueError("instance_order must be 'head_to_feet' or 'feet_to_head'")
        if not 0 <= self.series_number <= 2**31 - 1:
            raise ValueError("series_number out of range")


@dataclass(frozen=True)
class WrittenSeries:
    """What :func:`write_series` produced. ``sop_instance_uids`` follow the label arrays' z order."""

    outdir: Path
    files: tuple[Path, ...]  # in instance number order
    sop_instance_uids: tuple[str, ...]  # in array z order (feet to head)
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    transfer_syntax_uid: str
    image_orientation_patient: tuple[float, ...]
    truth_dir: Path | None = None
    truth_files: dict[str, Path] = field(default_factory=dict)


def _uid(options: SeriesOptions, phantom: Phantom, role: str) -> str:
    if options.seed is None:
        return str(generate_uid())
    src = [f"lungnode-synthetic|{options.seed}|{phantom.spec.seed}|{phantom.spec.kind}|{options.patient_id}|{role}"]
    return str(generate_uid(entropy_srcs=src))


def orientation_of(options: SeriesOptions) -> tuple[float, float, float, float, float, float]:
    """Image Orientation (Patient) used for the options (see the module docstring)."""
    if options.orientation == "FFS" and options.ffs_convention == "mirrored":
        return (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    return (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def pixel_layout(phantom_slice: NDArray[Any], iop: tuple[float, ...]) -> NDArray[Any]:
    """Canonical (patient right at column 0) slice -> the pixel layout for ``iop``."""
    return phantom_slice[:, ::-1] if iop[0] < 0 else phantom_slice


def _fmt(v: float) -> str:
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def _dcmcjpeg() -> str:
    for c in DCMCJPEG_CANDIDATES:
        if Path(c).is_file():
            return c
    found = shutil.which("dcmcjpeg")
    if found:
        return found
    raise RuntimeError("JPEG Lossless (1.2.840.10008.1.2.4.70) encoding needs dcmcjpeg from dcmtk "
                       "(Debian/Ubuntu package 'dcmtk'); it was not found at /usr/bin/dcmcjpeg or on PATH. "
                       "pydicom cannot encode this transfer syntax.")


def write_series(outdir: Path, phantom: Phantom, options: SeriesOptions = SeriesOptions()) -> WrittenSeries:
    """Write one DICOM file per slice and the ground truth into ``outdir`` (created if needed)."""
    t0 = time.perf_counter()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    ts_uid = TRANSFER_SYNTAXES[options.transfer_syntax]
    dcmcjpeg = _dcmcjpeg() if options.transfer_syntax == "jpeg-lossless" else None
    n, rows, cols = phantom.hu.shape
    iop = orientation_of(options)
    px = phantom.spacing_mm[1]
    x0, y0, z0 = phantom.origin_mm
    x_first = x0 + (cols - 1) * px if iop[0] < 0 else x0
    study_uid = options.study_instance_uid or _uid(options, phantom, "study")
    series_uid = options.series_instance_uid or _uid(options, phantom, "series")
    for_uid = options.frame_of_reference_uid or _uid(options, phantom, "for")
    # A series UID given by hand names another series: its images need their own UIDs, even from the same seed.
    given = f"{options.series_instance_uid}|" if options.series_instance_uid else ""
    sops = [_uid(options, phantom, f"{given}sop{k}") for k in range(n)]
    # acquisition order: instance 1 at the head end by default (a cranio-caudal chest scan)
    order = list(range(n - 1, -1, -1)) if options.instance_order == "head_to_feet" else list(range(n))
    intercept = float(options.rescale_intercept)
    dtype: type[np.integer[Any]]
    if options.signed:
        bits, dtype, lo, hi = 16, np.int16, -32768, 32767
    else:
        bits, dtype, lo, hi = 12, np.uint16, 0, 4095
    params = phantom.params
    padding = lo if params.get("fov_circle") else None
    if padding is not None:
        padding = int(np.clip(-1024 - intercept, lo, hi))
    files: list[Path] = []
    now = _dt.datetime(2020, 1, 1, 12, 0, 0)

    def build(inst: int, k: int) -> tuple[Path, Dataset]:
        ds = _base_dataset(options, phantom, study_uid, series_uid, for_uid, sops[k], now)
        z = z0 + k * phantom.spacing_mm[0]
        ds.InstanceNumber = inst
        ds.ImagePositionPatient = [_fmt(x_first), _fmt(y0), _fmt(z)]
        ds.ImageOrientationPatient = [_fmt(v) for v in iop]
        ds.SliceLocation = _fmt(z)
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated = 16
        ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = 1 if options.signed else 0
        ds.RescaleIntercept = _fmt(intercept)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        if padding is not None:
            ds.PixelPaddingValue = padding
        stored = np.clip(pixel_layout(phantom.hu[k], iop).astype(np.int32) - int(round(intercept)), lo, hi).astype(dtype)
        path = outdir / f"IM{inst:05d}.dcm"
        ts: UID | None = ts_uid if options.transfer_syntax in ("explicit", "implicit", "jpeg-lossless") else None
        if ts is not None:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if options.transfer_syntax == "jpeg-lossless" else ts
            ds.PixelData = stored.tobytes()
        else:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.compress(ts_uid, stored, encoding_plugin=_PLUGINS[options.transfer_syntax], generate_instance_uid=False)
        return path, ds

    def one(inst_k: tuple[int, int]) -> Path:
        inst, k = inst_k
        path, ds = build(inst, k)
        if dcmcjpeg is None:
            ds.save_as(path, enforce_file_format=True)
            return path
        with tempfile.TemporaryDirectory(dir=outdir) as tmp:
            raw = Path(tmp) / "raw.dcm"
            ds.save_as(raw, enforce_file_format=True)
            res = subprocess.run([dcmcjpeg, "+e1", "+un", "-q", str(raw), str(path)], capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"dcmcjpeg failed on slice {inst}: {res.stderr.strip() or res.stdout.strip()}")
        return path

    jobs = list(enumerate(order, start=1))
    # Only the dcmcjpeg subprocesses run in parallel: pylibjpeg-openjpeg 2.6.0 crashes (SIGSEGV) when two
    # threads encode at once (measured here), and the other encoders hold the GIL anyway.
    if options.threads > 1 and dcmcjpeg is not None:
        with ThreadPoolExecutor(max_workers=options.threads) as ex:
            files = list(ex.map(one, jobs))
    else:
        files = [one(j) for j in jobs]
    truth_dir = None
    truth_files: dict[str, Path] = {}
    if options.write_truth:
        truth_dir = outdir / options.truth_subdir
        truth_files = write_truth(truth_dir, phantom, options, iop, (x_first, y0, z0), sops, study_uid, series_uid,
                                  for_uid, str(ts_uid), files, order)
    log.info("wrote %d %s slices to %s in %.2fs", n, options.transfer_syntax, outdir, time.perf_counter() - t0)
    return WrittenSeries(outdir, tuple(files), tuple(sops), study_uid, series_uid, for_uid, str(ts_uid), iop,
                         truth_dir, truth_files)


def _base_dataset(options: SeriesOptions, phantom: Phantom, study_uid: str, series_uid: str, for_uid: str,
                  sop_uid: str, now: _dt.datetime) -> Dataset:
    p = phantom.params
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = options.study_date
    ds.SeriesDate = options.study_date
    ds.AcquisitionDate = options.study_date
    ds.ContentDate = options.study_date
    ds.StudyTime = options.study_time
    ds.SeriesTime = options.study_time
    ds.AcquisitionTime = options.study_time
    ds.ContentTime = options.study_time
    ds.AccessionNumber = options.accession_number
    ds.Modality = "CT"
    ds.Manufacturer = options.manufacturer
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = options.study_description
    ds.SeriesDescription = options.series_description
    ds.ManufacturerModelName = "lungnode phantom"
    ds.PatientName = options.patient_name
    ds.PatientID = options.patient_id
    ds.PatientBirthDate = options.patient_birth_date
    ds.PatientSex = options.patient_sex
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "synthetic phantom, no patient data"
    if p.get("contrast"):
        ds.ContrastBolusAgent = "IV contrast (simulated)"
    ds.BodyPartExamined = "CHEST"
    ds.ScanOptions = "HELICAL MODE"
    ds.SliceThickness = _fmt(float(p["slice_thickness_mm"]))
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.SoftwareVersions = "lungnode-synthetic 1"
    ds.ReconstructionDiameter = _fmt(float(p["fov_mm"]))
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.XRayTubeCurrent = int(np.clip(round(6000.0 / max(float(p["noise_hu"]), 1.0) ** 1.2), 20, 800))
    ds.ConvolutionKernel = KERNEL_NAMES.get(str(p["kernel"]), "STANDARD")
    ds.PatientPosition = options.orientation
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = options.study_id
    ds.SeriesNumber = options.series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelSpacing = [_fmt(phantom.spacing_mm[1]), _fmt(phantom.spacing_mm[2])]
    ds.BurnedInAnnotation = "NO"
    ds.WindowCenter = ["-600", "40"]
    ds.WindowWidth = ["1500", "400"]
    ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
    ds.ImageComments = f"synthetic {phantom.spec.kind} phantom, seed {phantom.spec.seed}"
    return ds


def write_truth(truth_dir: Path, phantom: Phantom, options: SeriesOptions, iop: tuple[float, ...],
                first_pos: tuple[float, float, float], sops: list[str], study_uid: str, series_uid: str, for_uid: str,
                ts_uid: str, files: list[Path], order: list[int]) -> dict[str, Path]:
    """Label maps as NIfTI (DICOM pixel layout and LPS geometry) and truth.json."""
    import SimpleITK as sitk

    truth_dir.mkdir(parents=True, exist_ok=True)
    direction = (iop[0], iop[3], 0.0, iop[1], iop[4], 0.0, iop[2], iop[5], 1.0)
    spacing = (phantom.spacing_mm[2], phantom.spacing_mm[1], phantom.spacing_mm[0])
    out: dict[str, Path] = {}
    for name, arr in (("lungs", phantom.lungs), ("lesions", phantom.lesions)):
        data = arr[:, :, ::-1] if iop[0] < 0 else arr
        img = sitk.GetImageFromArray(np.ascontiguousarray(data))
        img.SetSpacing(spacing)
        img.SetOrigin(first_pos)
        img.SetDirection(direction)
        path = truth_dir / f"{name}.nii.gz"
        sitk.WriteImage(img, str(path), useCompression=True)
        out[name] = path
    inst_of = {k: i for i, k in enumerate(order, start=1)}
    truth = {
        "format": "lungnode-synthetic-truth/1",
        "kind": phantom.spec.kind,
        "seed": phantom.spec.seed,
        "spec": phantom.spec.to_dict(),
        "params": phantom.params,
        "volumes_ml": phantom.volumes_ml,
        "labels": {"lungs": {"0": "background", "1": "right lung", "2": "left lung"},
                   "lesions": {"0": "none", "1": "ground-glass opacity", "2": "consolidation"}},
        "array_layout": ("labels[k, row, column] matches pixel (row, column) of the instance sop_instance_uids[k]; "
                         "k increases from feet to head"),
        "geometry": {
            "image_orientation_patient": list(iop),
            "origin_lps_mm": list(first_pos),
            "spacing_mm_xyz": list(spacing),
            "patient_position": options.orientation,
            "ffs_convention": options.ffs_convention if options.orientation == "FFS" else None,
        },
        "study_instance_uid": study_uid,
        "series_instance_uid": series_uid,
        "frame_of_reference_uid": for_uid,
        "transfer_syntax_uid": ts_uid,
        "sop_instance_uids": list(sops),
        "sop_to_index": {uid: k for k, uid in enumerate(sops)},
        "files": {sops[k]: files[inst_of[k] - 1].name for k in range(len(sops))},
    }
    path = truth_dir / "truth.json"
    path.write_text(json.dumps(truth, indent=1, default=_json_default))
    out["truth"] = path
    return out


def _json_default(o: object) -> object:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
