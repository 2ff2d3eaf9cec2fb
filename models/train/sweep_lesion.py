"""Cross-validate several lesion-model recipes side by side on one machine (a GPU host, typically).

    python -m models.train.sweep_lesion --plan models/train/plans/lesion-sweep.json --out DIR \\
        [--jobs 14 --device cuda --only E,F]

A plan names recipes; each has ``stage1`` (one or more phantom pre-training runs, chained through
``--init``) and ``stage2`` (the fine-tuning arguments). For every recipe the sweep runs stage 1, then
in parallel the ``k`` cross-validation folds of stage 2 (``train_lesion --cv k --fold i``) and the
final stage-2 model on all 50 MedSeg training slices. Each run is one ``train_lesion`` process with
one CPU thread (augmentation is CPU work; the network steps go to ``--device``), so ``--jobs`` runs
share the machine. The phantom cache is filled first, in parallel.

Writes ``DIR/stage1-<hash>/s1-<i>/`` (identical stage-1 chains run once and are shared),
``DIR/<recipe>/{cv,final}/`` with each run's log (``run.log``, ``cv/fold<i>.log``) and outputs, and
``DIR/summary.json``: per recipe the fold means of the CV metrics, the plan's selection rule and the
recipe it picks. The MedSeg test split is never read here.

Measured on one NVIDIA H200 host (16 cores) with ``--jobs 14`` and the 2026-11 plan: after the
phantom cache (68 s), recipe E's stage 1 took 87 s and its folds 78 s each; L's 40-epoch stage 1
124 s and its 32-epoch folds 153 s; D4's 167 s and 210 s. After 470 s W16D4's folds were still
running and W20's and W16D4L's had not started (W16D4's folds alone, six processes, took 136 s):
the whole plan needs roughly 12-15 minutes there. On one NVIDIA H100 (16 cores) with ``--jobs 18``,
all 18 stage-2 runs of plan b's W16D4, W16D4R and W16D4L at once: 32-epoch folds 355 s, W16D4R's
(twice the MedSeg slices per epoch) 478 s, W16D4L's 64-epoch folds 57 epochs in 490 s; with ``--jobs 20
--folds-only``, 20 W16D4-sized folds at once (plan elastic-gamma) in 360-400 s after an 18 s phantom cache. Where a
session's time is shorter, give ``--deadline`` (counted from the start, phantom cache included;
what finished is summarised and packed) and run again into the same DIR: finished stage-1 chains,
folds and final models are kept, not rerun.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import Pool
from pathlib import Path
from typing import Any

from models.train.data_lesion import phantom_lung_slices, training_phantom_seeds
from models.train.eval_lesion import read_cv, val_seeds

KEY = "infection_dice_mean"


def _one_phantom(job: tuple[int, int, str | None]) -> int:
    seed, size, kind = job
    return len(phantom_lung_slices(seed, size, kind))


def fill_cache(seeds: list[int], val_phantoms: int, size: int, jobs: int, log=print) -> None:
    """Generate (or find cached) the training phantoms ``seeds`` and the validation phantoms."""
    work = [(s, size, None) for s in seeds] + [(s, size, k) for s, k in val_seeds(val_phantoms)]
    t0 = time.perf_counter()
    with Pool(jobs) as pool:
        n = sum(pool.map(_one_phantom, work, chunksize=1))
    log(f"phantom cache: {len(work)} phantoms, {n} slices, {time.perf_counter() - t0:.0f} s")


def _arg(args: list[str], name: str, default: int) -> int:
    return next((int(args[i + 1]) for i, a in enumerate(args[:-1]) if a == name), default)


def phantom_seeds_needed(plan: dict[str, Any], names: list[str] | None = None) -> list[int]:
    """The training phantoms the runs of ``names`` will read: ``--phantoms N`` of them from ``--seed S``'s range.

    N is ``--phantoms``, else the plan's count; ``training_phantom_seeds`` says which ones a seed takes. Filling them before any run starts means no two training processes ever write one cache file.
    """
    seeds: set[int] = set()
    for name, recipe in plan["recipes"].items():
        if names is not None and name not in names:
            continue
        for args in [*recipe["stage1"], recipe["stage2"]]:
            seeds.update(training_phantom_seeds(_arg(args, "--seed", 0), _arg(args, "--phantoms", int(plan["phantoms"]))))
    return sorted(seeds)


class Runner:
    """Runs ``train_lesion`` processes, at most ``jobs`` at a time, each logging to its own file.

    After ``deadline`` (seconds from ``t0``, the sweep's start, phantom cache included; None: no limit)
    no run starts and running ones are stopped, so a time-limited session still gets the summary of
    what finished.
    """

    def __init__(self, jobs: int, device: str, deadline: float | None = None, log=print,
                 t0: float | None = None) -> None:
        self.slots = threading.Semaphore(jobs)
        self.device, self.log = device, log
        self.t0 = time.perf_counter() if t0 is None else t0
        self.deadline = deadline
        self.failed: list[str] = []
        self.stopped: list[str] = []

    def _left(self) -> float | None:
        return None if self.deadline is None else self.deadline - (time.perf_counter() - self.t0)

    def run(self, out: Path, args: list[str], name: str = "run") -> bool:
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "models.train.train_lesion", "--out", str(out), "--device", self.device,
               "--threads", "1", *args]
        with self.slots:
            left = self._left()
            if left is not None and left <= 0:
                self.log(f"[{time.perf_counter() - self.t0:5.0f} s] not started (deadline) {out}/{name}")
                self.stopped.append(f"{out}/{name}")
                return False
            self.log(f"[{time.perf_counter() - self.t0:5.0f} s] start {out}/{name}: {' '.join(args)}")
            with open(out / f"{name}.log", "w", encoding="utf-8") as fh:
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
                try:
                    rc = proc.wait(timeout=left)
                except subprocess.TimeoutExpired:
                    proc.terminate()
                    proc.wait()
                    self.log(f"[{time.perf_counter() - self.t0:5.0f} s] stopped (deadline) {out}/{name}")
                    self.stopped.append(f"{out}/{name}")
                    return False
            self.log(f"[{time.perf_counter() - self.t0:5.0f} s] {'done' if rc == 0 else f'FAILED rc={rc}'} {out}/{name}")
        if rc:
            self.failed.append(f"{out}/{name}")
        return rc == 0


class Stage1:
    """Stage-1 chains shared between recipes: identical chains run once, in ``DIR/stage1-<hash>/``.

    A chain whose weights are already there (an earlier, interrupted sweep into the same DIR) is reused.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.locks: dict[str, threading.Lock] = {}
        self.guard = threading.Lock()

    def weights(self, runner: Runner, chain: list[list[str]]) -> Path | None:
        key = hashlib.sha1(json.dumps(chain).encode()).hexdigest()[:10]
        with self.guard:
            lock = self.locks.setdefault(key, threading.Lock())
        with lock:
            init: Path | None = None
            for i, args in enumerate(chain):
                run_dir = self.root / f"stage1-{key}" / f"s1-{i}"
                if not (run_dir / "weights.pt").is_file() and not runner.run(
                        run_dir, [*args, *(["--init", str(init)] if init else [])]):
                    return None
                init = run_dir / "weights.pt"
            return init


def run_recipe(runner: Runner, pool: ThreadPoolExecutor, stage1: Stage1, out: Path, recipe: dict[str, Any],
               k: int, final: bool = True) -> None:
    """Stage 1 (chained, shared), then the k CV folds and (``final``) the final model in parallel; finished parts
    are kept."""
    init = stage1.weights(runner, recipe["stage1"])
    if init is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "stage1.txt").write_text(f"{init}\n", encoding="utf-8")
    s2 = [*recipe["stage2"], "--init", str(init)]
    futures = [pool.submit(runner.run, out / "cv", [*s2, "--cv", str(k), "--fold", str(f)], f"fold{f}")
               for f in range(1, k + 1) if not (out / "cv" / f"cv-fold{f}.json").is_file()]
    if final and not (out / "final" / "weights.pt").is_file():  # written last
        futures.append(pool.submit(runner.run, out / "final", s2))
    for fut in futures:
        fut.result()


def pack(out: Path, dest: Path) -> None:
    """The sweep's small outputs in one tar.gz: summaries, CV files, logs, manifests, final models."""
    keep = [p for p in sorted(out.rglob("*")) if p.is_file() and (
        p.suffix in (".json", ".log", ".yaml", ".txt") or p.parent.name == "final")]
    with tarfile.open(dest, "w:gz") as tar:
        for p in keep:
            tar.add(p, arcname=str(p.relative_to(out.parent)))


def cv_summary(folder: Path) -> dict[str, Any] | None:
    """Per-fold infection Dice and the fold means of every metric; None unless all folds finished."""
    cv = read_cv(folder)
    return None if cv is None else {"folds": [r[KEY] for r in cv["folds"]], "mean": cv["mean"]}


def select(summary: dict[str, Any], rule: dict[str, Any]) -> str | None:
    """The plan's rule: the best CV mean among the candidates, if it beats the baseline by ``margin``.

    None when the plan names no baseline run in this sweep (its baseline comes from an earlier one): the
    summary is still written, and the decision is made by hand from the plan's text."""
    if "baseline" not in rule or "margin" not in rule:
        return None
    base = summary.get(rule["baseline"])
    scored = {name: s["mean"][KEY] for name, s in summary.items() if s and name != rule["baseline"]}
    if not base or not scored:
        return None
    best = max(scored, key=scored.__getitem__)
    return best if scored[best] >= base["mean"][KEY] + rule["margin"] else rule["baseline"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", type=Path, required=True, help="JSON: recipes, k, the selection rule")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--jobs", type=int, default=2, help="training processes at a time")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", default="", help="comma-separated recipe names (default: all)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds from the start (phantom cache included) after which no run starts and running "
                         "ones stop; the summary is still written and packed. Leave a device call's limit a minute more")
    ap.add_argument("--folds-only", action="store_true",
                    help="run the CV folds but not the final networks (train those elsewhere, e.g. on the CPU)")
    ap.add_argument("--pack", type=Path, default=None, help="also write the small outputs to this tar.gz")
    a = ap.parse_args(argv)
    log = lambda s: print(s, flush=True)  # noqa: E731
    plan = json.loads(a.plan.read_text(encoding="utf-8"))
    names = [n for n in plan["recipes"] if not a.only or n in a.only.split(",")]
    k = int(plan["cv"])
    t0 = time.perf_counter()
    fill_cache(phantom_seeds_needed(plan, names), plan["val_phantoms"], plan["size"], a.jobs, log)
    runner = Runner(a.jobs, a.device, a.deadline, log, t0)
    stage1 = Stage1(a.out)
    with ThreadPoolExecutor(len(names) * (k + 2)) as pool:
        recipes = [pool.submit(run_recipe, runner, pool, stage1, a.out / n, plan["recipes"][n], k,
                               not a.folds_only) for n in names]
        for fut in recipes:
            fut.result()
    summary = {n: cv_summary(a.out / n / "cv") for n in names}
    result = {"plan": str(a.plan), "rule": plan["rule"], "summary": summary, "failed": runner.failed,
              "stopped_or_not_started": runner.stopped,
              "selected": select(summary, plan["rule"]), "seconds": round(time.perf_counter() - runner.t0, 1)}
    (a.out / "summary.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    for n, s in summary.items():
        log(f"{n}: " + ("incomplete" if s is None else f"CV {KEY} {s['mean'][KEY]} (folds {s['folds']})"))
    log(f"selected by the plan's rule: {result['selected']}")
    if a.pack:
        pack(a.out, a.pack)
        log(f"packed: {a.pack} ({a.pack.stat().st_size / 2**20:.1f} MiB)")
    return 1 if runner.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
