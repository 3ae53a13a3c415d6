"""Improved precision/recall and density/coverage: fidelity and diversity from k-NN balls.

Each sample x of a set gets a ball B(x, NND_k(x)) whose radius is the distance to its k-th
nearest other sample of the same set; the union of the balls estimates the set's manifold.
With real samples X_1..X_N and fake samples Y_1..Y_M:

- Precision (Kynkäänniemi et al. 2019): the fraction of fakes inside the real manifold,
  (1/M) sum_j 1[exists i: ||Y_j - X_i|| <= NND_k(X_i)].
- Recall (Kynkäänniemi et al. 2019): the fraction of reals inside the fake manifold,
  (1/N) sum_i 1[exists j: ||X_i - Y_j|| <= NND_k(Y_j)].
- Density (Naeem et al. 2020): how many real balls contain each fake, on average, scaled by 1/k,
  (1/(kM)) sum_j sum_i 1[Y_j in B(X_i, NND_k(X_i))]. Not bounded by 1; ~1 for matching
  distributions, > 1 when fakes cluster in dense real regions.
- Coverage (Naeem et al. 2020): the fraction of real balls that hold at least one fake,
  (1/N) sum_i 1[exists j: Y_j in B(X_i, NND_k(X_i))]; unlike recall it never builds a
  manifold from the fakes, so fake outliers cannot inflate it.

The ball test: Kynkäänniemi et al. define precision/recall with "<=" (a closed ball); for
density/coverage we follow Naeem et al.'s reference code (`prdc`), which uses "<" (an open
ball). The two differ only on exact ties (e.g. a fake that copies a real whose radius is 0).

Distances are Euclidean, float64, computed chunk by chunk (`medgen.metrics.knn`), so 50k x 50k
runs in bounded memory; one pass over the real x fake blocks gives all four numbers.
"""

from __future__ import annotations

import torch

from medgen.errors import DataError
from medgen.metrics.knn import _as_tensor, kth_neighbour_radius, pairwise_blocks, pairwise_topk


def _check(x: torch.Tensor, k: int, what: str) -> None:
    if x.ndim != 2:
        raise DataError(f"{what}: expected an (N, D) feature matrix, got shape {tuple(x.shape)}")
    if x.shape[0] < k + 1:
        raise DataError(
            f"{what}: {x.shape[0]} samples but k={k} nearest neighbours need at least k+1={k + 1}; "
            "add samples or lower k"
        )


def prdc_indicators(
    real,
    fake,
    k_pr: int | None = 3,
    k_dc: int | None = 5,
    chunk_size: int | None = None,
    device=None,
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """Per-sample terms of the metrics (their means are the metrics; used by the bootstrap).

    `k_pr=None` skips precision/recall, `k_dc=None` density/coverage. Returns float64 CPU
    tensors: "precision" (M,) 0/1, "recall" (N,) 0/1, "density" (M,) count/k_dc,
    "coverage" (N,) 0/1.
    """
    real, fake = _as_tensor(real), _as_tensor(fake)
    ks = [k for k in (k_pr, k_dc) if k is not None]
    if not ks:
        raise ValueError("set k_pr and/or k_dc")
    _check(real, max(ks), "real features")
    if k_pr is not None:
        _check(fake, k_pr, "fake features")
    elif fake.ndim != 2 or fake.shape[0] == 0:
        raise DataError(f"fake features: expected a non-empty (M, D) matrix, got shape {tuple(fake.shape)}")
    if real.shape[1] != fake.shape[1]:
        raise DataError(f"feature dimensions differ: real {real.shape[1]}, fake {fake.shape[1]}")
    device = torch.device(device) if device is not None else real.device
    kw = dict(chunk_size=chunk_size, device=device, dtype=dtype)

    real_nn, _ = pairwise_topk(real, real, max(ks), exclude_self=True, **kw)  # (N, max k)
    real_nn = real_nn.to(device)
    n, m = real.shape[0], fake.shape[0]
    out: dict[str, torch.Tensor] = {}
    if k_pr is not None:
        r_real_pr = real_nn[:, k_pr - 1]
        r_fake_pr = kth_neighbour_radius(fake, k_pr, **kw).to(device)  # (M,)
        fake_in_real = torch.zeros(m, dtype=torch.bool, device=device)
        recall = torch.empty(n, dtype=torch.float64, device=device)
    if k_dc is not None:
        r_real_dc = real_nn[:, k_dc - 1]
        density_count = torch.zeros(m, dtype=torch.float64, device=device)
        coverage = torch.empty(n, dtype=torch.float64, device=device)
    for start, stop, d in pairwise_blocks(real, fake, **kw):  # d: (chunk of reals, M) distances
        if k_pr is not None:
            fake_in_real |= (d <= r_real_pr[start:stop, None]).any(0)
            recall[start:stop] = (d <= r_fake_pr[None, :]).any(1).double()
        if k_dc is not None:
            density_count += (d < r_real_dc[start:stop, None]).sum(0)
            coverage[start:stop] = (d.min(1).values < r_real_dc[start:stop]).double()
    if k_pr is not None:
        out["precision"], out["recall"] = fake_in_real.double().cpu(), recall.cpu()
    if k_dc is not None:
        out["density"], out["coverage"] = (density_count / k_dc).cpu(), coverage.cpu()
    return out


def prdc(real, fake, k_pr: int | None = 3, k_dc: int | None = 5, **kwargs) -> dict[str, float]:
    """All four metrics in one pass over the real x fake distances (None skips a pair)."""
    return {name: float(v.mean()) for name, v in prdc_indicators(real, fake, k_pr, k_dc, **kwargs).items()}


def precision_recall(real, fake, k: int = 3, **kwargs) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of (M, D) fakes vs (N, D) reals."""
    return prdc(real, fake, k_pr=k, k_dc=None, **kwargs)


def density_coverage(real, fake, k: int = 5, **kwargs) -> dict[str, float]:
    """Density and coverage (Naeem et al. 2020) of (M, D) fakes vs (N, D) reals."""
    return prdc(real, fake, k_pr=None, k_dc=k, **kwargs)
