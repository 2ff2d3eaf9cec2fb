"""Deterministic UIDs for the outputs of one analysis.

Every UID is a name-based (version 5) UUID in the 2.25 form of PS3.5 B.2, named by the source series
UID, its revision, the models (name, version, sha256) that made the results and a digest of what
else decides the objects' content (the result itself, the node's version, the output settings, the
SR template, the installation's Device UID). (pydicom's ``generate_uid(prefix=None, entropy_srcs=...)`` would ignore the sources and
return a random UUID.) Re-running the same input gives the same UIDs, so a receiver that already has
an object recognises the resend as the same instance; anything that changes an object's content (a
new revision, a new model, a failed analysis run again with success, other settings) gives new UIDs,
since many archives keep the first instance they got under a UID and ignore a later one.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_OID, "lungnode-outputs-v1")


def _model_key(models: Sequence[Mapping[str, str]]) -> list[str]:
    return sorted(f"{m.get('name', '')}={m.get('version', '')}@{m.get('sha256', '')}" for m in models)


def content_digest(*parts: object) -> str:
    """A short digest of JSON-serialisable parts (what decides an object's content besides the models)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def uuid_uid(name: str) -> str:
    """``2.25.<n>`` where n is the name-based UUID of ``name`` as an integer (at most 44 characters)."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"


@dataclass(frozen=True)
class OutputUIDs:
    """The UIDs of one analysis' outputs; ``derive(role)`` gives further ones (segment tracking, key images)."""

    source_series_uid: str
    revision: int
    models: tuple[str, ...]
    content: str = ""

    @classmethod
    def for_analysis(cls, *, source_series_uid: str, revision: int, models: Sequence[Mapping[str, str]],
                     content: str = "") -> OutputUIDs:
        """``content``: ``content_digest`` of what else decides the objects (empty: models and revision only)."""
        if not source_series_uid:
            raise ValueError("outputs need the source Series Instance UID to derive their UIDs")
        return cls(source_series_uid, int(revision), tuple(_model_key(models)), content)

    def derive(self, role: str) -> str:
        """A UID unique to (source series, revision, models, content, role), the same on every run."""
        name = "\n".join([self.source_series_uid, str(self.revision), *self.models,
                          *([f"content={self.content}"] if self.content else []), role])
        return uuid_uid(name)

    @property
    def seg_series(self) -> str:
        return self.derive("seg/series")

    @property
    def seg_instance(self) -> str:
        return self.derive("seg/instance")

    @property
    def sr_series(self) -> str:
        return self.derive("sr/series")

    @property
    def sr_instance(self) -> str:
        return self.derive("sr/instance")

    @property
    def key_image_series(self) -> str:
        return self.derive("key_image/series")

    def key_image_instance(self, index: int) -> str:
        return self.derive(f"key_image/instance/{index}")

    @property
    def kos_series(self) -> str:
        return self.derive("kos/series")

    @property
    def kos_instance(self) -> str:
        return self.derive("kos/instance")

    def tracking_uid(self, structure_key: str) -> str:
        """Tracking UID of one structure: the SEG segment and its SR measurement group share it."""
        return self.derive(f"tracking/{structure_key}")

    def group_uid(self, group_key: str) -> str:
        """Tracking UID of an SR measurement group that is not a segment (e.g. the classification)."""
        return self.derive(f"group/{group_key}")
