"""Privacy audit: SSL copy detector, calibrated copy threshold, memorization measures, report,
filtered release set. Import-light: submodules (and torch) load on first attribute access.

    from medgen.privacy import run_audit
    report = run_audit("data/train", "data/holdout", "samples/", "audit/", detector="ssl")
"""

from __future__ import annotations

from medgen.lazy import lazy_getattr

_EXPORTS = {
    "run_audit": "medgen.privacy.audit",
    "audit_images": "medgen.privacy.audit",
    "filter_synthetic": "medgen.privacy.audit",
    "load_report": "medgen.privacy.audit",
    "AuditResult": "medgen.privacy.audit",
    "train_detector": "medgen.privacy.detector",
    "load_detector": "medgen.privacy.detector",
    "SSLCopyDetector": "medgen.privacy.detector",
    "PixelDetector": "medgen.privacy.detector",
    "FeatureDetector": "medgen.privacy.detector",
    "CopyEncoder": "medgen.privacy.detector",
    "nt_xent_loss": "medgen.privacy.detector",
    "copy_threshold": "medgen.privacy.memorization",
    "authpct": "medgen.privacy.memorization",
    "c_t_statistic": "medgen.privacy.memorization",
    "carlini_relative_l2": "medgen.privacy.memorization",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
