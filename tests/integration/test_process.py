"""``lungnode process DIR --out OUT`` as a subprocess: selection across a study, refusal with a
reason, and the real LIDC-IDRI-0001 CT through the whole path with the tiny test models."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from tests.helpers.faults import phantom, synth_series, write_scout
from tests.helpers.node_proc import run_cli
from tests.helpers.onnx_models import make_models_dir

RESULT_KEYS = {"status", "reason", "series_instance_uid", "qa", "models", "probabilities", "lung_volume_ml",
               "lesion_volume_ml", "involvement_percent", "timings_s"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_models_dir(tmp_path_factory.mktemp("models"))


def run_process(folder: Path, out: Path, models: Path, timeout: float = 120) -> tuple[subprocess.CompletedProcess[str],
                                                                                       dict[str, Any]]:
    proc = run_cli("process", folder, "--out", out, timeout=timeout,
                   env={"LUNGNODE_INFERENCE__MODELS_DIR": str(models), "LUNGNODE_INFERENCE__DEVICE": "cpu"})
    path = out / "result.json"
    assert path.is_file(), f"no result.json (exit {proc.returncode}):\n{proc.stderr}"
    return proc, json.loads(path.read_text())


def test_study_with_two_series_analyses_the_thin_lung_kernel_one(tmp_path: Path, models: Path) -> None:
    study = tmp_path / "study"
    study_uid = generate_uid()
    thin = synth_series(study / "thin", phantom(slices=40, matrix=96, seed=5, slice_thickness_mm=1.25, kernel="sharp"),
                        study_instance_uid=study_uid, series_number=3, series_description="Thorax 1.25 lung")
    thick = synth_series(study / "thick", phantom(slices=40, matrix=96, seed=5, slice_thickness_mm=5.0, kernel="smooth"),
                         study_instance_uid=study_uid, series_number=2, series_description="Thorax 5.0 soft tissue")
    assert (study / "thin" / "truth" / "truth.json").is_file()  # non-DICOM files in the folder are ignored

    proc, result = run_process(study, tmp_path / "out", models)
    assert proc.returncode == 0, proc.stderr
    assert RESULT_KEYS <= set(result)
    assert result["status"] == "ok" and result["reason"] is None
    assert result["series_instance_uid"] == thin.series_uid
    skipped = [q for q in result["qa"] if q["code"].startswith("skipped_")]
    assert len(skipped) == 1
    assert skipped[0]["code"] == "skipped_not_best" and skipped[0]["severity"] == "flag"
    assert thick.series_uid in skipped[0]["reason"] and thin.series_uid in skipped[0]["reason"]
    assert f"skipped series {thick.series_uid}" in proc.stderr
    assert f"analysing series {thin.series_uid} (40 images)" in proc.stderr
    assert set(result["probabilities"]) == {"covid19", "other_pneumonia", "no_pneumonia"}
    assert not [q for q in result["qa"] if q["severity"] == "refuse"]


def test_scout_only_folder_is_rejected_with_the_reason(tmp_path: Path, models: Path) -> None:
    folder = tmp_path / "scout"
    write_scout(folder / "IM00001.dcm")
    (folder / "notes.txt").write_text("not DICOM")
    proc, result = run_process(folder, tmp_path / "out", models)
    assert proc.returncode == 3, proc.stderr
    assert result["status"] == "rejected"
    assert "no series qualifies for analysis" in result["reason"]
    assert "ImageType ORIGINAL/PRIMARY/LOCALIZER holds LOCALIZER" in result["reason"]
    assert result["probabilities"] is None
    assert "rejected: no series qualifies" in proc.stderr
    assert "ignored 1 of 2 files" in proc.stderr
    # as in the node: a series the selection skips gets no SR unless outputs.sr_for_skipped_series is set
    assert not (tmp_path / "out" / "sr.dcm").exists()
    assert json.loads((tmp_path / "out" / "outputs.json").read_text())["objects"] == []


def test_a_localizer_filed_first_in_the_axial_series_is_left_out(tmp_path: Path, models: Path) -> None:
    """Judged by its first image, the series was refused for the localizer's ImageType; a worker judges it by an
    axial image, whatever order the files are in, and so does ``process``."""
    import pydicom

    series = synth_series(tmp_path / "study" / "axial", phantom(slices=40, matrix=96, seed=5))
    scout = pydicom.dcmread(write_scout(tmp_path / "scout.dcm", study_uid=series.study_uid))
    scout.SeriesInstanceUID = series.series_uid
    first = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    scout.PatientID, scout.PatientName = first.PatientID, first.PatientName
    scout.save_as(tmp_path / "study" / "axial" / "AA00000.dcm", enforce_file_format=True)  # sorted first
    proc, result = run_process(tmp_path / "study", tmp_path / "out", models)
    assert proc.returncode == 0, proc.stderr
    assert result["status"] == "ok" and result["series_instance_uid"] == series.series_uid
    assert [q["code"] for q in result["qa"] if q["code"] == "localizer_left_out"] == ["localizer_left_out"]


def test_empty_folder_is_rejected(tmp_path: Path, models: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("nothing here")
    proc, result = run_process(tmp_path / "empty", tmp_path / "out", models)
    assert proc.returncode == 3
    assert result["status"] == "rejected" and "no DICOM images found" in result["reason"]


@pytest.mark.parametrize("problem", ["no input", "out is a file", "no models"])
def test_usage_and_setup_errors_exit_2_and_write_nothing(tmp_path: Path, models: Path, problem: str) -> None:
    """Told apart from a refused study (exit 3): a script can see it was called wrongly."""
    series = tmp_path / "ct"
    if problem != "no input":
        write_scout(series / "IM00001.dcm")
    out = tmp_path / "out"
    if problem == "out is a file":
        out.write_text("")
    env = {"LUNGNODE_INFERENCE__MODELS_DIR": str(tmp_path / "no-models" if problem == "no models" else models),
           "LUNGNODE_INFERENCE__DEVICE": "cpu"}
    proc = run_cli("process", series, "--out", out, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    expected = {"no input": "does not exist", "out is a file": "is a file", "no models": "does not exist"}[problem]
    assert expected in proc.stderr
    assert not out.is_dir() or not any(out.iterdir())


def test_damaged_image_gives_a_failed_result_not_a_traceback(tmp_path: Path, models: Path) -> None:
    s = synth_series(tmp_path / "damaged", phantom(slices=40, matrix=64, seed=1))
    victim = s.files[10]
    victim.write_bytes(victim.read_bytes()[:-2000])  # pixel data cut short (headers still parse)
    proc = run_cli("process", s.folder, "--out", tmp_path / "out",
                   env={"LUNGNODE_INFERENCE__MODELS_DIR": str(models), "LUNGNODE_INFERENCE__DEVICE": "cpu"})
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode in (1, 3)
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["status"] in ("failed", "rejected") and result["reason"]


def test_real_lidc_ct_goes_through_the_whole_path(lidc_0001: Path, tmp_path: Path, models: Path) -> None:
    proc, result = run_process(lidc_0001, tmp_path / "out", models, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert RESULT_KEYS <= set(result)
    assert result["status"] == "ok" and result["reason"] is None
    assert result["series_instance_uid"].startswith("1.3.6.1.4.1.14519.5.2.1.6279.6001.")
    assert "(133 images)" in proc.stderr
    assert not [q for q in result["qa"] if q["severity"] == "refuse"]
    assert "partial_lung_coverage" not in {q["code"] for q in result["qa"]}
    assert set(result["probabilities"]) == {"covid19", "other_pneumonia", "no_pneumonia"}
    for key in ("lung_volume_ml", "lesion_volume_ml", "involvement_percent"):
        assert isinstance(result[key], dict) and "total" in result[key]
    assert {"volume", "coverage", "lung_seg", "lesion_seg", "diagnosis", "measure", "total"} <= set(result["timings_s"])


def test_images_of_two_studies_are_refused_not_mixed(tmp_path: Path, models: Path) -> None:
    """One result must not mix patients: the folder of two studies is a usage error (exit 2), nothing written."""
    folder = tmp_path / "two"
    synth_series(folder / "a", phantom(slices=8, matrix=32, seed=1))
    synth_series(folder / "b", phantom(slices=8, matrix=32, seed=2))
    out = tmp_path / "out"
    proc = run_cli("process", folder, "--out", out, env={"LUNGNODE_INFERENCE__MODELS_DIR": str(models)})
    assert proc.returncode == 2, proc.stderr
    assert "holds images of 2 studies" in proc.stderr and "one study at a time" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "result.json").exists()


def test_a_rerun_into_the_same_folder_leaves_nothing_of_the_earlier_study(tmp_path: Path, models: Path) -> None:
    out = tmp_path / "out"
    synth_series(tmp_path / "ct", phantom(slices=40, matrix=96, seed=5, slice_thickness_mm=1.25))
    proc, first = run_process(tmp_path / "ct", out, models)
    assert proc.returncode == 0 and first["status"] == "ok", proc.stderr
    earlier = [o["file"] for o in json.loads((out / "outputs.json").read_text())["objects"]]
    assert "seg.dcm" in earlier and all((out / name).is_file() for name in earlier)
    (out / "notes.txt").write_text("the operator's own file")
    write_scout(tmp_path / "scout" / "IM00001.dcm")
    proc, second = run_process(tmp_path / "scout", out, models)
    assert proc.returncode == 3 and second["status"] == "rejected"
    assert f"removed {len(earlier) + 2} files of an earlier run" in proc.stderr
    assert not any((out / name).exists() for name in earlier)  # no SEG or SR of the other study beside it
    assert (out / "notes.txt").is_file()


def test_a_copy_of_an_image_is_one_slice_not_two(tmp_path: Path, models: Path) -> None:
    """`cp IM00010.dcm copy.dcm` in the folder, or a copy cut short: one instance is one slice (it was refused as
    'slice positions occur twice')."""
    import shutil

    synth = synth_series(tmp_path / "ct", phantom(slices=40, matrix=96, seed=5, slice_thickness_mm=1.25))
    shutil.copy(synth.files[10], tmp_path / "ct" / "copy_of_10.dcm")
    (tmp_path / "ct" / "a_cut_copy.dcm").write_bytes(synth.files[11].read_bytes()[:20_000])
    proc, result = run_process(tmp_path / "ct", tmp_path / "out", models)
    assert proc.returncode == 0 and result["status"] == "ok", proc.stderr
    assert "ignored 2 copies of images already found" in proc.stderr


def test_when_the_preferred_series_is_refused_the_next_one_is_analysed(tmp_path: Path, models: Path) -> None:
    """As in the node (node.pipeline.siblings): the thin series, preferred, misses a slice; the thick one is
    analysed, and the result says why the thin one gave none."""
    study = tmp_path / "study"
    study_uid = generate_uid()
    thin = synth_series(study / "thin", phantom(slices=48, matrix=96, seed=5, slice_thickness_mm=1.25, kernel="sharp"),
                        study_instance_uid=study_uid, series_number=3)
    thick = synth_series(study / "thick", phantom(slices=40, matrix=96, seed=5, slice_thickness_mm=5.0, kernel="smooth"),
                         study_instance_uid=study_uid, series_number=2)
    thin.file_of_index(20).unlink()  # 47 slices: enough for selection (40), one missing for the checks

    proc, result = run_process(study, tmp_path / "out", models)
    assert proc.returncode == 0, proc.stderr
    assert result["status"] == "ok" and result["series_instance_uid"] == thick.series_uid
    [tried] = [q for q in result["qa"] if q["code"].startswith("tried_")]
    assert tried["code"] == "tried_rejected" and tried["severity"] == "flag"
    assert tried["reason"].startswith(f"series {thin.series_uid}, preferred to this one, was analysed and was "
                                      "refused by its checks: ") and "1 slice(s) missing" in tried["reason"]
    assert not [q for q in result["qa"] if q["code"].startswith("skipped_")]  # the thin one is not "not analysed"
    assert proc.stderr.index(f"analysing series {thin.series_uid}") < proc.stderr.index(
        f"analysing series {thick.series_uid}")
    assert "the next series is analysed" in proc.stderr
