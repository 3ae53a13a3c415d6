"""kNN against brute force (torch.cdist / explicit loops), incl. chunking and self-exclusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medgen.errors import DataError
from medgen.metrics.knn import kth_neighbour_radius, pairwise_blocks, pairwise_topk


def _brute(q, r, metric):
    q, r = q.double(), r.double()
    if metric == "l2":
        return torch.cdist(q, r)
    if metric == "pearson":
        q = q - q.mean(1, keepdim=True)
        r = r - r.mean(1, keepdim=True)
    return torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(r, dim=1).T


@pytest.mark.parametrize("metric", ["l2", "cosine", "pearson"])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_topk_matches_brute_force(metric, chunk_size):
    g = torch.Generator().manual_seed(0)
    q, r = torch.randn(53, 16, generator=g) + 3.0, torch.randn(71, 16, generator=g) + 3.0
    d = _brute(q, r, metric)
    want_v, want_i = d.topk(4, dim=1, largest=metric != "l2")
    v, i = pairwise_topk(q, r, 4, metric=metric, chunk_size=chunk_size)
    torch.testing.assert_close(v, want_v, rtol=0, atol=1e-10)
    assert torch.equal(i, want_i)


def test_reference_chunking_merges_running_topk(monkeypatch):
    """Force tiny blocks so both query and reference are chunked and top-k is merged."""
    import medgen.metrics.knn as knn

    monkeypatch.setitem(knn.DEFAULT_BLOCK_ELEMENTS, "cpu", 10)
    g = torch.Generator().manual_seed(1)
    q, r = torch.randn(23, 5, generator=g), torch.randn(37, 5, generator=g)
    want_v, want_i = torch.cdist(q.double(), r.double()).topk(6, dim=1, largest=False)
    v, i = pairwise_topk(q, r, 6)
    torch.testing.assert_close(v, want_v, rtol=0, atol=1e-10)
    assert torch.equal(i, want_i)
    # self-exclusion across reference chunks
    v, i = pairwise_topk(r, r, 3, exclude_self=True)
    d = torch.cdist(r.double(), r.double()).fill_diagonal_(float("inf"))
    want_v, want_i = d.topk(3, dim=1, largest=False)
    torch.testing.assert_close(v, want_v, rtol=0, atol=1e-10)
    assert torch.equal(i, want_i)


def test_kth_radius_equals_reference_definition():
    """Naeem et al.'s code: (k+1)-th smallest of the distance matrix including self."""
    x = np.random.default_rng(2).normal(size=(40, 8))
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    want = np.partition(d, 5, axis=1)[:, 5]  # k=5 -> index 5 counts the zero self-distance
    got = kth_neighbour_radius(x, 5).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert not (pairwise_topk(x, x, 5, exclude_self=True)[1] == np.arange(40)[:, None]).any()


def test_float64_precision_on_offset_features():
    """Large common offset: float32 expansion would lose digits; ours matches exact pairs."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 64, generator=g, dtype=torch.float64) * 0.01 + 100.0
    v, i = pairwise_topk(x, x, 1, exclude_self=True)
    exact = torch.stack([(x[j] - x[i[j, 0]]).norm() for j in range(30)])
    torch.testing.assert_close(v[:, 0], exact, rtol=1e-9, atol=0)


def test_blocks_cover_matrix():
    q, r = torch.randn(10, 3), torch.randn(6, 3)
    full = torch.cat([b for _, _, b in pairwise_blocks(q, r, chunk_size=4)])
    torch.testing.assert_close(full, torch.cdist(q.double(), r.double()), rtol=0, atol=1e-12)


def test_errors():
    x = torch.randn(5, 3)
    with pytest.raises(DataError, match="at least 6"):
        kth_neighbour_radius(x, 5)
    with pytest.raises(DataError, match="dimensions differ"):
        pairwise_topk(x, torch.randn(5, 4), 1)
    with pytest.raises(DataError, match="0 samples"):
        pairwise_topk(torch.empty(0, 3), x, 1)
