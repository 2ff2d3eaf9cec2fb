"""What the node calls a series, from its ``result.json``: the one place result.json's ``call``, the SR, the KOS and
the key images take it from.

The 3D diagnosis model gives class probabilities and the slice rule gives pneumonia / no pneumonia from per-slice
lesion evidence; the series is called pneumonia when either says so (the more sensitive reading: these are reference
models, and a reader is better shown a doubtful finding than none).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: How a diagnosis class is named on images; a site's model with other class names shows those names.
CLASS_NAMES = {"covid19": "COVID-19 pneumonia", "other_pneumonia": "other pneumonia", "no_pneumonia": "no pneumonia"}


def most_probable(result: Mapping[str, Any]) -> str | None:
    """The diagnosis model's most probable class, or None without probabilities."""
    probabilities: dict[str, float] = result.get("probabilities") or {}
    return max(probabilities, key=lambda name: probabilities[name]) if probabilities else None


def calls_pneumonia(result: Mapping[str, Any]) -> bool:
    """Whether the analysis calls the series pneumonia: the diagnosis model's most probable class, or the slice
    rule's decision; True when it has neither (no way to say no)."""
    decision = (result.get("slice_rule") or {}).get("decision")
    best = most_probable(result)
    if best is None and decision is None:
        return True
    return decision == "pneumonia" or (best is not None and best != "no_pneumonia")


def call_text(result: Mapping[str, Any]) -> str | None:
    """One line for a reader: the model's most probable class with its probability, and the slice rule's decision
    with the share it was taken on; None when the analysis has neither."""
    parts = []
    best = most_probable(result)
    if best is not None:
        parts.append(f"Most probable: {CLASS_NAMES.get(best, best.replace('_', ' '))} "
                     f"(probability {float(result['probabilities'][best]):.2f})")
    rule = result.get("slice_rule") or {}
    if rule.get("decision") is not None:
        share, least = rule.get("abnormal_slice_share"), rule.get("min_share")
        basis = (f" ({float(share):.0%} of slices with lesions, threshold {float(least):.0%})"
                 if isinstance(share, (int, float)) and isinstance(least, (int, float)) else "")
        parts.append(f"slice rule: {str(rule['decision']).replace('_', ' ')}{basis}")
    return "; ".join(parts) or None


def call_values(result: Mapping[str, Any]) -> dict[str, str | None] | None:
    """result.json's ``call``: ``pneumonia`` ("pneumonia" or "no_pneumonia", ``calls_pneumonia``) and
    ``most_probable`` (the diagnosis model's class); None when the analysis has no probabilities and no slice rule
    (a series refused or failed: nothing was called)."""
    best = most_probable(result)
    if best is None and (result.get("slice_rule") or {}).get("decision") is None:
        return None
    return {"pneumonia": "pneumonia" if calls_pneumonia(result) else "no_pneumonia", "most_probable": best}
