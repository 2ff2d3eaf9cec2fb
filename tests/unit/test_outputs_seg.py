"""DICOM SEG from node.outputs: every frame lines up with its source image, whatever the order of the
files, the patient position or the storage class of the source, and the object round-trips.

The series are the synthetic phantom written as DICOM; the masks handed to the outputs are the
phantom's exact truth (canonical by construction), and the truth files in truth/ give each source
image's mask in that image's own pixel layout, keyed by SOP Instance UID: the reference here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from node import MANUFACTURER
from node.config import OutputsSettings
from node.outputs.codes import STRUCTURES
from node.outputs.seg import OutputError
from node.outputs.truth import analysis_from_series
from node.outputs.write import read_manifest, segment_specs, write_outputs
from node.pipeline.manifest import parse_manifest
from node.pipeline.runner import Analysis
from node.synthetic import Phantom
from tests.helpers.faults import (
    Synth,
    crop_columns,
    orientation_noise,
    phantom,
    synth_series,
    to_decubitus,
    to_hfp,
    write_enhanced_ct,
    write_legacy_converted_ct,
)
from tests.helpers.onnx_models import LESION_LABELS, deep_merge, seg2d_manifest

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def ph() -> Phantom:
    """A covid phantom with both ground glass and consolidation (cached per process)."""
    return phantom("covid", slices=40, matrix=96, seed=2, variant="mixed")


@dataclass
class Case:
    synth: Synth
    files: list[Path]  # what the node received (shuffled, re-encoded, or Enhanced CT)
    analysis: Analysis
    # source SOP Instance UID (and frame number for Enhanced CT) -> the classic slice's SOP UID whose truth applies
    truth_key: dict[tuple[str, int | None], str]


def make_case(tmp_path: Path, layout: str) -> Case:
    options: dict[str, object] = {}
    if layout == "ffs_radiological":
        options = {"orientation": "FFS", "ffs_convention": "radiological"}
    elif layout == "ffs_mirrored":
        options = {"orientation": "FFS", "ffs_convention": "mirrored"}
    synth = synth_series(tmp_path / "series", ph(), **options)
    files = list(synth.files)
    truth_key: dict[tuple[str, int | None], str] = {}
    uid_of = {p: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    if layout == "hfp":
        to_hfp(files)
    crop = RECT_COLUMNS if layout == "hfdr_rectangular" else None
    if layout == "hfdr_rectangular":  # lying on the right side, images turned by a quarter, 96 x 80
        crop_columns(files, RECT_COLUMNS)
        to_decubitus(files, "HFDR")
    if layout == "orientation_noise":
        orientation_noise(files)
    if layout in ("enhanced", "legacy_converted"):
        [(path, members)] = (write_enhanced_ct(files, tmp_path / "enhanced" / "ct.dcm", order_seed=3)
                             if layout == "enhanced" else [write_legacy_converted_ct(files, tmp_path / "lce" / "ct.dcm")])
        enhanced_uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        truth_key = {(enhanced_uid, n): uid_of[files[k]] for n, k in enumerate(members, start=1)}
        files = [path]
        series_uid = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
    else:
        truth_key = {(uid, None): uid for uid in uid_of.values()}
        series_uid = synth.series_uid
        random.Random(7).shuffle(files)  # order of arrival says nothing
    keep = slice(None, crop)
    analysis = analysis_from_series(files, lungs=synth.phantom.lungs[..., keep], lesions=synth.phantom.lesions[..., keep],
                                    series_instance_uid=series_uid)
    np.testing.assert_array_equal(analysis.volume.hu, synth.phantom.hu[..., keep])  # type: ignore[union-attr]
    return Case(synth, files, analysis, truth_key)


def truth_planes(case: Case, name: str) -> dict[str, np.ndarray]:
    """truth/<name> per classic SOP UID, in the pixel layout the series was written with."""
    labels = case.synth.truth_labels(name)
    return {uid: labels[k] for uid, k in case.synth.truth["sop_to_index"].items()}


def frames_by_source(seg: pydicom.Dataset) -> dict[tuple[int, str, int | None], np.ndarray]:
    """(segment number, referenced source SOP UID, referenced frame) -> SEG frame, read with pydicom."""
    pixels = seg.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[None]
    out = {}
    for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        src = fg.DerivationImageSequence[0].SourceImageSequence[0]
        frame = int(src.ReferencedFrameNumber) if "ReferencedFrameNumber" in src else None
        out[(number, str(src.ReferencedSOPInstanceUID), frame)] = pixels[i]
    return out


LAYOUTS = ["hfs_shuffled", "ffs_radiological", "ffs_mirrored", "hfp", "hfdr_rectangular", "orientation_noise",
           "enhanced", "legacy_converted"]
RECT_COLUMNS = 80


def as_stored(layout: str, plane: np.ndarray) -> np.ndarray:
    """A truth plane of the HFS series in the pixel layout ``make_case`` stored its image in."""
    if layout == "hfp":
        return plane[::-1, ::-1]  # to_hfp rotates the stored pixels by 180 degrees
    if layout == "hfdr_rectangular":
        return plane[:, :RECT_COLUMNS].T[::-1, :]  # as crop_columns and to_decubitus stored them
    return plane


@pytest.mark.parametrize("layout", LAYOUTS)
def test_seg_frames_equal_the_truth_of_their_source_image(tmp_path: Path, layout: str) -> None:
    case = make_case(tmp_path, layout)
    objects = write_outputs(case.analysis, out_dir=tmp_path / "out", source_paths=case.files,
                            settings=OutputsSettings(sr=False, key_images=False, kos=False))
    assert [o.kind for o in objects] == ["seg"]
    seg = pydicom.dcmread(tmp_path / "out" / objects[0].file)
    assert seg.SOPClassUID == SEG_SOP_CLASS and seg.SegmentationType == "BINARY"
    got = frames_by_source(seg)
    truth = {"lungs": truth_planes(case, "lungs"), "lesions": truth_planes(case, "lesions")}
    checked = 0
    for number, s in enumerate(STRUCTURES, start=1):
        for (src_uid, frame), classic_uid in case.truth_key.items():
            expected = truth[s.label_map][classic_uid] == s.value
            expected = as_stored(layout, expected)
            frame_pixels = got.get((number, src_uid, frame))
            if frame_pixels is None:
                assert not expected.any(), f"segment {number}: non-empty source {src_uid} frame {frame} has no frame"
            else:
                np.testing.assert_array_equal(frame_pixels.astype(bool), expected,
                                              err_msg=f"segment {number}, source {src_uid} frame {frame}")
                checked += 1
    assert checked == len(got)  # no frame refers to anything else
    assert all(f.any() for f in got.values())  # empty frames omitted

    # highdicom reads the same pixels back by source instance
    hseg = hd.seg.segread(tmp_path / "out" / "seg.dcm")
    if layout in ("enhanced", "legacy_converted"):
        (src_uid,) = {k[0] for k in case.truth_key}
        numbers = sorted(n for (_, n) in case.truth_key)
        arr = hseg.get_pixels_by_source_frame(source_sop_instance_uid=src_uid, source_frame_numbers=numbers,
                                              segment_numbers=[1, 2, 3, 4], assert_missing_frames_are_empty=True)
        keys = [(src_uid, n) for n in numbers]
    else:
        keys = list(case.truth_key)
        arr = hseg.get_pixels_by_source_instance(source_sop_instance_uids=[k[0] for k in keys],
                                                 segment_numbers=[1, 2, 3, 4], assert_missing_frames_are_empty=True)
    for i, key in enumerate(keys):
        for j, s in enumerate(STRUCTURES):
            expected = as_stored(layout, truth[s.label_map][case.truth_key[key]] == s.value)
            np.testing.assert_array_equal(arr[i, :, :, j].astype(bool), expected)


@pytest.fixture(scope="module")
def hfs_case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return make_case(tmp_path_factory.mktemp("hfs"), "hfs_shuffled")


def manifests() -> dict[str, object]:
    lung = parse_manifest(deep_merge(seg2d_manifest("lung_seg"), {"algorithm": {"name": "lung-unet", "version": "2.1.0"}}),
                          Path("lung_seg/model.yaml"))
    lesion = parse_manifest(deep_merge(seg2d_manifest("lesion_seg"), {
        "output": {"labels": LESION_LABELS}, "algorithm": {"name": "lesion-unet", "version": "3.0.1",
                                                           "family": "Morphological Operations"}}), Path("lesion_seg/model.yaml"))
    return {"lung": lung, "lesion": lesion}


def test_segments_are_coded_identified_and_belong_to_the_source_study(hfs_case: Case, tmp_path: Path) -> None:
    settings = OutputsSettings(sr=False, key_images=False, kos=False, seg_series_number=4242, seg_series_description="my seg")
    write_outputs(hfs_case.analysis, out_dir=tmp_path, source_paths=hfs_case.files, settings=settings,
                  manifests=manifests())  # type: ignore[arg-type]
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    src = pydicom.dcmread(hfs_case.files[0], stop_before_pixels=True)
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.PatientID == src.PatientID and seg.PatientName == src.PatientName
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID
    assert seg.Manufacturer == MANUFACTURER
    assert (seg.SeriesNumber, seg.SeriesDescription) == (4242, "my seg")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    assert seg.SegmentsOverlap == "YES"  # lesions lie inside the lungs
    segs = seg.SegmentSequence
    assert [int(s.SegmentNumber) for s in segs] == [1, 2, 3, 4]
    assert [s.SegmentLabel for s in segs] == ["Right lung", "Left lung", "Ground glass opacity", "Consolidation"]
    types = [(s.SegmentedPropertyTypeCodeSequence[0].CodeValue, s.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator)
             for s in segs]
    assert types == [("3341006", "SCT"), ("44029006", "SCT"), ("1217294009", "SCT"), ("95436008", "SCT")]
    categories = [s.SegmentedPropertyCategoryCodeSequence[0].CodeValue for s in segs]
    assert categories == ["91723000", "91723000", "49755003", "49755003"]  # anatomical / morphologically abnormal
    assert all(s.SegmentAlgorithmType == "AUTOMATIC" for s in segs)
    algos = [(s.SegmentAlgorithmName, s.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion,
              s.SegmentationAlgorithmIdentificationSequence[0].AlgorithmFamilyCodeSequence[0].CodeMeaning) for s in segs]
    assert algos == [("lung-unet", "2.1.0", "Artificial Intelligence")] * 2 + [("lesion-unet", "3.0.1", "Morphological Operations")] * 2
    hashes = [s.SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters for s in segs]
    assert hashes == [f"sha256={m.sha256}" for m in (manifests()["lung"],) * 2 + (manifests()["lesion"],) * 2]
    colours = [tuple(s.RecommendedDisplayCIELabValue) for s in segs]
    assert len(set(colours)) == 4
    assert all(s.TrackingUID and s.TrackingID for s in segs)
    assert "AnatomicRegionSequence" in segs[2] and "AnatomicRegionSequence" not in segs[0]

    # highdicom reads the descriptions back the same
    hseg = hd.seg.segread(tmp_path / "seg.dcm")
    assert hseg.get_segment_numbers(segmented_property_type=Code("95436008", "SCT", "x")) == [4]


def test_fractional_jpeg_ls_round_trips(hfs_case: Case, tmp_path: Path) -> None:
    settings = OutputsSettings(sr=False, key_images=False, kos=False, seg_encoding="fractional_jpeg_ls")
    [obj] = write_outputs(hfs_case.analysis, out_dir=tmp_path, source_paths=hfs_case.files, settings=settings)
    assert obj.transfer_syntax_uid == JPEGLSLossless
    seg = pydicom.dcmread(tmp_path / obj.file)
    assert seg.SegmentationType == "FRACTIONAL" and seg.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert seg.SegmentationFractionalType == "OCCUPANCY"  # thresholded masks, not probabilities
    hseg = hd.seg.segread(tmp_path / obj.file)
    vol = hfs_case.analysis.volume
    assert vol is not None
    uids = [f.sop_instance_uid for f in vol.frames]
    arr = hseg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2, 3, 4],
                                             assert_missing_frames_are_empty=True, rescale_fractional=True)
    maps = {"lungs": hfs_case.analysis.lungs, "lesions": hfs_case.analysis.lesions}
    for j, s in enumerate(STRUCTURES):
        np.testing.assert_array_equal(arr[..., j] > 0.5, maps[s.label_map] == s.value)  # HFS: no flips


def test_uids_are_deterministic_and_change_with_revision_and_models(hfs_case: Case, tmp_path: Path) -> None:
    settings = OutputsSettings(key_images=False, kos=False)

    def run(name: str, revision: int, analysis: Analysis) -> dict[str, str]:
        objs = write_outputs(analysis, out_dir=tmp_path / name, source_paths=hfs_case.files, settings=settings,
                             revision=revision)
        return {o.kind: o.sop_instance_uid for o in objs} | {f"{o.kind}_series": o.series_instance_uid for o in objs}

    first = run("a", 1, hfs_case.analysis)
    assert first == run("b", 1, hfs_case.analysis)
    second = run("c", 2, hfs_case.analysis)
    assert not set(first.values()) & set(second.values())
    retrained = Analysis(**{**hfs_case.analysis.__dict__,
                            "models": [dict(m, version="9.9.9") for m in hfs_case.analysis.models]})
    assert not set(first.values()) & set(run("d", 1, retrained).values())
    # files on disk carry the UIDs outputs.json lists
    for obj in read_manifest(tmp_path / "a"):
        ds = pydicom.dcmread(tmp_path / "a" / obj.file, stop_before_pixels=True)
        assert (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.SOPClassUID) == (
            obj.sop_instance_uid, obj.series_instance_uid, obj.study_instance_uid, obj.sop_class_uid)
        assert ds.file_meta.TransferSyntaxUID == obj.transfer_syntax_uid == ExplicitVRLittleEndian


def test_specs_fall_back_to_builtin_codes_without_manifests() -> None:
    specs = segment_specs(None, {"lung": {"name": "l", "version": "1", "sha256": "a" * 64}})
    assert [s.type for s in specs] == [s.type for s in STRUCTURES]
    assert specs[0].algorithm.name == "l" and specs[2].algorithm.name == "unknown"


def test_several_enhanced_objects_give_no_seg_but_still_an_sr(hfs_case: Case, tmp_path: Path) -> None:
    written = write_enhanced_ct(list(hfs_case.synth.files), tmp_path / "enh" / "ct.dcm", frames_per_file=10)
    files = [p for p, _ in written]
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    analysis = analysis_from_series(files, lungs=hfs_case.synth.phantom.lungs, lesions=hfs_case.synth.phantom.lesions,
                                    series_instance_uid=series_uid)
    objects = write_outputs(analysis, out_dir=tmp_path / "out", source_paths=files,
                            settings=OutputsSettings(key_images=False, kos=False))
    assert [o.kind for o in objects] == ["sr"]
    sr = pydicom.dcmread(tmp_path / "out" / "sr.dcm")
    assert sr.StudyInstanceUID == hfs_case.synth.study_uid


def test_missing_source_headers_are_an_error_that_says_what_to_do(hfs_case: Case) -> None:
    from node.outputs.seg import build_seg

    with pytest.raises(OutputError, match="pass every file"):
        build_seg(volume=hfs_case.analysis.volume, lungs=hfs_case.analysis.lungs,  # type: ignore[arg-type]
                  lesions=hfs_case.analysis.lesions, headers={}, specs=segment_specs(None, {}),  # type: ignore[arg-type]
                  uids=None, series_number=1, series_description="x")  # type: ignore[arg-type]


def test_no_lesions_no_overlap_and_no_lungs_still_a_valid_seg(hfs_case: Case, tmp_path: Path) -> None:
    a = hfs_case.analysis
    assert a.lungs is not None and a.lesions is not None
    clear = Analysis(**{**a.__dict__, "lesions": np.zeros_like(a.lesions)})
    write_outputs(clear, out_dir=tmp_path / "clear", source_paths=hfs_case.files,
                  settings=OutputsSettings(sr=False, key_images=False, kos=False))
    seg = pydicom.dcmread(tmp_path / "clear" / "seg.dcm")
    assert seg.SegmentsOverlap == "NO"
    numbers = {int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
               for fg in seg.PerFrameFunctionalGroupsSequence}
    assert numbers == {1, 2} and len(seg.SegmentSequence) == 4  # empty segments described, without frames

    empty = Analysis(**{**a.__dict__, "lesions": np.zeros_like(a.lesions), "lungs": np.zeros_like(a.lungs)})
    objects = write_outputs(empty, out_dir=tmp_path / "empty", source_paths=hfs_case.files, settings=OutputsSettings())
    assert [o.kind for o in objects] == ["seg", "sr"]  # no slice to show as a key image
    hseg = hd.seg.segread(tmp_path / "empty" / "seg.dcm")
    vol = a.volume
    assert vol is not None
    arr = hseg.get_pixels_by_source_instance(source_sop_instance_uids=[f.sop_instance_uid for f in vol.frames],
                                             segment_numbers=[1, 2, 3, 4], assert_missing_frames_are_empty=True)
    assert not arr.any()


def test_built_seg_answers_pixel_queries_like_the_file(hfs_case: Case, tmp_path: Path) -> None:
    """The frame index highdicom skips while building is made on first use: queries on the object work."""
    from node.outputs.seg import build_seg, read_source_headers
    from node.outputs.uids import OutputUIDs

    analysis = hfs_case.analysis
    vol = analysis.volume
    assert vol is not None and analysis.lungs is not None and analysis.lesions is not None
    uids = OutputUIDs.for_analysis(source_series_uid=analysis.series_instance_uid, revision=1, models=[])
    seg = build_seg(volume=vol, lungs=analysis.lungs, lesions=analysis.lesions,
                    headers=read_source_headers(hfs_case.files), specs=segment_specs(None, {}), uids=uids,
                    series_number=1, series_description="x")
    sources = [f.sop_instance_uid for f in vol.frames]
    arr = seg.get_pixels_by_source_instance(source_sop_instance_uids=sources, segment_numbers=[1, 2, 3, 4],
                                            assert_missing_frames_are_empty=True)
    maps = {"lungs": analysis.lungs, "lesions": analysis.lesions}
    for j, s in enumerate(STRUCTURES):
        np.testing.assert_array_equal(arr[..., j] > 0, maps[s.label_map] == s.value)
    assert seg.get_segment_numbers(segmented_property_type=STRUCTURES[3].type) == [4]
