"""The receive path's stand-ins for pynetdicom internals write what pynetdicom would write."""

from __future__ import annotations

import io

import pytest
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, generate_uid
from pynetdicom.dsutils import create_file_meta

from node.receive.tuning import _create_file_meta, encode_file_meta


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
