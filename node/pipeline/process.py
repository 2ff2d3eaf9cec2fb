"""``lungnode process``: the analysis path offline, on a folder of DICOM files.

The folder may hold one series or a whole study (any layout, non-DICOM files ignored); images of
several studies are refused, since one result must not mix patients. Series are grouped by
SeriesInstanceUID, the selection rules pick the best one, and it is analysed exactly as a worker
would. As in the node, when the analysis refuses that series (a slice missing) or fails, the next eligible one is
analysed (``node.pipeline.siblings``). ``DIR/result.json`` says what happened, including why the other series were
skipped or gave no results, and the
DICOM outputs (SEG, SR, key images) are written beside it, listed in ``DIR/outputs.json``. A
previous run's outputs in ``DIR`` are removed first, so nothing there belongs to another study.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Callable

import pydicom
from pydicom.errors import InvalidDicomError

from node.config import Config
from node.db.models import JobState
from node.errors import LungnodeError
from node.logs import kv
from node.outputs.write import OUTPUTS_FILE, manifests_for, write_outputs
from node.pipeline.infer import InferenceDeviceError, choose_providers, models_problem
from node.pipeline.runner import RESULT_FILE, Analysis, analyse_series
from node.pipeline.select import SeriesHeader, check, choose, header_image, rank_key
from node.pipeline.siblings import ended_as
from node.pipeline.volume import QAFlag

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_REJECTED = 0, 1, 3


def scan(root: Path) -> dict[str, tuple[SeriesHeader, list[Path]]]:
    """Every DICOM image under ``root`` grouped by series, with a header summary per series."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    groups: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    studies: set[str] = set()
    held: dict[str, tuple[Path, str]] = {}  # SOP Instance UID -> the file kept for it and its series
    ignored = copies = 0
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError):
            ignored += 1
            continue
        if "SeriesInstanceUID" not in ds or "SOPClassUID" not in ds:
            ignored += 1
            continue
        sop = str(ds.get("SOPInstanceUID", "")) or str(path)
        if sop in held:  # a copy of an image (cp IM10 IM10-copy): one instance, one slice; the larger file is kept
            copies += 1
            kept, kept_series = held[sop]
            if path.stat().st_size <= kept.stat().st_size:
                continue
            groups[kept_series] = [(p, d) for p, d in groups[kept_series] if p != kept]
            if not groups[kept_series]:
                del groups[kept_series]
        held[sop] = (path, str(ds.SeriesInstanceUID))
        groups.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
        studies.add(str(ds.get("StudyInstanceUID", "")))
    if ignored:
        print(f"  ignored {ignored} of {len(files)} files: not DICOM images (or no Series Instance UID)",
              file=sys.stderr)
    if copies:
        print(f"  ignored {copies} copies of images already found (same SOP Instance UID; the largest file is used)",
              file=sys.stderr)
    if len(studies) > 1:
        raise LungnodeError(f"{root} holds images of {len(studies)} studies (Study Instance UIDs): give lungnode "
                            "process one study at a time, e.g. one folder per study")
    out = {}
    for uid, members in groups.items():
        judged = header_image(ds for _, ds in members)  # as a worker judges it: not by a localizer filed first
        assert judged is not None  # members is not empty
        header = SeriesHeader.from_dataset(judged, slice_count=len(members))
        out[uid] = (header, [p for p, _ in members])
    return out


def check_paths(input_path: Path, out_dir: Path) -> None:
    """Usage errors (exit 2), told apart from a study the rules refuse (exit 3)."""
    if not input_path.exists():
        raise LungnodeError(f"{input_path} does not exist: give a folder (or file) of DICOM images")
    if out_dir.exists() and not out_dir.is_dir():
        raise LungnodeError(f"--out {out_dir} is a file: give a folder for result.json and the DICOM outputs")


def clear_previous_run(out_dir: Path) -> int:
    """Remove what an earlier run wrote to ``out_dir``: its result.json, outputs.json and the objects that lists.

    Why: a DICOM object left there from another study beside this run's result.json could be sent on or
    read as this study's. Files the node did not list are left alone. Returns how many files were removed.
    """
    listing = out_dir / OUTPUTS_FILE
    names = [RESULT_FILE, OUTPUTS_FILE]
    try:
        names += [str(o["file"]) for o in json.loads(listing.read_text(encoding="utf-8")).get("objects", [])]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass  # no earlier run, or a listing that is not ours: only the two fixed names are removed
    removed = 0
    for name in names:
        path = (out_dir / name).resolve()
        if path.parent == out_dir.resolve() and path.is_file():
            path.unlink()
            removed += 1
    return removed


def ranked(series: dict[str, tuple[SeriesHeader, list[Path]]], config: Config) -> list[SeriesHeader]:
    """The series the selection rules allow, best first (the order ``choose`` prefers them in)."""
    return sorted((h for h, _ in series.values() if check(h, config.selection).eligible),
                  key=lambda h: rank_key(h, config.selection))


def _analyse_best(series: dict[str, tuple[SeriesHeader, list[Path]]], candidates: list[SeriesHeader], config: Config,
                  progress: Callable[[str], None]) -> tuple[Analysis, list[Analysis]]:
    """Analyse the candidates in turn until one gives results, as the node's workers do for a study. Returns that
    analysis (the first one's when none does: it says why the preferred series was refused) and the others that were
    analysed and gave none."""
    outcomes: list[Analysis] = []
    for header in candidates:
        uid = header.series_instance_uid
        _, paths = series[uid]
        print(f"analysing series {uid} ({len(paths)} images)", file=sys.stderr)
        outcome = analyse_series(paths, config.inference, series_instance_uid=uid, progress=progress)
        if outcome.status == "ok":
            return outcome, outcomes
        outcomes.append(outcome)
        if header is not candidates[-1]:
            print(f"  series {uid} {outcome.status}: {outcome.reason}; the next series is analysed", file=sys.stderr)
    return outcomes[0], outcomes[1:]


def _tried(other: Analysis, *, preferred: bool) -> QAFlag:
    """A series of the study that was analysed besides the one the result is for and gave no results."""
    ended = ended_as(JobState(other.status))
    role = "preferred to this one" if preferred else "the next candidate"
    return QAFlag(f"tried_{other.status}", "flag",
                  f"series {other.series_instance_uid}, {role}, was analysed and {ended}: {other.reason}")


def process(input_path: Path, out_dir: Path, config: Config) -> int:
    """Run the whole path on ``input_path`` and write ``out_dir/result.json``; returns the exit code."""
    def progress(step: str) -> None:
        print(f"  {step}...", file=sys.stderr, flush=True)

    check_paths(input_path, out_dir)
    problem = models_problem(config.inference)
    if problem:  # a set-up error, not a result about this study: no result.json, no SR that would carry it
        raise LungnodeError(f"{problem}. Check the models with lungnode models verify (with the same --config)")
    print(f"scanning {input_path}", file=sys.stderr)
    series = scan(input_path)
    if out_dir.is_dir() and (removed := clear_previous_run(out_dir)):
        print(f"  removed {removed} files of an earlier run from {out_dir}", file=sys.stderr)
    if not series:
        analysis = Analysis(status="rejected", series_instance_uid="", reason=f"no DICOM images found in {input_path}")
        analysis.write(out_dir)
        print(f"rejected: {analysis.reason}", file=sys.stderr)
        return EXIT_REJECTED
    best, verdicts = choose([h for h, _ in series.values()], config.selection)
    done: set[str] = set()  # the series analysed
    for v in verdicts:
        if not v.eligible:
            print(f"skipped series {v.series_instance_uid}: {v.reason}", file=sys.stderr)
    if best is None:
        reasons = "; ".join(f"{v.series_instance_uid}: {v.reason}" for v in verdicts)
        first = verdicts[0]
        # the worker's flag for a series the selection refused: outputs.sr_for_skipped_series then applies alike
        analysis = Analysis(status="rejected", series_instance_uid=first.series_instance_uid,
                            reason=f"no series qualifies for analysis ({reasons})",
                            qa=[QAFlag(f"selection_{first.rule}", "refuse", first.reason or "")])
    else:
        try:
            _, device_reason = choose_providers(config.inference.device)
        except InferenceDeviceError as exc:
            device_reason = str(exc)
        print(f"  inference: {device_reason}", file=sys.stderr)
        analysis, others = _analyse_best(series, ranked(series, config), config, progress)
        analysis.qa.extend(_tried(other, preferred=analysis.status == "ok") for other in others)
        done = {analysis.series_instance_uid} | {other.series_instance_uid for other in others}
    analysis.qa.extend(
        QAFlag(f"skipped_{v.rule}", "flag", f"series {v.series_instance_uid} not analysed: {v.reason}")
        for v in verdicts
        if not v.eligible and best is not None and v.series_instance_uid not in done
    )
    path = analysis.write(out_dir)
    _, source_paths = series.get(analysis.series_instance_uid, (None, []))
    if analysis.series_instance_uid:
        objects = write_outputs(analysis, out_dir=out_dir, source_paths=source_paths, settings=config.outputs,
                                manifests=manifests_for(config.inference, analysis))
    else:  # output UIDs derive from the source series: without its UID no object can belong to it
        objects = []
        print("no DICOM objects written: the images have no Series Instance UID", file=sys.stderr)
    for obj in objects:
        print(f"  wrote {obj.kind} {out_dir / obj.file}", file=sys.stderr)
    log.info(kv("process_done", status=analysis.status, result=path, objects=len(objects)))
    print(f"{analysis.status}{': ' + analysis.reason if analysis.reason else ''} -> {path}", file=sys.stderr)
    if objects or analysis.output_errors:  # again, with the outputs' timings (and errors)
        analysis.write(out_dir)
    if analysis.output_errors:  # as a worker would fail the job: the PACS would miss these objects
        print(f"failed: DICOM outputs not built ({'; '.join(analysis.output_errors)}); the reason is in the "
              "event=output_failed log line above", file=sys.stderr)
        return EXIT_FAILED
    return {"ok": EXIT_OK, "rejected": EXIT_REJECTED, "failed": EXIT_FAILED}[analysis.status]
