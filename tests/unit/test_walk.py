"""The lean header walk (node/receive/walk.py) against pydicom, which it stands in for.

The walk may decline any file (pydicom then judges it), but whatever it accepts must give exactly
the header pydicom's path gives, and pydicom's path must accept it too."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from node.errors import InstanceRejected
from node.receive.inspect import InstanceHeader, _pydicom_header, _walked_header
from node.receive.walk import same_dataset
from tests.helpers.series import make_ct_dataset, write_ct_series


@pytest.fixture(autouse=True)
def _quiet_pydicom_warnings() -> None:
    warnings.simplefilter("ignore")


def slow(path: Path) -> InstanceHeader | InstanceRejected:
    try:
        return _pydicom_header(path)
    except InstanceRejected as rej:
        return rej


def save(ds: Dataset, path: Path, *, implicit: bool = False) -> Path:
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def ct(**kw: object) -> Dataset:
    return make_ct_dataset(study_uid=generate_uid(), series_uid=generate_uid(), matrix=16, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("ts", ["explicit", "implicit", "rle", "jpeg-ls", "jpeg2000", "jpeg-lossless"])
def test_clean_files_take_the_walk(tmp_path: Path, ts: str) -> None:
    for path in write_ct_series(tmp_path, slices=2, matrix=32, transfer_syntax=ts).files:
        walked = _walked_header(path)
        assert walked is not None, "a clean file must not need pydicom"
        assert walked == _pydicom_header(path)


def nested(undefined: bool) -> Sequence:
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-28000", "SRT", "Lung"
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = generate_uid()
    item.AnatomicRegionSequence = Sequence([inner])
    items = Sequence([item, Dataset()])
    if undefined:
        for it in (item, inner):
            it.is_undefined_length_sequence_item = True
    return items


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize("undefined", [False, True], ids=["defined", "undefined"])
def test_sequences_are_skipped(tmp_path: Path, implicit: bool, undefined: bool) -> None:
    ds = ct()
    ds.ReferencedImageSequence = nested(undefined)
    ds.SourceImageSequence = nested(undefined)
    if undefined:
        ds["ReferencedImageSequence"].is_undefined_length = True
        ds.AnatomicRegionSequence = Sequence([Dataset()])
        ds["AnatomicRegionSequence"].is_undefined_length = True
    path = save(ds, tmp_path / "seq.dcm", implicit=implicit)
    assert _walked_header(path) == _pydicom_header(path) != None  # noqa: E711


@pytest.mark.parametrize(
    ("charset", "description"),
    [("ISO_IR 100", "Thorax süß"), ("ISO_IR 192", "Brustkorb 肺"), (None, "Lunge"), ("ISO_IR 6", "Lung")],
)
def test_text_in_simple_character_sets(tmp_path: Path, charset: str | None, description: str) -> None:
    ds = ct()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SeriesDescription = description
    ds.SoftwareVersions = ["V1 ", "build 7"]
    ds.SeriesNumber = " 12"
    ds.InstanceNumber = "3.0"
    path = save(ds, tmp_path / "text.dcm")
    walked = _walked_header(path)
    assert walked == _pydicom_header(path)
    assert walked is not None
    assert walked.series_description == description
    assert (walked.software_versions, walked.series_number, walked.instance_number) == ("V1\\build 7", 12, 3)


def test_iso_2022_text_is_left_to_pydicom(tmp_path: Path) -> None:
    ds = ct()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.SeriesDescription = "胸部"
    path = save(ds, tmp_path / "jis.dcm")
    assert _walked_header(path) is None
    assert _pydicom_header(path).series_description == "胸部"


def mutate(raw: bytes, rng: random.Random) -> bytes:
    """Damage of the kinds a broken sender or a cut connection causes, after the preamble."""
    b = bytearray(raw)
    kind = rng.random()
    pos = rng.randrange(132, len(b))
    if kind < 0.3:
        return bytes(b[:pos])
    if kind < 0.7:
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(132, len(b))] = rng.randrange(256)
        return bytes(b)
    if kind < 0.85:
        return bytes(b[:pos]) + rng.randbytes(rng.randint(1, 20)) + bytes(b[pos:])
    del b[pos : pos + rng.randint(1, 50)]
    return bytes(b)


def test_damaged_files_never_pass_the_walk_alone(tmp_path: Path) -> None:
    """Seeded damage to files with sequences, native and encapsulated pixels: whenever the walk
    accepts, pydicom accepts the same header."""
    sources = [write_ct_series(tmp_path / ts, slices=1, matrix=8, transfer_syntax=ts).files[0]
               for ts in ("explicit", "implicit", "rle")]
    with_seq = ct()
    with_seq.ReferencedImageSequence = nested(True)
    with_seq["ReferencedImageSequence"].is_undefined_length = True
    sources.append(save(with_seq, tmp_path / "seq.dcm"))
    rng = random.Random(20261126)
    damaged = tmp_path / "damaged.dcm"
    accepted = 0
    for _ in range(2000):
        damaged.write_bytes(mutate(rng.choice(sources).read_bytes(), rng))
        walked = _walked_header(damaged)
        if walked is not None:
            accepted += 1
            assert walked == slow(damaged)
    assert accepted > 0  # some damage (a changed pixel value) leaves a valid file


@pytest.mark.parametrize("layout", ["header-over-64k", "element-after-pixels", "small-file"])
def test_files_the_first_64k_do_not_settle(tmp_path: Path, layout: str) -> None:
    """Pixel Data is skipped unread only when it ends the file; anything else is walked in full."""
    ds = make_ct_dataset(study_uid=generate_uid(), series_uid=generate_uid(), matrix=256 if layout != "small-file" else 8)
    if layout == "header-over-64k":
        block = ds.private_block(0x0029, "LUNGNODE TEST", create=True)
        block.add_new(0x10, "OB", bytes(100_000))
    elif layout == "element-after-pixels":
        ds.add_new(0xFFFCFFFC, "OB", bytes(16))  # Data Set Trailing Padding
    path = save(ds, tmp_path / f"{layout}.dcm")
    walked = _walked_header(path)
    assert walked is not None
    assert walked == _pydicom_header(path)
    truncated = tmp_path / "cut.dcm"
    truncated.write_bytes(path.read_bytes()[:-3])
    assert _walked_header(truncated) is None


def test_same_dataset_compares_the_data_set_not_the_file_meta(tmp_path: Path) -> None:
    ds = make_ct_dataset(study_uid=generate_uid(), series_uid=generate_uid(), matrix=16)
    first, upgraded, changed = tmp_path / "first.dcm", tmp_path / "upgraded.dcm", tmp_path / "changed.dcm"
    ds.save_as(first, enforce_file_format=True)
    ds.file_meta.ImplementationVersionName = "LATER_RELEASE_2"  # received again after an upgrade: other meta
    ds.save_as(upgraded, enforce_file_format=True)
    assert first.read_bytes() != upgraded.read_bytes()
    assert same_dataset(first, upgraded) is True
    ds.PixelData = bytes([ds.PixelData[0] ^ 1]) + ds.PixelData[1:]  # one bit, same size
    ds.save_as(changed, enforce_file_format=True)
    assert same_dataset(first, changed) is False
    not_dicom = tmp_path / "not.dcm"
    not_dicom.write_bytes(b"x" * 200)
    assert same_dataset(first, not_dicom) is None and same_dataset(first, tmp_path / "gone.dcm") is None
