"""The receive path's stand-ins for pynetdicom internals write what pynetdicom would write."""

from __future__ import annotations

import io

import pytest
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, generate_uid
from pynetdicom.dsutils import create_file_meta

from node.receive.tuning import _copy_context, _create_file_meta, encode_file_meta, encode_store_response


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


@pytest.mark.parametrize(("status", "message_id"), [(0x0000, 1), (0xC210, 65535), (0xA700, 7)])
def test_store_response_is_byte_identical_to_pynetdicom(status: int, message_id: int) -> None:
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE

    for sop_uid in ("1.2.3.4", "1.2.3.45", str(generate_uid())):
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = message_id
        rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        rsp.AffectedSOPInstanceUID = sop_uid
        rsp.Status = status
        message = C_STORE_RSP()
        message.primitive_to_message(rsp)
        (pdata,) = message.encode_msg(1, 16384)
        assert pdata.presentation_data_value_list == [(1, b"\x03" + encode_store_response(rsp))]
