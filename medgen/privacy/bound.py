"""The privacy bound: at confidence 1 - alpha, at most `upper` of a model's outputs are copies of
training patients, as the audit's detectors see them.

The model is a mixture. A share pi of its outputs are copies of training images; the detectors
flag a copy with probability r (their recall, measured on the positive control: copies of
training images the audit makes itself) and flag a non-copy with some probability q' >= 0. The
share of flagged samples is then

    p = pi r + (1 - pi) q'  >=  pi r,   so   pi <= p / r.

`conservative` (the default) bounds pi by p_U / r_L, with p_U the one-sided Clopper-Pearson
upper bound of the flagged share of the samples and r_L the lower bound of the control recall,
each at alpha / 2 (Bonferroni: both hold together with probability >= 1 - alpha). It assumes
nothing about q': every sample above tau could be a copy. That matters, because the null rate
measured on held-out patients need not be the rate of the model's own non-copies (on the demo's
model they exceeded the old tau less often than new patients did), and a bound that subtracted
the held-out rate would then hide copies in the gap.

`null-adjusted` subtracts the null: pi <= (p_U - q_L) / (r_L - q_L), alpha / 3 each, with q_L
the lower bound of the held-out exceedance rate. It is valid only if the model's non-copies
exceed tau at least as often as new patients do; `eval/bound_simulation.py` shows its coverage
failing when they do not. Offered as an option, never the default.

`pass_probability` and `coverage` compute the operating characteristics exactly (sums over the
binomial laws of the two counts), as `eval/RESULTS.md` tabulates them.

Reruns: attempt k of a model is judged at alpha / 2^k (`attempt_alpha`), so that all attempts
together wrongly pass a model with probability at most alpha, however often it is retried.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

BOUND_METHODS = ("conservative", "null-adjusted")


def clopper_pearson_upper(x, n, alpha: float):
    """One-sided (1 - alpha) upper confidence bound of a binomial proportion from x of n
    (Clopper & Pearson 1934): the p with P(X <= x | n, p) = alpha, i.e. the (1 - alpha)
    quantile of Beta(x + 1, n - x); 1 when x = n. Vectorised over x and n."""
    from scipy.stats import beta

    x, n = np.asarray(x, dtype=float), np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore"):
        out = np.where(x >= n, 1.0, beta.ppf(1 - alpha, x + 1, np.maximum(n - x, 1e-12)))
    return float(out) if out.ndim == 0 else out


def clopper_pearson_lower(x, n, alpha: float):
    """One-sided (1 - alpha) lower confidence bound: the alpha quantile of Beta(x, n - x + 1);
    0 when x = 0."""
    from scipy.stats import beta

    x, n = np.asarray(x, dtype=float), np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore"):
        out = np.where(x <= 0, 0.0, beta.ppf(alpha, np.maximum(x, 1e-12), n - x + 1))
    return float(out) if out.ndim == 0 else out


def attempt_alpha(alpha: float, attempt: int) -> float:
    """The error level of attempt `attempt` (1, 2, ...) of one model: alpha / 2^attempt, which
    sums to at most alpha over any number of attempts."""
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    return alpha / 2**attempt


def _upper(p_u, r_l, q_l=None):
    """pi_U from the bounds (arrays or floats), clipped to [0, 1]: the largest copy share the
    confidence box allows. 1 when the detectors' recall cannot be told from the null."""
    if q_l is None:
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(r_l > 0, p_u / np.where(r_l > 0, r_l, 1.0), 1.0)
    else:
        gap = r_l - q_l
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(gap > 0, (p_u - q_l) / np.where(gap > 0, gap, 1.0), 1.0)
    return np.clip(out, 0.0, 1.0)


def bound_parts(method: str) -> int:
    if method not in BOUND_METHODS:
        raise ValueError(f"bound method must be one of {BOUND_METHODS}, got {method!r}")
    return 2 if method == "conservative" else 3


@dataclass(frozen=True)
class CopyBound:
    """The upper confidence bound on the share of a model's outputs that are copies."""

    n_flagged: int  # samples above tau (anatomy, any detector)
    n_samples: int  # all samples judged (non-anatomical ones count as non-copies)
    control_caught: int  # positive-control copies flagged and matched to their source
    control_n: int
    alpha: float  # the error level this bound was computed at (after attempt spending)
    method: str = "conservative"
    null_flagged: int = 0  # held-out images above tau (leave-one-out), null-adjusted only
    null_n: int = 0

    def __post_init__(self):
        bound_parts(self.method)
        if self.n_samples < 1 or self.control_n < 1:
            raise ValueError(f"a bound needs samples and control copies, got n_samples={self.n_samples}, control_n={self.control_n}")

    @property
    def rate_upper(self) -> float:  # p_U: upper bound of the flagged share
        return clopper_pearson_upper(self.n_flagged, self.n_samples, self.alpha / bound_parts(self.method))

    @property
    def recall_lower(self) -> float:  # r_L: lower bound of the detectors' recall on copies
        return clopper_pearson_lower(self.control_caught, self.control_n, self.alpha / bound_parts(self.method))

    @property
    def null_lower(self) -> float | None:
        if self.method != "null-adjusted":
            return None
        return clopper_pearson_lower(self.null_flagged, self.null_n, self.alpha / 3) if self.null_n else 0.0

    @property
    def upper(self) -> float:  # pi_U
        return float(_upper(self.rate_upper, self.recall_lower, self.null_lower))

    @property
    def recall(self) -> float:
        return self.control_caught / self.control_n

    @property
    def estimate(self) -> float:
        """Point estimate of the copy share under the bound's own model (flagged share / recall)."""
        if self.method == "conservative":
            return min(1.0, self.n_flagged / self.n_samples / self.recall) if self.recall > 0 else 1.0
        q = self.null_flagged / self.null_n if self.null_n else 0.0
        gap = self.recall - q
        return float(min(1.0, max(0.0, (self.n_flagged / self.n_samples - q) / gap))) if gap > 0 else 1.0

    def sentence(self, policy: float | None = None) -> str:
        """The bound in words a data steward can sign."""
        s = (f"at {100 * (1 - self.alpha):.4g}% confidence, at most {100 * self.upper:.2f}% of this model's outputs are copies of "
             f"training patients as the detectors see them (detector recall on control copies "
             f"{100 * self.recall:.0f}%, lower bound {100 * self.recall_lower:.0f}%)")
        if policy is not None:
            s += f"; policy: at most {100 * policy:.4g}%"
        return s

    def samples_to_pass(self, policy: float, limit: int = 10**7) -> int | None:
        """The number of samples that would bring the bound under `policy` if the flagged share
        stayed as observed (None when no number would: the observed share alone is too high)."""
        rate = self.n_flagged / self.n_samples

        def ok(n: int) -> bool:
            return CopyBound(math.floor(rate * n), n, self.control_caught, self.control_n, self.alpha, self.method,
                             self.null_flagged, self.null_n).upper <= policy

        if ok(self.n_samples):
            return self.n_samples
        hi = self.n_samples
        while not ok(hi):
            hi *= 2
            if hi > limit:
                return None
        lo = hi // 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok(mid) else (mid, hi)
        return hi

    def summary(self, policy: float | None = None) -> dict[str, Any]:
        return {
            "method": self.method, "confidence": round(1 - self.alpha, 6), "alpha": self.alpha,
            "upper_pct": round(100 * self.upper, 4), "estimate_pct": round(100 * self.estimate, 4),
            "flagged": self.n_flagged, "n_samples": self.n_samples, "rate_upper_pct": round(100 * self.rate_upper, 4),
            "control_caught": self.control_caught, "control_n": self.control_n, "recall": round(self.recall, 4),
            "recall_lower": round(self.recall_lower, 4),
            **({"null_flagged": self.null_flagged, "null_n": self.null_n, "null_lower": round(self.null_lower, 4)} if self.method == "null-adjusted" else {}),
            "max_copy_rate": policy, "within_policy": None if policy is None else self.upper <= policy,
            "sentence": self.sentence(policy),
        }


# ----------------------------------------------------------------------------- operating characteristics


def _bound_grid(n_samples: int, n_control: int, alpha: float, method: str, n_null: int = 0):
    """pi_U for every (flagged count, control count[, null count]): arrays indexed [x, c(, h)]."""
    parts = bound_parts(method)
    x = np.arange(n_samples + 1)
    c = np.arange(n_control + 1)
    p_u = clopper_pearson_upper(x, n_samples, alpha / parts)[:, None]  # (X, 1)
    r_l = clopper_pearson_lower(c, n_control, alpha / parts)[None, :]  # (1, C)
    if method == "conservative":
        return _upper(p_u, r_l)
    h = np.arange(n_null + 1)
    q_l = clopper_pearson_lower(h, n_null, alpha / 3)[None, None, :] if n_null else np.zeros((1, 1, 1))
    return _upper(p_u[..., None], r_l[..., None], q_l)


def _laws(copy_rate: float, recall: float, nonc_rate: float, n_samples: int, n_control: int, null_rate: float, n_null: int):
    from scipy.stats import binom

    p = copy_rate * recall + (1 - copy_rate) * nonc_rate
    px = binom.pmf(np.arange(n_samples + 1), n_samples, p)
    pc = binom.pmf(np.arange(n_control + 1), n_control, recall)
    ph = binom.pmf(np.arange(n_null + 1), n_null, null_rate) if n_null else np.ones(1)
    return px, pc, ph


def pass_probability(copy_rate: float, *, n_samples: int, n_control: int, recall: float, nonc_rate: float, max_copy_rate: float,
                     alpha: float, method: str = "conservative", null_rate: float | None = None, n_null: int = 0) -> float:
    """P(bound <= max_copy_rate) when a share `copy_rate` of the samples are copies, flagged with
    probability `recall` (the control's too), and the other samples are flagged with
    probability `nonc_rate`; null-adjusted also draws the held-out count (rate `null_rate`,
    default `nonc_rate`). Exact: a sum over the binomial laws of the counts."""
    grid = _bound_grid(n_samples, n_control, alpha, method, n_null if method == "null-adjusted" else 0)
    px, pc, ph = _laws(copy_rate, recall, nonc_rate, n_samples, n_control, nonc_rate if null_rate is None else null_rate,
                       n_null if method == "null-adjusted" else 0)
    ok = grid <= max_copy_rate
    if method == "conservative":
        return float(px @ ok.astype(float) @ pc)
    return float(np.einsum("x,c,h,xch->", px, pc, ph, ok.astype(float)))


def coverage(copy_rate: float, *, n_samples: int, n_control: int, recall: float, nonc_rate: float, alpha: float,
             method: str = "conservative", null_rate: float | None = None, n_null: int = 0) -> float:
    """P(bound >= copy_rate): how often the bound holds for a model that copies `copy_rate`."""
    grid = _bound_grid(n_samples, n_control, alpha, method, n_null if method == "null-adjusted" else 0)
    px, pc, ph = _laws(copy_rate, recall, nonc_rate, n_samples, n_control, nonc_rate if null_rate is None else null_rate,
                       n_null if method == "null-adjusted" else 0)
    ok = grid >= copy_rate - 1e-12
    if method == "conservative":
        return float(px @ ok.astype(float) @ pc)
    return float(np.einsum("x,c,h,xch->", px, pc, ph, ok.astype(float)))
