"""The ``lungnode`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node import __version__
from node.config import Config, load_config
from node.errors import LungnodeError
from node.logs import setup_logging

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("node.cli")
#: ``lungnode status`` options that ask what happened to one study (node.db.trace), as argparse names them
TRACE_KEYS = ("accession", "patient_id", "study", "series", "job")

EPILOG = """\
Configuration: embedded defaults, then --config FILE (see deploy/config.example.yaml), then
environment variables LUNGNODE_<SECTION>__<KEY>, e.g. LUNGNODE_DICOM__PORT=104.
By default everything the node keeps (received images, results, the ledger database) goes under
./var of the folder it runs in (storage.spool_dir, storage.database_url).
Reference models, not cleared for clinical use.
"""


@contextmanager
def _ledger(cfg: Config) -> Iterator[tuple[Engine, sessionmaker[Session]]]:
    """The node's ledger as it is (refused with the fix when absent or at another schema), closed after use: what
    the operator commands read and change."""
    from node.db.session import make_sessionmaker, open_database

    engine = open_database(cfg.storage.database_url, must_exist=True)
    try:
        yield engine, make_sessionmaker(engine)
    finally:
        engine.dispose()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, metavar="FILE", help="YAML configuration (default: embedded defaults)")


def _load(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config)
    setup_logging(cfg.logging.level, cfg.logging.file, cfg.logging.include_phi)
    return cfg


#: Received images, results, the ledger and logs hold patient data: no access for other users of the machine
#: (the node's group may read, for backups), whatever umask the node was started with.
PRIVATE_UMASK = 0o027


def cmd_serve(args: argparse.Namespace) -> int:
    from node.app import serve

    os.umask(PRIVATE_UMASK)
    return serve(_load(args), args.config)


def cmd_check_config(args: argparse.Namespace) -> int:
    from node.pipeline.infer import pairing_warnings
    from node.tls import check_tls

    path = args.file or args.config
    if path is None:
        raise LungnodeError("check-config needs the file to check: lungnode check-config FILE")
    cfg = load_config(path)
    check_tls(cfg)
    if cfg.workers.count and (model_problems := _model_problems(cfg)):
        # serve still receives and assembles without models (nothing acknowledged is refused for it), so this
        # alone does not stop a unit's ExecStartPre; --strict makes it an error.
        lines = [f"{path}: inference: {problem}" for problem in model_problems]
        lines[-1] += (". The node would receive and assemble but analyse nothing; "
                      f"details: lungnode models --config {path} verify")
        if args.strict:
            raise LungnodeError("\n".join(lines))
        for line in lines:
            print(f"warning: {line}", file=sys.stderr)
    for problem in pairing_warnings(cfg.inference) if cfg.workers.count else []:
        print(f"warning: {path}: inference: {problem}", file=sys.stderr)
    problems = _unwritable(cfg)
    # relative paths count from here, which may not be the node's folder: a warning; but serve stops at once on a
    # log file it cannot open (before it could log why), so that one is an error, as the unit's ExecStartPre needs
    for key, problem in problems.items():
        if key != "logging.file":
            print(f"warning: {path}: {problem}", file=sys.stderr)
    if "logging.file" in problems:
        raise LungnodeError(f"{path}: {problems['logging.file']} (the node would not start)")
    print(f"{path}: valid")
    if args.show:
        print(json.dumps(cfg.redacted(), indent=2, sort_keys=True))
    return 0


def _model_problems(cfg: Config) -> list[str]:
    """Why each configured model folder cannot play its role (manifest, file hash, role), one entry per model:
    the help promises every problem, and fixing three folders one check-config run at a time is slow."""
    from node.pipeline.infer import Which, check_role, model_name
    from node.pipeline.manifest import load_manifest

    roles: tuple[Which, ...] = ("lung", "lesion", "diagnosis")
    problems = []
    for role in roles:
        try:
            check_role(load_manifest(cfg.inference.models_dir / model_name(cfg.inference, role)), role)
        except LungnodeError as exc:
            problems.append(str(exc))
    return problems


def _nearest_existing(path: Path) -> Path:
    """``path`` or the closest of its parents that exists: where serve would have to create what is missing."""
    return next(p for p in (path, *path.parents) if p.exists())


def _cannot_create_in(folder: Path) -> str | None:
    """Why this user cannot create a file in ``folder`` (None: it can), found by creating and removing one:
    os.access says yes to root for any folder, /proc or a read-only mount included, where serve then fails."""
    if not folder.is_dir():
        return "is not a folder"
    try:
        fd, name = tempfile.mkstemp(prefix=".lungnode-check-", dir=folder)
    except OSError:
        return "is not writable"
    os.close(fd)
    os.unlink(name)
    return None


def _cannot_append(file: Path) -> bool:
    """Whether opening ``file`` for append fails, as the log handler would open it (nothing is written)."""
    try:
        with file.open("a", encoding="utf-8"):
            return False
    except OSError:
        return True


def _cannot_create(file: Path) -> str | None:
    """Why this user cannot create ``file``, whose folder exists (None: it can), by creating and removing it; one
    that appeared meanwhile (a node started) is opened for append instead, and kept."""
    if not file.parent.is_dir():
        return "is not a folder"
    try:
        os.close(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return "is not writable" if _cannot_append(file) else None
    except OSError:
        return "is not writable"
    file.unlink()
    return None


def _log_file_problem(log_file: Path, fix: str) -> str | None:
    """Why serve could not open ``log_file`` (it stops at once then, before it could log why), or None."""
    if log_file.exists():
        if log_file.is_file() and not _cannot_append(log_file):
            return None
        return f"logging.file: {log_file} cannot be written by this user: {fix}"
    existing = _nearest_existing(log_file.parent)
    why = _cannot_create(log_file) if existing == log_file.parent else _cannot_create_in(existing)
    if why is None:
        return None
    return f"logging.file: {log_file} cannot be created by this user ({existing} {why}): {fix}"


def _unwritable(cfg: Config) -> dict[str, str]:
    """The folders the node writes (spool, SQLite ledger) and the log file that this user could not create or
    write, by key; each found by really creating a file there, not by permission bits."""
    from sqlalchemy.engine import make_url

    url = make_url(cfg.storage.database_url)
    folders = {"storage.spool_dir": cfg.storage.spool_dir.absolute()}
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        folders["storage.database_url"] = Path(str(url.database)).parent.absolute()
    fix = "run the node as a user who can, or change it"
    problems = {}
    for key, folder in folders.items():
        existing = _nearest_existing(folder)
        if why := _cannot_create_in(existing):
            verb = "written" if existing == folder else "created"
            problems[key] = f"{key}: {folder} cannot be {verb} by this user ({existing} {why}): {fix}"
    if cfg.logging.file is not None and (problem := _log_file_problem(cfg.logging.file.absolute(), fix)):
        problems["logging.file"] = problem
    return problems


def cmd_status(args: argparse.Namespace) -> int:
    from node.db.models import Job
    from node.db.status import render_text, summary
    from node.db.trace import render_trace, trace

    cfg = load_config(args.config)
    setup_logging("WARNING")
    criteria = {k: getattr(args, k) for k in TRACE_KEYS if getattr(args, k, None) is not None}
    if getattr(args, "queue", False):
        if criteria or getattr(args, "metrics", False):
            print("lungnode status: --queue lists the whole queue: give it without --metrics or a study option",
                  file=sys.stderr)
            return 2
        return _queue(cfg, as_json=args.json)
    if getattr(args, "metrics", False):
        if criteria:
            print("lungnode status: --metrics counts the whole node: give it without a study option",
                  file=sys.stderr)
            return 2
        return _metrics(cfg)
    with _ledger(cfg) as (engine, sessions), sessions() as s:
        database = engine.url.render_as_string(hide_password=True)
        if "job" in criteria and s.get(Job, criteria["job"]) is None:
            # an id that was never given is a typo, not a study the PACS failed to route here
            print(f"database: {database}\nlungnode status: there is no job {criteria['job']} (lungnode status "
                  f"lists the jobs)", file=sys.stderr)
            return 1
        spool = cfg.storage.spool_dir
        data = trace(s, spool_dir=spool, **criteria) if criteria else summary(s, limit=args.limit, spool_dir=spool)
        if not criteria:
            _add_node_state(data, s, cfg)
        data["database"] = database
    if criteria and not data["studies"]:
        what = ", ".join(f"--{k.replace('_', '-')}" for k in criteria)
        print(f"database: {data['database']}\nnothing received matches {what}: the node never stored it (its log's "
              f"event=store_refused lines say what it refused and why; check the PACS routing to "
              f"{cfg.dicom.ae_title} and the sender's log)",
              file=sys.stderr)
        return 1
    text = render_trace(data) if criteria else render_text(data)
    print(json.dumps(data, indent=2) if args.json else f"database: {data['database']}\n" + text)
    return 0


def _add_node_state(data: dict[str, Any], s: Session, cfg: Config) -> None:
    """What status and its metrics add to the ledger's summary: the spool's headroom, the workers, and which
    outbox destinations this configuration still has (the ledger alone cannot say)."""
    from node.db.status import mark_configured, storage_summary
    from node.db.workers import workers_summary

    data["storage"] = storage_summary(s, cfg.storage.spool_dir, cfg.storage.min_free_disk_mb)
    data["workers"] = workers_summary(s, alive_s=cfg.workers.lease_s)
    mark_configured(data.get("outbox", {}), [d.name for d in cfg.destinations])


def _queue(cfg: Config, *, as_json: bool) -> int:
    """``status --queue``: the waiting jobs in the order workers take them."""
    from node.db.status import queue, render_queue

    with _ledger(cfg) as (_, sessions), sessions() as s:
        a = cfg.assembly
        data = queue(s, study_settle_s=a.study_settle_s, low_max_wait_s=a.low_priority_max_wait_s)
    print(json.dumps(data, indent=2) if as_json else render_queue(data))
    return 0


def _metrics(cfg: Config) -> int:
    """``status --metrics``: always a complete file, also when the ledger cannot be read (exit 1, the reason on
    stderr), so the collector never keeps showing an old, healthy picture."""
    from sqlalchemy.exc import SQLAlchemyError

    from node.db.status import render_metrics, summary
    from node.receive.selfcheck import listener_accepts

    data: dict[str, object] | None = None
    try:
        with _ledger(cfg) as (_, sessions), sessions() as s:
            data = summary(s, limit=0)
            _add_node_state(data, s, cfg)
    except (LungnodeError, SQLAlchemyError) as exc:
        print(f"lungnode: {exc}", file=sys.stderr)
    print(render_metrics(data, __version__, listener_up=listener_accepts(cfg.dicom)), end="")
    return 0 if data is not None else 1


def _told(answered: bool, message: str) -> bool:
    """Print a check's finding: on stdout when it answered, on stderr (where the reason belongs) when not."""
    print(message, file=sys.stdout if answered else sys.stderr)
    return answered


def cmd_echo(args: argparse.Namespace) -> int:
    from node.receive.selfcheck import echo_destination, echo_listener

    cfg = load_config(args.config)
    setup_logging("WARNING")
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # each finding below says what happened, and why
    if args.audit:
        from node.audit.trail import check_repository

        return 0 if _told(*check_repository(cfg.audit)) else 1
    if args.destination is None:
        return 0 if _told(*echo_listener(cfg.dicom, timeout_s=args.timeout)) else 1
    names = [d.name for d in cfg.destinations]
    chosen = [d for d in cfg.destinations if args.destination in ("all", d.name)]
    if not chosen:
        raise LungnodeError(f"no destination named {args.destination!r} in the configuration "
                            f"(destinations: {', '.join(names) or 'none'}); use a name or all")
    failed = 0
    for dest in chosen:
        failed += not _told(*echo_destination(dest, ae_title=cfg.dicom.ae_title, timeout_s=args.timeout))
    return 1 if failed else 0


def cmd_reanalyse(args: argparse.Namespace) -> int:
    from node.db.jobs import requeue_for_reanalysis

    cfg = load_config(args.config)
    setup_logging("WARNING")
    with _ledger(cfg) as (_, sessions):
        print(requeue_for_reanalysis(sessions, args.job))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from node.db.models import Job
    from node.send.outbox import requeue_failed, unsendable

    if (args.job is None) == (not args.failed):
        print("lungnode retry: give either a JOB id or --failed", file=sys.stderr)
        return 2
    if args.resend and args.job is None:
        print("lungnode retry: --resend takes one JOB id (lungnode retry JOB --resend)", file=sys.stderr)
        return 2
    cfg = load_config(args.config)
    setup_logging("WARNING")
    with _ledger(cfg) as (_, sessions):
        if args.job is not None:
            with sessions() as s:
                if s.get(Job, args.job) is None:
                    print(f"lungnode retry: there is no job {args.job} (lungnode status lists the jobs)",
                          file=sys.stderr)
                    return 2
        configured = [d.name for d in cfg.destinations]
        requeued = requeue_failed(sessions, job_id=args.job, resend=args.resend, destinations=configured)
        unknown = unsendable(sessions, destinations=configured, job_id=args.job)
        # Destinations configured after the job ran never got rows: --resend queues its results for them too.
        added = _queue_for_new_destinations(cfg, sessions, args.job) if args.resend else {}
    scope = f"job {args.job}" if args.job is not None else "all jobs"
    for dest, n in added.items():
        print(f"queued {n} object(s) of {scope} for {dest}, which never had them (configured after the job ran)")
    if not requeued and not added and not unknown:
        print(f"no failed or waiting sends for {scope}: nothing requeued" + (
            "; it has no results to send (lungnode reanalyse JOB analyses it again)" if args.resend else ""))
        return 0
    what = "send(s), delivered ones included," if args.resend else "failed or waiting send(s)"
    for dest, n in requeued:
        print(f"requeued {n} {what} to {dest} ({scope}), with a fresh set of attempts; a running node sends "
              f"them within sending.poll_interval_s")
    for dest, n in unknown:  # left as they are: no node would send them
        print(f"lungnode retry: {n} failed or waiting send(s) to {dest} ({scope}) cannot be sent: {dest} is not a destination in "
              f"{args.config or 'the embedded defaults'} (its destinations: {', '.join(configured) or 'none'}). Add "
              f"it back to destinations and restart the node to send them, or they stay unsent", file=sys.stderr)
    return 1 if unknown else 0


def _queue_for_new_destinations(cfg: Config, sessions: sessionmaker[Session], job_id: int) -> dict[str, int]:
    """Queue ``job_id``'s results for each configured destination that has no row of it; (destination, count)."""
    from node.outputs.write import OUTPUTS_FILE
    from node.pipeline.worker import results_dir
    from node.send.outbox import enqueue_results

    out = results_dir(cfg, job_id)
    if not (out / OUTPUTS_FILE).is_file():
        return {}
    added: dict[str, int] = {}
    for dest in cfg.destinations:
        n = enqueue_results(sessions, job_id=job_id, results_dir=out, destinations=[dest])
        if n:
            added[dest.name] = n
    return added


def cmd_synth(args: argparse.Namespace) -> int:
    from node.synthetic.cli import synth_main

    setup_logging("INFO")
    return synth_main(args.rest)


def cmd_models(args: argparse.Namespace) -> int:
    from node.pipeline.models_cli import build_parser as models_parser
    from node.pipeline.models_cli import models_main

    # --config may also come after list/verify (lungnode models verify --config F)
    pre = argparse.ArgumentParser(add_help=False)
    _config_arg(pre)
    known, rest = pre.parse_known_args(args.rest)
    if {"-h", "--help"} & set(rest):  # before reading the configuration: help needs none
        models_parser().parse_args(rest)  # prints the help and exits 0
    cfg = load_config(known.config or args.config)
    setup_logging("WARNING")
    return models_main(rest, cfg.inference)


def cmd_worker(args: argparse.Namespace) -> int:
    from node.db.session import open_database
    from node.pipeline.worker import worker_process_main

    os.umask(PRIVATE_UMASK)
    cfg = _load(args)
    open_database(cfg.storage.database_url, must_exist=True).dispose()  # the node's queue, not a new empty one
    worker_process_main(cfg)
    return 0


def cmd_process(args: argparse.Namespace) -> int:
    from node.pipeline.process import process

    cfg = load_config(args.config)
    setup_logging("WARNING" if cfg.logging.level == "INFO" else cfg.logging.level)
    return process(args.input, args.out, cfg)


def cmd_demo(args: argparse.Namespace) -> int:
    from node.demo import run_demo

    try:
        run_demo(args.dir, slices=args.slices, matrix=args.matrix, seed=args.seed, keep_running=not args.exit,
                 timeout_s=args.timeout)
    except KeyboardInterrupt:  # run_demo has stopped both servers on its way out
        print("lungnode demo: interrupted before the results were in", file=sys.stderr)
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lungnode",
        description="DICOM inference node for chest CT: receives series from a PACS, analyses them, sends results back.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lungnode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "serve", help="run the node in the foreground: DICOM listener, series assembly and analysis workers",
        description="Run the node in the foreground until SIGTERM or Ctrl-C: the DICOM listener (dicom.*), series "
        "assembly, the analysis workers (workers.count) and the sender (destinations). Logs go to stderr and "
        "logging.file. Exit status: 0 stopped by a signal, 2 could not start (the reason is printed and, once the "
        "configuration is read, logged as event=node_start_failed; an invalid configuration only on stderr).",
    )
    _config_arg(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "worker", help="run analysis workers only (they take jobs from the database in storage.database_url)",
        description="Run one analysis worker in the foreground, on another machine or beside serve, taking queued "
        "jobs from the node's database (storage.database_url, which must already exist: start serve first) and "
        "writing results under storage.spool_dir, which it must share with the node. Exit status: 0 stopped by "
        "SIGTERM or Ctrl-C, 2 could not start (invalid configuration, no database or one at another schema "
        "version, a log file it cannot write; the reason is printed), 75 a job ran past workers.max_job_s (it is "
        "failed, event=job_timed_out says where it hung; start the worker again, as deploy/lungnode-worker.service "
        "does).",
    )
    _config_arg(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser(
        "process",
        help="analyse a folder of DICOM files offline and write OUT/result.json",
        description="Run selection, QA and the models on a folder holding a series or a study: the best series "
        "of the study is analysed, and when its checks refuse it (or its analysis fails) the next one, as in the "
        "node. Exit status: 0 analysed, 3 rejected (the reason is in result.json), 1 failed (the analysis, or a DICOM "
        "output that could not be built: result.json's output_errors), 2 usage or set-up error "
        "(missing input, bad configuration, models that cannot run; nothing is written).",
    )
    p.add_argument("input", type=Path, help="folder (searched recursively) or file of DICOM images")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="where result.json and the outputs go")
    _config_arg(p)
    p.set_defaults(func=cmd_process)

    p = sub.add_parser(
        "echo", help="check that the node's DICOM listener answers (C-ECHO from this machine), or a destination",
        description="Send a C-ECHO to the node as configured (dicom.ae_title at dicom.port; its bind address, or "
        "127.0.0.1 when it listens on all addresses) from this machine, with the calling AE title LUNGNODE-CHECK. "
        "A refusal of that caller by dicom.allowed_callers still shows the listener answers. With dicom.tls, only "
        "the TCP connection is checked. With --destination: a C-ECHO to that destination instead, as the sender "
        "associates (a DICOMweb destination: a search with its credentials). With --audit: a connection to the audit "
        "repository (audit.host) as the audit trail makes it, TLS handshake included; nothing is sent. Exit status: "
        "0 it answered, 1 it did not (the reason on stderr), 2 bad configuration or no such destination.",
    )
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds to wait (default 10)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--destination", metavar="NAME",
                       help="instead, C-ECHO the configured destination NAME (or all of them) as the sender associates: "
                            "its calling AE title, TLS and host; exit 1 when one does not answer, with what to check")
    which.add_argument("--audit", action="store_true",
                       help="instead, connect to the audit repository (audit.host, audit.transport) and close again")
    _config_arg(p)
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser(
        "check-config", help="validate a configuration file and exit (0 valid, 2 invalid)",
        description="Validate a configuration file as serve would read it (embedded defaults, the file, then "
        "LUNGNODE_* environment variables): every key and value, the TLS certificates and keys, and, where this "
        "node runs workers (workers.count > 0), the model folders it names (manifest, file hash, role): a warning, "
        "since the node still receives without them, or an error with --strict. "
        "Exit status: 0 valid, 2 invalid (every problem is printed, naming its key or environment variable).",
    )
    p.add_argument("file", type=Path, nargs="?", help="the YAML file to check")
    p.add_argument("--config", "-c", type=Path, metavar="FILE", help="the same, as the other commands take it")
    p.add_argument("--strict", action="store_true",
                   help="a model folder that cannot be used is an error (exit 2), not a warning")
    p.add_argument("--show", action="store_true", help="print the effective configuration after defaults and environment")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser(
        "status", help="recent studies, series and jobs with their states",
        description="Read the node's database (storage.database_url; the node need not run) and list the most "
        "recent series, newest first (after the analysis workers seen today: busy with a job, idle, stopped, or "
        "lost: not heard from for workers.lease_s): when the last image came, the series state (receiving, complete), its "
        "revision (late images open a new one), instances, origin (modality: analysed; own_output: our results "
        "coming back; other) and its latest job as #ID STATE (queued, running, done, rejected: refused by "
        "selection or QA with its reason, failed, superseded: a newer revision answers for the series), then the "
        "series' number, description and UID. Then the "
        "results to send per destination, counted by state (pending, sending, sent, committed, failed, "
        "superseded), with the last error. Job ids are what lungnode retry takes. With --accession, --patient-id, "
        "--study, --series or --job: what happened to that study instead. Exit status: 0, 1 when nothing "
        "matches such an option, 2 when there is no database.",
    )
    _config_arg(p)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="machine-readable output")
    fmt.add_argument("--metrics", action="store_true",
                     help="the counts in Prometheus' text format (jobs, workers and sends by state, open associations, spool "
                          "headroom), e.g. from a timer into node_exporter's textfile collector folder")
    p.add_argument("--limit", type=_positive, default=20, help="how many recent series to list (default 20)")
    p.add_argument("--queue", action="store_true",
                   help="the jobs waiting for a worker instead, in the order workers take them (most urgent first: "
                        "assembly.priority_by_caller, C-STORE Priority HIGH), with how long each has waited")
    one = p.add_argument_group(
        "what happened to one study (instead of the list; exit 1 when nothing matches)",
        "who sent each series and when, whether it was analysed or refused and why, every event of its jobs, and "
        "each result's state per destination with its last DICOM status and error")
    which = one.add_mutually_exclusive_group()
    which.add_argument("--accession", metavar="NUMBER", help="the study with this Accession Number")
    which.add_argument("--patient-id", metavar="ID", help="the studies of this Patient ID")
    which.add_argument("--study", metavar="UID", help="the study with this Study Instance UID")
    which.add_argument("--series", metavar="UID", help="the series with this Series Instance UID")
    which.add_argument("--job", type=int, metavar="N", help="the series of job N (the ids in the list and the logs)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "retry", help="send results again now: lungnode retry JOB | lungnode retry --failed",
        description="Requeue result sends that gave up (state failed, after sending.max_attempts or a refusal) with "
        "a fresh set of attempts, and make those still waiting for their next attempt due now: run it once a "
        "destination is back. Sends that were superseded by a newer revision of their series are not requeued. "
        "The job ids are in lungnode status and in the event=send_failed log lines (jobs=...). Exit status: 0 "
        "done (also when there was nothing to requeue), 1 some are for a destination the configuration no longer "
        "has (named on stderr: they stay unsent until it is added back), 2 no such job or database.",
    )
    _config_arg(p)
    p.add_argument("job", type=int, nargs="?", help="requeue the failed or waiting sends of this job id")
    p.add_argument("--failed", action="store_true", help="requeue every failed or waiting send of every job")
    p.add_argument("--resend", action="store_true",
                   help="with JOB: send all its results again, delivered ones too (a PACS that lost them), and to "
                        "destinations configured since the job ran")
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser(
        "reanalyse", help="run the models on a finished job's series again: lungnode reanalyse JOB",
        description="Put a finished job (done, rejected, failed or superseded) of a series' newest revision back in "
        "the queue: a running node analyses its images again, for instance after a model update, and sends the "
        "new results as usual (objects that come out the same have the same UIDs, which a PACS keeps once). "
        "Its images must still be in the spool (retention.received_days). Exit status: 0 queued, 2 not possible "
        "(the reason is printed).",
    )
    _config_arg(p)
    p.add_argument("job", type=int, help="the job id (lungnode status lists them)")
    p.set_defaults(func=cmd_reanalyse)

    p = sub.add_parser(
        "synth",
        help="write a synthetic chest-CT series with ground-truth masks (lungnode synth --help for options)",
        add_help=False,
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "models", help="list and verify the ONNX models: lungnode models list|verify [--config F]", add_help=False
    )
    _config_arg(p)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "demo",
        help="the whole loop on this machine: a local Orthanc as PACS sends a synthetic COVID-19 CT to the node "
        "and gets its results back (SEG, SR, key images and KOS)",
        description="Starts a private Orthanc (Debian package orthanc) and a node on free local ports, uploads a "
        "synthetic COVID-19 chest CT to Orthanc, has Orthanc send it to the node and waits for the results (SEG, SR, "
        "key images and the Key Object Selection marking them) to come back into Orthanc; prints Orthanc's web "
        "viewer URL and the result instances. Ctrl-C stops both. "
        "Exit status: 0 the results came back (stopped by --exit or Ctrl-C after that), 1 the node stopped or the "
        "results did not come back within --timeout (the reason and the node's log file are printed), 2 Orthanc is "
        "not installed or failed (the reason is printed), 130 Ctrl-C before the results were in.",
    )
    p.add_argument("--dir", type=Path, help="folder for Orthanc, the node's spool, config and logs (default: a new "
                   "temporary folder)")
    p.add_argument("--slices", type=int, default=120, help="slices of the synthetic CT (default 120)")
    p.add_argument("--matrix", type=int, default=512, help="image size in pixels (default 512)")
    p.add_argument("--seed", type=int, default=1, help="phantom seed (default 1)")
    p.add_argument("--exit", action="store_true", help="stop both servers as soon as the results are in")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the results (default 600)")
    p.set_defaults(func=cmd_demo)
    return parser


PASSTHROUGH = {"synth", "models"}  # subcommands with their own argparse (and --help)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        # Their own parsers get the arguments as typed: through this parser, options before a positional
        # (`synth --slices 20 OUT`) came back out of order.
        args = parser.parse_args(argv[:1])
        args.rest = argv[1:]
    else:
        args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except LungnodeError as exc:
        print(f"lungnode: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `lungnode status | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0


if __name__ == "__main__":
    sys.exit(main())
