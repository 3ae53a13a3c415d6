"""95% intervals for the evaluation metrics, one scheme per kind of statistic.

- `half_sample_interval` (FID and every Fréchet distance, 2.5D included): half-samples without
  replacement. A with-replacement bootstrap does not work for the Fréchet distance: a resampled
  set holds duplicates, which shrink its effective size, and the FD's upward small-sample bias
  (~1/N, Chong & Forsyth 2020) grows accordingly; the percentile interval then sits above the
  point estimate (the demo reported FID 73.6 with "CI" [77.8, 102.2]). Each replicate here
  keeps floor(n/2) real and floor(m/2) synthetic rows, all distinct. Size correction: for a
  statistic linear in per-sample terms, a half-sample without replacement has exactly the
  full-sample variance (finite-population correction 1 - b/n = 1/2 cancels the 1/b), so the
  spread is used as is; the half-sample values are centred on their mean, which removes the
  difference E[FD_{N/2}] - E[FD_N]; and the interval is the reversed (subsampling, Politis &
  Romano 1994) one, statistic - quantiles of the deviations. It is an interval for the expected
  statistic at the full set sizes (n, m), the quantity the plug-in FID estimates, so it covers
  the point estimate. Where the FD's non-linear part dominates (two sets from one
  distribution) the half-sample spread is up to twice too wide: conservative. Coverage on
  Gaussians with a closed-form FD is in eval/RESULTS.md.
- `bootstrap_mean`: percentile bootstrap of per-sample terms whose mean is the metric. Used for
  precision/recall/density/coverage (per-sample indicators computed once against the
  manifolds of the full sets) and MS-SSIM (per-pair values). Resampling the *sets* would put
  duplicates at distance 0 and collapse the k-NN radii of the ball test, so for PRDC the
  interval is conditional on the estimated manifolds: it reflects which samples were drawn,
  not the radius estimates.
- KID has its own two-sample bootstrap (`medgen.metrics.kid.kid_bootstrap`) whose within-set
  sums skip pairs of copies, which keeps the estimator unbiased under duplicates.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch

HALF_SAMPLE_METHOD = ("half-samples without replacement (floor(n/2) real, floor(m/2) synthetic), centred on their mean, "
                      "reversed percentiles: interval for the expected value at the full set sizes")


def percentile_interval(values, level: float = 0.95) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    lo, hi = np.quantile(v, [alpha, 1 - alpha])
    return float(lo), float(hi)


def _interval(values: list[float], level: float, method: str) -> dict:
    lo, hi = percentile_interval(values, level)
    return {"low": lo, "high": hi, "level": level, "n_boot": len(values), "method": method}


def half_samples(n: int, m: int, n_sub: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`n_sub` pairs (real rows (n//2,), synthetic rows (m//2,)), each drawn without replacement."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_sub):
        yield torch.randperm(n, generator=g)[: n // 2], torch.randperm(m, generator=g)[: m // 2]


def half_sample_interval(point: float, values, level: float = 0.95, lower_bound: float | None = 0.0) -> dict:
    """Interval for E[statistic at the full sizes] from half-sample replicates (see module doc).

    theta in [point - q_hi, point - q_lo], q = quantiles of (values - mean(values)); clipped at
    `lower_bound` (a distance is >= 0). Also returns the half-sample mean, from which a
    statistic with a ~1/N bias gives its N -> infinity extrapolation (`fd_infinite_n`).
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"low": float("nan"), "high": float("nan"), "level": level, "n_boot": 0, "method": HALF_SAMPLE_METHOD,
                "half_sample_mean": float("nan")}
    q_lo, q_hi = percentile_interval(v - v.mean(), level)
    low, high = point - q_hi, point - q_lo
    if lower_bound is not None:
        low, high = max(low, lower_bound), max(high, lower_bound)
    return {"low": float(low), "high": float(high), "level": level, "n_boot": int(v.size), "method": HALF_SAMPLE_METHOD,
            "half_sample_mean": float(v.mean())}


def half_sample_two_sample(
    statistic: Callable[[torch.Tensor, torch.Tensor], float],
    real: torch.Tensor,
    fake: torch.Tensor,
    n_sub: int = 200,
    seed: int = 0,
    level: float = 0.95,
    point: float | None = None,
) -> dict:
    """`half_sample_interval` of statistic(real, fake) over `n_sub` half-samples of both sets."""
    point = statistic(real, fake) if point is None else point
    values = [statistic(real[i.to(real.device)], fake[j.to(fake.device)]) for i, j in half_samples(len(real), len(fake), n_sub, seed)]
    return half_sample_interval(point, values, level)


def fd_infinite_n(point: float, ci: dict) -> dict:
    """FD extrapolated to infinite set sizes from N and N/2 (Chong & Forsyth 2020, two points).

    FD_N ~ FD_inf + c/N, so E[FD_{N/2}] - E[FD_N] ~ c/N, and FD_inf ~ 2 FD_N - mean(FD_{N/2});
    its interval is the size-corrected one shifted by the same amount (clipped at 0).
    """
    bias = ci["half_sample_mean"] - point
    return {"value": max(point - bias, 0.0), "ci95": [max(ci["low"] - bias, 0.0), max(ci["high"] - bias, 0.0)], "size_bias": bias}


def bootstrap_mean(terms: torch.Tensor, n_boot: int = 200, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile interval of the mean of per-sample terms (P,) resampled with replacement."""
    t = torch.as_tensor(terms, dtype=torch.float64).reshape(-1)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(t.numel(), (n_boot, t.numel()), generator=g)  # (B, P)
    means = t[idx].mean(1)
    return _interval(means.tolist(), level, "percentile bootstrap of per-sample terms")
