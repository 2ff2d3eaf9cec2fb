"""SR templates: which values of an analysis go into the TID 1500 Measurement Report, coded how.

A template (``sr_templates/<name>.yaml``) is data: measurement groups, each with a tracking
identifier, a finding, the model that produced it, and its measurements (a value path into
``result.json``, a concept code and a UCUM unit) or coded evaluations. It is validated strictly when
loaded: an unknown key, an unknown value path, a code keyword that pydicom's dictionaries do not
know or a unit outside UCUM stops start-up with a message naming the field and the file.

Codes are written either as a pydicom dictionary keyword (``{keyword: DCM.Probability}``, preferred
where the dictionary has the concept) or in full (``{code: "3341006", scheme: SCT, meaning: Right lung}``).
Where no standard code says what a value is, a private scheme (designator ``99...``) may be used: the
template declares it under ``coding_schemes`` and the SR identifies it (Coding Scheme Identification
Sequence), so a reader can tell a private code from a standard one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from node.errors import LungnodeError
from node.outputs.codes import STRUCTURES
from node.yamlfile import did_you_mean, error_location, read_yaml_mapping

#: The templates shipped with the node.
TEMPLATES_DIR = Path(__file__).resolve().parent.parent.parent / "sr_templates"

#: Numeric values a template may report: result.json paths (``probabilities.<label>`` takes any label).
NUMBER_PATHS: frozenset[str] = frozenset({
    *(f"lung_volume_ml.{k}" for k in ("right", "left", "total")),
    *(f"lesion_volume_ml.{k}" for k in ("ggo", "consolidation", "total", "right", "left")),
    *(f"involvement_percent.{k}" for k in ("right", "left", "total")),
    *(f"slice_rule.{k}" for k in ("abnormal_slice_share", "slices_considered", "min_share", "head_skip",
                                   "tail_skip")),
})
#: Coded values: the path and the values it can take (each needs a code in the template).
CODED_PATHS: dict[str, frozenset[str]] = {
    "slice_rule.decision": frozenset({"pneumonia", "no_pneumonia"}),
    "call.pneumonia": frozenset({"pneumonia", "no_pneumonia"}),  # node.pipeline.call
    # the reference diagnosis model's classes (a site's model with others needs a template of its own)
    "call.most_probable": frozenset({"covid19", "other_pneumonia", "no_pneumonia"}),
}
_PROBABILITY_RE = re.compile(r"^probabilities\.[a-z][a-z0-9_]{0,63}$")


class TemplateError(LungnodeError):
    """An SR template is invalid or missing; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class CodeRef(_Strict):
    """A coded concept: a pydicom dictionary keyword, or code + scheme + meaning."""

    keyword: str | None = Field(default=None, description="SCHEME.Keyword from pydicom.sr.codedict, e.g. DCM.Probability")
    code: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^\S+$")
    scheme: str | None = Field(default=None, min_length=1, max_length=16, pattern=r"^\S+$")
    meaning: str | None = Field(default=None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _one_form(self) -> CodeRef:
        full = (self.code, self.scheme, self.meaning)
        if self.keyword is not None:
            if any(v is not None for v in full):
                raise ValueError("give either keyword or code/scheme/meaning, not both")
            scheme, _, name = self.keyword.partition(".")
            try:
                getattr(getattr(codes, scheme), name)
            except AttributeError:
                raise ValueError(f"{self.keyword!r} is not in pydicom's code dictionaries (write SCHEME.Keyword, "
                                 "e.g. DCM.Probability, or give code, scheme and meaning)") from None
        elif any(v is None for v in full):
            raise ValueError("a code needs keyword, or all of code, scheme and meaning")
        return self

    def to_code(self) -> Code:
        if self.keyword is not None:
            scheme, _, name = self.keyword.partition(".")
            code: Code = getattr(getattr(codes, scheme), name)
            return code
        assert self.code and self.scheme and self.meaning
        return Code(self.code, self.scheme, self.meaning)


class UnitRef(CodeRef):
    """A UCUM unit."""

    @model_validator(mode="after")
    def _ucum(self) -> UnitRef:
        if self.to_code().scheme_designator != "UCUM":
            raise ValueError("a unit must be a UCUM code (scheme UCUM, e.g. {keyword: UCUM.Percent} or "
                             "{code: mL, scheme: UCUM, meaning: milliliter})")
        return self


class MeasurementSpec(_Strict):
    value: str = Field(description="result.json path, e.g. lung_volume_ml.right")
    concept: CodeRef
    unit: UnitRef
    scale: float = Field(default=1.0, description="multiply the value by this (e.g. 100 for a share in percent)")

    @field_validator("value")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in NUMBER_PATHS and not _PROBABILITY_RE.match(v):
            raise ValueError(f"unknown value {v!r}; numeric values are probabilities.<label> or one of "
                             f"{sorted(NUMBER_PATHS)}")
        return v


class EvaluationSpec(_Strict):
    """A coded (qualitative) value, e.g. the slice rule's decision as Present/Absent."""

    value: str = Field(description="result.json path of a coded value, e.g. slice_rule.decision")
    concept: CodeRef
    codes: dict[str, CodeRef] = Field(description="a code for every value the path can take")

    @model_validator(mode="after")
    def _complete(self) -> EvaluationSpec:
        if self.value not in CODED_PATHS:
            raise ValueError(f"unknown coded value {self.value!r}; one of {sorted(CODED_PATHS)}")
        missing = sorted(CODED_PATHS[self.value] - set(self.codes))
        extra = sorted(set(self.codes) - CODED_PATHS[self.value])
        if missing or extra:
            raise ValueError(f"codes must cover exactly {sorted(CODED_PATHS[self.value])} "
                             f"(missing {missing}, unknown {extra})")
        return self


class GroupSpec(_Strict):
    """One measurement group: a SEG segment's (TID 1411) or the whole series' (TID 1501)."""

    id: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$", description="stable key; the group's tracking UID derives from it")
    tracking_id: str = Field(min_length=1, max_length=64, description="human-readable Tracking Identifier")
    segment: str | None = Field(default=None, description="SEG segment the group measures (TID 1411)")
    finding: CodeRef | None = Field(default=None, description="Finding type; a segment group defaults to the segment's type")
    finding_site: CodeRef | None = None
    model: Literal["lung", "lesion", "diagnosis"] = Field(description="the model whose results these are")
    measurements: list[MeasurementSpec] = Field(default_factory=list)
    evaluations: list[EvaluationSpec] = Field(default_factory=list)

    @field_validator("segment")
    @classmethod
    def _segment(cls, v: str | None) -> str | None:
        keys = [s.key for s in STRUCTURES]
        if v is not None and v not in keys:
            raise ValueError(f"unknown segment {v!r}; the SEG has {keys}")
        return v

    @model_validator(mode="after")
    def _content(self) -> GroupSpec:
        if not self.measurements and not self.evaluations:
            raise ValueError("a group needs at least one measurement or evaluation")
        if self.segment is None and self.finding is None:
            raise ValueError("a group without segment needs a finding")
        return self


class StatementCodes(_Strict):
    """Concept names of the report's text statements (the Analysis information group)."""

    disclaimer: CodeRef
    status: CodeRef
    reason: CodeRef
    qa_flag: CodeRef
    model: CodeRef
    refused_concept: CodeRef = Field(description="coded evaluation of a refused or failed analysis: its name")
    refused_value: CodeRef = Field(description="... and its value")


class CodingScheme(_Strict):
    """A private coding scheme the template's codes use (PS3.3 C.12.1.1.2: Coding Scheme Identification)."""

    designator: str = Field(pattern=r"^99[A-Z0-9_]{1,14}$", description="private designators start with 99")
    name: str = Field(min_length=1, max_length=64)
    responsible_organization: str = Field(min_length=1, max_length=64)


class SRTemplate(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    version: str = Field(min_length=1, max_length=16)
    procedure_reported: CodeRef
    information_group: str = Field(min_length=1, max_length=64, description="tracking identifier of the statements")
    statements: StatementCodes
    groups: list[GroupSpec] = Field(min_length=1)
    coding_schemes: list[CodingScheme] = Field(default_factory=list, validate_default=True,
                                               description="private schemes the codes use")

    @field_validator("coding_schemes")
    @classmethod
    def _private_schemes_declared(cls, v: list[CodingScheme], info: ValidationInfo) -> list[CodingScheme]:
        """Fields are validated in order, so the codes of every field above are in ``info.data``."""
        used = {s for s in _schemes(info.data) if s.startswith("99")}
        missing = sorted(used - {c.designator for c in v})
        if missing:
            raise ValueError(f"private coding scheme(s) {missing} used but not declared here "
                             "(designator, name, responsible_organization)")
        return v

    @field_validator("groups")
    @classmethod
    def _unique(cls, v: list[GroupSpec]) -> list[GroupSpec]:
        ids = [g.id for g in v]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"group ids must be unique: {dup}")
        return v


def _schemes(node: Any) -> list[str]:
    """Every ``scheme`` of a code in template content (models, or what they dump to)."""
    if isinstance(node, BaseModel):
        return _schemes(node.model_dump())
    if isinstance(node, dict):
        own = [node["scheme"]] if isinstance(node.get("scheme"), str) else []
        return own + [s for v in node.values() for s in _schemes(v)]
    if isinstance(node, list):
        return [s for v in node for s in _schemes(v)]
    return []


def parse_template(data: Any, source: Path) -> SRTemplate:
    """Validate template content read from ``source``."""
    if not isinstance(data, dict):
        raise TemplateError(f"invalid SR template {source}: the top level must be a mapping of keys")
    try:
        return SRTemplate.model_validate(data)
    except ValidationError as exc:
        lines = [f"invalid SR template {source}:"]
        for err in exc.errors():
            msg = ("unknown key" + did_you_mean(SRTemplate, err["loc"]) if err["type"] == "extra_forbidden"
                   else err["msg"].removeprefix("Value error, "))
            lines.append(f"  {error_location(err['loc'])}: {msg}")
        raise TemplateError("\n".join(lines)) from exc


def load_template(name: str, directory: Path | None = None) -> SRTemplate:
    """Read and validate ``<directory>/<name>.yaml`` (default: the templates shipped with the node)."""
    folder = Path(directory) if directory is not None else TEMPLATES_DIR
    path = folder / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        raise TemplateError(f"SR template {path} does not exist: set outputs.sr_template to one of {available} "
                            "or outputs.sr_templates_dir to the folder holding yours")
    template = parse_template(read_yaml_mapping(path, TemplateError, "SR template"), path)
    if template.name != name:
        raise TemplateError(f"invalid SR template {path}:\n  name: is {template.name!r} but the file is {name!r}.yaml")
    return template


def lookup(result: dict[str, Any], path: str) -> Any:
    """The value at a dotted ``path`` of result.json, or None where any part is missing."""
    node: Any = result
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node
