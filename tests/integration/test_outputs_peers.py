"""The outputs against independent readers and a real PACS: dciodvfy (dicom3tools) validates every
object (the IOCM rejection note too), dcmqi converts the SEG to images and reads the TID 1500 SR with
volumes equal to ours, Orthanc accepts all of them over C-STORE and renders the key image as PNG.

Each peer that is not installed skips its test with the reason.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE

from models.train.lung_labels import label_lungs
from node.config import OutputsSettings
from node.outputs.codes import STRUCTURES
from node.outputs.rejection import Replaced, build_rejection_note
from node.outputs.truth import analysis_from_series
from node.outputs.write import WrittenObject, save_dataset, write_outputs
from node.pipeline.runner import Analysis
from node.pipeline.volume import QAFlag, load_volume
from tests.helpers.faults import phantom, synth_series
from tests.helpers.orthanc import OrthancServer, orthanc, orthanc_factory  # noqa: F401

DCIODVFY = Path("/usr/bin/dciodvfy")
VENV_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"


def dcmqi_tool(name: str) -> str:
    found = shutil.which(name) or (str(VENV_BIN / name) if (VENV_BIN / name).is_file() else None)
    if found is None:
        pytest.skip(f"dcmqi's {name} is not installed (pip install 'lungnode[dev]', which pins dcmqi)")
    return found


@dataclass
class Outputs:
    analysis: Analysis
    binary: dict[str, list[WrittenObject]]
    folder: Path
    fractional: WrittenObject
    rejected_sr: WrittenObject
    rejection_note: Path  # withdraws every binary object, as the node's note does after a newer revision

    def path(self, obj: WrittenObject, sub: str) -> Path:
        return self.folder / sub / obj.file

    def all_files(self) -> list[Path]:
        files = [self.path(o, "binary") for objs in self.binary.values() for o in objs]
        return files + [self.path(self.fractional, "fractional"), self.path(self.rejected_sr, "rejected"),
                        self.rejection_note]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Outputs:
    root = tmp_path_factory.mktemp("outputs")
    synth = synth_series(root / "series", phantom("covid", slices=40, matrix=96, seed=2, variant="mixed"),
                         orientation="FFS", ffs_convention="mirrored")
    analysis = analysis_from_series(synth.files, lungs=synth.phantom.lungs, lesions=synth.phantom.lesions,
                                    series_instance_uid=synth.series_uid)
    binary: dict[str, list[WrittenObject]] = {}
    for obj in write_outputs(analysis, out_dir=root / "binary", source_paths=synth.files, settings=OutputsSettings()):
        binary.setdefault(obj.kind, []).append(obj)
    [fractional] = write_outputs(analysis, out_dir=root / "fractional", source_paths=synth.files,
                                 settings=OutputsSettings(sr=False, key_images=False, kos=False,
                                                          seg_encoding="fractional_jpeg_ls"))
    reason = "3 slice(s) missing in 1 gap(s) of the stack (slice gap 2.50 mm): re-send the complete series"
    rejected = Analysis(status="rejected", series_instance_uid=synth.series_uid, reason=reason,
                        qa=[QAFlag("missing_slices", "refuse", reason)])
    [rejected_sr] = write_outputs(rejected, out_dir=root / "rejected", source_paths=synth.files,
                                  settings=OutputsSettings())
    assert sorted(binary) == ["key_image", "kos", "seg", "sr"]
    withdrawn = [Replaced(o.sop_class_uid, o.sop_instance_uid, o.series_instance_uid)
                 for objs in binary.values() for o in objs]
    note = build_rejection_note(like=pydicom.dcmread(root / "binary" / binary["sr"][0].file), replaced=withdrawn,
                                sop_instance_uid=hd.UID(), series_instance_uid=hd.UID(), series_number=9705,
                                series_description="lungnode rejection note", reason="Replaced by a later analysis.")
    (root / "rejection").mkdir()
    save_dataset(note, root / "rejection" / "rejection.dcm")
    return Outputs(analysis, binary, root, fractional, rejected_sr, root / "rejection" / "rejection.dcm")


# -- dicom3tools ---------------------------------------------------------------------------------
def test_dciodvfy_finds_no_error_in_any_object(outputs: Outputs) -> None:
    if not DCIODVFY.is_file():
        pytest.skip(f"{DCIODVFY} is not installed (Debian package dicom3tools)")
    report = {}
    for path in outputs.all_files():
        proc = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=120)
        lines = (proc.stdout + proc.stderr).splitlines()
        errors = [line for line in lines if line.startswith("Error")]
        report[f"{path.parent.name}/{path.name}"] = errors
        assert lines and lines[0] in ("Segmentation", "EnhancedSR", "SCImage", "KeyObjectSelectionDocument"), lines[:3]
    assert all(not errors for errors in report.values()), json.dumps(report, indent=1)
    assert len(report) == 9  # seg, sr, 3 key images, kos, fractional seg, rejected sr, rejection note


# -- dcmqi ---------------------------------------------------------------------------------------
def canonical_centroid_lps(analysis: Analysis, mask: np.ndarray) -> np.ndarray:
    vol = analysis.volume
    assert vol is not None
    z, y, x = (float(v.mean()) for v in np.nonzero(mask))
    dz, dy, dx = vol.spacing_mm
    return vol.origin_lps + x * dx * vol.axes_lps[0] + y * dy * vol.axes_lps[1] + z * dz * vol.axes_lps[2]


@pytest.mark.parametrize("encoding", ["binary", "fractional"])
def test_dcmqi_converts_the_seg_to_the_same_masks_in_space(outputs: Outputs, tmp_path: Path, encoding: str) -> None:
    tool = dcmqi_tool("segimage2itkimage")
    if encoding == "binary":
        seg = outputs.path(outputs.binary["seg"][0], "binary")
    else:
        # dcmqi 1.5.7 (dcmtk's dcmseg) refuses every compressed SEG ("JPEG-LS Lossless uses lossy
        # compression"): give it the same object decompressed by pydicom.
        ds = pydicom.dcmread(outputs.path(outputs.fractional, "fractional"))
        ds.decompress()
        seg = tmp_path / "fractional-decompressed.dcm"
        ds.save_as(seg, enforce_file_format=True)
    proc = subprocess.run([tool, "--inputDICOM", str(seg), "--outputDirectory", str(tmp_path), "-t", "nrrd"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    meta = json.loads((tmp_path / "meta.json").read_text())
    labels = [seg_attr["SegmentLabel"] for group in meta["segmentAttributes"] for seg_attr in group]
    assert labels == [s.label for s in STRUCTURES]
    a = outputs.analysis
    maps = {"lungs": a.lungs, "lesions": a.lesions}
    vol = a.volume
    assert vol is not None
    for number, s in enumerate(STRUCTURES, start=1):
        image = sitk.ReadImage(str(tmp_path / f"{number}.nrrd"))
        arr = sitk.GetArrayFromImage(image) > 0
        ours = maps[s.label_map] == s.value  # type: ignore[index]
        assert int(arr.sum()) == int(ours.sum()), s.label
        spacing = image.GetSpacing()
        ml = arr.sum() * spacing[0] * spacing[1] * spacing[2] / 1000.0
        assert ml == pytest.approx(ours.sum() * vol.voxel_ml, rel=1e-4)
        k, j, i = (float(v.mean()) for v in np.nonzero(arr))
        theirs = np.array(image.TransformContinuousIndexToPhysicalPoint((i, j, k)))
        np.testing.assert_allclose(theirs, canonical_centroid_lps(a, ours), atol=0.05)  # same place in the patient


def test_dcmqi_reads_the_sr_with_our_volumes(outputs: Outputs, tmp_path: Path) -> None:
    tool = dcmqi_tool("tid1500reader")
    sr = outputs.path(outputs.binary["sr"][0], "binary")
    out = tmp_path / "sr.json"
    proc = subprocess.run([tool, "--inputDICOM", str(sr), "--outputMetadata", str(out)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "ERROR" not in proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    groups = {m["TrackingIdentifier"]: m for m in data["Measurements"]}
    result = outputs.analysis.result_json()
    seg_uid = outputs.binary["seg"][0].sop_instance_uid
    expected = {"Right lung": (1, result["lung_volume_ml"]["right"]), "Left lung": (2, result["lung_volume_ml"]["left"]),
                "Ground glass opacity": (3, result["lesion_volume_ml"]["ggo"]),
                "Consolidation": (4, result["lesion_volume_ml"]["consolidation"])}
    for name, (number, ml) in expected.items():
        group = groups[name]
        assert group["ReferencedSegment"] == number and group["segmentationSOPInstanceUID"] == seg_uid
        volumes = [float(i["value"]) for i in group["measurementItems"] if i["quantity"]["CodeValue"] == "118565006"]
        assert volumes == [pytest.approx(ml)]
        assert [i["units"]["CodeValue"] for i in group["measurementItems"]][0] == "mL"
    probs = {m["TrackingIdentifier"]: float(m["measurementItems"][0]["value"]) for m in data["Measurements"]
             if m["TrackingIdentifier"].startswith("Probability")}
    assert probs == {"Probability of COVID-19 pneumonia": pytest.approx(result["probabilities"]["covid19"]),
                     "Probability of other pneumonia": pytest.approx(result["probabilities"]["other_pneumonia"]),
                     "Probability of no pneumonia": pytest.approx(result["probabilities"]["no_pneumonia"])}
    # TID 1500's Image Library lists every analysed image
    assert outputs.analysis.volume is not None
    assert sorted(data["imageLibrary"]) == sorted(f.sop_instance_uid for f in outputs.analysis.volume.frames)

    rejected = tmp_path / "rejected.json"
    proc = subprocess.run([tool, "--inputDICOM", str(outputs.path(outputs.rejected_sr, "rejected")),
                           "--outputMetadata", str(rejected)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "re-send the complete series" in rejected.read_text()


# -- Orthanc -------------------------------------------------------------------------------------
def store(pacs: OrthancServer, files: list[Path]) -> dict[str, int | None]:
    """C-STORE each file over one association; status per file name.

    Orthanc commits each instance to its index before answering, which on a machine busy with other
    disk work has taken longer than the 30 s of tests.helpers.scu: allow two minutes per object.
    """
    ae = AE(ae_title="LUNGNODE")
    ae.acse_timeout = ae.network_timeout = 30
    ae.dimse_timeout = 120
    for path in files:
        meta = read_file_meta_info(path)
        ae.add_requested_context(str(meta.MediaStorageSOPClassUID), [str(meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", pacs.dicom_port, ae_title=pacs.ae_title)
    assert assoc.is_established
    try:
        out: dict[str, int | None] = {}
        for path in files:
            rsp = assoc.send_c_store(path)
            out[f"{path.parent.name}/{path.name}"] = int(rsp.Status) if "Status" in rsp else None
        return out
    finally:
        assoc.release()


def test_orthanc_accepts_every_object_and_renders_the_key_image(outputs: Outputs,
                                                                orthanc: OrthancServer) -> None:  # noqa: F811
    files = [outputs.path(o, "binary") for objs in outputs.binary.values() for o in objs]
    files += [outputs.path(outputs.rejected_sr, "rejected"), outputs.rejection_note]
    statuses = store(orthanc, files)
    assert statuses == {f"{f.parent.name}/{f.name}": 0x0000 for f in files}, orthanc.log[-3000:]
    for obj in [o for objs in outputs.binary.values() for o in objs]:
        assert orthanc.find_instance(obj.sop_instance_uid) is not None, obj.kind
    # Orthanc does not act on IOCM: it files the note as one more document (why reject_replaced is off by default)
    assert orthanc.find_instance(str(pydicom.dcmread(outputs.rejection_note).SOPInstanceUID)) is not None
    key = outputs.binary["key_image"][0]
    png = orthanc.get_bytes(f"/instances/{orthanc.find_instance(key.sop_instance_uid)}/preview")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    rendered = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    ours = pydicom.dcmread(outputs.path(key, "binary")).pixel_array
    assert rendered.shape == ours.shape
    np.testing.assert_array_equal(rendered, ours)  # RGB is shown as stored


def test_orthanc_accepts_the_jpeg_ls_fractional_seg(outputs: Outputs,
                                                    orthanc_factory) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    pacs = orthanc_factory()
    path = outputs.path(outputs.fractional, "fractional")
    assert store(pacs, [path]) == {"fractional/seg.dcm": 0x0000}, pacs.log[-3000:]
    assert pacs.find_instance(outputs.fractional.sop_instance_uid) is not None


# -- a real CT -----------------------------------------------------------------------------------
def test_real_ct_outputs_validate_and_line_up(lidc_0001: Path, tmp_path: Path) -> None:
    """LIDC-IDRI-0001 (GE, feet first): lungs from the documented classical labelling, a planted lesion."""
    files = sorted(lidc_0001.rglob("*.dcm"))
    volume = load_volume(files)
    lungs = label_lungs(volume.hu, volume.spacing_mm).astype(np.uint8)
    lesions = np.zeros_like(lungs)
    zc, yc, xc = (int(v.mean()) for v in np.nonzero(lungs == 1))
    z, y, x = np.ogrid[: lungs.shape[0], : lungs.shape[1], : lungs.shape[2]]
    ball = ((z - zc) * volume.spacing_mm[0]) ** 2 + ((y - yc) * volume.spacing_mm[1]) ** 2 + \
        ((x - xc) * volume.spacing_mm[2]) ** 2
    lesions[(ball < 30.0**2) & (lungs > 0)] = 1
    lesions[(ball < 12.0**2) & (lungs > 0)] = 2
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    analysis = analysis_from_series(files, lungs=lungs, lesions=lesions, series_instance_uid=series_uid)
    objects = write_outputs(analysis, out_dir=tmp_path, source_paths=files, settings=OutputsSettings())
    assert sorted({o.kind for o in objects}) == ["key_image", "kos", "seg", "sr"]
    if DCIODVFY.is_file():
        for obj in objects:
            proc = subprocess.run([str(DCIODVFY), str(tmp_path / obj.file)], capture_output=True, text=True, timeout=120)
            errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
            assert not errors, (obj.file, errors)
    hseg = hd.seg.segread(tmp_path / "seg.dcm")
    per_source = {f.sop_instance_uid: plane for f, plane in volume.to_source(lungs)}
    uids = list(per_source)
    arr = hseg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2],
                                             assert_missing_frames_are_empty=True)
    for i, uid in enumerate(uids):
        np.testing.assert_array_equal(arr[i, :, :, 0].astype(bool), per_source[uid] == 1)
        np.testing.assert_array_equal(arr[i, :, :, 1].astype(bool), per_source[uid] == 2)
