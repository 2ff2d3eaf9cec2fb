"""TID 1500 Measurement Report (Enhanced SR) built from an SR template and result.json.

Enhanced SR, as dcmqi writes TID 1500: the report has no 3D coordinates (it references the SEG's
segments), and Enhanced SR is in more PACS' storage configurations than Comprehensive 3D SR, whose
absence would make the PACS refuse the report's presentation context.

The template (:mod:`node.outputs.sr_template`) decides which values go in; this module only turns
them into highdicom content. Segment groups reference their DICOM SEG segment and share its
Tracking UID; every group names the model that produced it (TID 4019 Algorithm Identification,
with the model file's SHA-256 as parameter). An "Analysis information" group always closes the
report: status, reason for a refusal, QA flags, models used and the not-for-clinical-use statement,
so a rejected series still gets a short SR that says why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from node import MANUFACTURER
from node.outputs.codes import STRUCTURES, segment_number
from node.outputs.identity import MODEL_NAME, name_equipment
from node.outputs.seg import SegmentSpec
from node.outputs.sr_template import CodingScheme, GroupSpec, SRTemplate, lookup
from node.outputs.uids import OutputUIDs, uuid_uid
from node.pipeline.runner import NOT_FOR_CLINICAL_USE

Group = hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations


def _algorithm(model: Mapping[str, str] | None) -> hd.sr.AlgorithmIdentification | None:
    if not model:
        return None
    return hd.sr.AlgorithmIdentification(name=model["name"], version=model["version"],
                                         parameters=[f"sha256={model['sha256']}"] if model.get("sha256") else None)


def _measurements(spec: GroupSpec, result: dict[str, Any]) -> list[hd.sr.Measurement]:
    out = []
    for m in spec.measurements:
        value = lookup(result, m.value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(hd.sr.Measurement(name=m.concept.to_code(), value=float(value) * m.scale,
                                         unit=m.unit.to_code()))
    return out


def _evaluations(spec: GroupSpec, result: dict[str, Any]) -> list[hd.sr.QualitativeEvaluation]:
    out = []
    for e in spec.evaluations:
        value = lookup(result, e.value)
        if isinstance(value, str) and value in e.codes:
            out.append(hd.sr.QualitativeEvaluation(name=e.concept.to_code(), value=e.codes[value].to_code()))
    return out


def _group(spec: GroupSpec, *, result: dict[str, Any], seg: Dataset | None, source_series_uid: str,
           specs: Mapping[str, SegmentSpec], models: Mapping[str, Mapping[str, str]], uids: OutputUIDs
           ) -> Group | None:
    measurements = _measurements(spec, result)
    evaluations = _evaluations(spec, result)
    if not measurements and not evaluations:
        return None  # the analysis did not produce these values (refused, or a step not computed)
    sites = [hd.sr.FindingSite(spec.finding_site.to_code())] if spec.finding_site else None
    algorithm = _algorithm(models.get(spec.model))
    if spec.segment is not None:
        tracking = hd.sr.TrackingIdentifier(uid=uids.tracking_uid(spec.segment), identifier=spec.tracking_id)
        finding = spec.finding.to_code() if spec.finding else specs[spec.segment].type
        if seg is not None:
            reference = hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                segment_number=segment_number(spec.segment),
                source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid),
            )
            return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking, referenced_segment=reference, finding_type=finding,
                algorithm_id=algorithm, finding_sites=sites, measurements=measurements or None,
                qualitative_evaluations=evaluations or None,
            )
    else:
        tracking = hd.sr.TrackingIdentifier(uid=uids.group_uid(spec.id), identifier=spec.tracking_id)
        assert spec.finding is not None  # the template validator requires it
        finding = spec.finding.to_code()
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, finding_type=finding, algorithm_id=algorithm, finding_sites=sites,
        measurements=measurements or None, qualitative_evaluations=evaluations or None,
    )


#: What a failed analysis' SR says instead of the error, which stays in the node's record (lungnode status).
FAILED_STATEMENT = ("No results: the analysis stopped on a technical failure of the node, not on the images. "
                    "The node's job record and log say why.")


def _text(name: Any, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _information(template: SRTemplate, result: dict[str, Any], uids: OutputUIDs) -> Group:
    st = template.statements
    status = result.get("status")
    refused = status == "rejected"  # by the quality checks; a failure of the node is not the images' fault
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uids.group_uid("information"),
                                                     identifier=template.information_group),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=st.refused_concept.to_code(),
                                                             value=st.refused_value.to_code())] if refused else None,
    )
    items = [_text(st.status.to_code(), f"Analysis {status}")]
    if refused and result.get("reason"):
        items.append(_text(st.reason.to_code(), str(result["reason"])))
    elif status == "failed":  # the error itself may quote header values: it stays in the node's job record
        items.append(_text(st.disclaimer.to_code(), FAILED_STATEMENT))
    for flag in result.get("qa") or []:
        items.append(_text(st.qa_flag.to_code(), f"{flag['code']} ({flag['severity']}): {flag['reason']}"))
    for model in result.get("models") or []:
        items.append(_text(st.model.to_code(), f"{model['name']} {model['version']} sha256 {model['sha256']}"))
    items.append(_text(st.disclaimer.to_code(), str(result.get("disclaimer") or NOT_FOR_CLINICAL_USE)))
    group[0].ContentSequence.extend(items)
    return group


SOURCE = hd.sr.CodedConcept(value="260753009", meaning="Source", scheme_designator="SCT")
#: CID 29 meanings of the modalities a chest CT series may carry.
MODALITY_MEANINGS = {"CT": "Computed Tomography"}


def image_library(evidence: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library: one group per frame of reference (TID 1602 descriptors shared there: the modality
    and the frame of reference) holding an IMAGE entry per analysed image (TID 1601). highdicom's own library
    also writes each image's position, orientation and spacing, which it reads from classic CT headers only:
    about 7 ms an image, 2 s and 1 MB for a 300-slice series, for what the SEG already holds frame by frame."""
    by_frame: dict[str, list[Dataset]] = {}
    for ds in evidence:
        by_frame.setdefault(str(ds.get("FrameOfReferenceUID", "")), []).append(ds)
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary,
                                         relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    library.ContentSequence = hd.sr.ContentSequence()
    for frame_uid, images in by_frame.items():
        group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        group.ContentSequence = hd.sr.ContentSequence()
        modality = str(images[0].get("Modality") or "CT")
        group.ContentSequence.append(hd.sr.CodeContentItem(
            name=codes.DCM.Modality, value=hd.sr.CodedConcept(value=modality, scheme_designator="DCM",
                                                               meaning=MODALITY_MEANINGS.get(modality, modality)),
            relationship_type=hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT))
        if frame_uid:
            group.ContentSequence.append(hd.sr.UIDRefContentItem(
                name=codes.DCM.FrameOfReferenceUID, value=frame_uid,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT))
        group.ContentSequence.extend(
            hd.sr.ImageContentItem(name=SOURCE, referenced_sop_class_uid=ds.SOPClassUID,
                                   referenced_sop_instance_uid=ds.SOPInstanceUID,
                                   relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
            for ds in images)
        library.ContentSequence.append(group)
    return library


def _scheme_item(scheme: CodingScheme) -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = scheme.designator
    item.CodingSchemeName = scheme.name
    item.CodingSchemeResponsibleOrganization = scheme.responsible_organization
    return item


def device_observer(serial_number: str, device_uid: str | None = None) -> hd.sr.ObserverContext:
    """This node as the SR's observer (a device; no person has reviewed the results). ``device_uid``: the
    installation's (``node.outputs.device``); without one, a UID derived from the serial number."""
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid or uuid_uid(f"device/{serial_number}"),
            name=MODEL_NAME, manufacturer_name=MANUFACTURER, model_name=MODEL_NAME, serial_number=serial_number,
        ),
    )


def predecessor_reference(*, study_uid: str, series_uid: str, sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    """The header fields of a previous SR that the Predecessor Documents Sequence needs."""
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    return ds


def build_sr(*, result: dict[str, Any], template: SRTemplate, evidence: Sequence[Dataset], seg: Dataset | None,
             specs: Sequence[SegmentSpec], models: Mapping[str, Mapping[str, str]], uids: OutputUIDs,
             series_number: int, series_description: str, predecessor: Dataset | None = None,
             device_serial_number: str = "1", device_uid: str | None = None) -> hd.sr.EnhancedSR:
    """The Measurement Report of one analysis (``result`` is Analysis.result_json()).

    ``evidence``: the source image headers (patient and study modules are copied from the first);
    ``models``: name/version/sha256 by model role (lung, lesion, diagnosis).
    """
    if not evidence:
        raise ValueError("an SR needs at least one source image header (patient and study come from it)")
    by_key = {s.structure.key: s for s in specs}
    if set(by_key) != {s.key for s in STRUCTURES}:
        raise ValueError(f"segment specs must cover {[s.key for s in STRUCTURES]}")
    source_series_uid = str(result.get("series_instance_uid") or evidence[0].SeriesInstanceUID)
    groups: list[Group] = []
    for spec in template.groups:
        group = _group(spec, result=result, seg=seg, source_series_uid=source_series_uid, specs=by_key,
                       models=models, uids=uids)
        if group is not None:
            groups.append(group)
    groups.append(_information(template, result, uids))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device_observer(device_serial_number, device_uid)),
        procedure_reported=template.procedure_reported.to_code(),
        imaging_measurements=groups,
    )
    # TID 1500 row 5, after the procedure reported and before the imaging measurements (where highdicom puts it)
    root = report[0].ContentSequence
    measurements_at = next(n for n, i in enumerate(root) if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    root.insert(measurements_at, image_library(evidence))
    sr = hd.sr.EnhancedSR(
        evidence=[*evidence, *([seg] if seg is not None else [])],
        content=report,
        series_instance_uid=uids.sr_series,
        series_number=series_number,
        sop_instance_uid=uids.sr_instance,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # automatic results nobody has verified
        is_verified=False,
        previous_versions=[predecessor] if predecessor is not None else None,
    )
    if template.coding_schemes:
        sr.CodingSchemeIdentificationSequence = [_scheme_item(c) for c in template.coding_schemes]
    sr.SeriesDescription = series_description
    name_equipment(sr, device_serial_number)
    return sr
