"""Evaluation metrics for synthetic medical images: FID (2D, 2.5D, 3D), KID, precision/recall,
density/coverage, MS-SSIM diversity, confidence intervals, the feature-extractor registry, and
the utility of a labelled synthetic set (train on synthetic, test on real).

Import-light: submodules (and torch) load on first attribute access.
"""

from __future__ import annotations

from medgen.lazy import lazy_getattr

_EXPORTS = {
    "pairwise_topk": "medgen.metrics.knn",
    "pairwise_blocks": "medgen.metrics.knn",
    "kth_neighbour_radius": "medgen.metrics.knn",
    "frechet_distance": "medgen.metrics.fid",
    "frechet_distance_from_statistics": "medgen.metrics.fid",
    "gaussian_statistics": "medgen.metrics.fid",
    "kernel_inception_distance": "medgen.metrics.kid",
    "precision_recall": "medgen.metrics.prdc",
    "density_coverage": "medgen.metrics.prdc",
    "prdc": "medgen.metrics.prdc",
    "msssim_diversity": "medgen.metrics.msssim",
    "half_sample_two_sample": "medgen.metrics.bootstrap",
    "bootstrap_mean": "medgen.metrics.bootstrap",
    "get_extractor": "medgen.metrics.features",
    "evaluate": "medgen.metrics.report",
    "synthetic_utility": "medgen.metrics.utility",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
