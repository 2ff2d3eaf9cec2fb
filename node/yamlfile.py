"""Reading the YAML files IT and model authors write (config, model manifests, SR templates)."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, Tag

from node.errors import LungnodeError


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key written twice in one mapping: YAML would keep the last one silently, and a
    port or AE title set twice in a long config file is a mistake to show, not to guess."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"the key {key!r} appears twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: Path, error: type[LungnodeError], what: str) -> dict[str, Any]:
    """The file's top-level mapping; ``error`` names the file and says what is wrong with it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from exc
    try:
        loader = _UniqueKeyLoader(text)
        loader.name = str(path)  # errors then say which file, not "<unicode string>"
        try:
            loaded = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise error(f"{what} {path} is not valid YAML: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise error(f"{what} {path}: the top level must be a mapping")
    return loaded


def error_location(parts: Sequence[int | str]) -> str:
    """A validation error's place in the file as its author reads it: ``output.labels[2].snomed``."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _models(annotation: Any, tag: str | None = None) -> list[tuple[type[BaseModel], str | None]]:
    """The models a field holds, each with its union tag: ``list[Destination | WebDestination]`` -> both,
    ``TlsSettings | None`` -> TlsSettings."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        inner, *meta = typing.get_args(annotation)
        tags = [m.tag for m in meta if isinstance(m, Tag)]
        return _models(inner, tags[0] if tags else tag)
    if origin is not None:  # a union, list[...] or dict[...]: the models inside
        return [m for arg in typing.get_args(annotation) for m in _models(arg, tag)]
    return [(annotation, tag)] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []


def keys_at(model: type[BaseModel], loc: Sequence[int | str]) -> list[str]:
    """The keys a mapping may have, found by following an error's path from ``model``. A list index is stepped
    over; a union's tag (``dicomweb``, as pydantic puts it in the path) picks that member of the union."""
    models: list[tuple[type[BaseModel], str | None]] = [(model, None)]
    for part in map(str, loc):
        inner = [m for cls, _ in models if part in cls.model_fields for m in _models(cls.model_fields[part].annotation)]
        tagged: list[tuple[type[BaseModel], str | None]] = [(cls, tag) for cls, tag in models if tag == part]
        models = inner or tagged or models
    return sorted({key for cls, _ in models for key in cls.model_fields})


def did_you_mean(model: type[BaseModel], loc: Sequence[int | str]) -> str:
    """`` (did you mean port?)`` for a misspelt key (``prot``, ``quiet_period``), else nothing: the fix, not a
    search through the documentation."""
    if not loc:
        return ""
    close = difflib.get_close_matches(str(loc[-1]).lower(), keys_at(model, loc[:-1]), n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""
