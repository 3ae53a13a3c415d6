"""The probe's statistics: paired differences over images, t intervals, Holm's correction.

The unit is the image. A stochastic method's posterior samples of one image share its perturbation,
so they are averaged first: the samples are not independent replicates of the attack. For each
tested cell (method, R, eps) the paired difference per image is

    d_i = PSNR_i(control) - PSNR_i(worst-case)      (dB; > 0: the worst case hurts more)

and the cell gets the mean of d, a two-sided Student t interval over the images, and the one-sided
p-value of H0: E[d] <= 0. The cells of one probe are one family: Holm's step-down adjusts their
p-values (`holm`), and the interval at the Bonferroni level alpha / m is reported next to the plain
95% one. A cell *transfers* when its Holm-adjusted p-value is below alpha and its mean difference is
at least `min_effect_db` (a visible effect); otherwise the probe says "no evidence of transfer".
"""

from __future__ import annotations

import math
from typing import Sequence

ALPHA = 0.05
MIN_EFFECT_DB = 0.1  # smaller PSNR differences do not count as transfer, significant or not


def paired_summary(d: Sequence[float], *, alpha: float = ALPHA, family_size: int = 1) -> dict:
    """Mean, standard error, t intervals (1 - alpha and 1 - alpha / family_size) and the one-sided
    p-value of H0: mean <= 0, for per-image differences d. With one image there is no interval."""
    from scipy import stats

    values = [float(v) for v in d]
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    out = {"n": n, "mean": mean, "stderr": None, "ci": None, "ci_corrected": None, "p_value": None}
    if n < 2:
        return out
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    se = sd / math.sqrt(n)
    out["stderr"] = se
    if se == 0.0:  # every image moved by the same amount: the sign decides
        out.update(ci=[mean, mean], ci_corrected=[mean, mean], p_value=0.0 if mean > 0 else 1.0)
        return out
    t = stats.t(df=n - 1)
    half = t.ppf(1 - alpha / 2) * se
    half_corrected = t.ppf(1 - alpha / (2 * max(int(family_size), 1))) * se
    out.update(ci=[mean - half, mean + half], ci_corrected=[mean - half_corrected, mean + half_corrected],
               p_value=float(t.sf(mean / se)))
    return out


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (None stays None and does not count in the family):
    sort ascending, p_(j) * (m - j + 1) for j = 1..m, running maximum, capped at 1."""
    index = sorted((i for i, p in enumerate(p_values) if p is not None), key=lambda i: p_values[i])
    m = len(index)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for j, i in enumerate(index):
        running = max(running, min(1.0, (m - j) * float(p_values[i])))
        adjusted[i] = running
    return adjusted


def verdict(mean: float, p_holm: float | None, *, alpha: float = ALPHA, min_effect_db: float = MIN_EFFECT_DB) -> bool:
    """Transfers: significant after Holm's correction and at least `min_effect_db` on average."""
    return p_holm is not None and p_holm < alpha and mean >= min_effect_db
