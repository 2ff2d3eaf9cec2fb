"""Inference: provider choice and its logged reason, one cached session per model, manifest checks at
load, batching and IO binding giving the same numbers as the NumPy reference, the HU window, and the
``lungnode models list|verify`` exit codes. Real onnxruntime sessions on tiny real ONNX models."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from io import StringIO
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from node.config import InferenceSettings
from node.errors import LungnodeError
from node.pipeline import infer
from node.pipeline.infer import (
    CPU,
    CUDA,
    InferenceDeviceError,
    ModelLoadError,
    choose_providers,
    get_model,
    load_model,
    window,
)
from node.pipeline.manifest import ManifestError, load_manifest
from node.pipeline.models_cli import DEVICE_PATTERN, models_main
from tests.helpers.onnx_models import (
    cls3d_reference,
    make_cls3d,
    make_models_dir,
    make_seg2d,
    seg2d_reference,
)

_CUDA_PROVIDERS, _CUDA_REASON = choose_providers("auto")
CUDA_USABLE = _CUDA_PROVIDERS[0] != CPU
needs_gpu = pytest.mark.skipif(not CUDA_USABLE, reason=f"CUDAExecutionProvider cannot run here: {_CUDA_REASON}")
needs_no_gpu = pytest.mark.skipif(CUDA_USABLE, reason="a working GPU is present: the no-GPU behaviour cannot be seen")


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    infer.clear_model_cache()
    yield
    infer.clear_model_cache()


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """lung_seg (32x32), lesion_seg (dynamic size), diagnosis (3D classifier) under tmp_path/models."""
    return make_models_dir(tmp_path / "models")


def rng_slices(n: int, h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, h, w), dtype=np.float32)


# -- window ---------------------------------------------------------------------------------------
def test_window_maps_level_and_width_to_unit_range() -> None:
    hu = np.array([-3000, -1125, -450, 225, 3000, -788], dtype=np.int16)
    out = window(hu, level=-450, width=1350)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0, 337 / 1350], atol=1e-6)
    assert hu[0] == -3000  # input untouched
    np.testing.assert_allclose(window(np.array([-850.0]), level=-450, width=1350), [275 / 1350], atol=1e-6)


def test_window_refuses_zero_width() -> None:
    with pytest.raises(ValueError, match="width must be positive"):
        window(np.zeros(3), level=0, width=0)


# -- provider choice ------------------------------------------------------------------------------
def test_cpu_device_uses_cpu_provider() -> None:
    assert choose_providers("cpu") == ([CPU], "CPU provider: device=cpu")


@needs_no_gpu
def test_auto_picks_cpu_on_this_machine_with_reason() -> None:
    providers, reason = choose_providers("auto")
    assert providers == [CPU]
    assert reason.startswith("CPU provider: ")
    assert "device=auto" in reason or "no GPU could be initialised" in reason
    assert "\n" not in reason


@needs_no_gpu
def test_explicit_cuda_without_gpu_is_a_clear_error() -> None:
    with pytest.raises(InferenceDeviceError) as info:
        choose_providers("cuda:0")
    text = str(info.value)
    assert isinstance(info.value, LungnodeError)
    assert text.startswith("inference.device is cuda:0 but ")
    assert "set inference.device to auto" in text or "set inference.device to auto or cpu" in text


@needs_no_gpu
def test_probe_session_without_gpu_reports_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the library check, the probe really builds a CUDA session and notices the CPU fallback."""
    monkeypatch.setattr(infer, "_cuda_library_problem", lambda: None)
    reason = infer._probe_cuda.__wrapped__(0)
    assert reason is not None and "GPU 0" in reason


def test_without_cuda_provider_auto_falls_back_and_cuda_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    assert choose_providers("auto") == ([CPU], "CPU provider: device=auto and onnxruntime has no CUDA provider")
    with pytest.raises(InferenceDeviceError, match="has no CUDA provider: install onnxruntime-gpu"):
        choose_providers("cuda")


def test_probe_failure_reason_and_success_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(infer, "_probe_cuda", lambda device_id: f"GPU {device_id} could not be initialised")
    providers, reason = choose_providers("auto")
    assert providers == [CPU]
    assert reason == (
        "CPU provider: CUDA provider present but no GPU could be initialised: GPU 0 could not be initialised"
    )
    with pytest.raises(InferenceDeviceError, match="cannot run on GPU 2: GPU 2 could not be initialised"):
        choose_providers("cuda:2")
    monkeypatch.setattr(infer, "_probe_cuda", lambda device_id: None)
    providers, reason = choose_providers("cuda:1")
    assert providers == [(CUDA, {"device_id": 1}), CPU]
    assert reason == "CUDA provider selected: device=cuda:1 and CUDA available (GPU 1)"


def test_bad_device_string() -> None:
    with pytest.raises(InferenceDeviceError, match="use auto, cpu, cuda or cuda:N"):
        choose_providers("gpu")


def test_cli_device_pattern_matches_config() -> None:
    pattern = InferenceSettings.model_fields["device"].metadata[0].pattern
    assert pattern == f"^({DEVICE_PATTERN})$"


# -- loading, the cache, manifest checks ---------------------------------------------------------------
def test_session_cache_returns_same_object(models_dir: Path) -> None:
    settings = InferenceSettings(models_dir=models_dir, device="cpu")
    first = get_model(settings, "lung")
    assert get_model(settings, "lung") is first
    assert load_model(models_dir / "lung_seg", device="cpu") is first  # threads 0 == all cores
    assert load_model(models_dir / "lung_seg", device="cpu", threads=os.cpu_count() or 1) is first
    assert load_model(models_dir / "lung_seg", device="cpu", threads=1) is not first
    assert get_model(settings, "lesion") is not first


def test_load_logs_one_info_line(models_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node.pipeline.infer")
    model = load_model(models_dir / "lung_seg", device="cpu", threads=1)
    load_model(models_dir / "lung_seg", device="cpu", threads=1)
    lines = [r.getMessage() for r in caplog.records if "event=model_loaded" in r.getMessage()]
    assert len(lines) == 1
    line = lines[0]
    for part in ("name=lung_seg", "version=0.1.0", f"provider={CPU}", 'reason="CPU provider: device=cpu"', "threads=1"):
        assert part in line
    assert model.threads == 1
    assert model.session.get_session_options().intra_op_num_threads == 1
    assert model.session.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_threads_zero_means_all_cores(models_dir: Path) -> None:
    model = load_model(models_dir / "diagnosis", device="cpu", threads=0)
    assert model.threads == os.cpu_count()


def test_input_name_mismatch_caught_at_load(tmp_path: Path) -> None:
    folder = make_seg2d(tmp_path / "lung_seg", overrides={"input": {"name": "image"}})
    with pytest.raises(ModelLoadError) as info:
        load_model(folder, device="cpu")
    text = str(info.value)
    assert "input tensor is 'ct' but the manifest's input.name is 'image'" in text
    assert "model.onnx" in text


def test_output_name_mismatch_caught_at_load(tmp_path: Path) -> None:
    folder = make_seg2d(tmp_path / "lung_seg", overrides={"output": {"name": "logits"}})
    expected = r"has no output tensor 'logits' \(manifest output.name\); its outputs are \['probs'\]"
    with pytest.raises(ModelLoadError, match=expected):
        load_model(folder, device="cpu")


def test_rank_mismatch_caught_at_load(tmp_path: Path) -> None:
    overrides = {"input": {"layout": "NCHW", "size": [16, 16], "spacing_mm": None}}
    folder = make_cls3d(tmp_path / "diagnosis", overrides=overrides)
    with pytest.raises(ModelLoadError, match="input tensor 'ct' has rank 5 but the manifest layout NCHW needs rank 4"):
        load_model(folder, device="cpu")


def test_channel_and_size_mismatch_caught_at_load(tmp_path: Path) -> None:
    folder = make_cls3d(tmp_path / "diagnosis", channels=2, overrides={"input": {"channels": ["ct"]}})
    with pytest.raises(ModelLoadError, match=r"has 2 channels but the manifest lists 1 \(\['ct'\]\)"):
        load_model(folder, device="cpu")
    folder = make_seg2d(tmp_path / "lung_seg", overrides={"input": {"size": [64, 64]}})
    with pytest.raises(ModelLoadError, match=r"spatial size \[32, 32\] but the manifest's input.size is \[64, 64\]"):
        load_model(folder, device="cpu")


def test_label_count_mismatch_caught_at_load(tmp_path: Path) -> None:
    labels = [
        {"index": 0, "name": "background"},
        {"index": 1, "name": "lung", "snomed": {"code": "39607008", "meaning": "Lung"}},
    ]
    folder = make_seg2d(tmp_path / "lung_seg", overrides={"output": {"labels": labels}})
    with pytest.raises(ModelLoadError, match="has 3 channels but the manifest lists 2 labels"):
        load_model(folder, device="cpu")


def test_corrupt_onnx_is_a_clear_error(tmp_path: Path) -> None:
    folder = make_seg2d(tmp_path / "lung_seg", overrides={"sha256": "0" * 64})
    (folder / "model.onnx").write_bytes(b"not a model")
    import hashlib

    import yaml

    data = yaml.safe_load((folder / "model.yaml").read_text())
    data["sha256"] = hashlib.sha256(b"not a model").hexdigest()
    (folder / "model.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ModelLoadError, match="The file is damaged or not a model that onnxruntime"):
        load_model(folder, device="cpu")


def test_sha256_mismatch_stops_load(tmp_path: Path) -> None:
    folder = make_seg2d(tmp_path / "lung_seg")
    (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(ManifestError, match="the file was changed or the manifest not updated"):
        load_model(folder, device="cpu")


def test_roles_are_checked(models_dir: Path) -> None:
    wrong_task = InferenceSettings(models_dir=models_dir, device="cpu", diagnosis_model="lung_seg")
    with pytest.raises(ModelLoadError, match="inference.diagnosis_model is 'lung_seg', a segmentation model"):
        get_model(wrong_task, "diagnosis")
    make_cls3d(models_dir / "other_cls", overrides={"output": {"labels": [
        {"index": 0, "name": "a", "snomed": {"code": "1", "meaning": "A"}},
        {"index": 1, "name": "b", "snomed": {"code": "2", "meaning": "B"}},
        {"index": 2, "name": "c", "snomed": {"code": "3", "meaning": "C"}},
    ]}})
    wrong_labels = InferenceSettings(models_dir=models_dir, device="cpu", diagnosis_model="other_cls")
    with pytest.raises(ModelLoadError, match="needs exactly \\['covid19', 'no_pneumonia', 'other_pneumonia'\\]"):
        get_model(wrong_labels, "diagnosis")


# -- running ----------------------------------------------------------------------------------------
def test_run_matches_reference(models_dir: Path) -> None:
    model = load_model(models_dir / "lung_seg", device="cpu")
    x = rng_slices(4)
    y = model.run(x)
    assert y.dtype == np.float32 and y.shape == (4, 3, 32, 32)
    np.testing.assert_allclose(y, seg2d_reference(x), atol=1e-5)
    lung = np.full((1, 1, 32, 32), 0.2, dtype=np.float32)  # -855 HU after the lung window
    labels = model.run(lung).argmax(axis=1)[0]
    assert (labels[:, :16] == 1).all() and (labels[:, 16:] == 2).all()
    assert (model.run(np.full_like(lung, 0.8)).argmax(axis=1) == 0).all()


def test_dynamic_size_model_runs_any_size(models_dir: Path) -> None:
    model = load_model(models_dir / "lesion_seg", device="cpu")
    x = rng_slices(2, 24, 40)
    np.testing.assert_allclose(model.run(x), seg2d_reference(x), atol=1e-5)
    assert model.input_shape(batch=2) == (2, 1, 64, 64)


def test_run_batched_equals_one_batch(models_dir: Path) -> None:
    model = load_model(models_dir / "lung_seg", device="cpu")
    x = rng_slices(10, seed=1)
    whole = model.run(x)
    for batch_size in (1, 3, 4, 10, 64):
        np.testing.assert_array_equal(model.run_batched(x, batch_size), whole)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        model.run_batched(x, 0)


def test_run_batched_reduces_each_batch(models_dir: Path) -> None:
    """With ``reduce`` only what it keeps of each batch is held: the same as reducing the whole output."""
    model = load_model(models_dir / "lung_seg", device="cpu")
    x = rng_slices(10, seed=3)
    labels = np.argmax(model.run(x), axis=1).astype(np.uint8)
    for batch_size in (1, 4, 10, 64):
        out = model.run_batched(x, batch_size, reduce=lambda probs: np.argmax(probs, axis=1).astype(np.uint8))
        assert out.dtype == np.uint8 and out.shape == labels.shape
        np.testing.assert_array_equal(out, labels)


def test_warm_up_runs_each_model_at_the_shape_the_analysis_gives_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped models, on the CPU: one full batch of 16 slices at 192 x 192, and the 3D model's grid."""
    from node.pipeline.runner import warm_up

    shipped = Path(__file__).resolve().parents[2] / "models"
    seen: list[tuple[str, tuple[int, ...]]] = []
    for name in ("lung_seg", "lesion_seg", "diagnosis"):
        model = load_model(shipped / name, device="cpu")
        plain = model.run
        monkeypatch.setattr(model, "run", lambda x, plain=plain, name=name: seen.append((name, x.shape)) or plain(x))
        warm_up(model)
    assert seen == [("lung_seg", (16, 1, 192, 192)), ("lesion_seg", (16, 1, 192, 192)),
                    ("diagnosis", (1, 2, 64, 256, 256))]


def test_run_batched_refuses_3d_models(models_dir: Path) -> None:
    model = load_model(models_dir / "diagnosis", device="cpu")
    with pytest.raises(ValueError, match="NCDHW model"):
        model.run_batched(np.zeros((2, 1, 8, 16, 16), dtype=np.float32), 1)


def test_classifier_matches_reference(models_dir: Path) -> None:
    model = load_model(models_dir / "diagnosis", device="cpu")
    scale = np.array([0.1, 1.0, 1.9])[:, None, None, None, None]
    x = np.random.default_rng(2).random((3, 1, 8, 16, 16)) * scale  # means ~0.05, ~0.5, ~0.95
    y = model.run(x)  # float64 in: converted to float32
    assert y.dtype == np.float32 and y.shape == (3, 3)
    np.testing.assert_allclose(y, cls3d_reference(x), atol=1e-5)
    assert y[0].argmax() == 0 and y[2].argmax() == 2
    np.testing.assert_allclose(y[1], 1 / 3, atol=0.05)  # mid-grey: undecided


def test_wrong_input_shape_is_refused(models_dir: Path) -> None:
    model = load_model(models_dir / "lung_seg", device="cpu")
    with pytest.raises(ValueError, match="expects spatial size \\[32, 32\\]"):
        model.run(np.zeros((1, 1, 16, 16), dtype=np.float32))
    with pytest.raises(ValueError, match="expects a rank-4 NCHW array"):
        model.run(np.zeros((1, 32, 32), dtype=np.float32))
    with pytest.raises(ValueError, match="expects 1 channels"):
        model.run(np.zeros((1, 2, 32, 32), dtype=np.float32))


def test_io_binding_path_gives_same_result(models_dir: Path) -> None:
    """The CUDA code path (IO binding) also works on the CPU provider: same numbers as session.run."""
    model = load_model(models_dir / "lung_seg", device="cpu")
    assert model.use_io_binding is False
    x = rng_slices(5, seed=3)
    plain = model.run(x)
    model.use_io_binding = True
    try:
        np.testing.assert_array_equal(model.run_batched(x, 2), plain)
    finally:
        model.use_io_binding = False


def test_slice_batch_is_larger_on_the_gpu(models_dir: Path) -> None:
    from node.pipeline.runner import slice_batch

    model = load_model(models_dir / "lung_seg", device="cpu")
    assert slice_batch(model) == int(model.manifest.preprocessing.get("batch_size", 16))
    model.provider = CUDA  # what a CUDA session reports; only the batch choice is looked at
    try:
        assert slice_batch(model) == 64
        model.manifest.preprocessing["cuda_batch_size"] = 8
        assert slice_batch(model) == 8
    finally:
        model.provider = CPU
        model.manifest.preprocessing.pop("cuda_batch_size", None)


def test_padded_batches_give_the_same_result(models_dir: Path) -> None:
    """The CUDA path pads the last batch to full size; the slices' results must not change."""
    model = load_model(models_dir / "lung_seg", device="cpu")
    x = rng_slices(7, seed=5)
    plain = model.run_batched(x, 3)
    model.pad_batches = True
    try:
        padded = model.run_batched(x, 3)
        single = model.run_batched(x[:2], 3)  # fewer slices than one batch
    finally:
        model.pad_batches = False
    assert padded.shape == plain.shape == (7, *plain.shape[1:]) and single.shape[0] == 2
    np.testing.assert_allclose(padded, plain, atol=1e-6)
    np.testing.assert_allclose(single, plain[:2], atol=1e-6)


@needs_gpu
def test_cuda_model_matches_cpu(models_dir: Path) -> None:
    gpu = load_model(models_dir / "lung_seg", device="cuda:0")
    cpu = load_model(models_dir / "lung_seg", device="cpu")
    assert gpu.provider == CUDA and gpu.use_io_binding
    x = rng_slices(9, seed=4)
    np.testing.assert_allclose(gpu.run_batched(x, 4), cpu.run(x), atol=1e-4)
    diag = load_model(models_dir / "diagnosis", device="auto")
    assert diag.provider == CUDA and diag.reason.startswith("CUDA provider selected: device=auto")


# -- lungnode models list / verify --------------------------------------------------------------------
def run_models(argv: list[str], settings: InferenceSettings) -> tuple[int, str]:
    out = StringIO()
    return models_main(argv, settings, out=out), out.getvalue()


def test_models_list_and_verify_ok(models_dir: Path) -> None:
    settings = InferenceSettings(models_dir=models_dir, device="cpu")
    rc, text = run_models(["list"], settings)
    assert rc == 0, text
    assert "lung_seg" in text and "diagnosis" in text and "BAD" not in text
    rc, text = run_models(["verify"], settings)
    assert rc == 0, text
    assert text.count(" OK ") == 3 and CPU in text
    rc, text = run_models(["verify", "diagnosis", "--json"], settings)
    data = json.loads(text)
    assert rc == 0 and [m["name"] for m in data["models"]] == ["diagnosis"] and data["models"][0]["ok"]


def test_a_model_measured_with_another_lesion_model_is_run_with_a_warning(
        models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """paired_with: the diagnosis model names the lesion model it was trained on; another one still runs (a site's
    drop-in), but list, verify and check-config say the card's figures do not hold for that pair."""
    import hashlib

    import yaml

    from node.cli import main as cli_main
    from node.pipeline.infer import pairing_warnings

    settings = InferenceSettings(models_dir=models_dir, device="cpu")
    lesion_sha = hashlib.sha256((models_dir / "lesion_seg" / "model.onnx").read_bytes()).hexdigest()
    manifest_path = models_dir / "diagnosis" / "model.yaml"
    manifest = yaml.safe_load(manifest_path.read_text(encoding="utf-8"))
    manifest["paired_with"] = {"lesion": lesion_sha.upper()}
    manifest_path.write_text(yaml.safe_dump(manifest), encoding="utf-8")
    assert pairing_warnings(settings) == []  # the pair it was measured with (the hash in either case)
    manifest["paired_with"] = {"lesion": "ab" * 32}
    manifest_path.write_text(yaml.safe_dump(manifest), encoding="utf-8")
    [warning] = pairing_warnings(settings)
    assert "diagnosis" in warning and "abababababab" in warning and lesion_sha[:12] in warning
    rc, text = run_models(["verify"], settings)
    assert rc == 0 and text.count(" OK ") == 3 and f"warning: {warning}" in text
    rc, text = run_models(["list", "--json"], settings)
    assert json.loads(text)["pairing_warnings"] == [warning]
    config = models_dir.parent / "pair.yaml"
    config.write_text(yaml.safe_dump({"inference": {"models_dir": str(models_dir)}}), encoding="utf-8")
    assert cli_main(["check-config", "--strict", str(config)]) == 0  # it runs: a warning, never a refusal
    assert f"warning: {config}: inference: {warning}" in capsys.readouterr().err
    manifest["paired_with"] = {"lesion": "not a hash"}
    manifest_path.write_text(yaml.safe_dump(manifest), encoding="utf-8")
    with pytest.raises(ManifestError, match="paired_with: lesion: must be the SHA-256"):
        load_manifest(models_dir / "diagnosis")


def test_models_verify_bad_hash_exits_2(models_dir: Path) -> None:
    onnx_path = models_dir / "lesion_seg" / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")
    settings = InferenceSettings(models_dir=models_dir, device="cpu")
    rc, text = run_models(["verify"], settings)
    assert rc == 2
    bad = [line for line in text.splitlines() if "BAD" in line]
    assert len(bad) == 1 and bad[0].startswith("lesion_seg") and "manifest not updated" in bad[0]
    assert run_models(["verify", "lung_seg"], settings)[0] == 0
    assert run_models(["list"], settings)[0] == 2


def test_models_verify_missing_and_wrong_activation(models_dir: Path) -> None:
    settings = InferenceSettings(models_dir=models_dir, device="cpu", lesion_model="lesion_v9")
    rc, text = run_models(["list"], settings)
    assert rc == 2 and "missing: no folder" in text and "inference.lesion_model" in text
    make_seg2d(models_dir / "sig", overrides={"output": {"activation": "sigmoid"}})
    make_seg2d(models_dir / "raw", softmax=False, overrides={"output": {"activation": "none"}})
    rc, text = run_models(["verify", "sig", "raw"], settings)
    assert rc == 0, text  # softmax values are in the sigmoid range; "none" outputs are not range-checked
    make_seg2d(models_dir / "logits", softmax=False)  # manifest claims softmax, graph gives logits
    rc, text = run_models(["verify", "logits"], settings)
    assert rc == 2 and "output.activation is softmax but values span" in text
    rc, text = run_models(["verify", "nope"], settings)
    assert rc == 2 and "nope" in text


@needs_no_gpu
def test_models_verify_on_missing_gpu_exits_2(models_dir: Path) -> None:
    rc, text = run_models(["verify", "lung_seg", "--device", "cuda:0"], InferenceSettings(models_dir=models_dir))
    assert rc == 2 and "inference.device is cuda:0" in text


def test_models_cli_usage(models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = InferenceSettings(models_dir=models_dir)
    with pytest.raises(SystemExit) as info:
        models_main(["--help"], settings)
    assert info.value.code == 0 and "verify" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        models_main(["verify", "--device", "gpu"], settings)
    assert info.value.code == 2 and "use auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_models_verify_reports_a_failing_run(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: infer.Model, x: np.ndarray) -> np.ndarray:
        raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : bad shape\nmore")

    monkeypatch.setattr(infer.Model, "run", broken)
    rc, text = run_models(["verify", "lung_seg"], InferenceSettings(models_dir=models_dir, device="cpu"))
    assert rc == 2
    assert "running a dummy input of shape [1, 1, 32, 32] failed: [ONNXRuntimeError] : 2 : INVALID_ARGUMENT" in text


@pytest.mark.parametrize("where", ["before", "after"])
def test_models_cli_reads_the_config_given_before_or_after_the_action(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    from node.cli import main

    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"inference:\n  models_dir: {tmp_path / 'site-models'}\n", encoding="utf-8")
    argv = ["models", "--config", str(cfg), "list"] if where == "before" else ["models", "list", "--config", str(cfg)]
    assert main(argv) == 2  # the configured folder is empty, so every configured model is BAD
    assert f"models_dir: {tmp_path / 'site-models'}" in capsys.readouterr().out
