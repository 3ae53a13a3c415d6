"""Privacy audit: copy detectors (SSL + pixel-rank), calibrated thresholds, null rate, positive
control, verdict (pass / fail / inconclusive), memorization measures, report, filtered release set.
Import-light: submodules (and torch) load on first attribute access.

    from medgen.privacy import run_audit
    report = run_audit("data/train", "data/holdout", "samples/", "audit/")   # report["verdict"]

    from medgen.privacy import CopyAudit, judge                  # tensors (N, C, *S) in [-1, 1]
    audit = CopyAudit.fit(train, holdout)                        # detectors, tau, null, control
    result = judge(audit, synthetic)                             # AuditResult
    result.verdict, result.p_value, result.flagged, result.report
"""

from __future__ import annotations

from medgen.lazy import lazy_getattr

_EXPORTS = {
    "run_audit": "medgen.privacy.audit",
    "audit_images": "medgen.privacy.audit",
    "filter_synthetic": "medgen.privacy.audit",
    "load_report": "medgen.privacy.audit",
    "AuditResult": "medgen.privacy.verdict",
    "judge": "medgen.privacy.verdict",
    "EXIT_CODES": "medgen.privacy.verdict",
    "CopyAudit": "medgen.privacy.calibration",
    "Scores": "medgen.privacy.calibration",
    "run_split": "medgen.privacy.audit",
    "make_copies": "medgen.privacy.families",
    "build_detectors": "medgen.privacy.detector",
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
    "copy_rate_test": "medgen.privacy.memorization",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
