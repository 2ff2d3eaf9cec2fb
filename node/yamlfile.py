"""Reading the YAML files IT and model authors write (config, model manifests, SR templates)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from node.errors import LungnodeError


def read_yaml_mapping(path: Path, error: type[LungnodeError], what: str) -> dict[str, Any]:
    """The file's top-level mapping; ``error`` names the file and says what is wrong with it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from exc
    try:
        loaded = yaml.safe_load(text)
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
