"""DICOM Segmentation of the lungs and lesions, frame by frame against the source images.

One segment per structure (:data:`node.outputs.codes.STRUCTURES`). The canonical masks of the
analysis are mapped back to each source image with ``Volume.in_source_layout``, so frame ``i``
of the array handed to highdicom lines up pixel for pixel with source image ``i`` (classic CT:
one file per slice, in any order of arrival or orientation) or with source frame ``i`` (one
Enhanced CT object, frames in frame-number order). highdicom then writes each frame's
Derivation Image/Source Image reference and plane position from that source.

BINARY with empty frames omitted is the default; FRACTIONAL with JPEG-LS lossless is smaller.
LABELMAP is never written (Orthanc 1.10 refuses its presentation context over DICOM).
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import highdicom as hd
import highdicom._standard_utils
import numpy as np
import pydicom
from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless
from pydicom.valuerep import VR

from node import MANUFACTURER, __version__
from node.errors import LungnodeError
from node.logs import kv
from node.outputs.codes import LESION_REGION, Structure
from node.outputs.identity import MODEL_NAME
from node.outputs.uids import OutputUIDs
from node.pipeline.volume import Volume

log = logging.getLogger(__name__)

# highdicom asks, for every source image, whether its SOP class is a multi-frame IOD by walking the
# standard's module tables (``is_attribute_in_iod``): 0.4 ms a slice, a tenth of a 300-slice SEG's
# build. The answer depends on the attribute and the SOP Class UID alone, so it is remembered.
_is_attribute_in_iod = highdicom._standard_utils.is_attribute_in_iod


@functools.lru_cache(maxsize=256)
def _attribute_in_iod(attribute: str, sop_class_uid: str, exclude: tuple[str, ...] | None) -> bool:
    return bool(_is_attribute_in_iod(attribute, sop_class_uid, list(exclude) if exclude is not None else None))


def _cached_is_attribute_in_iod(attribute: str, sop_class_uid: str,
                                exclude_path_elements: Sequence[str] | None = None) -> bool:
    exclude = tuple(exclude_path_elements) if exclude_path_elements is not None else None
    return _attribute_in_iod(attribute, str(sop_class_uid), exclude)


highdicom._standard_utils.is_attribute_in_iod = _cached_is_attribute_in_iod

SegEncoding = Literal["binary", "fractional_jpeg_ls"]


class OutputError(LungnodeError):
    """An output object cannot be built from this analysis; the message says why and what to do."""


@dataclass(frozen=True)
class AlgorithmInfo:
    """SEG Segment Algorithm Identification of one model (from its manifest)."""

    name: str
    version: str
    family: Code
    sha256: str | None = None  # of model.onnx: the SR names the model file so too

    def sequence(self) -> hd.AlgorithmIdentificationSequence:
        return hd.AlgorithmIdentificationSequence(name=self.name, family=self.family, version=self.version,
                                                  parameters={"sha256": self.sha256} if self.sha256 else None)


@dataclass(frozen=True)
class SegmentSpec:
    """A structure as this node's models name it: the manifest's code wins over the built-in one."""

    structure: Structure
    type: Code
    algorithm: AlgorithmInfo


def read_source_headers(paths: Sequence[Path]) -> dict[str, Dataset]:
    """Headers (no pixel data) of the source images by SOP Instance UID: highdicom needs them for references.
    Elements that cannot be decoded are left out (``drop_undecodable``): one would fail every object."""
    headers: dict[str, Dataset] = {}
    dropped: set[str] = set()
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, EOFError):
            continue
        dropped.update(drop_undecodable(ds))
        if "SOPInstanceUID" in ds:
            headers[str(ds.SOPInstanceUID)] = ds
    if dropped:  # tags only: the values may be patient data
        log.warning(kv("source_elements_left_out", tags=",".join(sorted(dropped)),
                       reason="an unknown value representation: their values cannot be decoded, and the outputs "
                              "copy no private element"))
    return headers


#: The value representations pydicom decodes; an explicit VR outside them ('ZZ') fails when the value is read.
KNOWN_VRS = frozenset(vr.value for vr in VR)


def _repaired(raw: RawDataElement) -> RawDataElement | None:
    """``raw`` as pydicom can decode it: unchanged for a known VR, with its dictionary VR for a public element sent
    with an unknown one, or None (a private element with an unknown VR: its value cannot be read)."""
    if raw.VR is None or raw.VR in KNOWN_VRS:
        return raw
    if raw.tag.is_private or not dictionary_has_tag(raw.tag):
        return None
    return raw._replace(VR=dictionary_VR(raw.tag))


def drop_undecodable(ds: Dataset) -> list[str]:
    """Delete from ``ds`` (and its sequences' items) the elements pydicom cannot decode, such as a private element
    sent with the explicit VR 'ZZ', and read a public one sent so with its dictionary VR; returns the deleted tags.
    No private element is copied into the outputs, but decoding the character set
    (``charset.prepare_source_character_sets``) walks every element. Only raw VRs are looked at: cheap per file."""
    dropped: list[str] = []
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement):
            repaired = _repaired(raw)
            if repaired is None:
                del ds[tag]
                dropped.append(str(tag))
                continue
            if repaired is not raw:
                ds[tag] = repaired
        if raw.VR == "SQ":
            for item in ds[tag].value:
                dropped.extend(drop_undecodable(item))
    return dropped


def _rgb_to_lab(rgb: tuple[int, int, int]) -> hd.color.CIELabColor:
    """sRGB (0-255) to the CIELab value DICOM's RecommendedDisplayCIELabValue carries (D65)."""
    c = np.array(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = m @ lin / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab_l = 116 * f[1] - 16
    lab_a = 500 * (f[0] - f[1])
    lab_b = 200 * (f[1] - f[2])
    return hd.color.CIELabColor(float(np.clip(lab_l, 0, 100)), float(np.clip(lab_a, -128, 127)),
                                float(np.clip(lab_b, -128, 127)))


def segment_descriptions(specs: Sequence[SegmentSpec], uids: OutputUIDs) -> list[hd.seg.SegmentDescription]:
    out = []
    for number, spec in enumerate(specs, start=1):
        s = spec.structure
        out.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=s.label,
            segmented_property_category=s.category,
            segmented_property_type=spec.type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=spec.algorithm.sequence(),
            tracking_uid=uids.tracking_uid(s.key),
            tracking_id=s.label,
            anatomic_regions=[LESION_REGION] if s.label_map == "lesions" else None,
            display_color=_rgb_to_lab(s.rgb),
        ))
    return out


def _one_orientation(sources: list[Dataset]) -> list[Dataset]:
    """The source headers, with the first one's Image Orientation (Patient) where another differs in the last digits
    (rounding noise the volume accepts within ``ORIENTATION_TOLERANCE``): highdicom wants it identical in every source
    image, and would refuse the SEG. The callers' headers are not changed: those that differ are copied."""
    first = [float(v) for v in sources[0].ImageOrientationPatient]
    out = []
    for ds in sources:
        if [float(v) for v in ds.ImageOrientationPatient] != first:
            ds = copy.deepcopy(ds)
            ds.ImageOrientationPatient = sources[0].ImageOrientationPatient
        out.append(ds)
    return out


def _source_layout(volume: Volume, headers: Mapping[str, Dataset]) -> tuple[list[Dataset], np.ndarray]:
    """Source images for highdicom and, per array frame, the canonical z it comes from."""
    frames = volume.frames
    missing = sorted({f.sop_instance_uid for f in frames} - set(headers))
    if missing:
        raise OutputError(f"{len(missing)} source image header(s) missing (e.g. {missing[0]}): pass every file of "
                          "the analysed series")
    if all(f.frame_number is None for f in frames):
        return _one_orientation([headers[f.sop_instance_uid] for f in frames]), np.arange(len(frames))
    objects = {f.sop_instance_uid for f in frames}
    if len(objects) > 1:
        raise OutputError(f"the series is {len(objects)} multi-frame objects: a SEG can reference one multi-frame "
                          "source only (DICOM SEG of a multi-object Enhanced CT series is not supported)")
    source = headers[frames[0].sop_instance_uid]
    n = int(source.get("NumberOfFrames", 1) or 1)
    numbers = [f.frame_number for f in frames]
    if sorted(n_ for n_ in numbers if n_ is not None) != list(range(1, n + 1)):
        raise OutputError(f"the analysed volume uses {len(numbers)} of the {n} frames of {frames[0].sop_instance_uid}: "
                          "a SEG must cover every frame of a multi-frame source")
    order = np.argsort(np.array(numbers))  # array frame i = source frame i + 1
    return [source], order


def source_stack(volume: Volume, mask: np.ndarray, order: np.ndarray) -> np.ndarray:
    """A canonical (z, y, x) mask in the source pixel layout, stacked in the order of ``order``."""
    identity = len(order) == mask.shape[0] and bool(np.all(order == np.arange(len(order))))
    return volume.in_source_layout(mask if identity else mask[order])  # a view, not a copy, for classic series


class _Segmentation(hd.seg.Segmentation):
    """highdicom's Segmentation, faster to build for what the node does with it (write it out).

    * Overlap check: highdicom 0.28 finds overlapping segments with ``array.sum(axis=-1)``, which
      widens the whole (frames, rows, columns, segments) array to 64-bit integers: about 3 s for
      300 slices of 512 x 512 with four segments. Adding the segments in 8 bits gives the same
      answer in a tenth of the time.
    * Frame index: a new object indexes its frames (an in-memory SQLite table, 0.1 s for 750
      frames) for pixel queries the node never makes on it. The index is built on first use.
    """

    def _build_luts(self) -> None:
        self.__dict__["_luts_deferred"] = True

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") and self.__dict__.get("_luts_deferred"):
            self.__dict__["_luts_deferred"] = False
            hd.seg.Segmentation._build_luts(self)
            return getattr(self, name)
        return super().__getattr__(name)

    @classmethod
    def _check_and_cast_pixel_array(cls, pixel_array: Any, segment_numbers: np.ndarray,
                                    segmentation_type: Any, dtype: type) -> tuple[Any, Any]:
        if not (isinstance(pixel_array, np.ndarray) and pixel_array.ndim == 4 and pixel_array.dtype == np.uint8
                and pixel_array.shape[-1] == len(segment_numbers) > 1
                and segmentation_type != hd.seg.SegmentationTypeValues.LABELMAP):
            return super()._check_and_cast_pixel_array(pixel_array, segment_numbers, segmentation_type, dtype)
        if int(pixel_array.max(initial=0)) > 1:
            raise ValueError("a binary segment stack must hold only 0 and 1")
        total = pixel_array[..., 0].copy()
        for i in range(1, pixel_array.shape[-1]):
            total += pixel_array[..., i]  # values are 0/1 and segments few: no uint8 overflow
        overlap = hd.seg.SegmentsOverlapValues.YES if int(total.max(initial=0)) > 1 else hd.seg.SegmentsOverlapValues.NO
        return pixel_array, overlap


def build_seg(*, volume: Volume, lungs: np.ndarray, lesions: np.ndarray, headers: Mapping[str, Dataset],
              specs: Sequence[SegmentSpec], uids: OutputUIDs, series_number: int, series_description: str,
              encoding: SegEncoding = "binary", device_serial_number: str = "1") -> hd.seg.Segmentation:
    """The Segmentation object of one analysis (not yet written)."""
    if lungs.shape != volume.shape or lesions.shape != volume.shape:
        raise OutputError(f"mask shapes {lungs.shape}/{lesions.shape} differ from the volume {volume.shape}")
    sources, order = _source_layout(volume, headers)
    maps = {"lungs": lungs, "lesions": lesions}
    # Segment-major memory: each (frame, segment) plane is contiguous, which is what highdicom reads
    # frame by frame; the array it gets is the (frames, rows, columns, segments) view of it.
    planes = np.empty((len(specs), len(order), *volume.source_matrix), dtype=np.uint8)
    for i, spec in enumerate(specs):
        s = spec.structure
        np.equal(source_stack(volume, maps[s.label_map], order), s.value, out=planes[i], casting="unsafe")
    fractional = encoding == "fractional_jpeg_ls"
    seg = _Segmentation(
        source_images=sources,
        pixel_array=np.moveaxis(planes, 0, -1),
        segmentation_type=(hd.seg.SegmentationTypeValues.FRACTIONAL if fractional
                           else hd.seg.SegmentationTypeValues.BINARY),
        # The masks are thresholded (0 or 1): OCCUPANCY, since PROBABILITY would claim certainty the models do not give.
        fractional_type=hd.seg.SegmentationFractionalTypeValues.OCCUPANCY,
        max_fractional_value=255,
        segment_descriptions=segment_descriptions(specs, uids),
        series_instance_uid=uids.seg_series,
        series_number=series_number,
        sop_instance_uid=uids.seg_instance,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=__version__,
        device_serial_number=device_serial_number,
        content_label="LUNGS_LESIONS",
        content_description="Lungs and lesions, not for clinical use",
        transfer_syntax_uid=JPEGLSLossless if fractional else ExplicitVRLittleEndian,
        omit_empty_frames=True,
    )
    seg.SeriesDescription = series_description
    return seg
