"""docs/conformance.md says what the code does: identity, transfer syntaxes, statuses, refusals, audit messages,
defaults.

A hospital's IT configures its PACS from the conformance statement; a statement that drifted from the
code would be worse than none.
"""

from __future__ import annotations

import re

from pydicom.uid import UID
from pynetdicom.presentation import AllStoragePresentationContexts

from node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, __version__
from node.audit import AuditTrail
from node.config import AuditSettings, Config
from node.receive import inspect
from node.receive.inspect import ANALYSABLE_SOP_CLASSES
from node.receive.scp import _REJECT_REASONS, TRANSFER_SYNTAXES
from node.send.scu import UNCOMPRESSED
from tests.helpers.audit import every_event, parse, udp_repository, xml_of
from tests.helpers.conformance import UID_RE, section, table


def test_identity_and_version() -> None:
    rows = {r[0]: r[1] for r in table("3.2 Identity")}
    assert rows["Implementation Class UID"] == IMPLEMENTATION_CLASS_UID
    assert rows["Implementation Version Name"].split()[0] == IMPLEMENTATION_VERSION_NAME
    assert len(IMPLEMENTATION_VERSION_NAME) <= 16 and UID(IMPLEMENTATION_CLASS_UID).is_valid
    assert f"| Product version | {__version__} |" in section("lungnode DICOM Conformance Statement")


def test_services_table_names_each_uid_as_dicom_does() -> None:
    rows = table("Network services")
    for name, uid, *_ in rows:
        if uid:
            assert UID(uid).name == name, (uid, name)
    analysed = {uid for _name, uid, _scu, scp in rows if "analysed" in scp and "not analysed" not in scp}
    assert analysed == set(ANALYSABLE_SOP_CLASSES)
    count = re.search(r"\((\d+) in all", section("Network services"))
    assert count is not None and int(count.group(1)) == len(AllStoragePresentationContexts)


def test_accepted_transfer_syntaxes_in_the_listener_s_order() -> None:
    rows = table("Presentation contexts accepted")
    assert [uid for _name, uid in rows] == [str(ts) for ts in TRANSFER_SYNTAXES]
    assert all(UID(uid).name == name for name, uid in rows)


def test_c_store_statuses_are_those_the_listener_answers() -> None:
    documented = {int(r[0], 16) for r in table("Storage SCP conformance")}
    answered = {v for k, v in vars(inspect).items() if k.startswith("STATUS_")}
    assert documented == answered


def test_association_refusals() -> None:
    triples = {tuple(int(cell.split(",")[0]) for cell in r[:3]) for r in table("Listener association acceptance")}
    # (result, source, reason): pynetdicom's own refusals, keyed by (source, reason), and the allow list's
    assert {(s, d) for _r, s, d in triples} >= set(_REJECT_REASONS)
    assert (1, 1, 3) in triples  # StorageSCP._on_requested: send_reject(0x01, 0x01, 0x03)


def test_proposed_contexts_are_the_sender_s() -> None:
    rows = table("Presentation contexts proposed")
    # SEG, Enhanced SR, Secondary Capture, KOS (test_outputs_process checks each object written is listed), commitment
    assert {r[1] for r in rows} == {"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.22",
                                     "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.59",
                                     "1.2.840.10008.1.20.1"}
    for name, uid, syntaxes in rows:
        assert UID(uid).name == name
        assert UID_RE.findall(syntaxes)[:2] == [str(ts) for ts in UNCOMPRESSED]


def test_configuration_defaults() -> None:
    config = Config()
    for key, value in table("7. Configuration defaults"):
        section_name, field = key.split(".")
        actual = getattr(getattr(config, section_name), field)
        expected: object = {"true": True, "false": False, "null": None}.get(value, value)
        if isinstance(actual, (int, float)) and not isinstance(actual, bool):
            expected = type(actual)(value)
        assert actual == expected, key


def test_audit_messages_are_those_the_node_sends() -> None:
    """Every audited event once, caught on a UDP socket: event, EventID, action and event types as documented."""
    with udp_repository() as (port, sock):
        trail = AuditTrail(AuditSettings(host="127.0.0.1", port=port, transport="udp"), ae_title="LUNGNODE")
        trail.start()
        try:
            sent = [parse(xml_of(sock.recv(65535))) for _ in range(every_event(trail))]
        finally:
            trail.stop()
    actual: dict[tuple[str, str, str], set[str]] = {}
    for doc in sent:
        ident = doc.find("EventIdentification")
        key = (ident.find("EventID").get("originalText"), ident.find("EventID").get("csd-code"),
               ident.get("EventActionCode"))
        actual.setdefault(key, set()).update(t.get("originalText") for t in ident.findall("EventTypeCode"))
    documented: dict[tuple[str, str, str], set[str]] = {}
    for event, code, action, *_ in table("6.1 Audit messages"):
        name, _, types = event.partition(": ")
        documented.setdefault((name, code, action), set()).update(t for t in types.split(" / ") if t)
    assert documented == actual
