"""Model manifests: ``models/<name>/model.yaml`` describes what ``model.onnx`` expects and returns.

The manifest is the contract between training and the node: the input tensor, its layout, size and
HU window; the output tensor, its activation and the coded meaning of every label; the hash of the
exact ``model.onnx`` it describes. It is validated when loaded, strictly (an unknown key or a value of
the wrong type is refused), so a bad model folder stops start-up with a message naming the field and
the file instead of producing wrong results later.

``output.activation`` is the activation the ONNX graph itself already applies to the output tensor;
the node never applies it again:

* ``softmax``: probabilities over ``labels`` that sum to 1 along the channel axis (axis 1);
* ``sigmoid``: independent probabilities in [0, 1], one channel per label;
* ``none``: the tensor is final as it is (scores or logits that the model's post-processing reads).

``paired_with`` names, by role (``lung``, ``lesion``), the SHA-256 of the model whose outputs this model was
trained and measured on (the diagnosis model reads the lesion model's map): the node still runs another, but
warns at start that the figures in the model card do not hold for that pair.

``preprocessing`` and ``postprocessing`` are model-specific settings (numbers, strings, booleans),
e.g. ``crop_to_lung_box: true``, ``batch_size: 16`` (slices per run on the CPU), ``cuda_batch_size: 64``
(on the GPU), ``keep_largest_components: 2``, ``min_component_ml: 5``, ``threshold: 0.5``,
``smooth_z_sigma_mm: 2`` (a 2D slice model's probabilities averaged along z before the argmax); the
pipeline step that uses a model documents the keys it reads.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from node.errors import LungnodeError
from node.yamlfile import did_you_mean, error_location, read_yaml_mapping

MANIFEST_FILE = "model.yaml"
ONNX_FILE = "model.onnx"

#: Spatial dimensions per input layout (N and C excluded).
SPATIAL_DIMS: dict[str, int] = {"NCHW": 2, "NCDHW": 3}

_SEMVER_RE = r"^\d+\.\d+(\.\d+)?([-+][0-9A-Za-z.+-]+)?$"
_NAME_RE = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
_LABEL_RE = r"^[a-z][a-z0-9_]{0,63}$"

#: CID 7162 "Algorithm Family", by meaning (what a manifest writes) -> code (what DICOM SEG carries).
ALGORITHM_FAMILIES: dict[str, Code] = {
    getattr(codes.cid7162, keyword).meaning: getattr(codes.cid7162, keyword) for keyword in codes.cid7162.dir()
}

Scalar = bool | int | float | str


#: Settings the pipeline reads as sizes, counts or volumes (preprocessing and postprocessing alike).
NON_NEGATIVE_KEYS = frozenset({"min_component_ml", "smooth_z_sigma_mm", "keep_largest_components", "batch_size",
                               "cuda_batch_size"})

class ManifestError(LungnodeError):
    """A model folder is unusable: invalid or missing manifest, missing model, hash mismatch."""


class _Strict(BaseModel):
    # strict: YAML ``version: 1.0`` is a float, not the string "1.0": refuse rather than guess.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class CodeSpec(_Strict):
    """A coded concept (SNOMED CT by default) that names a label in DICOM SEG and SR."""

    code: str = Field(min_length=1, max_length=64, pattern=r"^\S+$")
    meaning: str = Field(min_length=1, max_length=64)
    scheme: str = Field(default="SCT", min_length=1, max_length=16, pattern=r"^\S+$")

    def to_code(self) -> Code:
        """The pydicom Code for highdicom (SEG segment categories/types, SR findings)."""
        return Code(value=self.code, scheme_designator=self.scheme, meaning=self.meaning)


class Label(_Strict):
    """One output channel (segmentation) or class (classification)."""

    index: int = Field(ge=0)
    name: str = Field(pattern=_LABEL_RE, description="lower_snake_case, e.g. right_lung, covid19")
    snomed: CodeSpec | None = Field(default=None, description="required except for the label named background")

    @model_validator(mode="after")
    def _coded(self) -> Label:
        # Every label that ends up in SEG or SR needs a code; background is never written.
        if self.snomed is None and self.name != "background":
            raise ValueError(
                f"label {self.name!r} needs snomed {{code, meaning, scheme}} (only background may omit it)"
            )
        return self


class Algorithm(_Strict):
    """DICOM Algorithm Identification (SEG SegmentAlgorithmName/Version/Family)."""

    name: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=64)
    family: str = Field(default="Artificial Intelligence", description="a CID 7162 meaning")

    @field_validator("family")
    @classmethod
    def _family(cls, v: str) -> str:
        if v not in ALGORITHM_FAMILIES:
            raise ValueError(f"must be a DICOM CID 7162 algorithm family, one of {sorted(ALGORITHM_FAMILIES)}")
        return v

    def family_code(self) -> Code:
        """The CID 7162 code for highdicom's AlgorithmIdentificationSequence."""
        return ALGORITHM_FAMILIES[self.family]


class Window(_Strict):
    """HU window mapped linearly to [0, 1] with clipping: [level - width/2, level + width/2]."""

    level: float
    width: float = Field(gt=0)


class InputSpec(_Strict):
    """The single input tensor of the model."""

    name: str = Field(min_length=1)
    layout: Literal["NCHW", "NCDHW"] = Field(description="NCHW: batches of 2D slices; NCDHW: 3D volumes")
    size: list[int | None] = Field(description="spatial size the model expects ([H, W] or [D, H, W]); null = dynamic")
    spacing_mm: list[float] | None = Field(
        default=None, description="voxel spacing after resampling, same order as size"
    )
    window: Window
    channels: list[str] = Field(
        min_length=1, description="what each input channel holds, e.g. [ct] or [ct, lesion_map]"
    )

    @field_validator("size")
    @classmethod
    def _size(cls, v: list[int | None]) -> list[int | None]:
        for dim in v:
            if dim is not None and dim < 1:
                raise ValueError("every size must be a positive integer or null (dynamic)")
        return v

    @field_validator("spacing_mm")
    @classmethod
    def _spacing(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(s <= 0 for s in v):
            raise ValueError("every spacing must be positive (millimetres)")
        return v

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("channel names must be unique")
        return v

    @model_validator(mode="after")
    def _dims(self) -> InputSpec:
        n = SPATIAL_DIMS[self.layout]
        if len(self.size) != n:
            raise ValueError(f"size has {len(self.size)} values but layout {self.layout} has {n} spatial dimensions")
        if self.spacing_mm is not None and len(self.spacing_mm) != n:
            raise ValueError(
                f"spacing_mm has {len(self.spacing_mm)} values but layout {self.layout} has {n} spatial dimensions"
            )
        return self

    @property
    def rank(self) -> int:
        """Tensor rank including the batch and channel axes."""
        return 2 + SPATIAL_DIMS[self.layout]


class OutputSpec(_Strict):
    """The output tensor the node reads (the model may have others; they are ignored)."""

    name: str = Field(min_length=1)
    activation: Literal["softmax", "sigmoid", "none"] = Field(description="applied inside the graph, see module doc")
    labels: list[Label] = Field(min_length=1)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[Label]) -> list[Label]:
        indices = [label.index for label in v]
        if len(set(indices)) != len(indices):
            dup = sorted({i for i in indices if indices.count(i) > 1})
            raise ValueError(f"label index used more than once: {dup}")
        if sorted(indices) != list(range(len(v))):
            raise ValueError(f"label indices must be 0..{len(v) - 1} without gaps, got {sorted(indices)}")
        names = [label.name for label in v]
        if len(set(names)) != len(names):
            raise ValueError("label names must be unique")
        return sorted(v, key=lambda label: label.index)

    @property
    def label_names(self) -> list[str]:
        """Label names in channel order."""
        return [label.name for label in self.labels]

    def label_index(self, name: str) -> int:
        """Channel of a label by name, so callers never hard-code channel numbers."""
        for label in self.labels:
            if label.name == name:
                return label.index
        raise KeyError(f"no label {name!r}; the model has {self.label_names}")


class ModelManifest(_Strict):
    """The content of ``models/<name>/model.yaml``."""

    name: str = Field(pattern=_NAME_RE, description="the model folder's name")
    version: str = Field(pattern=_SEMVER_RE, description="semver-ish: 1.2, 1.2.3, 1.2.3-rc1")
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$", description="SHA-256 of model.onnx, hex")
    task: Literal["segmentation", "classification"]
    description: str = Field(min_length=1)
    intended_use: str = Field(min_length=1)
    not_for_clinical_use: bool
    algorithm: Algorithm
    input: InputSpec
    output: OutputSpec
    preprocessing: dict[str, Scalar] = Field(default_factory=dict)
    postprocessing: dict[str, Scalar] = Field(default_factory=dict)
    paired_with: dict[Literal["lung", "lesion"], str] | None = None
    metrics: dict[str, Any] | None = None
    training: dict[str, Any] | None = None

    @field_validator("paired_with")
    @classmethod
    def _paired_hashes(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for role, sha in (v or {}).items():
            if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha):
                raise ValueError(f"{role}: must be the SHA-256 (64 hex digits) of that model's model.onnx")
        return {role: sha.lower() for role, sha in v.items()} if v else v

    @field_validator("preprocessing", "postprocessing", mode="before")
    @classmethod
    def _scalars(cls, v: Any) -> Any:
        # One clear message instead of one per member of the Scalar union.
        if isinstance(v, dict):
            for key, value in v.items():
                if not isinstance(value, (bool, int, float, str)):
                    raise ValueError(f"{key}: must be a number, string or boolean, got {type(value).__name__}")
                if key in NON_NEGATIVE_KEYS and (isinstance(value, (bool, str)) or value < 0):
                    # read with float() in the middle of an analysis: a bad value must stop the model loading
                    raise ValueError(f"{key}: must be a number of 0 or more, got {value!r}")
        return v

    @field_validator("sha256")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.lower()

    @field_validator("not_for_clinical_use")
    @classmethod
    def _not_clinical(cls, v: bool) -> bool:
        if v is not True:
            raise ValueError("must be true: these reference models are not cleared for clinical use")
        return v

    @property
    def output_rank(self) -> int:
        """Rank of the output tensor: per-voxel maps keep the input rank, classes are [N, K]."""
        return self.input.rank if self.task == "segmentation" else 2


def _format_error(exc: ValidationError, path: Path) -> str:
    lines = [f"invalid model manifest {path}:"]
    for err in exc.errors():
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + (did_you_mean(ModelManifest, err["loc"])
                                   or " (check the spelling; model.yaml accepts only documented keys)")
        elif err["type"] == "string_type" and isinstance(err.get("input"), (int, float)):
            msg = f"{err['msg']} (got {err['input']!r}: quote it in YAML)"
        else:
            msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {error_location(err['loc'])}: {msg}")
    return "\n".join(lines)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, streamed (models can be hundreds of MB)."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def parse_manifest(data: Any, source: Path) -> ModelManifest:
    """Validate manifest content already read from ``source`` (used by load_manifest and tests)."""
    if not isinstance(data, dict):
        raise ManifestError(f"invalid model manifest {source}: the top level must be a mapping of keys")
    try:
        return ModelManifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(_format_error(exc, source)) from exc


def load_manifest(model_dir: Path, *, check_hash: bool = True) -> ModelManifest:
    """Read and validate ``model_dir/model.yaml`` and check that ``model.onnx`` is the file it describes."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_FILE
    if not model_dir.is_dir():
        raise ManifestError(f"model folder {model_dir} does not exist: check inference.models_dir and the model name")
    if not path.is_file():
        raise ManifestError(f"{path} is missing: every model folder needs its manifest next to model.onnx")
    manifest = parse_manifest(read_yaml_mapping(path, ManifestError, "model manifest"), path)
    if manifest.name != model_dir.name:
        raise ManifestError(
            f"invalid model manifest {path}:\n  name: is {manifest.name!r} but the folder is {model_dir.name!r}: "
            "rename one so they agree (the configuration refers to models by folder name)"
        )
    onnx_path = model_dir / ONNX_FILE
    if not onnx_path.is_file():
        raise ManifestError(f"{onnx_path} is missing: copy the exported model next to its manifest")
    if check_hash:
        actual = file_sha256(onnx_path)
        if actual != manifest.sha256:
            raise ManifestError(
                f"{onnx_path} sha256 is {actual}, manifest says {manifest.sha256}: "
                "the file was changed or the manifest not updated"
            )
    return manifest


def describe(manifest: ModelManifest) -> str:
    """One line for logs and the CLI: name, version, task, short hash."""
    return f"{manifest.name} {manifest.version} ({manifest.task}, sha256 {manifest.sha256[:12]})"


__all__ = [
    "ALGORITHM_FAMILIES",
    "Algorithm",
    "CodeSpec",
    "InputSpec",
    "Label",
    "MANIFEST_FILE",
    "ManifestError",
    "ModelManifest",
    "ONNX_FILE",
    "OutputSpec",
    "Window",
    "describe",
    "file_sha256",
    "load_manifest",
    "parse_manifest",
]
