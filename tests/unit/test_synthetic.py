"""Synthetic chest-CT phantom: anatomy and label sanity, determinism, DICOM round trips and geometry."""

from __future__ import annotations

import json
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.synthetic import (
    TRANSFER_SYNTAXES,
    Phantom,
    PhantomSpec,
    SeriesOptions,
    make_phantom,
    write_series,
)
from node.synthetic.cli import synth_main

DCIODVFY = Path("/usr/bin/dciodvfy")
HAS_DCMCJPEG = Path("/usr/bin/dcmcjpeg").is_file() or shutil.which("dcmcjpeg") is not None


@lru_cache(maxsize=None)
def phantom(kind: str, variant: str | None = None, seed: int = 1, slices: int = 24, matrix: int = 128) -> Phantom:
    """Cached small phantoms; tests must not modify the arrays."""
    return make_phantom(PhantomSpec(kind=kind, variant=variant, seed=seed, slices=slices, matrix=matrix))  # type: ignore[arg-type]


def lung_z_halves(ph: Phantom) -> tuple[slice, slice]:
    zs = np.nonzero(ph.lungs.reshape(ph.lungs.shape[0], -1).any(axis=1))[0]
    mid = (int(zs[0]) + int(zs[-1]) + 1) // 2
    return slice(int(zs[0]), mid), slice(mid, int(zs[-1]) + 1)


def pleural_depth(ph: Phantom) -> np.ndarray:
    """In-plane distance (mm) of every voxel inside the lungs to the lung outline of its slice."""
    import SimpleITK as sitk

    out = np.zeros(ph.lungs.shape, np.float32)
    for k in range(ph.lungs.shape[0]):
        if not ph.lungs[k].any():
            continue
        img = sitk.GetImageFromArray((ph.lungs[k] > 0).astype(np.uint8))
        img.SetSpacing((ph.spacing_mm[2], ph.spacing_mm[1]))
        d = sitk.SignedMaurerDistanceMap(img, insideIsPositive=True, squaredDistance=False, useImageSpacing=True)
        out[k] = sitk.GetArrayFromImage(d)
    return out


# ---------------------------------------------------------------------------- volumes and labels

@pytest.mark.parametrize("kind", ["covid", "pneumonia", "normal"])
def test_arrays_and_lungs(kind: str) -> None:
    ph = phantom(kind)
    assert ph.hu.dtype == np.int16 and ph.lungs.dtype == np.uint8 and ph.lesions.dtype == np.uint8
    assert ph.hu.shape == ph.lungs.shape == ph.lesions.shape == (24, 128, 128)
    assert set(np.unique(ph.lungs)) == {0, 1, 2}
    assert set(np.unique(ph.lesions)) <= {0, 1, 2}
    # lesions only inside the lungs
    assert not np.any((ph.lesions > 0) & (ph.lungs == 0))
    # canonical layout: column 0 is the patient's right, so the right lung (1) has the smaller columns
    cols = np.arange(128)
    c_right = (ph.lungs == 1).sum(axis=(0, 1)) @ cols / (ph.lungs == 1).sum()
    c_left = (ph.lungs == 2).sum(axis=(0, 1)) @ cols / (ph.lungs == 2).sum()
    assert c_right < 64 < c_left
    # lung HU outside lesions: aerated lung at about -850 (vessels included)
    clear = ph.hu[(ph.lungs > 0) & (ph.lesions == 0)]
    assert -900 < clear.mean() < -740
    assert -900 < np.median(clear) < -800
    # realistic lung volumes, right larger than left (heart on the left)
    v = ph.volumes_ml
    assert 2000 < v["lungs"] < 9000
    assert v["right_lung"] > v["left_lung"]
    # body and bone are there; air outside
    assert ph.hu.max() > 600
    assert (ph.hu[:, :3, :] < -900).mean() > 0.9
    # some slices without lung (coverage beyond apex and bases)
    per_slice = np.asarray((ph.lungs > 0).reshape(24, -1).any(axis=1))
    assert not per_slice[0] and per_slice[12]


def test_trachea_is_air_and_not_lung() -> None:
    ph = phantom("normal", slices=40, matrix=160)
    cx, cy, cz = ph.params["landmarks_lps_mm"]["carina"]
    x0, y0, z0 = ph.origin_mm
    col = int(round((cx - x0) / ph.spacing_mm[2]))
    row = int(round((cy - y0) / ph.spacing_mm[1]))
    ks = [k for k, z in enumerate(ph.z_positions_mm) if cz + 15.0 < z < ph.params["landmarks_lps_mm"]["lung_apex_z"]]
    assert ks
    for k in ks:
        assert ph.hu[k, row, col] < -850
        assert ph.lungs[k, row, col] == 0
        assert ph.lungs[k].any()


def test_volumes_match_labels() -> None:
    ph = phantom("covid")
    vox = ph.spacing_mm[0] * ph.spacing_mm[1] * ph.spacing_mm[2] / 1000.0
    assert ph.volumes_ml["right_lung"] == pytest.approx((ph.lungs == 1).sum() * vox, rel=1e-3)
    assert ph.volumes_ml["ground_glass"] == pytest.approx((ph.lesions == 1).sum() * vox, rel=1e-3, abs=1e-3)
    assert ph.volumes_ml["consolidation"] == pytest.approx((ph.lesions == 2).sum() * vox, rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_covid_bilateral_lower_predominant(seed: int) -> None:
    ph = phantom("covid", "mixed", seed=seed)
    les = ph.lesions > 0
    assert (les & (ph.lungs == 1)).sum() > 0 and (les & (ph.lungs == 2)).sum() > 0, "COVID pattern must be bilateral"
    low, high = lung_z_halves(ph)
    assert les[low].sum() > les[high].sum(), "lower-lobe predominance"
    ggo = ph.hu[ph.lesions == 1]
    assert -780 < np.median(ggo) < -380
    # peripheral (subpleural): lesion voxels are closer to the lung surface than lung voxels in general
    depth = pleural_depth(ph)
    assert np.median(depth[les]) < np.median(depth[ph.lungs > 0])
    assert np.mean(depth[les] < 20.0) > 0.85


def test_covid_consolidation_density() -> None:
    for seed in range(1, 8):
        ph = phantom("covid", "mixed", seed=seed)
        if (ph.lesions == 2).sum() > 30:
            assert -200 < np.median(ph.hu[ph.lesions == 2]) < 120
            return
    pytest.fail("no mixed COVID phantom with consolidation in 7 seeds")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pneumonia_lobar_unilateral(seed: int) -> None:
    ph = phantom("pneumonia", "lobar", seed=seed)
    les = ph.lesions > 0
    right, left = (les & (ph.lungs == 1)).sum(), (les & (ph.lungs == 2)).sum()
    assert (right > 0) != (left > 0), "lobar pneumonia is unilateral"
    cons = ph.hu[ph.lesions == 2]
    assert cons.size > 50
    assert -150 < np.median(cons) < 100
    assert ph.volumes_ml["consolidation"] > ph.volumes_ml["ground_glass"] * 0.5


def test_pneumonia_air_bronchograms_not_lesion() -> None:
    ph = make_phantom(PhantomSpec(kind="pneumonia", variant="lobar", seed=4, slices=40, matrix=192, slice_thickness_mm=1.5))
    # air inside the consolidated region's bounding box that is labelled lung but not lesion
    zz, yy, xx = np.nonzero(ph.lesions == 2)
    box = (slice(zz.min(), zz.max() + 1), slice(yy.min(), yy.max() + 1), slice(xx.min(), xx.max() + 1))
    hu, les, lungs = ph.hu[box], ph.lesions[box], ph.lungs[box]
    assert np.median(hu[les == 2]) > -150 and np.percentile(hu[les == 2], 5) > -550  # consolidation is dense
    assert ((hu < -700) & (les == 0) & (lungs > 0)).sum() > 0


def test_bronchopneumonia_nodular() -> None:
    ph = phantom("pneumonia", "bronchopneumonia", seed=2, slices=32, matrix=160)
    assert ph.volumes_ml["lesions"] > 0
    assert ph.params["lesions"]["n_small_lesions"] > 5


@pytest.mark.parametrize("variant", ["clear", "nodules", "emphysema", "atelectasis"])
def test_normal_has_no_lesions(variant: str) -> None:
    ph = phantom("normal", variant, seed=5)
    assert ph.lesions.max() == 0
    assert ph.volumes_ml["lesions"] == 0.0
    assert ph.params["variant"] == variant


def test_determinism_and_seed_variation() -> None:
    spec = PhantomSpec(kind="covid", slices=16, matrix=96, seed=7)
    a, b = make_phantom(spec), make_phantom(spec)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.lungs, b.lungs) and np.array_equal(a.lesions, b.lesions)
    assert a.params == b.params
    c = make_phantom(PhantomSpec(kind="covid", slices=16, matrix=96, seed=8))
    assert not np.array_equal(a.hu, c.hu)


def test_same_seed_same_anatomy_across_kinds() -> None:
    a = phantom("normal", seed=3)
    b = phantom("covid", seed=3)
    # the patient (lung masks) is the same, only the disease differs
    assert (a.lungs == b.lungs).mean() > 0.99


def test_explicit_geometry_and_thickness() -> None:
    ph = make_phantom(PhantomSpec(kind="normal", slices=20, matrix=96, seed=2, slice_spacing_mm=2.5,
                                  slice_thickness_mm=5.0, pixel_spacing_mm=4.0, kernel="sharp", noise_hu=20.0))
    assert ph.spacing_mm == (2.5, 4.0, 4.0)
    assert ph.params["slice_thickness_mm"] == 5.0 and ph.params["kernel"] == "sharp"
    assert ph.params["sub_slices"] > 1


def test_spec_validation() -> None:
    with pytest.raises(ValueError):
        PhantomSpec(kind="flu")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PhantomSpec(kind="normal", variant="lobar")
    with pytest.raises(ValueError):
        PhantomSpec(kind="covid", slices=0)
    with pytest.raises(ValueError):
        SeriesOptions(transfer_syntax="jpeg-lossy")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- DICOM

def read_series(files: tuple[Path, ...]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f) for f in files]


def hu_of(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.int32) * int(float(ds.RescaleSlope)) + int(float(ds.RescaleIntercept))


@pytest.mark.parametrize("ts", sorted(TRANSFER_SYNTAXES))
@pytest.mark.parametrize("signed", [False, True])
def test_transfer_syntax_round_trip(tmp_path: Path, ts: str, signed: bool) -> None:
    if ts == "jpeg-lossless" and not HAS_DCMCJPEG:
        pytest.skip("dcmtk's dcmcjpeg not installed")
    ph = phantom("covid", slices=6, matrix=64)
    w = write_series(tmp_path, ph, SeriesOptions(transfer_syntax=ts, signed=signed))  # type: ignore[arg-type]
    assert w.transfer_syntax_uid == str(TRANSFER_SYNTAXES[ts])
    by_uid = {d.SOPInstanceUID: d for d in read_series(w.files)}
    for k, uid in enumerate(w.sop_instance_uids):
        d = by_uid[uid]
        assert d.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[ts]
        assert d.PixelRepresentation == (1 if signed else 0)
        assert np.array_equal(hu_of(d), ph.hu[k])


@pytest.mark.skipif(not DCIODVFY.is_file(), reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.parametrize("ts", sorted(TRANSFER_SYNTAXES))
def test_dciodvfy_no_errors(tmp_path: Path, ts: str) -> None:
    if ts == "jpeg-lossless" and not HAS_DCMCJPEG:
        pytest.skip("dcmtk's dcmcjpeg not installed")
    ph = phantom("pneumonia", slices=3, matrix=64)
    contrast = make_phantom(PhantomSpec(kind="normal", slices=3, matrix=64, seed=1, contrast=True, fov_circle=True))
    for i, p in enumerate((ph, contrast)):
        w = write_series(tmp_path / str(i), p, SeriesOptions(transfer_syntax=ts, orientation="FFS" if i else "HFS",  # type: ignore[arg-type]
                                                             ffs_convention="mirrored", signed=bool(i)))
        res = subprocess.run([str(DCIODVFY), str(w.files[0])], capture_output=True, text=True, timeout=60)
        out = res.stdout + res.stderr
        assert "CTImage" in out
        assert not [line for line in out.splitlines() if "Error" in line], out


def test_required_attributes(tmp_path: Path) -> None:
    ph = phantom("normal")
    w = write_series(tmp_path, ph, SeriesOptions(patient_id="P1", accession_number="A1", series_number=7))
    d = pydicom.dcmread(w.files[0])
    assert d.SOPClassUID == pydicom.uid.CTImageStorage
    assert list(d.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert d.Modality == "CT" and d.BodyPartExamined == "CHEST"
    assert d.Manufacturer == "lungnode synthetic phantom"
    assert d.ConvolutionKernel in ("SMOOTH", "STANDARD", "SHARP")
    assert float(d.SliceThickness) == pytest.approx(ph.params["slice_thickness_mm"])
    assert d.PatientID == "P1" and d.AccessionNumber == "A1" and d.SeriesNumber == 7
    assert "SYNTH" in str(d.PatientName)
    assert d.InstanceNumber == 1
    assert len({pydicom.dcmread(f).SOPInstanceUID for f in w.files}) == len(w.files)
    assert len({pydicom.dcmread(f).InstanceNumber for f in w.files}) == len(w.files)


def test_uids_deterministic_or_given(tmp_path: Path) -> None:
    ph = phantom("normal")
    a = write_series(tmp_path / "a", ph, SeriesOptions(seed=3, write_truth=False))
    b = write_series(tmp_path / "b", ph, SeriesOptions(seed=3, write_truth=False))
    assert a.sop_instance_uids == b.sop_instance_uids and a.study_instance_uid == b.study_instance_uid
    c = write_series(tmp_path / "c", ph, SeriesOptions(seed=None, study_instance_uid="1.2.3.4", write_truth=False))
    assert c.study_instance_uid == "1.2.3.4" and c.sop_instance_uids != a.sop_instance_uids
    assert pydicom.dcmread(c.files[0]).StudyInstanceUID == "1.2.3.4"
    # the same seed with a series UID given by hand is another series: its images have their own UIDs
    d = write_series(tmp_path / "d", ph, SeriesOptions(seed=3, series_instance_uid="1.2.3.5", write_truth=False))
    assert d.series_instance_uid == "1.2.3.5" and not set(d.sop_instance_uids) & set(a.sop_instance_uids)


def patient_points(ds: pydicom.Dataset, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """LPS coordinates (n, 3) of pixels (row, column) through IPP/IOP/PixelSpacing (PS3.3 C.7.6.2.1.1)."""
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)  # row spacing, column spacing
    return ipp + np.outer(cols * dc, iop[:3]) + np.outer(rows * dr, iop[3:])


@pytest.mark.parametrize("orientation,convention", [("HFS", "radiological"), ("FFS", "mirrored"), ("FFS", "radiological")])
def test_geometry_right_lung_on_patient_right(tmp_path: Path, orientation: str, convention: str) -> None:
    import SimpleITK as sitk

    ph = phantom("covid", slices=24, matrix=96)
    w = write_series(tmp_path, ph, SeriesOptions(orientation=orientation, ffs_convention=convention))  # type: ignore[arg-type]
    dss = read_series(w.files)
    iop = [float(v) for v in dss[0].ImageOrientationPatient]
    expected = [-1.0, 0, 0, 0, 1, 0] if (orientation, convention) == ("FFS", "mirrored") else [1.0, 0, 0, 0, 1, 0]
    assert iop == expected
    assert all(d.PatientPosition == orientation for d in dss)
    normal = np.cross(iop[:3], iop[3:])
    # sort by position along the slice normal; spacing equals the phantom's slice spacing
    dss.sort(key=lambda d: float(np.dot(normal, [float(v) for v in d.ImagePositionPatient])))
    pos = np.array([[float(v) for v in d.ImagePositionPatient] for d in dss])
    steps = np.abs(np.diff(pos @ normal))
    assert np.allclose(steps, ph.spacing_mm[0], atol=1e-3)
    assert np.allclose(pos[:, :2], pos[0, :2])
    lungs = sitk.GetArrayFromImage(sitk.ReadImage(str(w.truth_files["lungs"])))
    truth = json.loads(w.truth_files["truth"].read_text())
    x_right: list[np.ndarray] = []
    x_left: list[np.ndarray] = []
    for d in dss:
        k = truth["sop_to_index"][d.SOPInstanceUID]
        lab = lungs[k]
        assert np.array_equal(hu_of(d), ph.hu[k][:, ::-1] if iop[0] < 0 else ph.hu[k])
        for value, acc in ((1, x_right), (2, x_left)):
            r, c = np.nonzero(lab == value)
            if r.size:
                acc.append(patient_points(d, r, c)[:, 0])
    xr, xl = np.concatenate(x_right), np.concatenate(x_left)
    # LPS: the patient's right is -x, whatever the table position or pixel layout
    assert xr.mean() < 0 < xl.mean()
    assert np.mean(xr < 0) > 0.97 and np.mean(xl > 0) > 0.97


@pytest.mark.parametrize("orientation,convention", [("HFS", "radiological"), ("FFS", "mirrored"), ("FFS", "radiological")])
def test_nifti_geometry_matches_dicom(tmp_path: Path, orientation: str, convention: str) -> None:
    import SimpleITK as sitk

    ph = phantom("normal", slices=10, matrix=48)
    w = write_series(tmp_path, ph, SeriesOptions(orientation=orientation, ffs_convention=convention))  # type: ignore[arg-type]
    img = sitk.ReadImage(str(w.truth_files["lesions"]))
    assert img.GetSize() == (48, 48, 10)
    by_uid = {d.SOPInstanceUID: d for d in read_series(w.files)}
    for k in (0, 9):
        d = by_uid[w.sop_instance_uids[k]]
        for r, c in ((0, 0), (5, 40), (47, 3)):
            p_nii = np.array(img.TransformIndexToPhysicalPoint((c, r, k)))
            p_dcm = patient_points(d, np.array([r]), np.array([c]))[0]
            assert np.allclose(p_nii, p_dcm, atol=1e-3)


def test_truth_json(tmp_path: Path) -> None:
    ph = phantom("covid")
    w = write_series(tmp_path, ph, SeriesOptions(instance_order="feet_to_head"))
    truth = json.loads((tmp_path / "truth" / "truth.json").read_text())
    assert truth["kind"] == "covid" and truth["seed"] == 1
    assert truth["volumes_ml"] == ph.volumes_ml
    assert truth["sop_instance_uids"] == list(w.sop_instance_uids)
    assert truth["sop_to_index"] == {u: k for k, u in enumerate(w.sop_instance_uids)}
    assert truth["spec"]["kind"] == "covid"
    # feet_to_head: instance 1 is the lowest slice
    d1 = pydicom.dcmread(tmp_path / "IM00001.dcm")
    assert d1.SOPInstanceUID == w.sop_instance_uids[0]
    assert sorted(p.name for p in tmp_path.glob("*.dcm")) == [f"IM{i:05d}.dcm" for i in range(1, 25)]


def test_jpeg_lossless_without_dcmcjpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import node.synthetic.dicom as dicom_mod

    monkeypatch.setattr(dicom_mod, "DCMCJPEG_CANDIDATES", ("/nonexistent/dcmcjpeg",))
    monkeypatch.setattr(dicom_mod.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="dcmtk"):
        write_series(tmp_path, phantom("normal"), SeriesOptions(transfer_syntax="jpeg-lossless"))


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "series"
    rc = synth_main([str(out), "--kind", "pneumonia", "--slices", "12", "--matrix", "64", "--seed", "4",
                     "--orientation", "FFS", "--ffs-convention", "mirrored", "--transfer-syntax", "rle", "--patient-id", "CLI1"])
    assert rc == 0
    files = sorted(out.glob("IM*.dcm"))
    assert len(files) == 12
    d = pydicom.dcmread(files[0])
    assert d.PatientID == "CLI1" and d.PatientPosition == "FFS"
    assert [float(v) for v in d.ImageOrientationPatient] == [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert (out / "truth" / "truth.json").is_file()
    assert synth_main([str(tmp_path / "bad"), "--kind", "normal", "--variant", "lobar"]) == 2


def test_lungnode_synth_takes_options_before_the_folder(tmp_path: Path) -> None:
    """`lungnode synth --slices 8 OUT` (options first) once failed: the top-level parser reordered them."""
    from node.cli import main as cli_main

    assert cli_main(["synth", "--kind", "normal", "--slices", "8", "--matrix", "64", str(tmp_path / "a")]) == 0
    assert len(list((tmp_path / "a").glob("IM*.dcm"))) == 8
    assert cli_main(["synth", str(tmp_path / "b"), "--slices", "6", "--matrix", "64"]) == 0
    assert len(list((tmp_path / "b").glob("IM*.dcm"))) == 6
