"""Read-only summaries of the ledger for ``lungnode status``."""

from __future__ import annotations

import datetime as dt
import json
import math
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from node import __version__
from node.audit.backlog import waiting
from node.db.jobs import FINISHED_STATES, queue_order, study_settling, taken_as
from node.db.models import (
    Association,
    AssociationState,
    Event,
    Instance,
    Job,
    JobState,
    SendState,
    Series,
    Study,
    utcnow,
)
from node.db.workers import WORKER_STATES
from node.receive.priority import priority_name
from node.receive.spool import results_path
from node.send.outbox import outbox_summary


def iso_seconds(value: Any) -> str | None:
    """A ledger time as ISO 8601 to the second (None stays None), as status and its trace print them."""
    return value.isoformat(timespec="seconds") if value is not None else None


def job_result(spool_dir: Path | None, job_id: int) -> dict[str, Any] | None:
    """Where a job's result.json is, its status and its QA flags (a partial lung coverage, a slice gap: what a
    "done" alone does not say), when the file is on this machine."""
    if spool_dir is None:
        return None
    # node.pipeline.runner.RESULT_FILE; not imported from there: it would load the models' runtime into status
    path = results_path(spool_dir, job_id) / "result.json"
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict):  # not ours, or damaged: status must still answer
        return None
    qa = result.get("qa")
    flags = [{"code": str(q["code"]), "reason": q.get("reason")} for q in (qa if isinstance(qa, list) else [])
             if isinstance(q, dict) and q.get("severity") == "flag" and q.get("code")]
    return {"path": str(path), "status": result.get("status"), "qa_flags": flags}


#: Events ``serve`` records when analysis stops or starts (models missing or broken, then fixed).
ANALYSIS_DISABLED, ANALYSIS_ENABLED = "analysis_disabled", "analysis_enabled"


def analysis_state(s: Session) -> dict[str, Any]:
    """Whether the node analyses, from the latest analysis event: a node whose models are broken still answers
    C-ECHO and queues jobs, so its health check alone would say all is well."""
    last = s.scalars(select(Event).where(Event.kind.in_((ANALYSIS_DISABLED, ANALYSIS_ENABLED)))
                     .order_by(Event.id.desc()).limit(1)).first()
    if last is None or last.kind == ANALYSIS_ENABLED:
        return {"enabled": True, "since": iso_seconds(last.at) if last else None, "reason": None}
    return {"enabled": False, "since": iso_seconds(last.at), "reason": last.message}


def record_analysis_state(s: Session, *, problem: str | None) -> None:
    """Record that analysis is disabled (``problem``) or enabled, when that differs from the last record."""
    state = analysis_state(s)
    if problem is not None and (state["enabled"] or state["reason"] != problem):
        s.add(Event(kind=ANALYSIS_DISABLED, level="error", message=problem))
    elif problem is None and not state["enabled"]:
        s.add(Event(kind=ANALYSIS_ENABLED, message="the models pass their checks"))


def summary(s: Session, *, limit: int = 20, spool_dir: Path | None = None) -> dict[str, Any]:
    """Recent series (newest first) with their study and jobs, plus counts by state. ``spool_dir``: read the QA
    flags of each listed series' latest finished job from its result.json."""
    series_rows = s.execute(
        select(Series, Study).join(Study, Study.id == Series.study_id).order_by(Series.last_received_at.desc()).limit(limit)
    ).all()
    series_ids = [row.Series.id for row in series_rows]
    jobs_by_series: dict[int, list[Job]] = {}
    if series_ids:
        for job in s.scalars(select(Job).where(Job.series_id.in_(series_ids)).order_by(Job.revision)):
            jobs_by_series.setdefault(job.series_id, []).append(job)
    series: list[dict[str, Any]] = [
        {
            "study_instance_uid": study.study_instance_uid,
            "series_instance_uid": ser.series_instance_uid,
            "modality": ser.modality,
            "series_number": ser.series_number,
            "series_description": ser.series_description,
            "origin": ser.origin.value,
            "state": ser.state.value,
            "revision": ser.revision,
            "instances": ser.instance_count,
            "last_received_at": iso_seconds(ser.last_received_at),
            "completed_at": iso_seconds(ser.completed_at),
            "note": ser.note,
            "jobs": [
                {
                    "id": j.id,
                    "revision": j.revision,
                    "state": j.state.value,
                    "priority": priority_name(j.priority),
                    "created_at": iso_seconds(j.created_at),
                    "finished_at": iso_seconds(j.finished_at),
                    "error": j.error,
                }
                for j in jobs_by_series.get(ser.id, [])
            ],
        }
        for ser, study in series_rows
    ]
    for entry in series:
        if entry["jobs"] and entry["jobs"][-1]["state"] in (JobState.done.value, JobState.rejected.value):
            result = job_result(spool_dir, entry["jobs"][-1]["id"])
            entry["jobs"][-1]["qa_flags"] = [q["code"] for q in result["qa_flags"]] if result else []
    jobs_by_state = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    open_assocs = s.scalar(select(func.count()).where(Association.state == AssociationState.open)) or 0
    return {
        "counts": {
            "studies": s.scalar(select(func.count(Study.id))) or 0,
            "series": s.scalar(select(func.count(Series.id))) or 0,
            "jobs": {state.value: n for state, n in jobs_by_state.items()},
            "open_associations": open_assocs,
            "last_received_at": iso_seconds(s.scalar(select(func.max(Series.last_received_at)))),
            "oldest_queued_at": iso_seconds(s.scalar(select(func.min(Job.created_at)).where(
                Job.state == JobState.queued))),
            "queued_by_priority": {priority_name(level): n for level, n in s.execute(
                select(Job.priority, func.count()).where(Job.state == JobState.queued).group_by(Job.priority)).all()},
        },
        "analysis": analysis_state(s),
        "recent": recent_jobs(s),
        "series": series,
        "outbox": outbox_summary(s),
    }


#: The window of ``recent_jobs``: a day, the span over which a department reads its turnaround.
RECENT_HOURS = 24


def recent_jobs(s: Session, *, now: dt.datetime | None = None, hours: float = RECENT_HOURS) -> dict[str, Any]:
    """Jobs finished in the last ``hours``, by state, and for the done ones how long the analysis took and how
    long from the series' last image to its results being written (median, 90th percentile, max): what a
    turnaround target is checked against. From each job's recorded timings; nothing is read from the spool."""
    since = (now or utcnow()) - dt.timedelta(hours=hours)
    finished: dict[str, int] = {state.value: 0 for state in FINISHED_STATES}
    analysis: list[float] = []
    to_result: list[float] = []
    rows = s.execute(select(Job.state, Job.created_at, Job.finished_at, Job.timings)
                     .where(Job.state.in_(FINISHED_STATES), Job.finished_at >= since)).all()
    for state, created_at, finished_at, timings in rows:
        finished[state.value] += 1
        if state != JobState.done:
            continue
        t = timings if isinstance(timings, dict) else {}
        if isinstance(t.get("total"), (int, float)):
            analysis.append(float(t["total"]))
        complete = t.get("series_complete")  # last image -> series complete, before the job existed
        to_result.append((float(complete) if isinstance(complete, (int, float)) else 0.0)
                         + max(0.0, (finished_at - created_at).total_seconds()))
    return {"hours": hours, "finished": finished, "analysis_s": _spread(analysis),
            "last_image_to_result_s": _spread(to_result)}


def _spread(values: list[float]) -> dict[str, float] | None:
    """Median, 90th percentile (nearest rank), max, sum and count of some durations; None for none."""
    if not values:
        return None
    ordered = sorted(values)
    n = len(ordered)

    def rank(q: float) -> float:
        return round(ordered[min(n - 1, max(1, math.ceil(q * n)) - 1)], 2)

    return {"count": n, "median": rank(0.5), "p90": rank(0.9), "max": round(ordered[-1], 2),
            "sum": round(sum(ordered), 2)}


def storage_summary(s: Session, spool_dir: Path, min_free_mb: int) -> dict[str, Any]:
    """Images held (from the ledger: no walk of a spool of millions of files) and the spool disk's free space,
    beside the threshold under which C-STORE is refused: the headroom IT watches."""
    held = s.scalar(select(func.coalesce(func.sum(Instance.size_bytes), 0)).join(Series, Series.id == Instance.series_id)
                    .where(Series.purged_at.is_(None))) or 0
    out: dict[str, Any] = {"spool_dir": str(spool_dir), "images_bytes": int(held),
                           "refuse_below_bytes": min_free_mb * 2**20, "disk_free_bytes": None,
                           "audit_waiting": waiting(spool_dir)}
    try:
        out["disk_free_bytes"] = shutil.disk_usage(spool_dir).free
    except OSError:
        pass  # not on this machine, or run from another folder: say so in the text
    return out


def _gb(n: int) -> str:
    """A size the way people read it: 0 B, 640 MiB, 12.3 GiB (never "0.0 GiB" for 10 MB)."""
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} B"


def queue(s: Session, *, study_settle_s: float, low_max_wait_s: float = 0.0,
          now: dt.datetime | None = None) -> dict[str, Any]:
    """The jobs waiting for a worker, in the order workers take them (``JobQueue.claim``): what stands before an
    urgent study. A job whose study is still arriving waits out of turn (``settling``); a low job that has waited
    ``low_max_wait_s`` is taken as medium (``taken_as``)."""
    now = now or utcnow()
    series = aliased(Series)
    settling = study_settling(series, now, study_settle_s).label("settling")
    rows = s.execute(select(Job, series.series_instance_uid, Study.study_instance_uid, settling,
                            taken_as(now, low_max_wait_s))
                     .join(series, Job.series_id == series.id).join(Study, Study.id == series.study_id)
                     .where(Job.state == JobState.queued).order_by(*queue_order(now, low_max_wait_s))).all()
    jobs = [{"position": n, "id": job.id, "priority": priority_name(job.priority), "taken_as": priority_name(level),
             "revision": job.revision, "queued_at": iso_seconds(job.created_at),
             "waiting_s": round((now - job.created_at).total_seconds()), "settling": bool(waiting),
             "series_instance_uid": series_uid, "study_instance_uid": study_uid}
            for n, (job, series_uid, study_uid, waiting, level) in enumerate(rows, start=1)]
    running = s.scalar(select(func.count(Job.id)).where(Job.state == JobState.running)) or 0
    return {"queued": jobs, "running": running}


def _duration(seconds: int) -> str:
    minutes, sec = divmod(max(0, seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


def render_queue(data: dict[str, Any]) -> str:
    jobs = data["queued"]
    if not jobs:
        return f"queue: empty ({data['running']} running)"
    lines = [f"queue: {len(jobs)} waiting, {data['running']} running; workers take them in this order",
             f"{'#':>3} {'job':>6} {'priority':8} {'waiting':>8}  {'':9} series"]
    for j in jobs:
        # settling: its study is still arriving, taken once it is complete; "as medium": a low job that waited long
        note = "settling" if j["settling"] else (f"as {j['taken_as']}" if j["taken_as"] != j["priority"] else "")
        lines.append(f"{j['position']:>3} {'#' + str(j['id']):>6} {j['priority']:8} {_duration(j['waiting_s']):>8}  "
                     f"{note:9} {j['series_instance_uid']}")
    return "\n".join(lines)


def render_storage(storage: dict[str, Any]) -> str:
    line = f"spool {storage['spool_dir']}: {_gb(storage['images_bytes'])} of received images held"
    if storage["disk_free_bytes"] is None:
        return line + "; the folder is not here (run status where the node runs, or give absolute paths)"
    low = "  LOW: C-STORE is being refused" if storage["disk_free_bytes"] < storage["refuse_below_bytes"] else ""
    line += (f"; disk free {_gb(storage['disk_free_bytes'])} (C-STORE refused below "
             f"{_gb(storage['refuse_below_bytes'])}){low}")
    if storage.get("audit_waiting"):
        line += (f"\n{storage['audit_waiting']} audit messages waiting for the audit repository "
                 f"(see event=audit_send_failed in the node's log)")
    return line


def _series_name(ser: dict[str, Any]) -> str:
    """The series' number and description as a PACS lists them, before its UID: what IT recognises a series by."""
    name = " ".join(str(v) for v in (ser.get("series_number"), ser.get("series_description")) if v not in (None, ""))
    return f"{name}  " if name else ""


def render_text(data: dict[str, Any]) -> str:
    c = data["counts"]
    jobs = ", ".join(f"{k} {v}" for k, v in sorted(c["jobs"].items())) or "none"
    lines = [
        f"studies {c['studies']}  series {c['series']}  open associations {c['open_associations']}  jobs: {jobs}",
    ]
    analysis = data.get("analysis") or {"enabled": True}
    if not analysis["enabled"]:
        lines.append(f"ANALYSIS DISABLED since {analysis['since']}: {analysis['reason']}. Images are received and "
                     f"jobs wait in the queue; fix the models (lungnode models verify), the node checks them again "
                     f"every workers.models_recheck_s")
    if "workers" in data:
        lines.append(render_workers(data["workers"], queued=c["jobs"].get(JobState.queued.value, 0),
                                    analysis_enabled=analysis["enabled"]))
    if "recent" in data:
        lines.append(render_recent(data["recent"]))
    lines += [
        "",
        f"{'last received (UTC)':20} {'state':10} {'rev':>3} {'inst':>5} {'origin':10} {'job':19} series",
    ]
    for ser in data["series"]:
        job = ser["jobs"][-1] if ser["jobs"] else None
        job_text = f"#{job['id']} {job['state']}" if job else "-"
        if job and job["priority"] != "medium":
            job_text += f" {job['priority']}"
        lines.append(
            f"{(ser['last_received_at'] or '')[:19]:20} {ser['state']:10} {ser['revision']:>3} {ser['instances']:>5} "
            f"{ser['origin']:10} {job_text:19} {_series_name(ser)}{ser['series_instance_uid']}"
        )
        if ser["note"]:
            lines.append(f"{'':20} note: {ser['note']}")
        if job and job["error"]:  # why it was refused, failed or superseded: what the reader came for
            lines.append(f"{'':20} job #{job['id']}: {job['error']}")
        if job and job.get("qa_flags"):  # a "done" from part of the lungs, say: the SR carries the same flags
            lines.append(f"{'':20} job #{job['id']} QA flags: {', '.join(job['qa_flags'])}")
    if not data["series"]:
        lines.append("(nothing received yet)")
    lines += ["", render_outbox(data.get("outbox", {}))]
    if "storage" in data:
        lines += ["", render_storage(data["storage"])]
    return "\n".join(lines)


def render_recent(recent: dict[str, Any]) -> str:
    """One line: what finished in the window, and the turnaround of the done jobs."""
    head = f"last {recent['hours']:g} h: "
    if not any(recent["finished"].values()):
        return head + "no job finished"
    parts = [", ".join(f"{state} {n}" for state, n in recent["finished"].items())]
    for key, what in (("analysis_s", "analysis"), ("last_image_to_result_s", "last image to result")):
        spread = recent[key]
        if spread:
            parts.append(f"{what} median {spread['median']:.1f} s (90 % {spread['p90']:.1f} s, max {spread['max']:.1f} s)")
    return head + "; ".join(parts)


#: Stopped workers that status's text lists, the most recently stopped; older ones are counted (--json lists all).
STOPPED_LISTED = 2


def _workers_to_list(workers: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The workers worth a line, live ones first, then lost ones, then the latest stopped; and how many stopped
    ones are left out: every restart adds a stopped row, which would bury the live worker among them."""
    live = [w for w in workers if w["state"] in ("busy", "idle")]
    lost = [w for w in workers if w["state"] == "lost"]
    stopped = sorted((w for w in workers if w["state"] == "stopped"), key=lambda w: w["seen_s_ago"])
    return live + lost + stopped[:STOPPED_LISTED], max(0, len(stopped) - STOPPED_LISTED)


def render_workers(workers: list[dict[str, Any]], *, queued: int, analysis_enabled: bool = True) -> str:
    """One line per worker seen today (old stopped ones counted); a warning when jobs wait and no worker is alive to
    take them, which says why: models that do not pass their checks, or workers that stopped."""
    alive = [w for w in workers if w["state"] in ("busy", "idle")]
    counts = ", ".join(f"{n} {st}" for st in WORKER_STATES if (n := sum(w["state"] == st for w in workers)))
    lines = [f"workers: {counts or 'none has run today'}"]
    listed, more_stopped = _workers_to_list(workers)
    for w in listed:
        doing = f"job #{w['job']}" if w["state"] == "busy" else w["state"]
        # a remote worker left running through an upgrade runs the old code on the new schema
        other = (f"  version {w['version']}, not {__version__}: restart it" if w["state"] in ("busy", "idle")
                 and w["version"] != __version__ else "")
        lines.append(f"  {w['name']:28} {doing:12} {w['provider'] or '-':24} seen {_duration(w['seen_s_ago'])} ago"
                     + other)
    if more_stopped:
        lines.append(f"  ... and {more_stopped} more stopped (lungnode status --json lists them)")
    if queued and not alive and not analysis_enabled:
        lines.append(f"{queued} jobs wait for the models: serve starts no worker while analysis is disabled (above) "
                     "and starts them once the models pass their checks")
    elif queued and not alive:
        lines.append(f"NO WORKER ALIVE: {queued} jobs wait. Serve starts workers.count of them (its log says why "
                     "one stopped: event=worker_died); `lungnode worker` runs more")
    return "\n".join(lines)


def mark_configured(outbox: dict[str, Any], configured: list[str]) -> None:
    """Mark each outbox destination with whether the configuration still has it (``configured``): the sender
    skips the rows of one it no longer has, so they wait forever unless it is added back."""
    for dest, entry in outbox.items():
        entry["configured"] = dest in configured


def render_outbox(outbox: dict[str, Any]) -> str:
    """Results to send, per destination: counts by state and the last error of what is not delivered."""
    if not outbox:
        return "outbox: nothing queued for sending"
    lines = [f"{'destination':20} {'pending':>7} {'sending':>7} {'sent':>6} {'committed':>9} {'failed':>6} "
             f"{'superseded':>10}  last error"]
    for dest, entry in sorted(outbox.items()):
        c = entry["counts"]
        when = f"{entry['last_error_at']} " if entry["last_error_at"] else ""
        error = f"{when}{entry['last_error']}" if entry["last_error"] else "-"
        lines.append(f"{dest:20} {c['pending']:>7} {c['sending']:>7} {c['sent']:>6} {c['committed']:>9} {c['failed']:>6} "
                     f"{c['superseded']:>10}  {error}")
        if entry.get("configured") is False:
            unsent = c["pending"] + c["sending"] + c["failed"]
            lines.append(f"{'':20} {dest} is not configured: add it back to destinations (and restart the node), or "
                         f"its {unsent} unsent result(s) are never sent" if unsent else
                         f"{'':20} {dest} is not configured any more: nothing is left to send to it")
    return "\n".join(lines)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _gauge(name: str, help_text: str, value: float | int) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]


def _summary(name: str, help_text: str, spread: dict[str, float] | None) -> list[str]:
    """A Prometheus summary over a window: quantiles 0.5, 0.9 and 1, with _sum and _count (0 when empty)."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} summary"]
    if spread:
        lines += [f'{name}{{quantile="{q}"}} {spread[key]}' for q, key in (("0.5", "median"), ("0.9", "p90"), ("1", "max"))]
    return lines + [f"{name}_sum {spread['sum'] if spread else 0}", f"{name}_count {spread['count'] if spread else 0}"]


def render_metrics(data: dict[str, Any] | None, version: str, *, listener_up: bool) -> str:
    """The summary in Prometheus' text format, for node_exporter's textfile collector (or any scraper that
    reads it): run ``lungnode status --metrics`` from a timer into the collector's folder. Every job state and
    send state is listed, at 0 when empty, so an alert on a rising count starts from a series. ``data`` None: the
    ledger could not be read; the file then says so (lungnode_ledger_up 0) instead of going stale."""
    lines = ["# HELP lungnode_info The lungnode version that wrote these metrics.", "# TYPE lungnode_info gauge",
             f'lungnode_info{{version="{_label(version)}"}} 1',
             *_gauge("lungnode_listener_up", "1 while the DICOM listener accepts connections.", int(listener_up)),
             *_gauge("lungnode_ledger_up", "1 when the ledger (database) could be read.", int(data is not None))]
    if data is None:
        return "\n".join(lines) + "\n"
    c = data["counts"]
    for key, name, help_text in (("last_received_at", "lungnode_last_received_timestamp_seconds",
                                  "When the newest image was received (Unix time)."),
                                 ("oldest_queued_at", "lungnode_oldest_queued_job_timestamp_seconds",
                                  "When the oldest job still waiting for a worker was queued (Unix time).")):
        if c.get(key):
            lines += _gauge(name, help_text, int(dt.datetime.fromisoformat(c[key]).timestamp()))
    analysis = data.get("analysis") or {"enabled": True}
    lines += [*_gauge("lungnode_analysis_enabled", "0 while serve cannot analyse (models missing or broken; "
                      "jobs wait in the queue).", int(analysis["enabled"])),
              *_gauge("lungnode_studies", "Studies in the ledger.", c["studies"]),
              *_gauge("lungnode_series", "Series in the ledger.", c["series"]),
              *_gauge("lungnode_open_associations", "DICOM associations open now.", c["open_associations"]),
              "# HELP lungnode_jobs Analysis jobs by state.", "# TYPE lungnode_jobs gauge"]
    lines += [f'lungnode_jobs{{state="{st.value}"}} {c["jobs"].get(st.value, 0)}' for st in JobState]
    lines += ["# HELP lungnode_queued_jobs Jobs waiting for a worker, by priority (an urgent one waiting is worth "
              "an alert).", "# TYPE lungnode_queued_jobs gauge"]
    lines += [f'lungnode_queued_jobs{{priority="{p}"}} {c.get("queued_by_priority", {}).get(p, 0)}'
              for p in ("high", "medium", "low")]
    recent = data.get("recent")
    if recent is not None:
        window = f"the last {recent['hours']:g} h"
        lines += [f"# HELP lungnode_jobs_finished_recent Jobs finished in {window}, by state.",
                  "# TYPE lungnode_jobs_finished_recent gauge"]
        lines += [f'lungnode_jobs_finished_recent{{state="{st}"}} {n}' for st, n in recent["finished"].items()]
        for key, name, what in (("analysis_s", "lungnode_analysis_seconds", "Analysis time"),
                                ("last_image_to_result_s", "lungnode_last_image_to_result_seconds",
                                 "Time from a series' last image to its results written")):
            lines += _summary(name, f"{what} of the jobs done in {window} (quantile 1 is the longest).", recent[key])
    lines += ["# HELP lungnode_sends Result objects to send, by destination and state.", "# TYPE lungnode_sends gauge"]
    for dest, entry in sorted(data.get("outbox", {}).items()):
        lines += [f'lungnode_sends{{destination="{_label(dest)}",state="{st.value}"}} {entry["counts"].get(st.value, 0)}'
                  for st in SendState]
    if "workers" in data:
        lines += ["# HELP lungnode_workers Analysis worker processes seen today, by state (lost: not seen for "
                  "workers.lease_s; none busy or idle while jobs wait is worth an alert).", "# TYPE lungnode_workers gauge"]
        lines += [f'lungnode_workers{{state="{st}"}} {sum(w["state"] == st for w in data["workers"])}'
                  for st in WORKER_STATES]
    storage = data.get("storage")
    if storage is not None:
        lines += [*_gauge("lungnode_spool_images_bytes", "Received images held in the spool.", storage["images_bytes"]),
                  *_gauge("lungnode_spool_refuse_below_bytes", "Free space under which C-STORE is refused.",
                          storage["refuse_below_bytes"])]
        if storage["disk_free_bytes"] is not None:
            lines += _gauge("lungnode_spool_disk_free_bytes", "Free space on the spool's disk.",
                            storage["disk_free_bytes"])
        lines += _gauge("lungnode_audit_messages_waiting", "Audit messages the audit repository has not taken yet.",
                        storage["audit_waiting"])
    return "\n".join(lines) + "\n"
