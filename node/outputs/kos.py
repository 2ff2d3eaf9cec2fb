"""Key Object Selection: the most involved slices flagged in the original CT series.

Many PACS viewers show a KOS as key-image marks on the source images themselves, so the reader
scrolls the original series and finds the slices the node found most involved, at full quality and
with the viewer's own tools. It flags the same slices as the Secondary Capture key images
(``pick_slices``), references the source images (and their frames, for Enhanced CT), and is titled
"Of Interest" (DCM 113000, CID 7010). Only series the node calls pneumonia get one, by the 3D model's most
probable class or by the slice rule, and only where it found lesions: viewers show these marks as the
study's key images, so on a series called no pneumonia (where the lesion model's few millilitres are
most likely false) a mark would announce a finding the report does not make.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from node import MANUFACTURER
from node.outputs.identity import copy_identity, name_equipment
from node.outputs.keyimage import pick_slices, source_label
from node.outputs.sr import device_observer
from node.outputs.uids import OutputUIDs
from node.pipeline.runner import NOT_FOR_CLINICAL_USE
from node.pipeline.volume import Volume

OF_INTEREST = codes.DCM.OfInterest  # (113000, DCM, "Of Interest")


def build_kos(*, volume: Volume, lungs: np.ndarray, lesions: np.ndarray, headers: Mapping[str, Dataset],
              uids: OutputUIDs, series_number: int, series_description: str, count: int,
              device_serial_number: str = "1", device_uid: str | None = None
              ) -> hd.ko.KeyObjectSelectionDocument | None:
    """The KOS flagging the ``count`` most involved slices, or None when the series has no lesion (or no
    source header for them)."""
    if not (lesions > 0).any():
        return None
    slices = pick_slices(lungs, lesions, count)
    frames: dict[str, list[int]] = {}  # source SOP Instance UID -> its frames flagged (empty: a single-frame image)
    for z in slices:
        frame = volume.frames[z]
        if frame.sop_instance_uid not in headers:
            continue
        numbers = frames.setdefault(frame.sop_instance_uid, [])
        if frame.frame_number is not None:
            numbers.append(frame.frame_number)
    if not frames:
        return None
    evidence = [headers[uid] for uid in frames]
    where = "; ".join(source_label(volume, z, headers).replace("  ", ", ") for z in slices)
    content = hd.ko.KeyObjectSelection(
        document_title=OF_INTEREST,
        referenced_objects=evidence,
        observer_device_context=device_observer(device_serial_number, device_uid),
        description=f"Most involved slices found by lungnode: {where}. {NOT_FOR_CLINICAL_USE}",
    )
    _add_frame_numbers(content, frames)
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=evidence, content=content, series_instance_uid=uids.kos_series, series_number=series_number,
        sop_instance_uid=uids.kos_instance, instance_number=1, manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    copy_identity(kos, evidence[0])  # highdicom's KOS copies only some of it
    name_equipment(kos, device_serial_number)
    kos.SeriesDescription = series_description
    return kos


def _add_frame_numbers(content: Sequence[Dataset], frames: Mapping[str, list[int]]) -> None:
    """Name the flagged frames of a multi-frame source in its image reference (highdicom references the
    instance only, which would flag every frame of an Enhanced CT)."""
    for item in content[0].ContentSequence:
        if item.ValueType != "IMAGE":
            continue
        ref = item.ReferencedSOPSequence[0]
        numbers = frames.get(str(ref.ReferencedSOPInstanceUID))
        if numbers:
            ref.ReferencedFrameNumber = sorted(numbers) if len(numbers) > 1 else numbers[0]
