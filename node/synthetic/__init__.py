"""Synthetic chest-CT phantoms written as DICOM series, with exact lung and lesion ground truth.

Used by the tests (small, fast series), the demo and model training. See :mod:`.phantom` for the
rendering model and :mod:`.dicom` for the series layout and patient-orientation conventions.

>>> ph = make_phantom(PhantomSpec(kind="covid", slices=24, matrix=128, seed=1))  # doctest: +SKIP
>>> write_series(Path("out"), ph, SeriesOptions(orientation="FFS"))  # doctest: +SKIP
"""

from .dicom import (
    TRANSFER_SYNTAXES,
    SeriesOptions,
    TransferSyntax,
    WrittenSeries,
    write_series,
)
from .lesions import VARIANTS
from .phantom import KERNELS, KINDS, Kernel, Kind, Phantom, PhantomSpec, make_phantom

__all__ = [
    "KERNELS",
    "KINDS",
    "TRANSFER_SYNTAXES",
    "VARIANTS",
    "Kernel",
    "Kind",
    "Phantom",
    "PhantomSpec",
    "SeriesOptions",
    "TransferSyntax",
    "WrittenSeries",
    "make_phantom",
    "write_series",
]
