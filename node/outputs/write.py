"""``write_outputs``: the DICOM objects of one analysis, written beside result.json.

    Analysis + source files ─► SEG (seg.dcm) ─► SR (sr.dcm) ─► key images (key_image_N.dcm) ─► KOS (kos.dcm)
                            ─► outputs.json

``outputs.json`` is what the sender reads; its shape is a fixed interface::

    {"objects": [{"kind": "seg"|"sr"|"key_image"|"kos", "file": "<name relative to the dir>",
                  "sop_class_uid": ..., "sop_instance_uid": ..., "series_instance_uid": ...,
                  "study_instance_uid": ..., "transfer_syntax_uid": ...}]}

Objects belong to the source study (same Study Instance UID, patient module copied) and carry
deterministic UIDs (:mod:`node.outputs.uids`). A failure to build one object is logged and the
others are still written: a missing SEG must not cost the radiologist the SR that says why.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydicom import config
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pydicom.valuerep import DA, DT, TM, validate_value

from node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.config import InferenceSettings, OutputsSettings
from node.logs import kv, phi
from node.outputs.charset import prepare_source_character_sets, settle_character_set
from node.outputs.clock import creation_moment, stamp_creation
from node.outputs.codes import STRUCTURES, ModelRole
from node.outputs.identity import COPIED_KEYWORDS
from node.outputs.keyimage import build_key_images
from node.outputs.kos import build_kos
from node.outputs.seg import AlgorithmInfo, OutputError, SegmentSpec, build_seg, read_source_headers
from node.outputs.sr import build_sr, predecessor_reference
from node.outputs.sr_template import SRTemplate, load_template
from node.outputs.uids import OutputUIDs, content_digest
from node.pipeline.call import calls_pneumonia
from node.pipeline.infer import model_name
from node.pipeline.manifest import ALGORITHM_FAMILIES, ManifestError, ModelManifest, load_manifest
from node.pipeline.runner import Analysis

log = logging.getLogger(__name__)
# highdicom logs every module it copies at INFO (dozens of lines per object): keep its warnings only.
logging.getLogger("highdicom").setLevel(logging.WARNING)

OUTPUTS_FILE = "outputs.json"


def _value_problem(vr: str, value: object) -> bool:
    """True where ``value`` is not valid for ``vr`` (a date written 1961-03-15, a sex written m)."""
    texts = [str(v) for v in value] if isinstance(value, (list, tuple, MultiValue)) else [str(value)]
    try:
        for text in texts:
            if text and vr in ("DA", "TM", "DT"):
                {"DA": DA, "TM": TM, "DT": DT}[vr](text)
            validate_value(vr, text, config.RAISE)
    except (ValueError, TypeError, OverflowError):
        return True
    return False


def clean_copied_values(headers: Mapping[str, Dataset]) -> list[str]:
    """Leave empty, in these in-memory headers, the copied values the standard does not allow; returns their
    keywords. The outputs then carry the attribute empty (all are type 2 there) instead of not being written."""
    dropped: set[str] = set()
    for ds in headers.values():
        for keyword in COPIED_KEYWORDS:
            if keyword not in ds or ds[keyword].value in (None, ""):
                continue
            element = ds[keyword]
            if _value_problem(element.VR, element.value):
                element.value = ""
                dropped.add(keyword)
    return sorted(dropped)
Kind = Literal["seg", "sr", "key_image", "kos"]
ROLES: tuple[ModelRole, ...] = ("lung", "lesion", "diagnosis")


@dataclass(frozen=True)
class WrittenObject:
    """One entry of outputs.json."""

    kind: Kind
    file: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str


def revised(description: str, revision: int) -> str:
    """A later revision's series say so in their description (at most 64 characters, DICOM LO): the earlier
    revision's series stay in the PACS under the same number, and a reader must tell which is current."""
    if revision <= 1:
        return description
    suffix = f" rev {revision}"
    return description[: 64 - len(suffix)].rstrip() + suffix


def models_by_role(analysis: Analysis, manifests: Mapping[str, ModelManifest] | None) -> dict[str, dict[str, str]]:
    """name/version/sha256 of each model role for the SR's Algorithm Identification: from the manifests where
    given (the algorithm name and version the SEG names too, so a reader can match the two), else from
    result.json's list (the runner records the models in role order: lung, lesion, diagnosis)."""
    out: dict[str, dict[str, str]] = {}
    if len(analysis.models) == len(ROLES):
        out = {role: dict(m) for role, m in zip(ROLES, analysis.models)}
    for role, m in (manifests or {}).items():
        out[role] = {"name": m.algorithm.name, "version": m.algorithm.version, "sha256": m.sha256}
    return out


def manifests_for(settings: InferenceSettings, analysis: Analysis) -> dict[str, ModelManifest]:
    """The manifests of the models this analysis used (read again, cheaply: no model is loaded).

    A manifest whose sha256 is not among the analysis' models (the folder changed since) is left out.
    """
    used = {m.get("sha256") for m in analysis.models}
    out: dict[str, ModelManifest] = {}
    for role in ROLES:
        try:
            manifest = load_manifest(settings.models_dir / model_name(settings, role), check_hash=False)
        except ManifestError:
            continue
        if manifest.sha256 in used:
            out[role] = manifest
    return out


def segment_specs(manifests: Mapping[str, ModelManifest] | None, models: Mapping[str, Mapping[str, str]]
                  ) -> list[SegmentSpec]:
    """Each segment's type code and algorithm from its model's manifest (built-in codes otherwise)."""
    specs = []
    for s in STRUCTURES:
        manifest = (manifests or {}).get(s.role)
        if manifest is not None:
            labels = {label.name: label for label in manifest.output.labels}
            label = labels.get(s.key)
            type_code = label.snomed.to_code() if label is not None and label.snomed is not None else s.type
            algorithm = AlgorithmInfo(manifest.algorithm.name, manifest.algorithm.version,
                                      manifest.algorithm.family_code(), manifest.sha256)
        else:
            model = models.get(s.role, {})
            type_code = s.type
            algorithm = AlgorithmInfo(model.get("name", "unknown"), model.get("version", "unknown"),
                                      ALGORITHM_FAMILIES["Artificial Intelligence"], model.get("sha256"))
        specs.append(SegmentSpec(s, type_code, algorithm))
    return specs


def save_dataset(ds: Dataset, path: Path) -> None:
    """Write a DICOM file atomically (a reader never sees half of it), naming lungnode as its writer."""
    tmp = path.with_name(f".{path.name}.tmp")
    ds.file_meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)


def _save(ds: Dataset, out_dir: Path, name: str, kind: Kind, made: tuple[dt.datetime, str | None]) -> WrittenObject:
    """Write one object; ``made``: its creation moment and the source's UTC offset (``creation_moment``)."""
    stamp_creation(ds, *made)
    settle_character_set(ds)
    save_dataset(ds, out_dir / name)
    return WrittenObject(kind=kind, file=name, sop_class_uid=str(ds.SOPClassUID),
                         sop_instance_uid=str(ds.SOPInstanceUID), series_instance_uid=str(ds.SeriesInstanceUID),
                         study_instance_uid=str(ds.StudyInstanceUID),
                         transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID))


def write_manifest(out_dir: Path, objects: Sequence[WrittenObject]) -> Path:
    """Write outputs.json (atomically: the sender may be polling the folder)."""
    path = out_dir / OUTPUTS_FILE
    tmp = path.with_name(f".{OUTPUTS_FILE}.tmp")
    tmp.write_text(json.dumps({"objects": [asdict(o) for o in objects]}, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_manifest(out_dir: Path) -> list[WrittenObject]:
    """The objects listed in ``out_dir/outputs.json`` (empty when there is none)."""
    path = out_dir / OUTPUTS_FILE
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    return [WrittenObject(**o) for o in data.get("objects", [])]


def predecessor_from(out_dir: Path) -> Dataset | None:
    """The SR listed in an earlier outputs.json, as a Predecessor Documents reference."""
    for obj in read_manifest(out_dir):
        if obj.kind == "sr":
            return predecessor_reference(study_uid=obj.study_instance_uid, series_uid=obj.series_instance_uid,
                                         sop_class_uid=obj.sop_class_uid, sop_instance_uid=obj.sop_instance_uid)
    return None


def write_outputs(analysis: Analysis, *, out_dir: Path, source_paths: Sequence[Path], settings: OutputsSettings,
                  revision: int = 1, manifests: Mapping[str, ModelManifest] | None = None,
                  predecessor: Dataset | None = None, template: SRTemplate | None = None,
                  device_uid: str | None = None, withdrawals: int = 0) -> list[WrittenObject]:
    """Build and write the SEG, SR, key images and KOS of ``analysis`` into ``out_dir`` and list them in outputs.json.

    ``source_paths``: the files of the analysed series (headers are read for references and the
    patient/study modules); ``manifests``: the models by role (lung, lesion, diagnosis), for codes
    and algorithm identification; ``predecessor``: the previous revision's SR, referenced by this one;
    ``device_uid``: the installation's Device UID for the SR and KOS observer (``node.outputs.device``);
    ``withdrawals``: rejection notes queued for the series so far (``node.send.rejections``), part of the UIDs, so
    objects made again after an archive withdrew them (reanalysis with models A, B, then A again) are new instances.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    headers = {uid: ds for uid, ds in read_source_headers(source_paths).items()
               if str(ds.get("SeriesInstanceUID", "")) == analysis.series_instance_uid}
    prepare_source_character_sets(headers.values())
    if dropped := clean_copied_values(headers):  # the values themselves are patient data: names only
        log.warning(kv("source_values_left_empty", series=analysis.series_instance_uid, attributes=",".join(dropped),
                       reason="not valid for their value representation in the source images"))
    objects: list[WrittenObject] = []
    skipped = analysis.status == "rejected" and any(f.code.startswith("selection_") for f in analysis.qa)
    if skipped and not settings.sr_for_skipped_series:
        log.info(kv("outputs_skipped", series=analysis.series_instance_uid,
                    reason="series skipped by the selection rules (outputs.sr_for_skipped_series is false)"))
        write_manifest(out_dir, objects)
        return objects
    if not headers:
        log.warning(kv("outputs_skipped", series=analysis.series_instance_uid or None,
                       reason="no source image of the series: outputs need its patient and study"))
        write_manifest(out_dir, objects)
        return objects
    result = analysis.result_json()
    if settings.sr:
        template = template or load_template(settings.sr_template, settings.sr_templates_dir)
    content = content_digest({k: v for k, v in result.items() if k != "timings_s"}, settings.model_dump(mode="json"),
                             template.model_dump(mode="json") if template is not None else None,
                             *([{"withdrawals": withdrawals}] if withdrawals else []),
                             # the SR's and KOS's observer: two installations never give one UID to two contents
                             *([{"device_uid": device_uid}] if device_uid else []))
    uids = OutputUIDs.for_analysis(source_series_uid=analysis.series_instance_uid, revision=revision,
                                   models=analysis.models, content=content)
    if predecessor is not None and str(predecessor.SOPInstanceUID) == uids.sr_instance:
        predecessor = None  # the same analysis run again: this is that very SR, not its successor
    models = models_by_role(analysis, manifests)
    specs = segment_specs(manifests, models)
    made = creation_moment(next(iter(headers.values())))  # one moment for all, in the study's time zone
    volume = analysis.volume
    masks_ready = (analysis.status == "ok" and volume is not None and analysis.lungs is not None
                   and analysis.lesions is not None)
    seg_ds: Dataset | None = None
    if settings.seg and masks_ready:
        assert volume is not None and analysis.lungs is not None and analysis.lesions is not None
        t0 = time.perf_counter()
        try:
            seg_ds = build_seg(volume=volume, lungs=analysis.lungs, lesions=analysis.lesions, headers=headers,
                               specs=specs, uids=uids, series_number=settings.seg_series_number,
                               series_description=revised(settings.seg_series_description, revision), encoding=settings.seg_encoding,
                               device_serial_number=settings.device_serial_number)
            objects.append(_save(seg_ds, out_dir, "seg.dcm", "seg", made))
        except OutputError as exc:
            seg_ds = None
            log.warning(kv("seg_skipped", series=analysis.series_instance_uid, reason=str(exc)))
        except Exception as exc:  # a bug in one object must not cost the others (the SR says what was found)
            seg_ds = None
            _failed(analysis, "seg", exc)
        timings["seg"] = time.perf_counter() - t0
    if settings.sr:
        t0 = time.perf_counter()
        assert template is not None  # loaded above with the UIDs
        in_volume = dict.fromkeys(f.sop_instance_uid for f in volume.frames) if volume is not None else {}
        evidence = [headers[u] for u in in_volume if u in headers] or list(headers.values())
        try:
            sr = build_sr(result=result, template=template, evidence=evidence, seg=seg_ds, specs=specs,
                          models=models, uids=uids, series_number=settings.sr_series_number,
                          series_description=revised(settings.sr_series_description, revision), predecessor=predecessor,
                          device_serial_number=settings.device_serial_number, device_uid=device_uid)
            objects.append(_save(sr, out_dir, "sr.dcm", "sr", made))
        except Exception as exc:  # see the SEG above
            _failed(analysis, "sr", exc)
        timings["sr"] = time.perf_counter() - t0
    if settings.key_images and masks_ready:
        assert volume is not None and analysis.lungs is not None and analysis.lesions is not None
        t0 = time.perf_counter()
        reference = headers.get(volume.frames[0].sop_instance_uid, next(iter(headers.values())))
        try:
            images = build_key_images(volume=volume, lungs=analysis.lungs, lesions=analysis.lesions, result=result,
                                      reference=reference, uids=uids, series_number=settings.key_image_series_number,
                                      series_description=revised(settings.key_image_series_description, revision),
                                      count=settings.key_image_count, headers=headers,
                                      device_serial_number=settings.device_serial_number)
            objects.extend(_save(sc, out_dir, f"key_image_{n}.dcm", "key_image", made)
                           for n, sc in enumerate(images, 1))
        except Exception as exc:  # see the SEG above
            _failed(analysis, "key_image", exc)
        timings["key_images"] = time.perf_counter() - t0
    if settings.kos and masks_ready and calls_pneumonia(result):
        assert volume is not None and analysis.lungs is not None and analysis.lesions is not None
        t0 = time.perf_counter()
        try:
            kos = build_kos(volume=volume, lungs=analysis.lungs, lesions=analysis.lesions, headers=headers, uids=uids,
                            series_number=settings.kos_series_number,
                            series_description=revised(settings.kos_series_description, revision),
                            count=settings.key_image_count, device_serial_number=settings.device_serial_number,
                            device_uid=device_uid)
            if kos is not None:
                objects.append(_save(kos, out_dir, "kos.dcm", "kos", made))
        except Exception as exc:  # see the SEG above
            _failed(analysis, "kos", exc)
        timings["kos"] = time.perf_counter() - t0
    write_manifest(out_dir, objects)
    analysis.timings_s.update({f"output_{k}": v for k, v in timings.items()})  # recorded with the job
    log.info(kv("outputs_written", series=analysis.series_instance_uid, revision=revision,
                objects=",".join(o.kind for o in objects) or "none",
                **{f"{k}_s": f"{v:.2f}" for k, v in timings.items()}))
    return objects


def _failed(analysis: Analysis, kind: str, exc: Exception) -> None:
    """Record an output that could not be built. Its message may quote a header value (patient data), so it is
    logged only where logging.include_phi allows; the traceback goes to DEBUG."""
    analysis.output_errors.append(f"{kind}: {type(exc).__name__}")
    log.error(kv("output_failed", kind=kind, series=analysis.series_instance_uid,
                 error=f"{type(exc).__name__}: {phi(exc)}"))
    log.debug("output_failed traceback", exc_info=exc)

