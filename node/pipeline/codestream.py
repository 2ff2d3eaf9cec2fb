"""What a compressed image's own codestream says about its size, read from its first bytes.

A header whose Rows or Columns disagree with the compressed frame makes the decoders fail with
errors no reader understands (a numpy broadcast error, or a panic inside the RLE decoder), or
decode a frame of the same byte count into the wrong shape. Reading the size the codestream
declares lets the volume refuse such an image in words.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments

#: JPEG start-of-frame markers (ISO/IEC 10918-1 B.1.1.3: C0-CF but DHT, JPG and DAC) and JPEG-LS's SOF55.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}


def first_fragment(ds: Dataset) -> bytes | None:
    """The first fragment of encapsulated Pixel Data (after the Basic Offset Table), or None."""
    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_encapsulated or "PixelData" not in ds:
        return None
    try:
        items = generate_fragments(ds.PixelData)
        next(items)  # the Basic Offset Table, perhaps empty
        return next(items)
    except (StopIteration, ValueError):
        return None


def _jpeg_size(code: bytes) -> tuple[int, int] | None:
    """(rows, columns) of a JPEG or JPEG-LS frame header; None when not found (or 0: a DNL marker gives it later)."""
    if code[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 9 <= len(code):
        if code[at] != 0xFF:
            return None
        marker = code[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _SOF_MARKERS:
            rows, cols = int.from_bytes(code[at + 5:at + 7], "big"), int.from_bytes(code[at + 7:at + 9], "big")
            return (rows, cols) if rows and cols else None
        at += 2 + int.from_bytes(code[at + 2:at + 4], "big")
    return None


def _j2k_size(code: bytes) -> tuple[int, int] | None:
    """(rows, columns) of a JPEG 2000 codestream's SIZ segment (ISO/IEC 15444-1 A.5.1); None when not one."""
    if code[:4] != b"\xff\x4f\xff\x51" or len(code) < 28:
        return None
    width, height, x0, y0 = (int.from_bytes(code[at:at + 4], "big") for at in (8, 12, 16, 20))
    return (height - y0, width - x0) if height > y0 and width > x0 else None


def coded_size(ds: Dataset) -> tuple[int, int] | None:
    """(rows, columns) that the first JPEG, JPEG-LS or JPEG 2000 frame declares; None for native or RLE data."""
    code = first_fragment(ds)
    if code is None:
        return None
    return _jpeg_size(code) or _j2k_size(code)


def rle_pixels(ds: Dataset) -> int | None:
    """Pixels in the first RLE frame (PS3.5 G: the decoded length of its first segment), or None when not RLE.

    PackBits is walked, not decoded; this is for a frame that failed to decode, not for every frame."""
    code = first_fragment(ds)
    if code is None or len(code) < 64 or str(ds.file_meta.TransferSyntaxUID) != "1.2.840.10008.1.2.5":
        return None
    segments = int.from_bytes(code[:4], "little")
    offsets = [int.from_bytes(code[4 + 4 * i:8 + 4 * i], "little") for i in range(15)]
    if not 1 <= segments <= 15:
        return None
    start, end = offsets[0], offsets[1] if segments > 1 else len(code)
    count, at, end = 0, start, min(end, len(code))
    while at < end:
        header = code[at]
        if header < 128:  # a literal run of header + 1 bytes; one running past the end is the segment's pad byte
            if at + header + 2 > end:
                break
            count, at = count + header + 1, at + header + 2
        elif header > 128:  # one byte repeated 257 - header times
            count, at = count + 257 - header, at + 2
        else:  # 128: no operation
            at += 1
    return count
