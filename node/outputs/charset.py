"""The Specific Character Set of a created object: the source's, unless a value does not fit it.

The objects copy the patient and study values from the source images with the source's Specific
Character Set, so a viewer shows them as it shows the source. The node adds its own text (series
descriptions from the configuration, SR template text), which may hold characters that character
set lacks: pydicom would then write '?' in their place, silently. Such an object is written in UTF-8
(ISO_IR 192) instead, which holds every value unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

from highdicom.valuerep import _check_specific_character_set
from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset

UTF8 = "ISO_IR 192"
#: Value representations whose values may use the extended character set (PS3.5 6.1.2.3).
TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "PN", "UC"})


def _fits(value: str, codecs: list[str]) -> bool:
    for codec in codecs:
        try:
            value.encode(codec)
            return True
        except (UnicodeError, LookupError):
            continue
    return False


def _texts(ds: Dataset) -> list[str]:
    out: list[str] = []
    for elem in ds.iterall():
        if elem.VR not in TEXT_VRS or elem.value is None:
            continue
        values = elem.value if elem.VM > 1 else [elem.value]
        out.extend(str(v) for v in values if v not in (None, ""))
    return out


def settle_character_set(ds: Dataset) -> bool:
    """Switch ``ds`` to UTF-8 when one of its text values cannot be written in its character set.

    Returns whether it switched. A value that fits none of the set's character repertoires one at a
    time (a name mixing two ISO 2022 sets, say) also switches: UTF-8 is never wrong, only less usual.
    """
    charset = ds.get("SpecificCharacterSet")
    if charset in (None, ""):
        charset = ["ISO_IR 6"]
    names = [charset] if isinstance(charset, str) else list(charset)
    if UTF8 in names:
        return False
    # pydicom reads the default repertoire as Latin-1, leniently; written, it must be ASCII.
    codecs = ["ascii" if c == "iso8859" else c for c in convert_encodings([n or "ISO_IR 6" for n in names])]
    if all(_fits(v, codecs) for v in _texts(ds)):
        return False
    ds.SpecificCharacterSet = UTF8
    return True


def writable_character_set(value: str | list[str] | None) -> str | list[str] | None:
    """``value`` (a Specific Character Set) in the form highdicom takes, or UTF-8 where it takes none; None for
    the default repertoire."""
    if value in (None, ""):
        return None
    names = [value] if isinstance(value, str) else list(value)
    if names[0] == "":
        names[0] = "ISO 2022 IR 6"  # PS3.3 C.12.1.1.2: an empty value 1 is the default repertoire
    if len(names) == 1 and names[0].startswith("ISO 2022 IR "):  # one code-extension term: no extension to switch to
        number = names[0].removeprefix("ISO 2022 IR ")
        if number == "6":
            return None
        names = [f"ISO_IR {number}"]
    try:
        checked = _check_specific_character_set(names if len(names) > 1 else names[0])
    except ValueError:
        return UTF8
    return checked if isinstance(checked, str) else list(checked)


def prepare_source_character_sets(headers: Iterable[Dataset]) -> None:
    """Decode these in-memory source headers and give each a Specific Character Set highdicom takes (the values,
    now text, are written in it, or in UTF-8 where they do not fit: ``settle_character_set``)."""
    for ds in headers:
        if "SpecificCharacterSet" not in ds:
            continue
        ds.decode()
        writable = writable_character_set(ds.SpecificCharacterSet)
        if writable is None:
            del ds.SpecificCharacterSet
        else:
            ds.SpecificCharacterSet = writable
