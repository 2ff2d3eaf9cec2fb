"""What happened to one study, series or job: ``lungnode status --accession A`` (or --study, --series,
--patient-id, --job).

The question IT gets is "study X has no results in the PACS": this gathers, from the ledger alone,
who sent each series and when, whether it was complete, whether it was analysed or refused and why,
every event of its jobs, and each result object's state per destination with its last DICOM status
and error. The identifiers asked for are matched, never printed: the answer names series by UID.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from node.db.models import Association, Event, Instance, Job, OutboxItem, Series, Study
from node.db.status import iso_seconds, job_result


def matching_series(s: Session, *, job: int | None = None, study: str | None = None, series: str | None = None,
                    accession: str | None = None, patient_id: str | None = None) -> list[Series]:
    """The series one criterion names (a job names its series; a study, accession or patient all their series)."""
    query = select(Series).join(Study, Study.id == Series.study_id)
    if job is not None:
        query = query.join(Job, Job.series_id == Series.id).where(Job.id == job)
    elif series is not None:
        query = query.where(Series.series_instance_uid == series.strip())
    elif study is not None:
        query = query.where(Study.study_instance_uid == study.strip())
    elif accession is not None:
        query = query.where(Study.accession_number == accession.strip())
    elif patient_id is not None:
        query = query.where(Study.patient_id == patient_id.strip())
    else:
        raise ValueError("name a job, study, series, accession number or patient id")
    return list(s.scalars(query.order_by(Series.first_received_at)))


def _senders(s: Session, series_id: int) -> list[dict[str, Any]]:
    rows = s.execute(
        select(Association, func.count(Instance.id))
        .join(Instance, Instance.association_id == Association.id)
        .where(Instance.series_id == series_id)
        .group_by(Association.id)
        .order_by(Association.opened_at)
    ).all()
    return [{"association": a.id, "calling_ae": a.calling_ae, "host": a.peer_host, "opened_at": iso_seconds(a.opened_at),
             "closed_at": iso_seconds(a.closed_at), "state": a.state.value, "instances": n} for a, n in rows]


def _events(s: Session, series_id: int, job_ids: list[int]) -> list[dict[str, Any]]:
    where = Event.series_id == series_id
    if job_ids:
        where = or_(where, Event.job_id.in_(job_ids))
    return [{"at": iso_seconds(e.at), "kind": e.kind, "level": e.level, "job": e.job_id, "message": e.message}
            for e in s.scalars(select(Event).where(where).order_by(Event.at, Event.id))]


def _sends(s: Session, job_id: int) -> list[dict[str, Any]]:
    rows = s.scalars(select(OutboxItem).where(OutboxItem.job_id == job_id).order_by(OutboxItem.destination,
                                                                                      OutboxItem.id))
    return [{"destination": o.destination, "kind": o.kind, "sop_instance_uid": o.sop_instance_uid,
             "state": o.state.value, "attempts": o.attempts,
             "last_status": None if o.last_status is None else f"0x{o.last_status:04X}",
             "sent_at": iso_seconds(o.sent_at), "committed_at": iso_seconds(o.committed_at), "last_error": o.last_error,
             "withdrawn": o.rejected_by is not None}  # a rejection note (reject_replaced) withdrew it
            for o in rows]


def trace(s: Session, *, spool_dir: Path | None = None, **criteria: Any) -> dict[str, Any]:
    """Every matching series with its senders, jobs (with their result sends) and events, grouped by study.
    ``spool_dir``: where the results are, to name each job's result.json and its QA flags."""
    studies: dict[str, dict[str, Any]] = {}
    for ser in matching_series(s, **criteria):
        jobs = list(s.scalars(select(Job).where(Job.series_id == ser.id).order_by(Job.id)))
        entry = studies.setdefault(ser.study.study_instance_uid,
                                   {"study_instance_uid": ser.study.study_instance_uid, "series": []})
        entry["series"].append({
            "series_instance_uid": ser.series_instance_uid, "modality": ser.modality,
            "series_number": ser.series_number, "origin": ser.origin.value, "state": ser.state.value,
            "revision": ser.revision, "instances": ser.instance_count,
            "first_received_at": iso_seconds(ser.first_received_at), "last_received_at": iso_seconds(ser.last_received_at),
            "completed_at": iso_seconds(ser.completed_at), "purged_at": iso_seconds(ser.purged_at), "note": ser.note,
            "senders": _senders(s, ser.id),
            "jobs": [{"id": j.id, "revision": j.revision, "state": j.state.value, "attempts": j.attempts,
                      "created_at": iso_seconds(j.created_at), "started_at": iso_seconds(j.started_at),
                      "finished_at": iso_seconds(j.finished_at), "worker": j.worker, "error": j.error,
                      "sends": _sends(s, j.id), "result": job_result(spool_dir, j.id)} for j in jobs],
            "events": _events(s, ser.id, [j.id for j in jobs]),
        })
    return {"studies": list(studies.values())}


def render_trace(data: dict[str, Any]) -> str:
    """The trace as text, one block per series: senders, then the timeline, then the result sends per job."""
    lines: list[str] = []
    for study in data["studies"]:
        lines.append(f"study {study['study_instance_uid']}")
        for ser in study["series"]:
            number = ser["series_number"] if ser["series_number"] is not None else "-"
            lines += ["", f"  series {ser['series_instance_uid']}",
                      f"    {ser['modality'] or '?'} series number {number}, {ser['instances']} instances, "
                      f"origin {ser['origin']}, state {ser['state']}, revision {ser['revision']}"
                      + (f", images deleted by retention {ser['purged_at']}" if ser["purged_at"] else "")]
            if ser["note"]:
                lines.append(f"    note: {ser['note']}")
            for a in ser["senders"]:
                lines.append(f"    sent by {a['calling_ae']} from {a['host']} (association {a['association']}, "
                             f"{a['instances']} instances, opened {a['opened_at']}, {a['state']})")
            lines.append("    timeline (UTC):")
            for e in ser["events"]:
                job = f" job #{e['job']}" if e["job"] else ""
                lines.append(f"      {e['at']} {e['kind']}{job}" + (f": {e['message']}" if e["message"] else ""))
            if not ser["events"]:
                lines.append("      (no events)")
            for j in ser["jobs"]:
                lines.append(f"    job #{j['id']} (revision {j['revision']}): {j['state']}"
                             + (f", {j['error']}" if j["error"] else ""))
                if j.get("result"):
                    lines.append(f"      result {j['result']['path']}")
                    lines += [f"      QA flag {q['code']}: {q['reason']}" for q in j["result"]["qa_flags"]]
                for o in j["sends"]:
                    status = f" status {o['last_status']}" if o["last_status"] else ""
                    if o["committed_at"] or o["sent_at"]:
                        status += f" at {o['committed_at'] or o['sent_at']}"
                    error = f": {o['last_error']}" if o["last_error"] and o["state"] not in ("sent", "committed") else ""
                    withdrawn = ", withdrawn by a rejection note" if o["withdrawn"] else ""
                    lines.append(f"      {o['destination']:12} {o['kind']:9} {o['state']:10} attempts {o['attempts']}"
                                 f"{status}{error}{withdrawn}")
                if not j["sends"]:
                    lines.append("      no result sends (no destination, no objects, or not analysed)")
    return "\n".join(lines)
