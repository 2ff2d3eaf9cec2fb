"""The receive path's stand-ins for pynetdicom internals write what pynetdicom would write."""

from __future__ import annotations

import io

import pytest
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, generate_uid
from pynetdicom.dsutils import create_file_meta

from node.receive.tuning import _copy_context, _create_file_meta, encode_file_meta


@pytest.mark.parametrize("version", ["PYNETDICOM_304", "ODD_LEN"])
@pytest.mark.parametrize("ts", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.80"])
def test_file_meta_is_byte_identical_to_pydicom(ts: str, version: str) -> None:
    for sop_class, sop_uid in [("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"), ("1.2.840.10008.5.1.4.1.1.2.1", "1.2.3.45"),
                               ("1.2.840.10008.5.1.4.1.1.2", str(generate_uid()))]:
        expected = io.BytesIO()
        write_file_meta_info(expected, create_file_meta(
            sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_uid), transfer_syntax=UID(ts),
            implementation_version=version))
        ours = encode_file_meta(_create_file_meta(
            sop_class_uid=sop_class, sop_instance_uid=sop_uid, transfer_syntax=ts, implementation_version=version))
        assert ours == expected.getvalue()


def test_context_copy_is_deep_where_it_matters() -> None:
    from pynetdicom.presentation import build_context

    original = build_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    original.context_id = 3
    copied = _copy_context(original, {})
    assert copied is not original
    assert (copied.abstract_syntax, copied.transfer_syntax, copied.context_id) == (
        original.abstract_syntax, original.transfer_syntax, original.context_id)
    copied.add_transfer_syntax("1.2.840.10008.1.2.5")
    copied.context_id = 5
    assert original.transfer_syntax == ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
    assert original.context_id == 3
