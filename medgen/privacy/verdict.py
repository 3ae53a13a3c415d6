"""The verdict of a memorization audit: pass, fail or inconclusive, and the numbers behind it.

- `inconclusive` when the audit could not have seen copies: any reason of the calibrated audit
  (collapsed or saturated detector, no convergence, held-out images shared with training, too
  few held-out images, a failed positive control; `medgen.privacy.calibration`), or a test too
  weak to notice even `detectable_rate` (half) of the samples being copies. The report gives the
  smallest copy rate the test could have noticed (`min_detectable_rate`).
- `fail` when synthetic samples exceed tau significantly more often than genuinely new images
  do: one-sided Fisher exact test of the synthetic rate against the null rate at `alpha`; or when
  the excess rate (synthetic minus null) is above a `max_copy_rate` policy.
- `pass` otherwise.

Flagged samples are listed whatever the verdict (and can be filtered out). Measures (Dar et al.
2024, memorization_assessment notebooks of Cardio-AI/memorization-ldm):

- `n_copies_pct`: synthetic samples whose best training match exceeds tau ("synthetic samples
  that are copies"), non-anatomical samples excluded from the count, over all synthetic samples.
- `n_mem_pct`: training images whose best synthetic match exceeds tau ("training samples that
  are copies": memorized patients), over all training images.
- `n_copy_sources_pct`: training images that are the nearest neighbour of a flagged synthetic
  sample (how many patients the flagged samples point at; <= n_mem).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from medgen.errors import DataError
from medgen.metrics.knn import pairwise_topk
from medgen.privacy.calibration import CopyAudit, Scores, check_images
from medgen.privacy.memorization import copy_rate_test, summary

VERDICTS = ("pass", "fail", "inconclusive")
EXIT_CODES = {"pass": 0, "fail": 1, "inconclusive": 3}
ALPHA = 0.05
# Inconclusive when the test could not notice even this share of copies (the report also gives
# the smallest share it could notice): with Dar's tau the null rate grows with N_train / N_holdout
# (a max over more candidates), so small held-out sets leave little power.
DETECTABLE_RATE = 0.5


@dataclass
class AuditResult:
    """A judged synthetic set. `report` is the JSON-ready summary (report.json); per-sample
    tensors are on the CPU. `flagged` lists the indices of the samples counted as copies."""

    verdict: str
    reasons: list[str]  # why inconclusive (empty otherwise)
    test: "RateTest"  # synthetic rate vs null rate
    scores: Scores  # the synthetic samples' scores
    report: dict[str, Any]
    train_holdout_best: torch.Tensor  # (Nt,) under the first detector (figures)
    warnings: list[str] = field(default_factory=list)
    audit: CopyAudit | None = None  # the calibrated audit: judge more samples against the same tau
    carlini_ratio: torch.Tensor | None = None  # (Ns,) relative l2 (Carlini et al. 2023), set by audit_images

    @property
    def p_value(self) -> float:
        return self.test.p_value

    @property
    def synthetic_rate(self) -> float:  # share of anatomical synthetic samples above tau
        return self.test.rate

    @property
    def null_rate(self) -> float:  # share of held-out images above tau (leave-one-out)
        return self.test.null_rate

    @property
    def is_copy(self) -> torch.Tensor:  # (Ns,) bool
        return self.scores.is_copy

    @property
    def flagged(self) -> list[int]:
        return self.scores.is_copy.nonzero().flatten().tolist()

    @property
    def synthetic_best(self) -> torch.Tensor:  # (Ns,)
        return self.scores.best

    @property
    def synthetic_nearest(self) -> torch.Tensor:  # (Ns,)
        return self.scores.nearest_train

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]


def _memorized(audit: CopyAudit, scores: Scores, embeddings: Sequence[torch.Tensor], device) -> tuple[torch.Tensor, list[int]]:
    """Dar et al.'s direction: (Nt,) bool, a training image is memorized when its best match
    among the anatomical synthetic samples exceeds tau of some detector; and per detector counts."""
    keep = scores.anatomical
    memorized = torch.zeros(audit.n_train, dtype=torch.bool)
    per_detector = []
    for f, e in zip(audit.fits, embeddings):
        if not bool(keep.any()):
            per_detector.append(0)
            continue
        best, _ = pairwise_topk(f.train_embeddings, e[keep], k=1, metric=audit.similarity, device=device)  # (Nt, 1)
        hit = best[:, 0].float().cpu() > f.threshold
        per_detector.append(int(hit.sum()))
        memorized |= hit
    return memorized, per_detector


@dataclass
class RateTest:
    """The synthetic rate above tau against the null rate: Fisher's one-sided exact test, and
    its power check (the p-value if `detectable_rate` of the samples were copies)."""

    n_flagged: int
    n_tested: int  # anatomical synthetic samples
    null_flagged: int
    null_n: int
    alpha: float
    detectable_rate: float

    @property
    def rate(self) -> float:
        return self.n_flagged / self.n_tested if self.n_tested else 0.0

    @property
    def null_rate(self) -> float:
        return self.null_flagged / self.null_n

    @property
    def p_value(self) -> float:
        return copy_rate_test(self.n_flagged, self.n_tested, self.null_flagged, self.null_n)

    def p_if_copied(self, rate: float) -> float:
        """The p-value the test would give if a share `rate` of the samples were copies (flagged)
        on top of the null rate: its power at that copy rate, in one number."""
        expected = int(round(self.n_tested * (self.null_rate + rate * (1 - self.null_rate))))
        return copy_rate_test(expected, self.n_tested, self.null_flagged, self.null_n)

    @property
    def p_at_detectable_rate(self) -> float:
        return self.p_if_copied(self.detectable_rate)

    @property
    def min_detectable_rate(self) -> float | None:
        """The smallest copy rate (1% steps) the test would call significant; None if none."""
        return next((r / 100 for r in range(1, 101) if self.p_if_copied(r / 100) < self.alpha), None)

    def summary(self) -> dict[str, Any]:
        return {
            "name": "one-sided Fisher exact test (synthetic vs held-out rate above tau)",
            "alpha": self.alpha, "p_value": round(self.p_value, 6),
            "synthetic_rate_pct": round(100.0 * self.rate, 4), "null_rate_pct": round(100.0 * self.null_rate, 4),
            "excess_pct": round(100.0 * (self.rate - self.null_rate), 4),
            "null_flagged": self.null_flagged, "null_n": self.null_n, "n_tested": self.n_tested,
            "detectable_rate": self.detectable_rate, "p_at_detectable_rate": round(self.p_at_detectable_rate, 6),
            "min_detectable_rate": self.min_detectable_rate,
        }


def decide(audit: CopyAudit, test: RateTest, n_synthetic: int, max_copy_rate: float | None) -> tuple[str, list[str]]:
    """(verdict, reasons): inconclusive when the audit or the test was blind, else fail when the
    synthetic rate is significantly above the null (or its excess above a policy), else pass."""
    reasons = list(audit.reasons)
    if test.n_tested == 0:
        reasons.append(f"none of the {n_synthetic} synthetic samples is anatomy (blank, noise or unlike any patient): there is nothing to audit")
    elif test.p_at_detectable_rate >= test.alpha:
        reasons.append(f"too few samples for the test: even if {100 * test.detectable_rate:.0f}% of the {test.n_tested} synthetic samples were copies, "
                       f"p would be {test.p_at_detectable_rate:.3f} >= alpha = {test.alpha:g} against {test.null_n} held-out images; audit more samples or hold out more patients")
    if reasons:
        return "inconclusive", reasons
    if test.p_value < test.alpha or (max_copy_rate is not None and test.rate - test.null_rate > max_copy_rate):
        return "fail", reasons
    return "pass", reasons


def judge(
    audit: CopyAudit,
    synthetic: torch.Tensor,
    *,
    alpha: float = ALPHA,
    max_copy_rate: float | None = None,
    detectable_rate: float = DETECTABLE_RATE,
    names: Sequence[str] | None = None,
    device=None,
) -> AuditResult:
    """Score `synthetic` (N, C, *S) against `audit`'s training set and decide the verdict."""
    if not 0 < alpha < 1:
        raise DataError(f"--alpha must be in (0, 1), got {alpha}")
    if max_copy_rate is not None and not 0 <= max_copy_rate <= 1:
        raise DataError(f"--max-copy-rate is a fraction of synthetic samples in [0, 1] (0.01 = 1%), got {max_copy_rate}")
    if not 0 < detectable_rate <= 1:
        raise DataError(f"detectable_rate must be in (0, 1], got {detectable_rate}")
    check_images(synthetic, "synthetic", names, 1)
    scores, embeddings = audit.score(synthetic, device=device, keep_embeddings=True)
    null = audit.holdout_flagged
    test = RateTest(int(scores.is_copy.sum()), int(scores.anatomical.sum()), int(null.sum()), len(null), alpha, detectable_rate)
    verdict, reasons = decide(audit, test, len(scores), max_copy_rate)
    report = _report(audit, scores, embeddings, test, verdict, reasons, max_copy_rate, device)
    return AuditResult(verdict, reasons, test, scores, report, audit.fits[0].train_holdout_best, list(audit.warnings), audit)


def _report(audit: CopyAudit, scores: Scores, embeddings, test: RateTest, verdict: str, reasons: list[str], max_copy_rate, device) -> dict[str, Any]:
    n_s, n_t = len(scores), audit.n_train
    memorized, mem_per_detector = _memorized(audit, scores, embeddings, device)
    sources = torch.unique(scores.nearest_train[scores.is_copy])
    flagged = scores.flagged & scores.anatomical[:, None]  # (N, K)
    not_anatomy = {r: scores.not_anatomy.count(r) for r in ("blank", "noise", "atypical")}
    pct = lambda k, n: round(100.0 * k / n, 4)  # noqa: E731
    detectors = {}
    for k, f in enumerate(audit.fits):
        n_flagged = int(flagged[:, k].sum())
        detectors[f.name] = {**f.summary(), "n_flagged": n_flagged, "n_copies_pct": pct(n_flagged, n_s), "n_mem": mem_per_detector[k],
                             "n_mem_pct": pct(mem_per_detector[k], n_t), "synthetic_train_best": summary(scores.similarity[:, k])}
    return {
        "verdict": verdict, "reasons": reasons,
        "threshold": round(audit.fits[0].threshold, 6), "thresholds": {f.name: round(f.threshold, 6) for f in audit.fits},
        "detector": "+".join(f.name for f in audit.fits), "percentile": audit.percentile, "similarity": audit.similarity,
        "n_train": n_t, "n_holdout": audit.n_holdout, "n_synthetic": n_s,
        "n_copies": test.n_flagged, "n_copies_pct": pct(test.n_flagged, n_s),
        "n_mem": int(memorized.sum()), "n_mem_pct": pct(int(memorized.sum()), n_t),
        "n_copy_sources": int(len(sources)), "n_copy_sources_pct": pct(len(sources), n_t),
        "n_not_anatomy": sum(not_anatomy.values()), "not_anatomy": not_anatomy,
        "test": test.summary(), "max_copy_rate": max_copy_rate,
        "control": None if audit.control is None else audit.control.summary(),
        "detectors": detectors, "anatomy_gate": audit.gate.summary(), "holdout_dropped": audit.holdout_dropped,
        "spatial_dims": audit.spatial_dims, "image_shape": list(audit.image_shape), "warnings": list(audit.warnings),
    }
