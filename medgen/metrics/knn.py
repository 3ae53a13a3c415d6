"""Chunked, bounded-memory nearest neighbours on CPU or GPU.

The feature metrics (improved precision/recall, density/coverage) and the privacy audit all
need k-nearest-neighbour distances between two feature sets of up to ~50k x 50k rows. The full
distance matrix would be 50k^2 x 8 B = 20 GB, so we never build it: the query rows are processed
in chunks (and the reference rows too when they alone exceed the budget) and a running top-k is
merged across reference chunks. Work runs on the device the inputs live on (or `device=`); CPU
inputs can be streamed through a GPU chunk by chunk.

Euclidean distances use float64 by default: the ball tests of precision/recall and
density/coverage compare a distance with a radius, and float32's ||a||^2 + ||b||^2 - 2ab loses
about three digits to cancellation on 2048-d Inception features (sklearn, which the reference
implementations use, also upcasts to float64 for this reason). Both sets are centred on the
reference mean first, which keeps the squared norms small and the subtraction well conditioned.

Own code rather than sklearn/faiss: sklearn's `NearestNeighbors` is CPU-only and single-set
brute force; faiss is not a dependency. This is ~100 lines of torch and runs on the GPU.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from medgen.errors import DataError

METRICS = ("l2", "cosine", "pearson")

# Elements of one (query chunk x reference chunk) block: 2^25 x 8 B = 256 MiB in float64.
DEFAULT_BLOCK_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 24}


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    return torch.from_numpy(np.ascontiguousarray(x))


def _check_2d(x: torch.Tensor, what: str) -> None:
    if x.ndim != 2:
        raise DataError(f"{what}: expected a (N, D) feature matrix, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise DataError(f"{what}: no rows (0 samples)")


def _prepare(query, ref, metric: str, dtype: torch.dtype | None, device) -> tuple[torch.Tensor, torch.Tensor, torch.device]:
    """Convert to tensors on the compute device in `dtype`, normalised for the metric."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    q, r = _as_tensor(query), _as_tensor(ref)
    _check_2d(q, "query features")
    _check_2d(r, "reference features")
    if q.shape[1] != r.shape[1]:
        raise DataError(f"feature dimensions differ: query {q.shape[1]}, reference {r.shape[1]}")
    device = torch.device(device) if device is not None else q.device
    dtype = dtype or torch.float64
    q = q.to(device=device, dtype=dtype)
    r = r.to(device=device, dtype=dtype)
    if metric == "l2":
        mean = r.mean(0, keepdim=True)  # translation-invariant; improves conditioning
        q, r = q - mean, r - mean
    else:
        if metric == "pearson":  # Pearson correlation = cosine similarity of row-centred vectors
            q = q - q.mean(1, keepdim=True)
            r = r - r.mean(1, keepdim=True)
        q = torch.nn.functional.normalize(q, dim=1)
        r = torch.nn.functional.normalize(r, dim=1)
    return q, r, device


def _block(q: torch.Tensor, r: torch.Tensor, r_sq: torch.Tensor | None, metric: str) -> torch.Tensor:
    """(n, D) x (m, D) -> (n, m): Euclidean distance for l2, similarity otherwise."""
    dots = q @ r.T
    if metric != "l2":
        return dots
    q_sq = (q * q).sum(1, keepdim=True)
    # in place: one (n, m) buffer per block, so the element budget is the memory bound
    return dots.mul_(-2).add_(q_sq).add_(r_sq[None, :]).clamp_min_(0).sqrt_()


def _chunk_sizes(n_q: int, n_r: int, chunk_size: int | None, device: torch.device) -> tuple[int, int]:
    budget = DEFAULT_BLOCK_ELEMENTS.get(device.type, DEFAULT_BLOCK_ELEMENTS["cpu"])
    ref_chunk = min(n_r, budget)
    query_chunk = chunk_size or max(1, budget // ref_chunk)
    return min(query_chunk, n_q), ref_chunk


def pairwise_blocks(
    query,
    ref,
    metric: str = "l2",
    chunk_size: int | None = None,
    device=None,
    dtype: torch.dtype | None = torch.float64,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield `(start, stop, block)` with block (stop-start, M) = d(query[start:stop], ref).

    For reductions that need every pair (ball tests) rather than a top-k. Each block holds
    `chunk_size` query rows (default: as many as fit the per-device element budget).
    """
    q, r, device = _prepare(query, ref, metric, dtype, device)
    r_sq = (r * r).sum(1) if metric == "l2" else None
    step = chunk_size or max(1, DEFAULT_BLOCK_ELEMENTS.get(device.type, DEFAULT_BLOCK_ELEMENTS["cpu"]) // r.shape[0])
    for start in range(0, q.shape[0], step):
        stop = min(start + step, q.shape[0])
        yield start, stop, _block(q[start:stop], r, r_sq, metric)


def pairwise_topk(
    query,
    ref,
    k: int,
    metric: str = "l2",
    largest: bool | None = None,
    chunk_size: int | None = None,
    exclude_self: bool = False,
    device=None,
    dtype: torch.dtype | None = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest reference rows for every query row, in bounded memory.

    Args:
        query: (N, D) tensor or array; ref: (M, D).
        k: neighbours per query row.
        metric: "l2" (Euclidean distance, nearest = smallest), "cosine" or "pearson"
            (similarity, nearest = largest).
        largest: override the direction (default: False for l2, True otherwise).
        chunk_size: query rows per block (default from a per-device memory budget).
        exclude_self: `query` and `ref` are the same set; row i never matches column i.
        device: compute device (default: the query's device).
        dtype: compute dtype (float64 default; see the module docstring).

    Returns:
        values (N, k) sorted nearest first, indices (N, k) into `ref` (int64), on the
        query's original device (CPU for numpy inputs).
    """
    out_device = query.device if isinstance(query, torch.Tensor) else torch.device("cpu")
    q, r, device = _prepare(query, ref, metric, dtype, device)
    n, m = q.shape[0], r.shape[0]
    if exclude_self and n != m:
        raise ValueError(f"exclude_self needs query and ref to be the same set; got {n} and {m} rows")
    available = m - int(exclude_self)
    if k < 1 or k > available:
        need = k + int(exclude_self)
        raise DataError(f"k={k} nearest neighbours need at least {need} reference samples, got {m}; use more samples or a smaller k")
    largest = (metric != "l2") if largest is None else largest
    fill = float("-inf") if largest else float("inf")
    r_sq = (r * r).sum(1) if metric == "l2" else None
    query_chunk, ref_chunk = _chunk_sizes(n, m, chunk_size, device)

    values = torch.empty(n, k, dtype=q.dtype, device=device)
    indices = torch.empty(n, k, dtype=torch.long, device=device)
    for qs in range(0, n, query_chunk):
        qe = min(qs + query_chunk, n)
        best_v = best_i = None
        for rs in range(0, m, ref_chunk):
            re = min(rs + ref_chunk, m)
            block = _block(q[qs:qe], r[rs:re], None if r_sq is None else r_sq[rs:re], metric)  # (nq, nr)
            if exclude_self:
                rows = torch.arange(qs, qe, device=device)
                hit = (rows >= rs) & (rows < re)
                block[hit.nonzero(as_tuple=True)[0], rows[hit] - rs] = fill
            kk = min(k, re - rs)
            v, i = block.topk(kk, dim=1, largest=largest, sorted=True)
            i = i + rs
            if best_v is not None:  # merge with the running top-k of earlier reference chunks
                v, sel = torch.cat([best_v, v], 1).topk(min(k, best_v.shape[1] + kk), dim=1, largest=largest, sorted=True)
                i = torch.cat([best_i, i], 1).gather(1, sel)
            best_v, best_i = v, i
        values[qs:qe], indices[qs:qe] = best_v, best_i
    return values.to(out_device), indices.to(out_device)


def kth_neighbour_radius(x, k: int, metric: str = "l2", **kwargs) -> torch.Tensor:
    """(N,) distance from each row of x to its k-th nearest *other* row of x.

    This is NND_k of Kynkäänniemi et al. 2019 and Naeem et al. 2020: the reference code takes
    the (k+1)-th smallest value of the distance matrix including the zero self-distance, which
    is the same number.
    """
    values, _ = pairwise_topk(x, x, k, metric=metric, exclude_self=True, **kwargs)
    return values[:, -1]
