"""The verdict of a memorization audit: pass, fail or inconclusive, and the numbers behind it.

- `inconclusive` when the audit could not have seen copies: any reason of the calibrated audit
  (collapsed or saturated detector, no convergence, held-out images shared with training, too
  few held-out images, a failed positive control; `medgen.privacy.calibration`), or a test too
  weak to notice `detectable_rate` of copies among these many samples.
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
DETECTABLE_RATE = 0.2


@dataclass
class AuditResult:
    """A judged synthetic set. `report` is the JSON-ready summary (report.json); per-sample
    tensors are on the CPU. `flagged` lists the indices of the samples counted as copies."""

    verdict: str
    reasons: list[str]  # why inconclusive (empty otherwise)
    p_value: float
    synthetic_rate: float  # share of (anatomical) synthetic samples above tau
    null_rate: float  # share of held-out images above tau (leave-one-out)
    scores: Scores  # the synthetic samples' scores
    report: dict[str, Any]
    train_holdout_best: torch.Tensor  # (Nt,) under the first detector (figures)
    warnings: list[str] = field(default_factory=list)
    audit: CopyAudit | None = None  # the calibrated audit: judge more samples against the same tau
    carlini_ratio: torch.Tensor | None = None  # (Ns,) relative l2 (Carlini et al. 2023), set by audit_images

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
    n_s = len(scores)
    is_copy, anatomical = scores.is_copy, scores.anatomical
    n_anat = int(anatomical.sum())
    n_copies = int(is_copy.sum())

    null_flagged = audit.holdout_flagged
    k_h, n_h = int(null_flagged.sum()), len(null_flagged)
    null_rate = k_h / n_h
    synthetic_rate = n_copies / n_anat if n_anat else 0.0
    p_value = copy_rate_test(n_copies, n_anat, k_h, n_h)
    excess = synthetic_rate - null_rate
    # Power: would the test have noticed if `detectable_rate` of the samples were copies?
    expected = int(round(n_anat * (null_rate + detectable_rate * (1 - null_rate))))
    p_detectable = copy_rate_test(expected, n_anat, k_h, n_h)

    reasons = list(audit.reasons)
    if n_anat == 0:
        reasons.append(f"none of the {n_s} synthetic samples is anatomy (blank, noise or unlike any patient): there is nothing to audit")
    elif p_detectable >= alpha:
        reasons.append(f"too few samples for the test: even if {100 * detectable_rate:.0f}% of the {n_anat} synthetic samples were copies, "
                       f"p would be {p_detectable:.3f} >= alpha = {alpha:g} against {n_h} held-out images; audit more samples or hold out more patients")
    if reasons:
        verdict = "inconclusive"
    elif p_value < alpha or (max_copy_rate is not None and excess > max_copy_rate):
        verdict = "fail"
    else:
        verdict = "pass"

    memorized, mem_per_detector = _memorized(audit, scores, embeddings, device)
    sources = torch.unique(scores.nearest_train[is_copy])
    flagged_counts = scores.flagged & anatomical[:, None]  # (N, K)
    not_anatomy = {r: scores.not_anatomy.count(r) for r in ("blank", "noise", "atypical")}
    first = audit.fits[0]
    detectors = {}
    for k, f in enumerate(audit.fits):
        d = f.summary()
        d.update({
            "n_flagged": int(flagged_counts[:, k].sum()),
            "n_copies_pct": round(100.0 * float(flagged_counts[:, k].sum()) / n_s, 4),
            "n_mem": mem_per_detector[k],
            "n_mem_pct": round(100.0 * mem_per_detector[k] / audit.n_train, 4),
            "synthetic_train_best": summary(scores.similarity[:, k]),
        })
        detectors[f.name] = d
    report: dict[str, Any] = {
        "verdict": verdict,
        "reasons": reasons,
        "threshold": round(first.threshold, 6),
        "thresholds": {f.name: round(f.threshold, 6) for f in audit.fits},
        "detector": "+".join(f.name for f in audit.fits),
        "percentile": audit.percentile,
        "similarity": audit.similarity,
        "n_train": audit.n_train,
        "n_holdout": audit.n_holdout,
        "n_synthetic": n_s,
        "n_copies": n_copies,
        "n_copies_pct": round(100.0 * n_copies / n_s, 4),
        "n_mem": int(memorized.sum()),
        "n_mem_pct": round(100.0 * float(memorized.sum()) / audit.n_train, 4),
        "n_copy_sources": int(len(sources)),
        "n_copy_sources_pct": round(100.0 * len(sources) / audit.n_train, 4),
        "n_not_anatomy": sum(not_anatomy.values()),
        "not_anatomy": not_anatomy,
        "test": {
            "name": "one-sided Fisher exact test (synthetic vs held-out rate above tau)",
            "alpha": alpha,
            "p_value": round(p_value, 6),
            "synthetic_rate_pct": round(100.0 * synthetic_rate, 4),
            "null_rate_pct": round(100.0 * null_rate, 4),
            "excess_pct": round(100.0 * excess, 4),
            "null_flagged": k_h,
            "null_n": n_h,
            "n_tested": n_anat,
            "detectable_rate": detectable_rate,
            "p_at_detectable_rate": round(p_detectable, 6),
        },
        "max_copy_rate": max_copy_rate,
        "control": None if audit.control is None else audit.control.summary(),
        "detectors": detectors,
        "anatomy_gate": audit.gate.summary(),
        "holdout_dropped": audit.holdout_dropped,
        "spatial_dims": audit.spatial_dims,
        "image_shape": list(audit.image_shape),
        "warnings": list(audit.warnings),
    }
    return AuditResult(verdict, reasons, p_value, synthetic_rate, null_rate, scores, report, first.train_holdout_best, list(audit.warnings), audit)
