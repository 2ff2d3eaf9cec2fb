"""Train the diagnosis model and write a node model folder: ``DIR/model.onnx`` + ``DIR/model.yaml``.

    python -m models.train.data_diagnosis --train 300 --held-out 60      # build /tmp/diag_cache first
    python -m models.train.train_diagnosis --out DIR [--epochs N --seed S --train 270 --val 30]
    python -m models.train.data_diagnosis --chain --train 240   # optional: the node chain's lesion maps
    python -m models.train.train_diagnosis --out DIR --chain --p-chain 0.75 --p-blank 0.2 --version 0.2.0 ...

Input: [N, 2, 64, 256, 256] (ct windowed -450/1350, lesion_map) on the lung box, as the node's
``runner.classify`` builds it. Output: softmax over (covid19, other_pneumonia, no_pneumonia).

Network (``DiagNet``): a fixed 2x4x4 average pooling in the graph (64x256x256 -> 32x64x64, voxels
of about 5 mm in-plane: lesion patterns are tens of mm), a 3x3x3 conv stem with stride 2, three plain conv stages
with stride 2, then global average *and* max pooling (a small focal lesion must not be averaged
away) and one linear layer. Training feeds the pooled inputs straight to the learned part (pooling
in numpy once is the same operation), which makes CPU training about 10x cheaper. Small: under
1 MB of ONNX (CARD.md has the parameter count and the measured CPU time).

Data: phantom seeds 0..train-1 for training, train..train+val-1 for per-epoch validation (the
held-out seeds 500000+ are only read by ``eval_diagnosis``), plus LIDC-IDRI-0001 copies as
no_pneumonia when cached. The lesion_map channel is drawn anew every epoch (``lesion_map``): blank
with ``p_blank`` (so that the CT channel has to carry the decision), else the node chain's own
lesion map (``data_diagnosis.attach_chain``: ``models/lesion_seg`` as the node runs it, with its real
false positives) with ``p_chain`` where the case has one, else the truth degraded by
``data_diagnosis.degrade_lesions``. Seeds fix initialisation, degradation,
augmentation and batch order; torch runs with deterministic algorithms. Export: ONNX opset 17,
dynamic batch, softmax in the graph; onnxruntime must match torch to 1e-4, else the run fails.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn import functional as F

from models.train.data_diagnosis import (
    CACHE,
    CHAIN,
    CHANNELS,
    CLASSES,
    POOL,
    SIZE,
    WINDOW,
    Case,
    _specks,
    attach_chain,
    degrade_lesions,
    load_cases,
    pool,
    train_names,
    unpool,
)
from node.pipeline.manifest import file_sha256

VERSION = "0.1.0"  # the shipped version; a candidate is built with --version
INPUT_NAME, OUTPUT_NAME = "x", "probs"
BN_EPS = 1e-5  # torch BatchNorm default, used by DiagNet
SNOMED = {
    "covid19": {"code": "840539006", "meaning": "COVID-19", "scheme": "SCT"},
    "other_pneumonia": {"code": "233604007", "meaning": "Pneumonia", "scheme": "SCT"},
    "no_pneumonia": {"code": "827032003", "meaning": "Normal lung", "scheme": "SCT"},
}
Log = Callable[[str], None]


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
    )


class DiagNet(nn.Module):
    """[N, C, 64, 256, 256] -> [N, 3] softmax (logits with ``softmax=False``).

    A fixed 2x4x4 average pooling comes first (in the graph, so the node feeds the full grid); the
    learned part (``pooled_logits``) sees 32x64x64 and can be trained on pooled inputs directly.
    """

    def __init__(self, channels: int = 2, base: int = 8, classes: int = 3, softmax: bool = True) -> None:
        super().__init__()
        self.pool = nn.AvgPool3d(POOL)
        c = (base, base * 3 // 2, base * 2, base * 3)
        self.stem = nn.Sequential(nn.Conv3d(channels, c[0], 3, stride=2, padding=1, bias=False), nn.BatchNorm3d(c[0]),
                                  nn.ReLU(inplace=True))
        self.stages = nn.Sequential(_stage(c[0], c[1]), _stage(c[1], c[2]), _stage(c[2], c[3]))
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(2 * c[3], classes)
        self.softmax = softmax

    def pooled_logits(self, xp: torch.Tensor) -> torch.Tensor:
        f = self.stages(self.stem(xp))
        pooled = torch.cat([f.mean(dim=(2, 3, 4)), f.amax(dim=(2, 3, 4))], dim=1)
        return self.head(self.drop(pooled))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.pooled_logits(self.pool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.logits(x)
        return torch.softmax(z, dim=1) if self.softmax else z


class MeanOfNets(nn.Module):
    """[N, C, D, H, W] -> [N, 3]: the mean of several DiagNets' softmax outputs (``ensemble_diagnosis``)."""

    def __init__(self, members: list[DiagNet]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def lesion_map(case: Case, rng: np.random.Generator, p_chain: float = 0.0, p_blank: float = 0.0) -> np.ndarray:
    """Pooled lesion map [32, 64, 64] for one training draw.

    Blank with ``p_blank``; else the chain's map (what the node feeds, sometimes with a few extra
    false-positive specks) with ``p_chain`` when the case has one; else the degraded truth.
    """
    if rng.random() < p_blank:
        return np.zeros([s // f for s, f in zip(SIZE, POOL)], dtype=np.float32)
    if case.les_chain is not None and rng.random() < p_chain:
        frac = pool(case.les_chain) / np.float32(255.0)
        if rng.random() < 0.25:
            specks = _specks(frac.shape, pool(case.lung) > 0.5, rng, int(rng.poisson(2)), rmax=2.0)
            frac = np.maximum(frac, specks * np.float32(rng.uniform(0.3, 1.0)))
        return frac.astype(np.float32)
    return degrade_lesions(case.les, case.lung, rng)


def case_input(case: Case, rng: np.random.Generator, p_chain: float = 0.0, p_blank: float = 0.0) -> np.ndarray:
    """[2, 32, 64, 64] float32 after the model's pooling: pooled CT and a lesion map drawn by ``lesion_map``."""
    ct = case.ct_pooled if case.ct_pooled is not None else pool(case.ct) / 255.0
    return np.stack([ct, lesion_map(case, rng, p_chain, p_blank)])


def full_input(case: Case, pooled: np.ndarray) -> np.ndarray:
    """The [2, 64, 256, 256] model input whose pooling is ``pooled``'s lesion map (CT at full resolution)."""
    return np.stack([case.ct.astype(np.float32) / 255.0, unpool(pooled[1])])


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Left-right mirror (label-invariant), CT gain/offset and noise; the lesion map is left as it is."""
    if rng.random() < 0.5:
        x = x[..., ::-1]
    ct = x[0] * np.float32(rng.uniform(0.93, 1.07)) + np.float32(rng.uniform(-0.04, 0.04))
    if rng.random() < 0.5:
        ct = ct + np.float32(rng.uniform(0.0, 0.01)) * rng.standard_normal(ct.shape, dtype=np.float32)
    return np.stack([np.clip(ct, 0.0, 1.0), x[1]]).astype(np.float32)


def predict_pooled(model: DiagNet, xs: list[np.ndarray], batch: int = 16) -> np.ndarray:
    """Softmax probabilities [N, 3] in eval mode from pooled inputs."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(xs), batch):
            out.append(torch.softmax(model.pooled_logits(torch.from_numpy(np.stack(xs[i:i + batch]))), 1).numpy())
    return np.concatenate(out)


def predict(model: nn.Module, xs: list[np.ndarray]) -> np.ndarray:
    """Softmax probabilities [N, 3] in eval mode from full-size inputs (the ONNX model's input)."""
    model.eval()
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[None])).numpy() for x in xs])


def _epoch(model: DiagNet, opt: torch.optim.Optimizer, sched: Any, cases: list[Case], rng: np.random.Generator,
           batch: int, smoothing: float, p_chain: float = 0.0, p_blank: float = 0.0) -> float:
    model.train()
    order = rng.permutation(len(cases))
    total = 0.0
    for i in range(0, len(order), batch):
        chunk = [cases[k] for k in order[i:i + batch]]
        xb = torch.from_numpy(np.stack([augment(case_input(c, rng, p_chain, p_blank), rng) for c in chunk]))
        yb = torch.tensor([c.label for c in chunk], dtype=torch.int64)
        loss = F.cross_entropy(model.pooled_logits(xb), yb, label_smoothing=smoothing)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * len(chunk)
    return total / len(cases)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean())


def export_onnx(model: nn.Module, path: Path) -> None:
    """ONNX opset 17, dynamic batch, softmax inside the graph."""
    model = model.eval()
    dummy = torch.zeros(1, len(CHANNELS), *SIZE)
    with torch.no_grad():
        torch.onnx.export(model, (dummy,), str(path), opset_version=17, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
                          dynamo=False)


def parity(model: nn.Module, onnx_path: Path, xs: list[np.ndarray], tol: float = 1e-4) -> float:
    """max |onnxruntime - torch| over ``xs``; raises when above ``tol``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = np.concatenate([sess.run(None, {INPUT_NAME: x[None]})[0] for x in xs])
    err = float(np.abs(got - predict(model, xs)).max())
    if not err <= tol:
        raise RuntimeError(f"ONNX export parity failed: max |onnxruntime - torch| = {err:.2e} > {tol:g}")
    return err


def torch_from_onnx(path: Path) -> DiagNet | MeanOfNets:
    """The DiagNet (or, for a graph of several, their ``MeanOfNets``) holding the weights of an exported
    model.onnx, so the shipped file can be checked against torch without shipping weights.pt (export folds
    each BatchNorm into its conv's bias; here the BatchNorm becomes the identity that adds that bias)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}

    def tensor(name: str) -> torch.Tensor:
        while name in alias:
            name = alias[name]
        return torch.from_numpy(init[name].copy())

    convs = [n for n in graph.node if n.op_type == "Conv"]
    gemms = [n for n in graph.node if n.op_type == "Gemm"]  # one head per member, in the members' order
    per = len(convs) // max(1, len(gemms))
    if not gemms or per * len(gemms) != len(convs):
        raise ValueError(f"{path}: {len(convs)} Conv and {len(gemms)} Gemm nodes are not whole DiagNets")
    members = [_diagnet_from(convs[k * per:(k + 1) * per], gemm, tensor, path) for k, gemm in enumerate(gemms)]
    return members[0] if len(members) == 1 else MeanOfNets(members).eval()


def _diagnet_from(convs: list[Any], gemm: Any, tensor: Callable[[str], torch.Tensor], path: Path) -> DiagNet:
    w0 = tensor(convs[0].input[1])
    model = DiagNet(channels=int(w0.shape[1]), base=int(w0.shape[0])).eval()
    mods = [m for m in model.modules() if isinstance(m, (nn.Conv3d, nn.BatchNorm3d))]
    pairs = list(zip(mods[0::2], mods[1::2]))
    if len(pairs) != len(convs):
        raise ValueError(f"{path}: {len(convs)} Conv nodes per member, DiagNet has {len(pairs)} conv layers")
    with torch.no_grad():
        for (conv, bn), node in zip(pairs, convs):
            conv.weight.copy_(tensor(node.input[1]))
            bias = tensor(node.input[2])
            n = int(bias.shape[0])
            bn.load_state_dict({"weight": torch.ones(n), "bias": bias, "running_mean": torch.zeros(n),
                                "running_var": torch.full((n,), 1.0 - BN_EPS),
                                "num_batches_tracked": torch.tensor(0)})
        w = tensor(gemm.input[1])
        trans_b = any(a.name == "transB" and a.i == 1 for a in gemm.attribute)
        model.head.weight.copy_(w if trans_b else w.T)
        model.head.bias.copy_(tensor(gemm.input[2]))
    return model


def manifest(sha: str, training: dict[str, Any], metrics: dict[str, Any], version: str = VERSION,
             paired_with: dict[str, str] | None = None) -> dict[str, Any]:
    """The model.yaml content (validated by node.pipeline.manifest when the node loads it). ``paired_with``:
    the lesion model whose maps it was trained on, by role, so the node warns when it runs beside another."""
    return {
        "name": "diagnosis",
        "version": version,
        "sha256": sha,
        "task": "classification",
        "description": "Small 3D CNN on the lung box of a chest CT (windowed CT + lesion map): probabilities of "
                       "COVID-19 pneumonia, other pneumonia and no pneumonia. Trained on synthetic phantoms only "
                       "for the pneumonia classes.",
        "intended_use": "Reference classifier for the lungnode pipeline: research, demonstration and integration "
                        "testing only. See CARD.md for its limits.",
        "not_for_clinical_use": True,
        "algorithm": {"name": "lungnode-diagnosis-cnn3d", "version": version, "family": "Artificial Intelligence"},
        "input": {"name": INPUT_NAME, "layout": "NCDHW", "size": list(SIZE),
                  "window": {"level": WINDOW[0], "width": WINDOW[1]}, "channels": list(CHANNELS)},
        "output": {"name": OUTPUT_NAME, "activation": "softmax", "labels": [
            {"index": i, "name": name, "snomed": SNOMED[name]} for i, name in enumerate(CLASSES)]},
        "preprocessing": {"crop_to_lung_box": True},
        **({"paired_with": paired_with} if paired_with else {}),
        "metrics": metrics,
        "training": training,
    }


def _data(cache: Path, n_train: int, n_val: int, lidc_copies: int,
          chain: Path | None = None) -> tuple[list[Case], list[Case]]:
    names = train_names(n_train + n_val)
    cases = load_cases(cache, names[:n_train])
    lidc = [f"lidc0001_{k}" for k in range(lidc_copies) if (cache / f"lidc0001_{k}.npz").is_file()]
    cases += load_cases(cache, lidc)
    val = load_cases(cache, names[n_train:])
    if chain is not None:
        cases, val = attach_chain(cases, chain), attach_chain(val, chain)
    return cases, val


def train(out: Path, *, cache: Path = CACHE, epochs: int = 12, seed: int = 0, n_train: int = 270, n_val: int = 30,
          lidc_copies: int = 8, batch: int = 8, lr: float = 3e-3, base: int = 8, smoothing: float = 0.05,
          chain: Path | None = None, p_chain: float = 0.0, p_blank: float = 0.0, version: str = VERSION,
          log: Log = print) -> dict[str, Any]:
    """Train, export, check parity and write the model folder; returns history, parity, model, val inputs."""
    seed_everything(seed)
    t0 = time.perf_counter()
    cases, val = _data(cache, n_train, n_val, lidc_copies, chain)
    n_lidc = sum(c.name.startswith("lidc") for c in cases)
    n_chain = sum(c.les_chain is not None for c in cases)
    n_val_chain = sum(c.les_chain is not None for c in val)
    lidc_meta = next((c.meta for c in cases if c.name.startswith("lidc")), {})
    log(f"data: {len(cases)} training cases ({n_lidc} LIDC-IDRI-0001 copies, {n_chain} with a chain lesion map), "
        f"{len(val)} validation phantoms ({n_val_chain} with a chain lesion map)")
    val_rng = np.random.default_rng(7_000 + seed)
    for c in cases + val:
        c.ct_pooled = pool(c.ct) / 255.0
    val_x = [case_input(c, val_rng, p_chain=1.0) for c in val]  # chain map where present, fixed across epochs
    val_y = np.array([c.label for c in val])
    model = DiagNet(len(CHANNELS), base)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-3)
    steps = max(1, epochs * ((len(cases) + batch - 1) // batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    rng = np.random.default_rng(seed)
    history = []
    for epoch in range(1, epochs + 1):
        loss = _epoch(model, opt, sched, cases, rng, batch, smoothing, p_chain, p_blank)
        acc = accuracy(predict_pooled(model, val_x), val_y)
        history.append({"epoch": epoch, "loss": round(loss, 4), "val_accuracy": round(acc, 4)})
        log(f"epoch {epoch}/{epochs}: loss {loss:.4f}, val accuracy {acc:.3f}, {time.perf_counter() - t0:.0f} s")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "model.onnx"
    export_onnx(model, onnx_path)
    err = parity(model, onnx_path, [full_input(c, x) for c, x in zip(val[:3], val_x[:3])])
    log(f"export parity: max |onnxruntime - torch| = {err:.2e}")
    training = {
        "data": {"phantom_seeds": [0, n_train - 1], "lidc_idri_0001_copies": n_lidc, "cases": len(cases),
                 "lidc_lungs": lidc_meta.get("lungs", "models.train.lung_labels.label_lungs"),
                 "cache": "models.train.data_diagnosis",
                 "lidc_lesion_map": lidc_meta.get("lesions", "empty"),
                 "lidc_lesion_ml": lidc_meta.get("chain_lesion_ml", lidc_meta.get("lesion_ml", 0.0)),
                 "cases_with_chain_lesion_map": n_chain},
        "validation": {"phantom_seeds": [n_train, n_train + n_val - 1], "cases_with_chain_lesion_map": n_val_chain,
                       "accuracy_last_epoch": history[-1]["val_accuracy"]},
        "seed": seed, "epochs": epochs, "batch": batch, "lr": lr, "base_channels": base, "label_smoothing": smoothing,
        "parameters": n_params(model),
        "lesion_map": (f"drawn per case and epoch: blank with p {p_blank}; else the node chain's lesion map "
                       f"(models/lesion_seg via runner.segment_lesions; {n_chain} cases have one) with p {p_chain}, "
                       "sometimes with extra false-positive specks; else the truth lesion mask degraded (threshold, "
                       "erosion/dilation, missed small lesions, false-positive specks)"),
        "augmentation": "left-right mirror, CT gain/offset, Gaussian noise",
        "torch": str(torch.__version__), "seconds": round(time.perf_counter() - t0, 1),
    }
    metrics = {"onnx_parity_max_abs": float(f"{err:.3g}")}
    write_manifest(out, training, metrics, version)
    torch.save(model.state_dict(), out / "weights.pt")
    return {"history": history, "parity": err, "model": model, "val_x": val_x, "val_y": val_y}


def write_manifest(out: Path, training: dict[str, Any], metrics: dict[str, Any], version: str = VERSION,
                   paired_with: dict[str, str] | None = None) -> None:
    """(Re)write model.yaml for the model.onnx in ``out`` (hash taken from the file)."""
    text = yaml.safe_dump(manifest(file_sha256(out / "model.onnx"), training, metrics, version, paired_with),
                          sort_keys=False)
    (out / "model.yaml").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=270, help="training phantoms (seeds 0..N-1)")
    ap.add_argument("--val", type=int, default=30, help="validation phantoms (the next seeds)")
    ap.add_argument("--lidc-copies", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--base", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--chain", type=Path, default=None, nargs="?", const=CHAIN,
                    help="folder of chain lesion maps (data_diagnosis --chain); default none")
    ap.add_argument("--p-chain", type=float, default=0.75, help="chain lesion map share where a case has one")
    ap.add_argument("--p-blank", type=float, default=0.0, help="share of blank lesion maps (e.g. 0.2)")
    ap.add_argument("--version", default=VERSION, help="version written into model.yaml")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    train(a.out, cache=a.cache, epochs=a.epochs, seed=a.seed, n_train=a.train, n_val=a.val,
          lidc_copies=a.lidc_copies, batch=a.batch, lr=a.lr, base=a.base, chain=a.chain,
          p_chain=a.p_chain if a.chain else 0.0, p_blank=a.p_blank, version=a.version, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
