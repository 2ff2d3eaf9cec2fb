#!/usr/bin/env python3
"""Seconds to build the outputs of one analysis: DICOM SEG, TID 1500 SR, key images and KOS.

A 300-slice 512 x 512 axial CT series (headers only: the builders never read source pixels) with
lungs and lesions shaped like a COVID-19 case (two ellipsoid lungs of about 5 l, peripheral ground
glass and consolidation in the lower lobes, about 12 % involvement). Each object is built ``--rounds``
times and the median printed, separately for building (highdicom, pixel packing) and for encoding the
file (pydicom, to memory); the SEG both BINARY (default) and FRACTIONAL + JPEG-LS. Reading the 300
source headers from disk, which ``write_outputs`` does first, is timed too. Pin it to one core for
the figure the design targets: ``taskset -c 0 .venv/bin/python bench/outputs.py``.

    .venv/bin/python bench/outputs.py [--rounds 5] [--slices 300] [--matrix 512] [--json FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.config import OutputsSettings  # noqa: E402
from node.outputs.keyimage import build_key_images  # noqa: E402
from node.outputs.kos import build_kos  # noqa: E402
from node.outputs.seg import build_seg, read_source_headers  # noqa: E402
from node.outputs.sr import build_sr  # noqa: E402
from node.outputs.sr_template import load_template  # noqa: E402
from node.outputs.truth import analysis_from_masks  # noqa: E402
from node.outputs.uids import OutputUIDs  # noqa: E402
from node.outputs.write import models_by_role, segment_specs  # noqa: E402
from node.pipeline.volume import SourceFrame, Volume  # noqa: E402


def headers(slices: int, matrix: int, spacing: float, thickness: float) -> list[Dataset]:
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    out = []
    for k in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.Modality, ds.Manufacturer, ds.BodyPartExamined = "CT", "BENCH", "CHEST"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "BENCH^SERIES", "B1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = (
            "20240101", "120000", "", "", "1")
        ds.SeriesNumber, ds.InstanceNumber = 2, slices - k
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Rows = ds.Columns = matrix
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = thickness
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-spacing * matrix / 2, -spacing * matrix / 2, -300.0 + k * thickness]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        out.append(ds)
    return out


def masks(slices: int, matrix: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU volume, lungs (1 right, 2 left) and lesions (1 ground glass, 2 consolidation), canonical."""
    z, y, x = np.ogrid[0:slices, 0:matrix, 0:matrix]
    zc, zr = slices * 0.5, slices * 0.42
    yc, yr, xr = matrix * 0.5, matrix * 0.26, matrix * 0.17
    lungs = np.zeros((slices, matrix, matrix), np.uint8)
    for value, xc in ((1, matrix * 0.32), (2, matrix * 0.68)):
        lungs[((z - zc) / zr) ** 2 + ((y - yc) / yr) ** 2 + ((x - xc) / xr) ** 2 < 1] = value
    rng = np.random.default_rng(0)
    lesions = np.zeros_like(lungs)
    for _ in range(14):  # peripheral, lower-lobe predominant patches
        cz = rng.uniform(slices * 0.12, slices * 0.6)
        cy = rng.uniform(matrix * 0.35, matrix * 0.72)
        cx = rng.choice([matrix * 0.18, matrix * 0.82]) + rng.uniform(-matrix * 0.04, matrix * 0.04)
        r = rng.uniform(0.04, 0.08) * matrix
        blob = ((z - cz) / (r * 0.8)) ** 2 + ((y - cy) / r) ** 2 + ((x - cx) / r) ** 2
        lesions[blob < 1] = 1
        lesions[blob < 0.3] = 2
    lesions[lungs == 0] = 0
    hu = np.full(lungs.shape, 40, np.int16)
    hu[lungs > 0] = -850
    hu[lesions == 1] = -550
    hu[lesions == 2] = -50
    return hu, lungs, lesions


CPU: dict[str, float] = {}  # CPU seconds of the last timed() call: wall time minus waiting for a busy core


def timed(fn: Callable[[], Any], rounds: int) -> tuple[float, Any]:
    times, cpu, value = [], [], None
    for _ in range(rounds):
        value = None  # free the previous round's object outside the timed region: the node builds each once
        t0, c0 = time.perf_counter(), time.process_time()
        value = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    CPU["last"] = statistics.median(cpu)
    return statistics.median(times), value


def encode(ds: Dataset) -> int:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.tell()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--matrix", type=int, default=512)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    spacing, thickness = 0.7, 1.0
    srcs = headers(args.slices, args.matrix, spacing, thickness)
    hu, lungs, lesions = masks(args.slices, args.matrix)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in srcs}
    volume = Volume(hu=hu, spacing_mm=(thickness, spacing, spacing),
                    origin_lps=np.array(srcs[0].ImagePositionPatient, dtype=float), axes_lps=np.eye(3),
                    frames=[SourceFrame(str(ds.SOPInstanceUID), CTImageStorage, None) for ds in srcs],
                    flip_rows=False, flip_cols=False, reference=srcs[0])
    series_uid = str(srcs[0].SeriesInstanceUID)
    analysis = analysis_from_masks(volume=volume, lungs=lungs, lesions=lesions, series_instance_uid=series_uid)
    result = analysis.result_json()
    uids = OutputUIDs.for_analysis(source_series_uid=series_uid, revision=1, models=analysis.models)
    models = models_by_role(analysis, None)
    specs = segment_specs(None, models)
    settings = OutputsSettings()
    template = load_template(settings.sr_template)
    print(f"series: {args.slices} x {args.matrix}x{args.matrix}; lungs {result['lung_volume_ml']['total']:.0f} ml, "
          f"lesions {result['lesion_volume_ml']['total']:.0f} ml ({result['involvement_percent']['total']:.1f} %); "
          f"median of {args.rounds} rounds", flush=True)

    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for ds in srcs:
            path = Path(tmp) / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        read_s, _ = timed(lambda: read_source_headers(paths), args.rounds)
    figures["source headers (read 300 files)"] = {"build_s": read_s, "build_cpu_s": CPU["last"], "encode_s": 0.0,
                                                  "encode_cpu_s": 0.0, "mb": 0.0}

    def seg(encoding: str) -> Any:
        return build_seg(volume=volume, lungs=lungs, lesions=lesions, headers=by_uid, specs=specs, uids=uids,
                         series_number=1, series_description="bench", encoding=encoding)  # type: ignore[arg-type]

    def measure(name: str, build: Callable[[], Any], to_bytes: Callable[[Any], int]) -> Any:
        build_s, obj = timed(build, args.rounds)
        build_cpu = CPU["last"]
        enc_s, size = timed(lambda: to_bytes(obj), args.rounds)
        figures[name] = {"build_s": build_s, "build_cpu_s": build_cpu, "encode_s": enc_s, "encode_cpu_s": CPU["last"],
                         "mb": size / 1e6}
        return obj

    seg_ds = measure("SEG BINARY", lambda: seg("binary"), encode)
    measure("SEG FRACTIONAL JPEG-LS", lambda: seg("fractional_jpeg_ls"), encode)
    measure("SR TID 1500", lambda: build_sr(result=result, template=template, evidence=srcs, seg=seg_ds, specs=specs,
                                            models=models, uids=uids, series_number=2, series_description="bench"),
            encode)
    images = measure(f"key images ({settings.key_image_count})",
                     lambda: build_key_images(volume=volume, lungs=lungs, lesions=lesions, result=result,
                                              reference=srcs[0], uids=uids, series_number=3,
                                              series_description="bench", count=settings.key_image_count),
                     lambda imgs: sum(encode(i) for i in imgs))
    measure("KOS", lambda: build_kos(volume=volume, lungs=lungs, lesions=lesions, headers=by_uid, uids=uids,
                                     series_number=4, series_description="bench", count=settings.key_image_count),
            encode)

    print(f"{'object':34s} {'build s':>8s} {'(cpu s)':>8s} {'encode s':>9s} {'(cpu s)':>8s} {'MB':>7s}")
    for name, f in figures.items():
        print(f"{name:34s} {f['build_s']:8.3f} {f['build_cpu_s']:8.3f} {f['encode_s']:9.3f} "
              f"{f.get('encode_cpu_s', 0.0):8.3f} {f['mb']:7.2f}")
    default = ["source headers (read 300 files)", "SEG BINARY", "SR TID 1500", f"key images ({len(images)})", "KOS"]
    cpu = sum(figures[k]["build_cpu_s"] + figures[k]["encode_cpu_s"] for k in default)
    total = sum(figures[k]["build_s"] + figures[k]["encode_s"] for k in default)
    print(f"{'total, default outputs (headers + SEG BINARY + SR + key images + KOS)':55s} {total:.3f} s "
          f"(cpu {cpu:.3f} s)")
    alt = total - figures["SEG BINARY"]["build_s"] - figures["SEG BINARY"]["encode_s"] + \
        figures["SEG FRACTIONAL JPEG-LS"]["build_s"] + figures["SEG FRACTIONAL JPEG-LS"]["encode_s"]
    print(f"{'total with the FRACTIONAL JPEG-LS SEG instead':55s} {alt:.3f} s")
    if args.json:
        args.json.write_text(json.dumps({"figures": figures, "total_default_s": total, "total_default_cpu_s": cpu,
                                         "total_fractional_s": alt},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
