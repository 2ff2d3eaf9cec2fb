"""Model manifests (models/<name>/model.yaml): strict validation whose messages name the field and
the file, label index rules, and the sha256 check that ties a manifest to its exact model.onnx."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from node.pipeline.manifest import ManifestError, ModelManifest, load_manifest, parse_manifest
from tests.helpers.onnx_models import cls3d_manifest, deep_merge, make_cls3d, make_seg2d, seg2d_manifest


def manifest_error(data: dict[str, Any]) -> str:
    """The ManifestError text for manifest content (as if read from /m/lung_seg/model.yaml)."""
    with pytest.raises(ManifestError) as info:
        parse_manifest(data, Path("/m/lung_seg/model.yaml"))
    return str(info.value)


def edited(**changes: Any) -> dict[str, Any]:
    return deep_merge(seg2d_manifest("lung_seg"), changes)


# -- valid manifests ----------------------------------------------------------------------------
def test_seg2d_manifest_loads_with_its_fields(tmp_path: Path) -> None:
    m = load_manifest(make_seg2d(tmp_path / "lung_seg"))
    assert isinstance(m, ModelManifest)
    assert (m.name, m.task, m.input.layout, m.input.size) == ("lung_seg", "segmentation", "NCHW", [32, 32])
    assert m.input.rank == 4
    assert (m.input.window.level, m.input.window.width) == (-450.0, 1350.0)
    assert m.output.label_names == ["background", "right_lung", "left_lung"]
    assert m.output.label_index("left_lung") == 2
    right = m.output.labels[1].snomed
    assert right is not None and (right.code, right.scheme) == ("3341006", "SCT")
    assert right.to_code().value == "3341006"
    assert m.algorithm.family_code().value == "123110"  # CID 7162 Artificial Intelligence
    assert m.postprocessing["keep_largest_components"] == 2
    assert m.output_rank == 4


def test_cls3d_manifest_loads(tmp_path: Path) -> None:
    m = load_manifest(make_cls3d(tmp_path / "diagnosis", channels=2))
    assert m.task == "classification" and m.input.rank == 5 and m.output_rank == 2
    assert m.input.channels == ["ct", "lesion_map"]
    assert m.input.spacing_mm == [5.0, 2.0, 2.0]
    assert m.metrics == {"test_auc": 1.0}


def test_labels_are_kept_in_index_order() -> None:
    data = seg2d_manifest("lung_seg")
    data["output"]["labels"].reverse()
    m = parse_manifest(data, Path("x.yaml"))
    assert [label.index for label in m.output.labels] == [0, 1, 2]


def test_dynamic_size_and_uppercase_hash_accepted() -> None:
    m = parse_manifest(edited(sha256="AB" * 32, input={"size": [None, None]}), Path("x.yaml"))
    assert m.input.size == [None, None]
    assert m.sha256 == "ab" * 32


# -- validation messages name the field and the file ----------------------------------------------
def test_unknown_top_level_key_refused() -> None:
    text = manifest_error(edited(threshold=0.5))
    assert "/m/lung_seg/model.yaml" in text
    assert "threshold: unknown key" in text


def test_unknown_nested_key_refused() -> None:
    text = manifest_error(edited(input={"windw": {"level": 0, "width": 1}}))
    assert "input.windw: unknown key (did you mean window?)" in text


def test_missing_field_named() -> None:
    data = seg2d_manifest("lung_seg")
    del data["intended_use"]
    assert "intended_use: Field required" in manifest_error(data)


def test_label_without_code_named() -> None:
    data = seg2d_manifest("lung_seg")
    del data["output"]["labels"][1]["snomed"]
    text = manifest_error(data)
    assert "output.labels[1]" in text and "right_lung" in text and "snomed" in text


def test_missing_code_meaning_named() -> None:
    data = seg2d_manifest("lung_seg")
    del data["output"]["labels"][2]["snomed"]["meaning"]
    assert "output.labels[2].snomed.meaning: Field required" in manifest_error(data)


def test_not_for_clinical_use_must_be_true() -> None:
    text = manifest_error(edited(not_for_clinical_use=False))
    assert "not_for_clinical_use: " in text and "must be true" in text


def test_strict_types_version_float_refused_with_hint() -> None:
    text = manifest_error(edited(version=1.0))
    assert "version: Input should be a valid string" in text and "quote it in YAML" in text


def test_bad_version_and_hash_formats() -> None:
    assert "version: String should match pattern" in manifest_error(edited(version="latest"))
    assert "sha256: String should match pattern" in manifest_error(edited(sha256="abc"))


def test_task_and_activation_enums() -> None:
    assert "task: Input should be 'segmentation' or 'classification'" in manifest_error(edited(task="detection"))
    assert "output.activation: " in manifest_error(edited(output={"activation": "relu"}))


def test_duplicate_label_index_refused() -> None:
    data = seg2d_manifest("lung_seg")
    data["output"]["labels"][2]["index"] = 1
    text = manifest_error(data)
    assert "output.labels: " in text and "more than once: [1]" in text


def test_label_indices_must_be_contiguous_from_zero() -> None:
    data = seg2d_manifest("lung_seg")
    data["output"]["labels"][2]["index"] = 5
    assert "must be 0..2 without gaps, got [0, 1, 5]" in manifest_error(data)


def test_size_must_fit_layout() -> None:
    text = manifest_error(edited(input={"size": [8, 32, 32]}))
    assert "input: " in text and "size has 3 values but layout NCHW has 2 spatial dimensions" in text


def test_spacing_must_fit_layout_and_be_positive() -> None:
    assert "spacing_mm has 3 values" in manifest_error(edited(input={"spacing_mm": [1.0, 1.0, 1.0]}))
    assert "input.spacing_mm: " in manifest_error(edited(input={"spacing_mm": [0.0, 1.0]}))


def test_window_width_positive_and_size_positive() -> None:
    text = manifest_error(edited(input={"window": {"level": 0, "width": 0}}))
    assert "input.window.width: Input should be greater than 0" in text
    assert "input.size: " in manifest_error(edited(input={"size": [0, 32]}))


def test_algorithm_family_from_cid7162() -> None:
    text = manifest_error(edited(algorithm={"family": "Magic"}))
    assert "algorithm.family: " in text and "CID 7162" in text


def test_preprocessing_values_are_scalars() -> None:
    assert "preprocessing: crop: must be a number, string or boolean, got dict" in manifest_error(
        edited(preprocessing={"crop": {"nested": 1}})
    )


@pytest.mark.parametrize("value", ["two", -1.0, True])
def test_sizes_the_pipeline_reads_must_be_numbers(value: object) -> None:
    msg = manifest_error(edited(postprocessing={"smooth_z_sigma_mm": value}))
    assert f"postprocessing: smooth_z_sigma_mm: must be a number of 0 or more, got {value!r}" in msg


# -- files on disk ------------------------------------------------------------------------------
def test_sha256_mismatch_caught(tmp_path: Path) -> None:
    folder = make_seg2d(tmp_path / "lung_seg")
    onnx_path = folder / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")
    with pytest.raises(ManifestError) as info:
        load_manifest(folder)
    text = str(info.value)
    assert f"{onnx_path} sha256 is " in text
    assert "manifest says " in text and "the file was changed or the manifest not updated" in text
    assert load_manifest(folder, check_hash=False).name == "lung_seg"


def test_missing_files_and_folders(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist: check inference.models_dir"):
        load_manifest(tmp_path / "nope")
    folder = make_seg2d(tmp_path / "lung_seg")
    (folder / "model.onnx").unlink()
    with pytest.raises(ManifestError, match="model.onnx is missing"):
        load_manifest(folder)
    (folder / "model.yaml").unlink()
    with pytest.raises(ManifestError, match="model.yaml is missing"):
        load_manifest(folder)


def test_name_must_match_folder(tmp_path: Path) -> None:
    folder = make_seg2d(tmp_path / "lung_seg", overrides={"name": "lung_v2"})
    with pytest.raises(ManifestError, match="name: is 'lung_v2' but the folder is 'lung_seg'"):
        load_manifest(folder)


def test_invalid_yaml_and_non_mapping(tmp_path: Path) -> None:
    folder = make_seg2d(tmp_path / "lung_seg")
    (folder / "model.yaml").write_text("name: [unclosed\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="is not valid YAML"):
        load_manifest(folder)
    (folder / "model.yaml").write_text(yaml.safe_dump(["a", "b"]), encoding="utf-8")
    with pytest.raises(ManifestError, match="top level must be a mapping"):
        load_manifest(folder)


def test_manifest_is_immutable() -> None:
    m = parse_manifest(cls3d_manifest("diagnosis"), Path("x.yaml"))
    with pytest.raises(ValueError):
        m.version = "9.9.9"
