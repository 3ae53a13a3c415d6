"""Fréchet distance between two feature sets (FID when the features are Inception's).

FID (Heusel et al. 2017) models each feature set as a Gaussian N(mu, Sigma) and reports the
squared Fréchet (2-Wasserstein) distance between them (Dowson & Landau 1982):

    d^2 = ||mu_1 - mu_2||^2 + Tr(Sigma_1) + Tr(Sigma_2) - 2 Tr((Sigma_1 Sigma_2)^{1/2})

Statistics are float64 (the difference of three ~1e3-sized traces is ~1e0). The last term
needs no matrix square root: Tr((Sigma_1 Sigma_2)^{1/2}) = sum_i sqrt(lambda_i(Sigma_1 Sigma_2)),
and Sigma_1 Sigma_2 has real non-negative eigenvalues (it is similar to the PSD matrix
L^T Sigma_2 L where Sigma_1 = L L^T). We take them from the symmetric matrix L^T Sigma_2 L
(Cholesky + `eigvalsh`, the fastest and best-conditioned route) and fall back to the general
`eigvals(Sigma_1 Sigma_2)` when Sigma_1 is singular (fewer samples than dimensions). Both run
in torch, on the GPU when the features are there. With fewer samples than dimensions,
`frechet_distance` takes the same square roots as the singular values of the small (N, M)
cross-covariance factor instead (see the comment there). `scipy.linalg.sqrtm` (clean-fid, pytorch-fid)
computes the whole square-root matrix by a Schur decomposition; eval/RESULTS.md has timings.
"""

from __future__ import annotations

import numpy as np
import torch

from medgen.errors import DataError


def _features(x, what: str, device=None) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.ndim != 2:
        raise DataError(f"{what}: expected an (N, D) feature matrix, got shape {tuple(t.shape)}")
    if t.shape[0] < 2:
        raise DataError(f"{what}: FID needs at least 2 samples to estimate a covariance, got {t.shape[0]}")
    if not torch.isfinite(t).all():
        raise DataError(f"{what}: features contain NaN or Inf")
    return t.to(device=device if device is not None else t.device, dtype=torch.float64)


def gaussian_statistics(feats, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) -> mean (D,), unbiased covariance (D, D), both float64 (as numpy.cov, clean-fid)."""
    x = _features(feats, "features", device)
    mu = x.mean(0)
    xc = x - mu
    sigma = xc.T @ xc / (x.shape[0] - 1)
    return mu, sigma


def trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """Tr((Sigma_1 Sigma_2)^{1/2}) from the eigenvalues of Sigma_1 Sigma_2 (float64 scalar)."""
    chol, info = torch.linalg.cholesky_ex(sigma1)
    if int(info) == 0:
        # Sigma_1 Sigma_2 = L (L^T Sigma_2 L) L^{-1}: same spectrum, symmetric PSD middle factor.
        eig = torch.linalg.eigvalsh(chol.T @ sigma2 @ chol)
        return eig.clamp_min(0).sqrt().sum()
    # Singular Sigma_1: general eigenvalues; rounding can leave tiny negative/complex parts,
    # whose complex square roots are ~imaginary and drop out with .real (as torchmetrics).
    eig = torch.linalg.eigvals(sigma1 @ sigma2)
    return eig.sqrt().real.sum()


def frechet_distance_from_statistics(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982)."""
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, mu2, sigma1, sigma2))
    sigma2, mu2 = sigma2.to(sigma1.device), mu2.to(sigma1.device)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise DataError(f"feature dimensions differ: {tuple(mu1.shape)} vs {tuple(mu2.shape)}")
    diff = mu1 - mu2
    value = diff @ diff + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt_product(sigma1, sigma2)
    return float(value)


def frechet_distance(real_feats, fake_feats, device=None) -> float:
    """FID between two (N, D) feature sets (Heusel et al. 2017), float64 statistics.

    Runs on `device` (default: where the features are, so CUDA tensors use the GPU).
    """
    x = _features(real_feats, "real features", device)
    y = _features(fake_feats, "fake features", x.device)
    if x.shape[1] != y.shape[1]:
        raise DataError(f"feature dimensions differ: real {x.shape[1]}, fake {y.shape[1]}")
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    if n * m * min(n, m) >= d**3:
        return frechet_distance_from_statistics(*gaussian_statistics(x), *gaussian_statistics(y))
    # Few samples for the dimension (e.g. 100 images, 2048-d): Sigma_1 = A^T A, Sigma_2 = B^T B
    # with A = X_c / sqrt(n-1) (n, D), B likewise. The non-zero eigenvalues of
    # Sigma_1 Sigma_2 = A^T (A B^T B) equal those of (A B^T)(A B^T)^T, so their square roots are
    # the singular values of the (n, m) matrix A B^T: same number, O(nmD) instead of O(D^3).
    a = (x - x.mean(0)) / (n - 1) ** 0.5
    b = (y - y.mean(0)) / (m - 1) ** 0.5
    diff = x.mean(0) - y.mean(0)
    tr_sqrt = torch.linalg.svdvals(a @ b.T).sum()
    return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2 * tr_sqrt)
