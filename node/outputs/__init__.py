"""Results radiologists can open: DICOM SEG, TID 1500 SR and key images (entry point: write.write_outputs).

Imports are lazy so that node.config can validate SR templates (node.outputs.sr_template) at
start-up without importing the builders, which import node.config themselves.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OUTPUTS_FILE", "WrittenObject", "predecessor_from", "read_manifest", "write_outputs"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from node.outputs import write

        return getattr(write, name)
    raise AttributeError(f"module 'node.outputs' has no attribute {name!r}")
