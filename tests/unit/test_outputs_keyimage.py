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
from node.outputs.keyimage import ALPHA, build_key_images, legend_entries, pick_slices, render
from node.outputs.truth import analysis_from_series
from node.outputs.uids import OutputUIDs
from node.outputs.write import write_outputs
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


def test_render_fills_lesions_in_their_colours_and_adds_a_legend() -> None:
    hu = np.full((64, 64), -850, np.int16)
    lungs = np.zeros((64, 64), np.uint8)
    lungs[10:50, 5:30] = 1
    lungs[10:50, 34:60] = 2
    lesions = np.zeros_like(lungs)
    lesions[20:25, 10:15] = 1
    lesions[30:35, 40:45] = 2
    out = render(hu, lungs, lesions, legend=[(s.rgb, s.label) for s in STRUCTURES], title="t")
    assert out.shape[1:] == (64, 3) and out.shape[0] > 64  # legend band below the image
    gray = np.clip((-850 + 600 + 750) * 255 / 1500, 0, 255)
    for value, s in ((1, STRUCTURES[2]), (2, STRUCTURES[3])):
        expected = (1 - ALPHA) * gray + ALPHA * np.array(s.rgb)
        ys, xs = np.nonzero(lesions == value)
        np.testing.assert_allclose(out[ys, xs].mean(axis=0), expected, atol=1.5)
    assert tuple(out[30, 5]) == STRUCTURES[0].rgb and tuple(out[30, 59]) == STRUCTURES[1].rgb  # lung outlines
    band = out[64:]
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
        assert ds.BurnedInAnnotation == "YES" and ds.PhotometricInterpretation == "RGB"
        assert ds.ConversionType == "WSD"  # rendered here, as the conformance statement says
        assert list(ds.PatientOrientation) == ["L", "P"]
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == vol.frames[z].sop_instance_uid
        pixels = ds.pixel_array
        assert pixels.shape[1:] == (vol.shape[2], 3) and pixels.shape[0] > vol.shape[1]
        # the picture is the canonical slice with its overlay, exactly as rendered, titled with the source image's
        # Instance Number and position (what a reader scrolling the original series sees), not the canonical index
        source = by_uid[vol.frames[z].sop_instance_uid]
        label = f"image {source.InstanceNumber}  z {float(source.ImagePositionPatient[2]):.1f} mm"
        assert label in ds.ImageComments
        expected = render(vol.hu[z], analysis.lungs[z], analysis.lesions[z],  # type: ignore[index]
                          legend=legend_entries(analysis.result_json()),
                          title=f"lungnode {__version__}  {label}")
        np.testing.assert_array_equal(pixels, expected)
        assert analysis.lesions[z].any()  # the most involved slices show lesions
        # the patient's right lung is on the image's left
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
