"""``lungnode synth``: render a synthetic chest-CT phantom and write it as a DICOM series."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .dicom import TRANSFER_SYNTAXES, SeriesOptions, write_series
from .lesions import VARIANTS
from .phantom import KERNELS, KINDS, PhantomSpec, make_phantom

log = logging.getLogger(__name__)


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one and the help does not already say what it is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """Argument parser for ``lungnode synth`` (exposed so the main CLI can embed it)."""
    p = argparse.ArgumentParser(
        prog="lungnode synth",
        description=(
            "Render a synthetic chest CT (body, bones, mediastinum, airways, vessels, lungs at about -850 HU) "
            "with a lesion pattern per kind and write it as a CT Image Storage series: OUTDIR/IM00001.dcm ... "
            "plus the exact ground truth in OUTDIR/truth/ (lungs.nii.gz: 1 right / 2 left lung, "
            "lesions.nii.gz: 1 ground-glass / 2 consolidation, truth.json with volumes and the SOP Instance "
            "UID of every label slice). Anything not given is drawn at random from --seed."
        ),
        formatter_class=_DefaultsHelp,
    )
    p.add_argument("outdir", type=Path, help="output folder (created; existing files with the same names are replaced)")
    p.add_argument("--kind", choices=KINDS, default="normal",
                   help="covid: bilateral peripheral ground glass; pneumonia: lobar/segmental consolidation or "
                        "bronchopneumonia; normal: clear lungs, maybe nodules/emphysema/atelectasis (unlabelled)")
    variants = sorted({v for vs in VARIANTS.values() for v in vs})
    p.add_argument("--variant", choices=variants, default=None, help="pattern within the kind (random if omitted)")
    p.add_argument("--slices", type=int, default=64, help="number of axial slices")
    p.add_argument("--matrix", type=int, default=256, help="rows = columns of each slice")
    p.add_argument("--spacing", type=float, default=None, dest="slice_spacing",
                   help="slice spacing in mm (default: chosen so the slices cover the lungs plus margins)")
    p.add_argument("--pixel-spacing", type=float, default=None, help="in-plane pixel spacing in mm (default: from a random field of view)")
    p.add_argument("--thickness", type=float, default=None, help="reconstructed slice thickness in mm, 1..5 typical (default: random)")
    p.add_argument("--kernel", choices=KERNELS, default=None, help="reconstruction kernel to simulate (default: random)")
    p.add_argument("--noise", type=float, default=None, help="image noise standard deviation in HU (default: random 5..40)")
    p.add_argument("--contrast", action=argparse.BooleanOptionalAction, default=None, help="IV contrast (default: random)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same arguments and seed give the same series")
    p.add_argument("--patient-id", default="SYNTH-0001", help="Patient ID")
    p.add_argument("--patient-name", default="SYNTHETIC^PHANTOM", help="Patient's Name")
    p.add_argument("--study-uid", default=None, help="Study Instance UID (default: derived from the seed)")
    p.add_argument("--series-uid", default=None, help="Series Instance UID (default: derived from the seed)")
    p.add_argument("--accession", default="", help="Accession Number")
    p.add_argument("--series-number", type=int, default=1, help="Series Number")
    p.add_argument("--orientation", choices=("HFS", "FFS"), default="HFS", help="patient position on the table")
    p.add_argument("--ffs-convention", choices=("radiological", "mirrored"), default="radiological",
                   help="FFS pixel layout: radiological = Image Orientation [1,0,0,0,1,0] as diagnostic scanners write it; "
                        "mirrored = [-1,0,0,0,1,0] (gantry frame, as in radiotherapy tables)")
    p.add_argument("--transfer-syntax", choices=sorted(TRANSFER_SYNTAXES), default="explicit",
                   help="explicit/implicit VR little endian or lossless rle, jpeg-ls, jpeg2000, jpeg-lossless (needs dcmtk's dcmcjpeg)")
    p.add_argument("--signed", action="store_true", help="store signed 16-bit pixels instead of unsigned 12-bit")
    p.add_argument("--no-truth", action="store_true", help="do not write the truth/ folder")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def synth_main(argv: list[str] | None = None) -> int:
    """Entry point: parse ``argv``, render, write; returns a process exit status."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.variant is not None and args.variant not in VARIANTS[args.kind]:
        log.error("variant %r does not belong to kind %r (choose from %s)", args.variant, args.kind, ", ".join(VARIANTS[args.kind]))
        return 2
    try:
        spec = PhantomSpec(kind=args.kind, slices=args.slices, matrix=args.matrix, pixel_spacing_mm=args.pixel_spacing,
                           slice_spacing_mm=args.slice_spacing, slice_thickness_mm=args.thickness, seed=args.seed,
                           variant=args.variant, kernel=args.kernel, noise_hu=args.noise, contrast=args.contrast)
        options = SeriesOptions(patient_id=args.patient_id, patient_name=args.patient_name, study_instance_uid=args.study_uid,
                                series_instance_uid=args.series_uid, accession_number=args.accession,
                                series_number=args.series_number, orientation=args.orientation,
                                ffs_convention=args.ffs_convention, transfer_syntax=args.transfer_syntax,
                                signed=args.signed, seed=args.seed, write_truth=not args.no_truth)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    t0 = time.perf_counter()
    log.info("rendering %s phantom: %d slices of %dx%d, seed %d", spec.kind, spec.slices, spec.matrix, spec.matrix, spec.seed)
    phantom = make_phantom(spec)
    p = phantom.params
    log.info("variant %s, kernel %s, noise %.1f HU, thickness %.2f mm, spacing %.2f mm, pixel %.3f mm, contrast %s",
             p["variant"], p["kernel"], p["noise_hu"], p["slice_thickness_mm"], p["slice_spacing_mm"], p["pixel_spacing_mm"],
             p["contrast"])
    try:
        written = write_series(args.outdir, phantom, options)
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    v = phantom.volumes_ml
    log.info("lungs %.0f ml (right %.0f, left %.0f), ground glass %.1f ml, consolidation %.1f ml",
             v["lungs"], v["right_lung"], v["left_lung"], v["ground_glass"], v["consolidation"])
    log.info("wrote %d files to %s (study %s, series %s) in %.1fs", len(written.files), written.outdir,
             written.study_instance_uid, written.series_instance_uid, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(synth_main())
