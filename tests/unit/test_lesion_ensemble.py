"""Averaged lesion networks (``models.train.ensemble_lesion``): one ONNX graph that the node loads like any
lesion model and whose output is the mean of its members' outputs (skipped without torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from node.pipeline.infer import check_role, load_model


def test_built_ensemble_is_the_mean_of_its_members(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch", reason="torch is not installed (training-only dependency; CI does not install it)")
    import models.train.data_lesion as data_lesion
    from models.train.ensemble_lesion import build
    from models.train.eval_lesion import onnx_runner
    from models.train.train_lesion import train

    monkeypatch.setattr(data_lesion, "CACHE", tmp_path / "cache")
    members = []
    for seed in (0, 1):
        out = tmp_path / f"m{seed}" / "lesion_seg"
        train(out, epochs=1, seed=seed, phantoms=1, val_phantoms=1, size=64, base=4, batch=4, reps=0, n_ph=8,
              crop=32, medseg=False, slices=8, matrix=96, depth=3, log=lambda s: None)
        members.append(out)
    ens_dir = tmp_path / "ens" / "lesion_seg"
    build(members, ens_dir, "9.9.9", log=lambda s: None)

    model = load_model(ens_dir, device="cpu", threads=1)  # schema and sha256, as the node checks them
    check_role(model.manifest, "lesion")
    assert model.manifest.version == "9.9.9"
    training = model.manifest.training or {}
    assert [m["seed"] for m in training["ensemble"]["members"]] == [0, 1]
    x = np.random.default_rng(3).random((4, 1, 64, 64), dtype=np.float32)
    outs = [onnx_runner(m / "model.onnx", threads=1)(x) for m in members]
    assert np.abs(outs[0] - outs[1]).max() > 1e-3  # the members differ, so the mean is a real test
    np.testing.assert_allclose(model.run(x), (outs[0] + outs[1]) / 2.0, atol=1e-5)


def test_score_without_folds_gives_the_phantom_figure_alone(tmp_path: Path) -> None:
    """``score --members M`` (no ``--cv``) scores the validation phantoms only, as the node's lesion step does."""
    import json

    from models.train.data_lesion import phantom_volume
    from models.train.ensemble_lesion import main
    from models.train.eval_lesion import dice, phantom_series_labels, val_seeds

    member = Path(__file__).resolve().parents[2] / "models" / "lesion_seg"
    out = tmp_path / "scores.json"
    assert main(["score", "--members", str(member), "--phantoms", "1", "--out", str(out)]) == 0
    scores = json.loads(out.read_text())["scores"]
    assert set(scores) == {"seed0", "ensemble"} and all(set(v) == {"synthetic_val"} for v in scores.values())

    seed, kind = val_seeds(1)[0]
    hu, lungs, lesions, args = phantom_volume(seed, kind)
    model = load_model(member, device="cpu", threads=1)
    pred = phantom_series_labels(model.run, hu, lungs, model.manifest, args)
    assert scores["seed0"]["synthetic_val"] == pytest.approx(dice(pred, lesions)["infection"], abs=1e-4)
