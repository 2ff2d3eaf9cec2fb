"""Key images: the most involved slices, the lesion overlay in the SEG colours, a legend and the
not-for-clinical-use statement burnt in, as Secondary Capture in the source study."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from node import MANUFACTURER, __version__
from node.config import OutputsSettings
from node.outputs.codes import STRUCTURES
from node.outputs.keyimage import (
    ALPHA,
    band_text,
    build_key_images,
    enlargement,
    involvement_text,
    legend_entries,
    pick_slices,
    render,
)
from node.outputs.truth import analysis_from_series
from node.outputs.uids import OutputUIDs
from node.outputs.write import write_outputs
from node.pipeline.call import call_text
from node.pipeline.runner import Analysis
from tests.helpers.faults import Synth, phantom, synth_series

SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    # feet first, mirrored: key images must still show the patient's right on the image's left
    return synth_series(tmp_path_factory.mktemp("key") / "series",
                        phantom("covid", slices=40, matrix=96, seed=2, variant="mixed"),
                        orientation="FFS", ffs_convention="mirrored")


@pytest.fixture(scope="module")
def analysis(synth: Synth) -> Analysis:
    return analysis_from_series(synth.files, lungs=synth.phantom.lungs, lesions=synth.phantom.lesions,
                                series_instance_uid=synth.series_uid)


def test_pick_slices_takes_the_most_involved_apart() -> None:
    lungs = np.zeros((40, 8, 8), np.uint8)
    lungs[5:35, 2:6, 2:6] = 1
    lesions = np.zeros_like(lungs)
    for z, n in {10: 9, 11: 10, 20: 4, 30: 6}.items():
        lesions[z].flat[:n] = 1
    assert pick_slices(lungs, lesions, 3) == [11, 20, 30]  # 10 is next to 11: too close
    assert pick_slices(lungs, np.zeros_like(lesions), 2) == [5, 7]  # no lesions: largest lungs, spaced
    assert pick_slices(np.zeros_like(lungs), lesions * 0, 3) == []
    lungs[25] = 1  # the most lung, on a series not called pneumonia, whatever its lesions
    assert pick_slices(lungs, lesions, 1, by_lesions=False) == [25]


def test_a_small_matrix_is_enlarged_so_that_its_text_stays_legible() -> None:
    hu = np.full((128, 100), -850, np.int16)
    lungs = np.zeros((128, 100), np.uint8)
    lungs[20:100, 10:45] = 1
    out = render(hu, lungs, np.zeros_like(lungs), legend=[], title="t")
    assert enlargement(100) == 6 and out.shape[1] == 600 and out.shape[0] > 128 * 6
    assert tuple(out[6 * 50, 6 * 10]) == STRUCTURES[0].rgb  # the outline where the mask puts it, scaled
    assert enlargement(512) == enlargement(768) == 1


def test_the_call_is_written_above_the_statement() -> None:
    hu = np.full((64, 512), -850, np.int16)
    plain = render(hu, np.zeros((64, 512), np.uint8), np.zeros((64, 512), np.uint8), legend=[], title="t")
    said = render(hu, np.zeros((64, 512), np.uint8), np.zeros((64, 512), np.uint8), legend=[], title="t",
                  call="Most probable: no pneumonia (probability 0.97)")
    assert said.shape[0] > plain.shape[0]
    assert ((said[64:, :, 0] > 200) & (said[64:, :, 2] > 200)).sum() > 50  # white text in the band: the call


@pytest.mark.parametrize(("result", "expected"), [
    ({"probabilities": {"covid19": 0.81, "other_pneumonia": 0.1, "no_pneumonia": 0.09},
      "slice_rule": {"decision": "pneumonia", "abnormal_slice_share": 0.5, "min_share": 0.2}},
     "Most probable: COVID-19 pneumonia (probability 0.81); slice rule: pneumonia (50% of slices with lesions, "
     "threshold 20%)"),
    ({"probabilities": {"covid19": 0.01, "other_pneumonia": 0.02, "no_pneumonia": 0.97}},
     "Most probable: no pneumonia (probability 0.97)"),
    ({"slice_rule": {"decision": "no_pneumonia"}}, "slice rule: no pneumonia"),
    ({}, None),
])
def test_call_text(result: dict[str, object], expected: str | None) -> None:
    assert call_text(result) == expected


def test_the_band_says_the_call_and_how_much_of_each_lung_is_involved() -> None:
    result = {"probabilities": {"covid19": 0.81, "other_pneumonia": 0.1, "no_pneumonia": 0.09},
              "involvement_percent": {"right": 12.34, "left": None, "total": 7.0}}
    assert involvement_text(result) == "Lung involved by lesions: right 12.3%, left unknown, both 7.0%"
    assert band_text(result) == ("Most probable: COVID-19 pneumonia (probability 0.81)\n"
                                 "Lung involved by lesions: right 12.3%, left unknown, both 7.0%")
    assert involvement_text({}) is None and band_text({}) is None


def test_legend_volumes_keep_a_decimal_under_10_ml() -> None:
    entries = legend_entries({"lung_volume_ml": {"right": 2872.44, "left": 9.96},
                              "lesion_volume_ml": {"ggo": 0.36, "consolidation": 0.0}})
    assert [text for _, text in entries] == ["Right lung 2872 mL", "Left lung 10.0 mL", "Ground glass opacity 0.4 mL",
                                             "Consolidation 0.0 mL"]


def test_render_fills_lesions_in_their_colours_and_adds_a_legend() -> None:
    hu = np.full((64, 64), -850, np.int16)
    lungs = np.zeros((64, 64), np.uint8)
    lungs[10:50, 5:30] = 1
    lungs[10:50, 34:60] = 2
    lesions = np.zeros_like(lungs)
    lesions[20:25, 10:15] = 1
    lesions[30:35, 40:45] = 2
    out = render(hu, lungs, lesions, legend=[(s.rgb, s.label) for s in STRUCTURES], title="t")
    k = enlargement(64)  # 8: every pixel an 8 x 8 block
    assert out.shape[1:] == (64 * k, 3) and out.shape[0] > 64 * k  # legend band below the image
    gray = np.clip((-850 + 600 + 750) * 255 / 1500, 0, 255)
    for value, s in ((1, STRUCTURES[2]), (2, STRUCTURES[3])):
        expected = (1 - ALPHA) * gray + ALPHA * np.array(s.rgb)
        ys, xs = np.nonzero(lesions == value)
        np.testing.assert_allclose(out[ys * k, xs * k].mean(axis=0), expected, atol=1.5)
    assert tuple(out[30 * k, 5 * k]) == STRUCTURES[0].rgb  # lung outlines, on the edge of each mask
    assert tuple(out[30 * k, 60 * k - 1]) == STRUCTURES[1].rgb
    band = out[64 * k:]
    assert (band == np.array(STRUCTURES[3].rgb)).all(axis=2).sum() > 10  # legend swatch
    assert ((band[..., 0] > 200) & (band[..., 1] > 150) & (band[..., 2] < 50)).sum() > 50  # the statement in amber


def test_key_images_round_trip(analysis: Analysis, synth: Synth, tmp_path: Path) -> None:
    settings = OutputsSettings(seg=False, sr=False, kos=False, key_image_count=2, key_image_series_number=55,
                               key_image_series_description="keys")
    objects = write_outputs(analysis, out_dir=tmp_path, source_paths=synth.files, settings=settings)
    assert [o.kind for o in objects] == ["key_image", "key_image"]
    assert len({o.series_instance_uid for o in objects}) == 1
    vol = analysis.volume
    assert vol is not None and analysis.lesions is not None
    chosen = pick_slices(analysis.lungs, analysis.lesions, 2)  # type: ignore[arg-type]
    src = pydicom.dcmread(synth.files[0], stop_before_pixels=True)
    by_uid = {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in synth.files)}
    for number, (obj, z) in enumerate(zip(objects, chosen), start=1):
        ds = pydicom.dcmread(tmp_path / obj.file)
        assert ds.SOPClassUID == SC_SOP_CLASS and obj.sop_class_uid == SC_SOP_CLASS
        assert (ds.StudyInstanceUID, ds.PatientID) == (src.StudyInstanceUID, src.PatientID)
        assert (ds.Manufacturer, ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber) == (
            MANUFACTURER, 55, "keys", number)
        assert ds.BurnedInAnnotation == "NO" and ds.PhotometricInterpretation == "RGB"  # no identity in it
        assert ds.ConversionType == "WSD"  # rendered here, as the conformance statement says
        assert list(ds.PatientOrientation) == ["L", "P"]
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == vol.frames[z].sop_instance_uid
        pixels = ds.pixel_array
        k = enlargement(vol.shape[2])
        assert pixels.shape[1:] == (vol.shape[2] * k, 3) and pixels.shape[0] > vol.shape[1] * k
        # the picture is the canonical slice with its overlay, exactly as rendered, titled with the source image's
        # Instance Number and position (what a reader scrolling the original series sees), not the canonical index
        source = by_uid[vol.frames[z].sop_instance_uid]
        label = (f"series {source.SeriesNumber} image {source.InstanceNumber}  "
                 f"z {float(source.ImagePositionPatient[2]):.1f} mm")
        assert label in ds.ImageComments
        expected = render(vol.hu[z], analysis.lungs[z], analysis.lesions[z],  # type: ignore[index]
                          legend=legend_entries(analysis.result_json()),
                          title=f"lungnode {__version__}  {label}", call=band_text(analysis.result_json()))
        np.testing.assert_array_equal(pixels, expected)
        assert analysis.lesions[z].any()  # the most involved slices show lesions
        # the patient's right lung is on the image's left
        assert call_text(analysis.result_json())  # the call is on the image
        right_cols = np.nonzero((analysis.lungs[z] == 1).any(axis=0))[0]  # type: ignore[index]
        left_cols = np.nonzero((analysis.lungs[z] == 2).any(axis=0))[0]  # type: ignore[index]
        assert right_cols.mean() < left_cols.mean()
        image = hd.imread(tmp_path / obj.file)  # highdicom reads it: the same pixels
        np.testing.assert_array_equal(image.get_frame(1), pixels)


def test_key_images_carry_the_patient_identity_of_the_seg_and_sr(analysis: Analysis, synth: Synth) -> None:
    """Archives that match a patient on ID and issuer must file the key images with the SEG and SR."""
    reference = pydicom.dcmread(synth.files[0], stop_before_pixels=True)
    reference.IssuerOfPatientID = "HOSP-A"
    other = pydicom.Dataset()
    other.PatientID, other.IssuerOfPatientID = "OLD-7", "HOSP-B"
    reference.OtherPatientIDsSequence = [other]
    issuer = pydicom.Dataset()
    issuer.LocalNamespaceEntityID = "RIS"
    reference.IssuerOfAccessionNumberSequence = [issuer]
    reference.StudyDescription, reference.PatientAge = "CT CHEST", "061Y"
    assert analysis.volume is not None and analysis.lungs is not None and analysis.lesions is not None
    (sc,) = build_key_images(volume=analysis.volume, lungs=analysis.lungs, lesions=analysis.lesions,
                             result=analysis.result_json(), reference=reference,
                             uids=OutputUIDs.for_analysis(source_series_uid=synth.series_uid, revision=1, models=[]),
                             series_number=3, series_description="keys", count=1)
    assert (sc.PatientID, sc.IssuerOfPatientID, sc.StudyDescription, sc.PatientAge) == (
        reference.PatientID, "HOSP-A", "CT CHEST", "061Y")
    assert (sc.OtherPatientIDsSequence[0].PatientID, sc.OtherPatientIDsSequence[0].IssuerOfPatientID) == (
        "OLD-7", "HOSP-B")
    assert sc.IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID == "RIS"
    assert "(slice " in sc.ImageComments and "(image " not in sc.ImageComments  # no headers given: canonical index


def test_a_series_not_called_pneumonia_shows_its_largest_lungs_not_its_lesions(analysis: Analysis,
                                                                                synth: Synth) -> None:
    """The few millilitres a lesion model marks on a normal lung are not what the images should put forward."""
    assert analysis.volume is not None and analysis.lungs is not None and analysis.lesions is not None
    normal = {**analysis.result_json(), "probabilities": {"covid19": 0.01, "other_pneumonia": 0.02,
                                                          "no_pneumonia": 0.97},
              "slice_rule": {"decision": "no_pneumonia"}}
    images = build_key_images(volume=analysis.volume, lungs=analysis.lungs, lesions=analysis.lesions, result=normal,
                              reference=pydicom.dcmread(synth.files[0], stop_before_pixels=True),
                              uids=OutputUIDs.for_analysis(source_series_uid=synth.series_uid, revision=1, models=[]),
                              series_number=3, series_description="keys", count=2)
    by_lung = pick_slices(analysis.lungs, analysis.lesions, 2, by_lesions=False)
    assert by_lung != pick_slices(analysis.lungs, analysis.lesions, 2)  # the phantom's lesions lie elsewhere
    assert [sc.SourceImageSequence[0].ReferencedSOPInstanceUID for sc in images] == [
        analysis.volume.frames[z].sop_instance_uid for z in by_lung]
