"""The lung model's training pipeline (models/train): data, flip augmentation, export, manifest, parity.

Needs torch, which CI does not install: the whole module is skipped there with that reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (training-only dependency; CI does not install it)")

from models.train.data_lung import augment, flip_lr, phantom_samples  # noqa: E402
from models.train.train_lung import parity, train  # noqa: E402
from node.pipeline.infer import load_model  # noqa: E402
from node.pipeline.manifest import load_manifest  # noqa: E402


def _asymmetric() -> tuple[np.ndarray, np.ndarray]:
    x = np.zeros((16, 16), dtype=np.float32)
    y = np.zeros((16, 16), dtype=np.uint8)
    x[4:12, 1:6] = 0.2  # patient right (low columns): a big right lung
    y[4:12, 1:6] = 1
    x[6:9, 12:14] = 0.3  # patient left: a small left lung
    y[6:9, 12:14] = 2
    return x, y


def test_flip_mirrors_image_and_swaps_right_left() -> None:
    x, y = _asymmetric()
    xf, yf = flip_lr(x, y)
    assert np.array_equal(xf, x[:, ::-1])
    # the big lung now lies at high columns, where a left lung belongs: it must be labelled left (2)
    assert set(np.unique(yf[4:12, 10:15])) == {2}
    assert (yf == 2).sum() == (y == 1).sum() and (yf == 1).sum() == (y == 2).sum()
    assert set(np.unique(yf[6:9, 2:4])) == {1}
    # flipping twice is the identity
    x2, y2 = flip_lr(xf, yf)
    assert np.array_equal(x2, x) and np.array_equal(y2, y)


def test_augment_flip_only_keeps_labels_consistent() -> None:
    x, y = _asymmetric()
    rng = np.random.default_rng(0)
    seen_flip = False
    for _ in range(20):
        xa, ya = augment(x, y, rng, max_scale=0.0, max_rot_deg=0.0, noise=0.0)
        assert xa.shape == x.shape and ya.dtype == np.uint8
        if (ya == 1).sum() == (y == 2).sum():  # flipped
            seen_flip = True
            assert np.all(np.nonzero(ya == 2)[1] > 8) and np.all(np.nonzero(ya == 1)[1] < 8)
        else:
            assert np.array_equal(ya, y)
    assert seen_flip


def test_phantom_samples_put_right_lung_on_low_columns() -> None:
    s = phantom_samples([3], 64, slices=12, matrix=128)
    assert s.x.shape == s.y.shape == (12, 64, 64)
    assert 0.0 <= s.x.min() and s.x.max() <= 1.0
    cols_r = np.nonzero(s.y == 1)[2]
    cols_l = np.nonzero(s.y == 2)[2]
    assert cols_r.size and cols_l.size and cols_r.mean() < 32 < cols_l.mean()


def test_one_epoch_training_writes_a_loadable_model(tmp_path: Path) -> None:
    out = tmp_path / "lung_seg"
    res = train(out, epochs=1, phantoms=2, val_phantoms=1, size=64, slices=12, matrix=128, lidc=False, batch=8,
                log=lambda s: None)
    manifest = load_manifest(out)  # validates the schema and the sha256
    assert manifest.name == "lung_seg" and manifest.task == "segmentation"
    assert manifest.input.size == [64, 64] and manifest.output.label_names == ["background", "right_lung", "left_lung"]
    assert manifest.postprocessing["keep_largest_components"] == 1
    assert manifest.training and manifest.training["epochs"] == 1
    model = load_model(out, device="cpu", threads=1)
    x = res["val"].x[:5, None]
    probs = model.run(x)
    assert probs.shape == (5, 3, 64, 64)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert parity(res["model"], out / "model.onnx", res["val"].x[:7]) <= 1e-4


def test_extra_pneumonia_phantoms_and_real_weight_are_recorded(tmp_path: Path) -> None:
    out = tmp_path / "lung_seg"
    train(out, epochs=1, phantoms=1, val_phantoms=1, size=64, slices=8, matrix=128, lidc=False, batch=8,
          pneumonia_phantoms=2, log=lambda s: None)
    data = load_manifest(out).training["data"]  # type: ignore[index]
    assert data["pneumonia_phantoms"] == 2 and data["pneumonia_seeds"] == [50_000, 50_001]
    assert data["pneumonia_patterns"][:2] == ["lobar", "segmental"]
    assert data["slices"] == 3 * 8  # one random phantom and two pneumonia phantoms, every slice
