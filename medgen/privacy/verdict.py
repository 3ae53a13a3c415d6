"""The verdict of a memorization audit: pass, fail or inconclusive, and the bound behind it.

- `pass` when the privacy bound holds: at confidence 1 - alpha, at most `max_copy_rate` (default
  5%) of the model's outputs are copies of training patients as the detectors see them
  (`medgen.privacy.bound`: the flagged share of the samples over the positive control's recall,
  both with their sampling error).
- `fail` when the samples exceed tau significantly more often than new patients do: one-sided
  Fisher exact test of the synthetic rate against the held-out null rate at alpha.
- `inconclusive` when the audit could not have seen copies (any reason of the calibrated audit:
  collapsed or saturated detector, no convergence, held-out images shared with training, too
  few held-out images, a detector blind to its own positive control;
  `medgen.privacy.calibration`), when no sample is anatomy, or when the bound is above the policy
  but the excess is not significant: then the report says how many samples would decide it.

`attempt` spends alpha over a model's attempts (attempt k at alpha / 2^k; `bound.attempt_alpha`):
a model judged again and again passes wrongly with probability at most alpha in all.

Flagged samples are listed whatever the verdict (and can be filtered out). Measures (Dar et al.
2024, memorization_assessment notebooks of Cardio-AI/memorization-ldm):

- `n_copies_pct`: synthetic samples whose best training match exceeds tau ("synthetic samples
  that are copies"), non-anatomical samples excluded from the count, over all synthetic samples.
- `n_mem_pct`: training images whose best synthetic match exceeds tau ("training samples that
  are copies": memorized patients), over all training images.
- `n_copy_sources_pct`: training images that are the nearest neighbour of a flagged synthetic
  sample (how many patients the flagged samples point at; <= n_mem).
- `dar`: the share of samples above Dar et al.'s own tau (95th percentile, train -> held-out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from medgen.errors import DataError
from medgen.metrics.knn import pairwise_topk
from medgen.privacy.bound import BOUND_METHODS, CopyBound, attempt_alpha
from medgen.privacy.calibration import CopyAudit, Scores, check_images
from medgen.privacy.memorization import copy_rate_test, summary

VERDICTS = ("pass", "fail", "inconclusive")
EXIT_CODES = {"pass": 0, "fail": 1, "inconclusive": 3}
ALPHA = 0.05
MAX_COPY_RATE = 0.05  # the default policy: at most 5% of the model's outputs may be copies


@dataclass
class AuditResult:
    """A judged synthetic set. `report` is the JSON-ready summary (report.json); per-sample
    tensors are on the CPU. `flagged` lists the indices of the samples counted as copies."""

    verdict: str
    reasons: list[str]  # why inconclusive (empty otherwise)
    test: "RateTest"  # synthetic rate vs null rate
    bound: CopyBound | None  # None when the audit has no positive control
    scores: Scores
    report: dict[str, Any]
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


@dataclass
class ScoredSet:
    """A synthetic set scored against an audit, without its images or embeddings: per-sample
    `scores`, and per detector each training image's best similarity with the set's anatomical
    samples (Dar et al.'s direction, for `n_mem`). Sets scored batch by batch or round by round
    combine with `cat`, so a set of any size is judged in the memory of one batch."""

    scores: Scores
    train_best: list[torch.Tensor | None]  # per detector (Nt,), None while no sample is anatomy

    @classmethod
    def cat(cls, parts: Sequence["ScoredSet"]) -> "ScoredSet":
        best = []
        for k in range(len(parts[0].train_best)):
            values = [p.train_best[k] for p in parts if p.train_best[k] is not None]
            best.append(torch.stack(values).amax(0) if values else None)
        return cls(Scores.cat([p.scores for p in parts]), best)


def score_set(audit: CopyAudit, batches: Iterable[torch.Tensor] | torch.Tensor, names: Sequence[str] | None = None, device=None) -> ScoredSet:
    """Score synthetic images (a tensor (N, C, *S), or an iterable of such batches) against the
    audit's training set; keeps scores, never the images."""
    if isinstance(batches, torch.Tensor):
        check_images(batches, "synthetic", names, 1)
        batches = [batches]
    parts = []
    for x in batches:
        check_images(x, "synthetic", None, 1)
        scores, embeddings = audit.score(x, device=device, keep_embeddings=True)
        keep = scores.anatomical
        best = [pairwise_topk(f.train_embeddings, e[keep], k=1, metric=audit.similarity, device=device)[0][:, 0].float().cpu()
                if bool(keep.any()) else None for f, e in zip(audit.fits, embeddings)]  # (Nt,) per detector
        parts.append(ScoredSet(scores, best))
    if not parts:
        raise DataError("the synthetic set is empty: there is nothing to audit")
    return ScoredSet.cat(parts)


def _memorized(audit: CopyAudit, scored: ScoredSet) -> tuple[torch.Tensor, list[int]]:
    """Dar et al.'s direction: (Nt,) bool, a training image is memorized when its best match
    among the anatomical synthetic samples exceeds tau of some detector; and per detector counts."""
    memorized = torch.zeros(audit.n_train, dtype=torch.bool)
    per_detector = []
    for f, best in zip(audit.fits, scored.train_best):
        hit = best > f.threshold if best is not None else torch.zeros(audit.n_train, dtype=torch.bool)
        per_detector.append(int(hit.sum()))
        memorized |= hit
    return memorized, per_detector


@dataclass
class RateTest:
    """The synthetic rate above tau against the null rate: Fisher's one-sided exact test."""

    n_flagged: int
    n_tested: int  # anatomical synthetic samples
    null_flagged: int
    null_n: int
    alpha: float

    @property
    def rate(self) -> float:
        return self.n_flagged / self.n_tested if self.n_tested else 0.0

    @property
    def null_rate(self) -> float:
        return self.null_flagged / self.null_n

    @property
    def p_value(self) -> float:
        return copy_rate_test(self.n_flagged, self.n_tested, self.null_flagged, self.null_n)

    def samples_to_fail(self, limit: int = 10**6) -> int | None:
        """Samples at which the excess would be significant if both rates stayed as observed
        (None when the synthetic rate is not above the null)."""
        if self.rate <= self.null_rate:
            return None
        n = max(self.n_tested, 1)
        while n <= limit:
            if copy_rate_test(round(self.rate * n), n, self.null_flagged, self.null_n) < self.alpha:
                return n
            n = int(n * 1.25) + 1
        return None

    def summary(self) -> dict[str, Any]:
        return {
            "name": "one-sided Fisher exact test (synthetic vs held-out rate above tau)",
            "alpha": self.alpha, "p_value": round(self.p_value, 6),
            "synthetic_rate_pct": round(100.0 * self.rate, 4), "null_rate_pct": round(100.0 * self.null_rate, 4),
            "excess_pct": round(100.0 * (self.rate - self.null_rate), 4),
            "n_flagged": self.n_flagged, "null_flagged": self.null_flagged, "null_n": self.null_n, "n_tested": self.n_tested,
        }


def decide(audit: CopyAudit, test: RateTest, bound: CopyBound | None, n_synthetic: int, max_copy_rate: float) -> tuple[str, list[str], dict]:
    """(verdict, reasons, what would decide it): inconclusive when the audit was blind; pass when
    the bound is within the policy; fail when the excess over the null is significant; else
    inconclusive with the number of samples that would decide."""
    reasons = list(audit.reasons)
    if bound is None:
        reasons.append("the audit has no positive control, so the detectors' recall on copies is unknown and no bound can be given")
    if test.n_tested == 0:
        reasons.append(f"none of the {n_synthetic} synthetic samples is anatomy (blank, noise or unlike any patient): there is nothing to audit")
    if reasons:
        return "inconclusive", reasons, {}
    if bound.upper <= max_copy_rate:
        return "pass", reasons, {}
    if test.p_value < test.alpha:
        return "fail", reasons, {}
    to_pass, to_fail = bound.samples_to_pass(max_copy_rate), test.samples_to_fail()
    why = (f"at {100 * (1 - bound.alpha):.4g}% confidence up to {100 * bound.upper:.2f}% of the samples could be copies, above the "
           f"policy's {100 * max_copy_rate:.4g}%, but they do not exceed tau significantly more often than new patients "
           f"({100 * test.rate:.2f}% vs {100 * test.null_rate:.2f}%, p = {test.p_value:.3g})")
    if to_pass is not None:
        why += f"; about {to_pass} samples would pass if the flagged share stayed at {100 * bound.n_flagged / bound.n_samples:.2f}%"
    elif bound.recall_lower * max_copy_rate <= 1 / bound.n_samples:
        why += ("; no number of samples passes at this control recall: the positive control is too small or missed too "
                "many copies (more training images give more control copies)")
    else:
        why += f"; the flagged share {100 * bound.n_flagged / bound.n_samples:.2f}% is too high for the policy at any sample size"
    if to_fail is not None:
        why += f"; about {to_fail} samples would show the excess over the null as significant if the rates stayed as observed"
    reasons.append(why)
    return "inconclusive", reasons, {"samples_to_pass": to_pass, "samples_to_fail": to_fail}


def judge(
    audit: CopyAudit,
    synthetic: torch.Tensor | Iterable[torch.Tensor] | ScoredSet,
    *,
    alpha: float = ALPHA,
    max_copy_rate: float = MAX_COPY_RATE,
    bound_method: str = "conservative",
    attempt: int | None = None,
    names: Sequence[str] | None = None,
    device=None,
) -> AuditResult:
    """Score `synthetic` against `audit`'s training set and decide the verdict. `synthetic`: a
    tensor (N, C, *S), an iterable of batches (scored one at a time, `score_set`), or a
    `ScoredSet` (rounds scored earlier, combined with `ScoredSet.cat`).

    `attempt` (1, 2, ...): which attempt on this model this is; alpha is spent over attempts
    (alpha / 2^attempt). None judges at `alpha` itself (one look)."""
    if not 0 < alpha < 1:
        raise DataError(f"--alpha must be in (0, 1), got {alpha}")
    if max_copy_rate is None or not 0 < max_copy_rate <= 1:
        raise DataError(f"--max-copy-rate is the largest share of copies a pass allows, in (0, 1] (0.05 = 5%), got {max_copy_rate}")
    if bound_method not in BOUND_METHODS:
        raise DataError(f"--bound must be one of {', '.join(BOUND_METHODS)}, got {bound_method!r}")
    level = alpha if attempt is None else attempt_alpha(alpha, attempt)
    scored = synthetic if isinstance(synthetic, ScoredSet) else score_set(audit, synthetic, names, device)
    scores = scored.scores
    null = audit.holdout_flagged
    n_flagged = int(scores.is_copy.sum())
    test = RateTest(n_flagged, int(scores.anatomical.sum()), int(null.sum()), len(null), level)
    bound = None
    if audit.control is not None:
        bound = CopyBound(n_flagged, len(scores), audit.control.n_caught, audit.control.n, level, bound_method, int(null.sum()), len(null))
    verdict, reasons, decide_info = decide(audit, test, bound, len(scores), max_copy_rate)
    report = _report(audit, scored, test, bound, verdict, reasons)
    report["policy"] = {"max_copy_rate": max_copy_rate, "alpha": alpha, "attempt": attempt, "alpha_used": level, "bound_method": bound_method}
    report.update(decide_info)
    if bound is not None:
        report["bound"] = bound.summary(max_copy_rate)
    return AuditResult(verdict, reasons, test, bound, scores, report, list(audit.warnings), audit)


def _report(audit: CopyAudit, scored: ScoredSet, test: RateTest, bound, verdict: str, reasons: list[str]) -> dict[str, Any]:
    scores = scored.scores
    n_s, n_t = len(scores), audit.n_train
    memorized, mem_per_detector = _memorized(audit, scored)
    sources = torch.unique(scores.nearest_train[scores.is_copy])
    flagged = scores.flagged & scores.anatomical[:, None]  # (N, K)
    above_dar = scores.anatomical & (scores.similarity > torch.tensor([f.dar_threshold for f in audit.fits])).any(1)
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
        "detector": "+".join(f.name for f in audit.fits), "null_level": audit.null_level, "similarity": audit.similarity,
        "decoded_calibration": audit.decoded,
        "n_train": n_t, "n_holdout": audit.n_holdout, "n_synthetic": n_s,
        "n_copies": test.n_flagged, "n_copies_pct": pct(test.n_flagged, n_s),
        "n_mem": int(memorized.sum()), "n_mem_pct": pct(int(memorized.sum()), n_t),
        "n_copy_sources": int(len(sources)), "n_copy_sources_pct": pct(len(sources), n_t),
        "n_not_anatomy": sum(not_anatomy.values()), "not_anatomy": not_anatomy,
        "test": test.summary(),
        "dar": {"percentile": audit.percentile, "thresholds": {f.name: round(f.dar_threshold, 6) for f in audit.fits},
                "n_above": int(above_dar.sum()), "above_pct": pct(int(above_dar.sum()), n_s)},
        "control": None if audit.control is None else audit.control.summary(),
        "detectors": detectors, "anatomy_gate": audit.gate.summary(), "holdout_dropped": audit.holdout_dropped,
        "spatial_dims": audit.spatial_dims, "image_shape": list(audit.image_shape), "warnings": list(audit.warnings),
    }
