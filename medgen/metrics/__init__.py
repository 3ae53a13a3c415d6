"""Evaluation metrics for synthetic medical images: FID (2D, 2.5D, 3D), KID, precision/recall,
density/coverage, MS-SSIM diversity, bootstrap intervals, and the feature-extractor registry.

Import-light: submodules (and torch) load on first attribute access.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "pairwise_topk": "medgen.metrics.knn",
    "pairwise_blocks": "medgen.metrics.knn",
    "kth_neighbour_radius": "medgen.metrics.knn",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'medgen.metrics' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
