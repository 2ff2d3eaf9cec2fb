"""The node's DICOM application entities, each introducing itself as lungnode (not as the toolkit).

Every association the node opens or accepts (listener, result sender, storage commitment listener,
``lungnode echo``) carries lungnode's Implementation Class UID and Version Name, as the conformance
statement (docs/conformance.md) lists them.
"""

from __future__ import annotations

from pynetdicom import AE

from node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME


def node_ae(ae_title: str) -> AE:
    """A pynetdicom AE with ``ae_title`` and lungnode's implementation identity."""
    ae = AE(ae_title=ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return ae
