"""95% bootstrap confidence intervals (Efron & Tibshirani 1993, percentile method).

Two schemes, chosen per metric by the report:

- `bootstrap_two_sample`: resample the real rows and the fake rows with replacement,
  independently, and recompute the statistic (FID). This captures the sampling noise of both
  sets; duplicates lower the effective sample size, so FID's upward finite-sample bias makes
  the interval sit a little above the point estimate. KID has its own variant
  (`medgen.metrics.kid.kid_bootstrap`) that keeps the estimator unbiased under duplicates.
- `bootstrap_mean`: resample per-sample terms whose mean is the metric. Used for
  precision/recall/density/coverage (per-sample indicators computed once against the
  manifolds of the full sets) and MS-SSIM (per-pair values). Resampling the *sets* would put
  duplicates at distance 0 and collapse the k-NN radii of the ball test, so for PRDC the
  interval is conditional on the estimated manifolds: it reflects which samples were drawn,
  not the radius estimates.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch


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


def bootstrap_two_sample(
    statistic: Callable[[torch.Tensor, torch.Tensor], float],
    real: torch.Tensor,
    fake: torch.Tensor,
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Percentile interval of statistic(real*, fake*) over resampled (with replacement) sets."""
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(n_boot):
        ir = torch.randint(real.shape[0], (real.shape[0],), generator=g).to(real.device)
        jf = torch.randint(fake.shape[0], (fake.shape[0],), generator=g).to(fake.device)
        values.append(statistic(real[ir], fake[jf]))
    return _interval(values, level, "two-sample percentile bootstrap")


def bootstrap_mean(terms: torch.Tensor, n_boot: int = 200, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile interval of the mean of per-sample terms (P,) resampled with replacement."""
    t = torch.as_tensor(terms, dtype=torch.float64).reshape(-1)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(t.numel(), (n_boot, t.numel()), generator=g)  # (B, P)
    means = t[idx].mean(1)
    return _interval(means.tolist(), level, "percentile bootstrap of per-sample terms")
