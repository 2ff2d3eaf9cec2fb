"""Key images: a few axial slices with the lesion overlay burnt in, for viewers without SEG support.

Secondary Capture (RGB, 8 bits), one instance per slice, in the lung window, radiological view (patient's right on
the image's left). On a series the node calls pneumonia (``node.pipeline.call``) they are the most involved slices
(lesion area, kept apart so they show different levels); on one it does not, the slices with the most lung, so that
the few millilitres the lesion model may mark on a normal lung are not what the images put forward. Ground glass and
consolidation are filled in their SEG colours, the lungs outlined; a band below the image holds the legend with the
volumes, the node's call and the not-for-clinical-use statement. Small matrices are enlarged (to at least
``MIN_WIDTH`` columns) so that text stays legible. Burned In Annotation is NO: the text names no patient and no
date, which is what that attribute is about (PS3.3 C.7.6.1.1), so de-identifying exports need not quarantine them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from node import MANUFACTURER, __version__
from node.outputs.codes import STRUCTURES
from node.outputs.identity import copy_identity, name_equipment
from node.outputs.uids import OutputUIDs
from node.pipeline.call import call_text, calls_pneumonia
from node.pipeline.runner import NOT_FOR_CLINICAL_USE
from node.pipeline.volume import Volume
from node.synthetic.preview import outline

LUNG_WINDOW = (-600.0, 1500.0)  # level, width
ALPHA = 0.45
MIN_WIDTH = 512  # columns a key image is enlarged to, at least (an integer factor): a 9-pixel font is hard to read


def pick_slices(lungs: np.ndarray, lesions: np.ndarray, count: int, *, by_lesions: bool = True) -> list[int]:
    """Canonical z of the most involved slices (lesion area), at least ~5 % of the series apart.

    Without lesions (or with ``by_lesions`` False), the slices with the largest lung area; without lungs, none.
    """
    area = (lesions > 0).sum(axis=(1, 2)).astype(np.float64) if by_lesions else np.zeros(len(lungs))
    if not area.any():
        area = (lungs > 0).sum(axis=(1, 2)).astype(np.float64)
    if not area.any():
        return []
    gap = max(1, int(round(0.05 * len(area))))
    chosen: list[int] = []
    for z in np.argsort(-area, kind="stable"):
        if area[z] <= 0 or len(chosen) >= count:
            break
        if all(abs(int(z) - c) >= gap for c in chosen):
            chosen.append(int(z))
    return sorted(chosen)


def _window(hu: np.ndarray) -> np.ndarray:
    level, width = LUNG_WINDOW
    scaled = (hu.astype(np.float32) - (level - width / 2)) * (255.0 / width)
    return np.clip(scaled, 0, 255).astype(np.uint8)


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def enlargement(cols: int) -> int:
    """The integer factor a slice of ``cols`` columns is enlarged by (1 from ``MIN_WIDTH`` up)."""
    return max(1, -(-MIN_WIDTH // cols))


def render(hu: np.ndarray, lungs: np.ndarray, lesions: np.ndarray, *, legend: Sequence[tuple[tuple[int, int, int], str]],
           title: str, call: str | None = None) -> np.ndarray:
    """One canonical slice as RGB with the overlay, a title line and the legend band below (with ``call``, the
    node's call, above the statement: its lines each start a new line); enlarged by ``enlargement``."""
    k = enlargement(hu.shape[1])
    if k > 1:  # every pixel a k x k block: the overlay's edges stay where the masks put them
        hu, lungs, lesions = (np.repeat(np.repeat(a, k, axis=0), k, axis=1) for a in (hu, lungs, lesions))
    gray = _window(hu)
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    for s in STRUCTURES:
        tint = np.array(s.rgb, dtype=np.float32)
        if s.label_map == "lesions":
            m = lesions == s.value
            rgb[m] = (1 - ALPHA) * rgb[m] + ALPHA * tint
        else:
            rgb[outline(lungs == s.value)] = tint
    rows, cols = gray.shape
    size = max(9, min(16, cols // 40))
    font = _font(size)
    line_h = size + 4
    # Lay the legend out first (entries and the statement wrapped to the width), then size the band.
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    entries: list[list[tuple[tuple[int, int, int], str]]] = [[]]
    x = 4
    for colour, text in legend:
        width = size + 8 + int(measure.textlength(text, font=font))
        if entries[-1] and x + width > cols - 4:
            entries.append([])
            x = 4
        entries[-1].append((colour, text))
        x += width
    said = [line for part in (call or "").split("\n") if part for line in _wrap(part, measure, font, cols - 8)]
    statement = _wrap(f"NOT FOR CLINICAL USE. {NOT_FOR_CLINICAL_USE}", measure, font, cols - 8)
    band = (len(entries) + len(said) + len(statement)) * line_h + 8
    canvas = Image.new("RGB", (cols, rows + band), (0, 0, 0))
    canvas.paste(Image.fromarray(rgb.astype(np.uint8), "RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), title, fill=(255, 255, 255), font=font)
    draw.text((4, rows // 2), "R", fill=(255, 255, 255), font=font)
    draw.text((cols - size, rows // 2), "L", fill=(255, 255, 255), font=font)
    y = rows + 4
    for line in entries:
        x = 4
        for colour, text in line:
            draw.rectangle((x, y + 2, x + size - 2, y + size), fill=colour)
            draw.text((x + size + 2, y), text, fill=(255, 255, 255), font=font)
            x += size + 8 + int(draw.textlength(text, font=font))
        y += line_h
    for text, colour in [(line, (255, 255, 255)) for line in said] + [(line, (255, 200, 0)) for line in statement]:
        draw.text((4, y), text, fill=colour, font=font)
        y += line_h
    return np.asarray(canvas, dtype=np.uint8)


def _wrap(text: str, measure: ImageDraw.ImageDraw, font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
          width: int) -> list[str]:
    """``text`` in lines of at most ``width`` pixels (a word longer than that on a line of its own)."""
    words = text.split()
    lines = [words[0]]
    for word in words[1:]:
        if measure.textlength(f"{lines[-1]} {word}", font=font) > width:
            lines.append(word)
        else:
            lines[-1] += f" {word}"
    return lines


def legend_entries(result: Mapping[str, object]) -> list[tuple[tuple[int, int, int], str]]:
    """Legend text per structure, with its volume from result.json when there is one."""
    volumes = {
        "right_lung": ("lung_volume_ml", "right"), "left_lung": ("lung_volume_ml", "left"),
        "ground_glass_opacity": ("lesion_volume_ml", "ggo"), "consolidation": ("lesion_volume_ml", "consolidation"),
    }
    out = []
    for s in STRUCTURES:
        group, key = volumes[s.key]
        values = result.get(group)
        ml = values.get(key) if isinstance(values, dict) else None
        out.append((s.rgb, f"{s.label} {_ml(ml)} mL" if isinstance(ml, (int, float)) else s.label))
    return out


def involvement_text(result: Mapping[str, object]) -> str | None:
    """The share of each lung that lesions take, as the SR reports it; None when the analysis has none."""
    pct = result.get("involvement_percent")
    if not isinstance(pct, dict) or not pct:
        return None

    def one(key: str) -> str:
        value = pct.get(key)
        return f"{float(value):.1f}%" if isinstance(value, (int, float)) else "unknown"
    return f"Lung involved by lesions: right {one('right')}, left {one('left')}, both {one('total')}"


def band_text(result: Mapping[str, object]) -> str | None:
    """What the key image says under the legend: the node's call, and the involvement on a line of its own."""
    return "\n".join(t for t in (call_text(result), involvement_text(result)) if t) or None


def _ml(ml: float) -> str:
    """A volume as the legend shows it: one decimal under 10 mL (as the SR has it), so 0.4 mL is not "0 mL"."""
    return f"{ml:.1f}" if abs(ml) < 10 else f"{ml:.0f}"


def source_label(volume: Volume, z: int, headers: Mapping[str, Dataset]) -> str:
    """Where canonical slice ``z`` is in the source series, as a viewer shows it: the source series' number, the
    image's Instance Number (and frame), and the slice's position along the patient axis. The canonical index means
    nothing to a reader scrolling the original series, and a study analysed from two series (one arriving late) has
    two sets of key images that only the series number tells apart."""
    frame = volume.frames[z]
    ds = headers.get(frame.sop_instance_uid)
    number = ds.get("InstanceNumber") if ds is not None else None
    where = f"image {number}" if number not in (None, "") else f"slice {z + 1}/{volume.shape[0]}"
    series = ds.get("SeriesNumber") if ds is not None else None
    if series not in (None, ""):
        where = f"series {series} {where}"
    if frame.frame_number is not None:
        where += f" frame {frame.frame_number}"
    position = volume.origin_lps + z * volume.spacing_mm[0] * volume.axes_lps[2]
    return f"{where}  z {float(position[2]):.1f} mm"


def build_key_images(*, volume: Volume, lungs: np.ndarray, lesions: np.ndarray, result: Mapping[str, object],
                     reference: Dataset, uids: OutputUIDs, series_number: int, series_description: str,
                     count: int, headers: Mapping[str, Dataset] | None = None,
                     device_serial_number: str = "1") -> list[hd.sc.SCImage]:
    """Secondary Capture images of the most involved slices, or of the most lung on a series not called pneumonia
    (none when there are no lungs).

    ``headers``: the source images' headers by SOP Instance UID, for the Instance Number each image names.
    """
    legend = legend_entries(result)
    call = band_text(result)
    images = []
    slices = pick_slices(lungs, lesions, count, by_lesions=calls_pneumonia(result))
    for number, z in enumerate(slices, start=1):
        where = source_label(volume, z, headers or {})
        pixels = render(volume.hu[z], lungs[z], lesions[z], legend=legend, title=f"lungnode {__version__}  {where}",
                        call=call)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=reference,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=uids.key_image_series,
            series_number=series_number,
            sop_instance_uid=uids.key_image_instance(number),
            instance_number=number,
            manufacturer=MANUFACTURER,
            patient_orientation=("L", "P"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
        copy_identity(sc, reference)  # highdicom's Secondary Capture copies only some of it
        name_equipment(sc, device_serial_number)
        sc.SeriesDescription = series_description
        sc.BurnedInAnnotation = "NO"  # its text identifies neither the patient nor the date (module docstring)
        sc.ConversionType = "WSD"  # rendered by software (workstation), not taken from a digital interface (DI)
        # A chest is not a paired body part: with it named, General Series needs no Laterality.
        sc.BodyPartExamined = str(reference.get("BodyPartExamined") or "CHEST")
        sc.ImageComments = f"Key image {number} of {len(slices)} ({where}); not for clinical use"
        frame = volume.frames[z]
        source = Dataset()
        source.ReferencedSOPClassUID = frame.sop_class_uid
        source.ReferencedSOPInstanceUID = frame.sop_instance_uid
        if frame.frame_number is not None:
            source.ReferencedFrameNumber = frame.frame_number
        sc.SourceImageSequence = DicomSequence([source])
        images.append(sc)
    return images
