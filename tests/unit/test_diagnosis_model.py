"""The shipped diagnosis model (models/diagnosis): loads as the node loads it, matches torch, classifies.

The held-out phantoms are rendered here from seeds far from the training seeds (0..299) and the
evaluation seeds (500000+), one per class, and run through the node's own ``runner.classify`` with
their exact lung and lesion masks (a perfect lesion model). LIDC-IDRI-0001 needs ../shared/data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.train.data_diagnosis import CHANNELS, SIZE, degrade_lesions, model_input, pool, unpool
from node.pipeline.infer import DIAGNOSIS_LABELS, check_role, load_model
from node.pipeline.preprocess import lung_box, volume_input, windowed_volume
from node.pipeline.runner import classify
from node.synthetic.phantom import PhantomSpec, make_phantom
from tests.conftest import LIDC_0001

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "diagnosis"
EXPECTED = {"covid": "covid19", "pneumonia": "other_pneumonia", "normal": "no_pneumonia"}


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return load_model(MODEL_DIR, device="cpu", threads=2)  # checks the manifest schema and the sha256


@pytest.fixture(scope="module")
def phantoms() -> dict[str, object]:
    specs = {
        "covid": PhantomSpec(kind="covid", variant="mixed", severity=0.3, slices=40, matrix=192, seed=910_001),
        "pneumonia": PhantomSpec(kind="pneumonia", variant="lobar", slices=40, matrix=192, seed=910_002),
        "normal": PhantomSpec(kind="normal", variant="nodules", slices=40, matrix=192, seed=910_003),
    }
    return {kind: make_phantom(spec) for kind, spec in specs.items()}


def test_shipped_model_loads_and_plays_the_diagnosis_role(model) -> None:  # type: ignore[no-untyped-def]
    m = model.manifest
    check_role(m, "diagnosis")
    assert set(m.output.label_names) == DIAGNOSIS_LABELS and m.output.activation == "softmax"
    assert m.input.layout == "NCDHW" and m.input.size == list(SIZE) and m.input.channels == list(CHANNELS)
    assert (m.input.window.level, m.input.window.width) == (-450.0, 1350.0)
    assert all(label.snomed is not None for label in m.output.labels)
    assert (MODEL_DIR / "model.onnx").stat().st_size < 10 * 2**20
    probs = model.run(np.random.default_rng(0).random(model.input_shape(batch=2), dtype=np.float32))
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_shipped_onnx_matches_torch_on_the_same_inputs(model) -> None:  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch", reason="torch is not installed (training-only dependency; CI does not install it)")
    from models.train.train_diagnosis import torch_from_onnx

    net = torch_from_onnx(MODEL_DIR / "model.onnx")
    x = np.random.default_rng(1).random(model.input_shape(batch=2), dtype=np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    assert float(np.abs(model.run(x) - ref).max()) <= 1e-4


def test_training_input_is_the_node_input(model, phantoms) -> None:  # type: ignore[no-untyped-def]
    ph = phantoms["pneumonia"]
    lesions = (ph.lesions > 0).astype(np.float32)
    node = volume_input([windowed_volume(ph.hu, model.manifest), lesions], model.manifest, lung_box(ph.lungs > 0))
    np.testing.assert_allclose(model_input(ph.hu, ph.lungs, lesions)[None], node, atol=1e-6)


def test_degraded_lesion_map_is_pooled_inside_the_lungs_and_close_to_the_truth() -> None:
    les = np.zeros((16, 64, 64), dtype=np.uint8)
    les[4:12, 12:40, 12:40] = 255
    lung = np.zeros_like(les)
    lung[:, 4:60, 4:60] = 1
    truth = pool(les > 0) > 0.5
    changed = False
    for seed in range(8):
        out = degrade_lesions(les, lung, np.random.default_rng(seed))
        assert out.shape == (8, 16, 16) and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0
        assert not out[pool(lung) <= 0.5].any()  # false positives are placed inside the lungs only
        pred = out > 0.5
        assert 2 * (truth & pred).sum() / (truth.sum() + pred.sum()) > 0.6
        changed |= not np.array_equal(pred, truth)
    assert changed  # it does degrade


def test_pool_is_the_models_average_pooling() -> None:
    x = np.random.default_rng(2).integers(0, 256, (4, 8, 8)).astype(np.uint8)
    assert np.allclose(pool(x), x.astype(np.float64).reshape(2, 2, 2, 4, 2, 4).mean(axis=(1, 3, 5)))
    assert np.array_equal(pool(unpool(pool(x))), pool(x))


@pytest.mark.parametrize("kind", ["covid", "pneumonia", "normal"])
def test_held_out_phantom_is_classified(model, phantoms, kind: str) -> None:  # type: ignore[no-untyped-def]
    ph = phantoms[kind]
    probs = classify(ph, ph.lungs, ph.lesions, model)  # Phantom has .hu in the node's canonical orientation
    assert max(probs, key=lambda k: probs[k]) == EXPECTED[kind], probs


def test_lidc_0001_is_no_pneumonia(model, lidc_0001: Path) -> None:  # type: ignore[no-untyped-def]
    from models.train.lung_labels import label_lungs
    from node.pipeline.volume import load_volume

    assert LIDC_0001.is_file()
    vol = load_volume(sorted(lidc_0001.rglob("*.dcm")))
    lungs = label_lungs(vol.hu, vol.spacing_mm)
    probs = classify(vol, lungs, np.zeros_like(lungs), model)
    assert max(probs, key=lambda k: probs[k]) == "no_pneumonia", probs
