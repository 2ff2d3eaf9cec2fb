"""An Analysis from a series and known masks, with no model: for tests, benchmarks and demos.

The synthetic phantom's label maps are in the canonical orientation by construction, so a series
written from it, read back with ``load_volume``, pairs with ``phantom.lungs``/``phantom.lesions``
exactly (whatever the patient position or the order of the files).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from node.config import SliceRuleSettings
from node.pipeline import postprocess as post
from node.pipeline.runner import Analysis
from node.pipeline.slice_rule import apply_slice_rule
from node.pipeline.volume import Volume, load_volume

#: Placeholder model identities for analyses made without models.
TRUTH_MODELS: tuple[dict[str, str], ...] = (
    {"name": "truth_lung", "version": "0.0.1", "sha256": "1" * 64},
    {"name": "truth_lesion", "version": "0.0.1", "sha256": "2" * 64},
    {"name": "truth_diagnosis", "version": "0.0.1", "sha256": "3" * 64},
)


def analysis_from_masks(*, volume: Volume, lungs: np.ndarray, lesions: np.ndarray, series_instance_uid: str,
                        probabilities: Mapping[str, float] | None = None,
                        models: Sequence[Mapping[str, str]] = TRUTH_MODELS) -> Analysis:
    """An ``ok`` Analysis whose masks are the given ones and whose measurements are measured from them."""
    if lungs.shape != volume.shape or lesions.shape != volume.shape:
        raise ValueError(f"masks {lungs.shape}/{lesions.shape} do not match the volume {volume.shape}")
    return Analysis(
        status="ok",
        series_instance_uid=series_instance_uid,
        qa=list(volume.qa),
        models=[dict(m) for m in models],
        probabilities=dict(probabilities or {"covid19": 0.7, "other_pneumonia": 0.2, "no_pneumonia": 0.1}),
        measurements=post.measure(lungs, lesions, volume.voxel_ml),
        volume=volume,
        lungs=lungs.astype(np.uint8),
        lesions=lesions.astype(np.uint8),
        slice_rule=apply_slice_rule(lungs, lesions, pixel_mm2=volume.spacing_mm[1] * volume.spacing_mm[2],
                                    rule=SliceRuleSettings()),
    )


def analysis_from_series(paths: Sequence[Path], *, lungs: np.ndarray, lesions: np.ndarray,
                         series_instance_uid: str, **kwargs: object) -> Analysis:
    """Read the series and pair it with canonical masks (e.g. a phantom's truth)."""
    return analysis_from_masks(volume=load_volume(paths), lungs=lungs, lesions=lesions,
                               series_instance_uid=series_instance_uid, **kwargs)  # type: ignore[arg-type]
