"""Memorization statistics on embeddings or pixels: the calibrated copy threshold and the three
reference measures the audit reports beside it (AuthPct, C_T, Carlini's relative l2).

All nearest-neighbour searches go through `medgen.metrics.knn.pairwise_topk` (chunked, bounded
memory, on the GPU when the inputs are there), so 100k x 100k sets never build a full matrix.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from medgen.errors import DataError
from medgen.metrics.knn import pairwise_topk

SIMILARITIES = ("pearson", "cosine")


def summary(v: torch.Tensor) -> dict[str, float]:
    """mean, median, 5th/95th percentile, min and max of a 1-D tensor ({} when empty)."""
    a = v.double().numpy()
    if a.size == 0:
        return {}
    stats = (("mean", np.mean), ("median", np.median), ("p05", lambda x: np.percentile(x, 5)), ("p95", lambda x: np.percentile(x, 95)), ("min", np.min), ("max", np.max))
    return {k: round(float(f(a)), 6) for k, f in stats}


def best_match(query: torch.Tensor, ref: torch.Tensor, similarity: str = "pearson", device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query row its most similar reference row: (values (N,), indices (N,)).

    Pearson correlation between embeddings as in Dar et al. 2024 (= cosine similarity of
    row-centred vectors); cosine is the alternative. Rows with zero variance (e.g. a constant
    image under the pixel detector) get similarity 0 rather than NaN.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    values, indices = pairwise_topk(query, ref, k=1, metric=similarity, device=device)
    return values[:, 0].float().cpu(), indices[:, 0].cpu()


def copy_threshold(train_to_holdout_best, percentile: float = 95.0) -> float:
    """tau = the `percentile`-th percentile of each training sample's best similarity with the
    held-out set (Dar et al. 2024). numpy's default linear interpolation between order
    statistics: with sorted values v_0..v_{n-1}, h = (n-1) p/100, tau = v_floor(h) +
    (h - floor(h)) (v_ceil(h) - v_floor(h)).
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    v = torch.as_tensor(train_to_holdout_best).detach().double().cpu().numpy()
    if v.size == 0 or not np.isfinite(v).all():
        raise DataError("cannot calibrate the copy threshold: train->holdout similarities are empty or not finite")
    return float(np.percentile(v, percentile))


def conformal_threshold(scores, level: float) -> tuple[float, float]:
    """tau such that a new image exchangeable with the calibration images exceeds it with
    probability at most `level` (split-conformal; Vovk et al. 2005): with the n scores sorted
    ascending v_1..v_n, tau = v_k, k = ceil((n + 1)(1 - level)), capped at n (the maximum: then
    the attainable level is 1 / (n + 1), above `level`). Returns (tau, the level attained,
    (n - k + 1) / (n + 1))."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    v = np.sort(torch.as_tensor(scores).detach().double().cpu().numpy())
    if v.size == 0 or not np.isfinite(v).all():
        raise DataError("cannot calibrate the copy threshold: held-out similarities are empty or not finite")
    n = v.size
    k = min(n, math.ceil((n + 1) * (1 - level)))
    return float(v[k - 1]), (n - k + 1) / (n + 1)


def tail_threshold(scores, level: float) -> float:
    """The (1 - level) quantile of a Gaussian fitted to the Fisher z-transforms (atanh) of the
    scores: it extrapolates the tail beyond the largest score, where a conformal quantile of a
    few dozen held-out images cannot reach. Correlations are close to Gaussian after atanh."""
    from scipy.stats import norm

    z = np.arctanh(np.clip(torch.as_tensor(scores).detach().double().cpu().numpy(), -1 + 1e-9, 1 - 1e-9))
    if z.size < 2:
        return -1.0  # no spread to extrapolate from
    return float(np.tanh(z.mean() + norm.ppf(1 - level) * z.std(ddof=1)))


def calibrated_threshold(scores, level: float) -> tuple[float, float]:
    """tau = the larger of the conformal quantile (distribution-free: a new image exceeds it with
    probability at most the attained level, returned) and the Gaussian tail quantile at `level`
    (which only raises tau, so the guarantee holds). Returns (tau, attained conformal level)."""
    tau, attained = conformal_threshold(scores, level)
    return max(tau, tail_threshold(scores, level)), attained


def leave_one_out_exceedances(scores, level: float) -> torch.Tensor:
    """(N,) bool: calibration image j scores above the tau of the other N - 1 images
    (`calibrated_threshold`). Scored against a tau it did not shape, image j is as independent of
    the threshold as a synthetic sample is: the share that exceeds is the audit's null rate."""
    s = torch.as_tensor(scores).detach().double().cpu()
    n = s.numel()
    if n < 2:
        raise DataError(f"the null rate needs at least 2 held-out images, got {n}")
    v, order = s.sort()
    k = min(n - 1, math.ceil(n * (1 - level)))  # rank of the conformal tau among the n - 1 others (1-based)
    position = torch.empty(n, dtype=torch.long)
    position[order] = torch.arange(n)
    # without image j (at sorted position i), the k-th smallest of the others is v[k - 1] if i >= k, else v[k]
    conformal = torch.where(position >= k, v[k - 1], v[min(k, n - 1)])
    # the Gaussian tail of the others' z-scores: leave-one-out mean and standard deviation in closed form
    from scipy.stats import norm

    z = torch.atanh(s.clamp(-1 + 1e-9, 1 - 1e-9))
    total, squares = z.sum(), (z * z).sum()
    mean = (total - z) / (n - 1)
    var = ((squares - z * z) - (n - 1) * mean * mean) / (n - 2) if n > 2 else torch.full_like(z, float("nan"))
    tail = torch.tanh(mean + float(norm.ppf(1 - level)) * var.clamp_min(0).sqrt()).nan_to_num(-1.0)
    return s > torch.maximum(conformal, tail)


def copy_rate_test(n_flagged: int, n: int, null_flagged: int, null_n: int) -> float:
    """One-sided p-value that synthetic samples exceed tau more often than genuinely new images:
    Fisher's exact test of the 2x2 table (flagged, not flagged) x (synthetic, held-out), i.e. the
    exact permutation test of the two rates, which accounts for the null rate being estimated
    from `null_n` held-out images. H1: the synthetic rate is higher."""
    from scipy.stats import fisher_exact

    if n == 0 or null_n == 0:
        return 1.0
    table = [[n_flagged, n - n_flagged], [null_flagged, null_n - null_flagged]]
    return float(fisher_exact(table, alternative="greater")[1])


def effective_rank(embeddings: torch.Tensor) -> float:
    """Effective rank (Roy & Vetterli 2007) of the centred rows: exp of the entropy of the
    normalised singular values; 0 for identical rows, 1 for rows on a line, D for isotropic."""
    x = embeddings.double()
    x = x - x.mean(0, keepdim=True)
    s = torch.linalg.svdvals(x)
    if s.numel() == 0 or float(s.sum()) <= 1e-12 * (1 + float(embeddings.abs().max())):
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def authpct(train: torch.Tensor, generated: torch.Tensor, device=None) -> float:
    """Authenticity percentage as dgm-eval computes it (Stein et al. 2023, after Alaa et al. 2022):
    a generated sample is authentic when its nearest training sample x has another training
    sample closer to x than the generated one is, i.e. d(x, NN_train(x)) < d(g, x). Euclidean
    distances on the features as given. Returns % authentic in [0, 100]."""
    if train.shape[0] < 2:
        raise DataError(f"AuthPct needs at least 2 training samples, got {train.shape[0]}")
    real_nn, _ = pairwise_topk(train, train, k=1, metric="l2", exclude_self=True, device=device)  # (Nt, 1)
    gen_nn, gen_idx = pairwise_topk(generated, train, k=1, metric="l2", device=device)  # (Ng, 1)
    authentic = real_nn[gen_idx[:, 0], 0] < gen_nn[:, 0]
    return float(100.0 * authentic.double().mean())


def _pca(train: np.ndarray, others: list[np.ndarray], dims: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Project on the top `dims` principal axes of `train` (randomized SVD: 100k x 4096 stays fast)."""
    t = torch.from_numpy(train)
    mean = t.mean(0, keepdim=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, _, v = torch.pca_lowrank(t - mean, q=dims, center=False, niter=4)  # v: (D, dims)
    return ((t - mean) @ v).numpy(), [((torch.from_numpy(o) - mean) @ v).numpy() for o in others]


def _mann_whitney_z(l_q: np.ndarray, l_p: np.ndarray) -> float:
    """Z-scored Mann-Whitney U of generated (L(Q_m)) vs test (L(P_n)) distances to training,
    with the continuity-corrected null mean m n / 2 - 0.5 and std sqrt(m n (m + n + 1) / 12)
    (Meehan et al. 2020; the reference code's normalisation)."""
    from scipy.stats import mannwhitneyu

    m, n = len(l_q), len(l_p)
    u = mannwhitneyu(l_q, l_p, alternative="less").statistic  # U of the first sample
    return float((u - (m * n / 2 - 0.5)) / math.sqrt(m * n * (m + n + 1) / 12))


def c_t_statistic(
    train: torch.Tensor,
    holdout: torch.Tensor,
    generated: torch.Tensor,
    n_cells: int = 3,
    min_generated: int = 20,
    pca_dims: int = 64,
    seed: int = 0,
    device=None,
) -> tuple[float | None, str | None]:
    """C_T of Meehan et al. 2020 ("A non-parametric test to detect data-copying in generative
    models"), set up as dgm-eval computes it: features reduced to `pca_dims` by PCA fitted on the
    training set, the space partitioned into `n_cells` cells by k-means on the training set, and
    in each cell pi the Z-scored Mann-Whitney U between L(Q_m) (generated -> nearest training
    distance) and L(P_n) (held-out -> nearest training distance). C_T is the average of Z_U over
    cells holding more than `min_generated` generated samples (tau = min_generated / m),
    weighted by the held-out share P_n(pi). C_T << 0: data copying; >> 0: underfitting.

    Returns (C_T, None) or (None, reason) when the sets are too small for the test.
    """
    from scipy.cluster.vq import kmeans2, vq

    t, p, q = (x.double().cpu().numpy() for x in (train, holdout, generated))
    if t.shape[1] > pca_dims and t.shape[0] > pca_dims:
        t, (p, q) = _pca(t, [p, q], pca_dims, seed)
    k = min(n_cells, t.shape[0])
    with warnings.catch_warnings():  # degenerate sets (identical rows): empty cells are handled below
        warnings.simplefilter("ignore")
        centroids, t_cells = kmeans2(t, k, seed=seed, minit="++")
    if not np.isfinite(centroids).all():
        return None, "k-means on the training features failed (identical or constant features)"
    p_cells, _ = vq(p, centroids)
    q_cells, _ = vq(q, centroids)
    m, n = q.shape[0], p.shape[0]
    tau = min_generated / m
    z, weight = [], []
    for cell in range(k):
        t_i, p_i, q_i = t[t_cells == cell], p[p_cells == cell], q[q_cells == cell]
        if len(q_i) / m <= tau:  # outside Pi_tau: too few generated samples
            continue
        if len(t_i) == 0 or len(p_i) == 0:
            return None, f"cell {cell} has generated samples but no training or held-out samples"
        t_i_t = torch.from_numpy(t_i)
        l_q = pairwise_topk(torch.from_numpy(q_i), t_i_t, k=1, metric="l2", device=device)[0][:, 0].numpy()
        l_p = pairwise_topk(torch.from_numpy(p_i), t_i_t, k=1, metric="l2", device=device)[0][:, 0].numpy()
        z.append(_mann_whitney_z(l_q, l_p))
        weight.append(len(p_i) / n)
    if not z:
        return None, f"no cell holds more than {min_generated} generated samples (C_T needs at least {min_generated + 1} in one cell)"
    return float(np.dot(weight, z) / np.sum(weight)), None


def carlini_relative_l2(generated: torch.Tensor, train: torch.Tensor, n: int = 50, alpha: float = 0.5, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative l2 of Carlini et al. 2023 ("Extracting training data from diffusion models", sec. 5):
        l(g, x; S_g) = l2(g, x) / (alpha * E_{y in S_g}[ l2(g, y) ]),
    x the nearest training image to g, S_g its `n` nearest training images (n = 50, alpha = 0.5).
    Small values mean g sits much closer to one training image than to its other neighbours.

    generated (Ng, D), train (Nt, D) flattened pixels. Returns (ratios (Ng,), nearest index (Ng,)).
    """
    n = min(n, train.shape[0])
    # float64 while the copies fit in 2 GiB (exact copies then get distance ~0, not ~1e-3 from
    # float32 cancellation); float32 for larger sets, accurate near any sensible threshold
    dtype = torch.float64 if (generated.numel() + train.numel()) <= (1 << 28) else torch.float32
    dist, idx = pairwise_topk(generated, train, k=n, metric="l2", device=device, dtype=dtype)  # (Ng, n)
    mean = dist.mean(1)
    ratio = dist[:, 0] / (alpha * mean).clamp_min(torch.finfo(dist.dtype).tiny)
    ratio = torch.where(mean > 0, ratio, torch.zeros_like(ratio))  # all n neighbours identical to g
    return ratio.cpu(), idx[:, 0].cpu()
