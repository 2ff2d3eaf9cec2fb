"""Every model folder shipped in models/: intact (sha256), small, current opset, documented.

Model-specific behaviour (Dice, classification, parity) is tested per model in
test_lung_model.py, test_lesion_model.py and test_diagnosis_model.py.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from node.config import InferenceSettings
from node.pipeline.infer import check_role, load_model, model_name, pairing_warnings
from node.pipeline.manifest import MANIFEST_FILE, ONNX_FILE, load_manifest

MODELS = Path(__file__).resolve().parents[2] / "models"
FOLDERS = sorted(p.parent for p in MODELS.glob(f"*/{MANIFEST_FILE}"))
MAX_BYTES = 10 * 1024 * 1024


def test_the_default_configuration_finds_a_shipped_model_for_every_role() -> None:
    settings = InferenceSettings()
    assert settings.models_dir.resolve() == MODELS.resolve()
    for role in ("lung", "lesion", "diagnosis"):
        folder = MODELS / model_name(settings, role)
        assert (folder / MANIFEST_FILE).is_file(), f"no shipped model for the {role} role in {folder}"
        model = load_model(folder, device="cpu", threads=1)  # hash, tensors and manifest checked on load
        check_role(model.manifest, role)
    assert pairing_warnings(settings) == [], "the shipped models are the pairs their cards were measured with"
    assert load_manifest(MODELS / "diagnosis").paired_with  # it reads the lesion map: says which model's


@pytest.mark.parametrize("folder", FOLDERS, ids=[f.name for f in FOLDERS])
def test_model_folder_is_intact_small_and_documented(folder: Path) -> None:
    manifest = load_manifest(folder)  # raises when model.onnx does not match the manifest's sha256
    onnx_path = folder / ONNX_FILE
    assert onnx_path.stat().st_size < MAX_BYTES, f"{onnx_path} is over 10 MB"
    proto = onnx.load(str(onnx_path), load_external_data=False)
    opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 17
    assert manifest.not_for_clinical_use
    assert manifest.metrics, "the manifest must carry the measured metrics"
    assert manifest.training, "the manifest must say how the model was trained"
    card = (folder / "CARD.md").read_text(encoding="utf-8").lower()
    assert "not for clinical use" in card or "not cleared for clinical use" in card
    for heading in ("intended use", "data", "training", "metrics", "limits"):
        assert heading in card, f"CARD.md has no section on {heading}"
    assert not (folder / "weights.pt").exists(), "training checkpoints are not shipped"
