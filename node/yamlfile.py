"""Reading the YAML files IT and model authors write (config, model manifests, SR templates)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

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
