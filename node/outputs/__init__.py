"""Results radiologists can open: DICOM SEG, TID 1500 SR and key images (see write.py)."""

from node.outputs.write import OUTPUTS_FILE, WrittenObject, predecessor_from, read_manifest, write_outputs

__all__ = ["OUTPUTS_FILE", "WrittenObject", "predecessor_from", "read_manifest", "write_outputs"]
