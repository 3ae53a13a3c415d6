"""Reconstruction metrics with the fastMRI conventions, per image, on magnitude images (B, 1, H, W).

- PSNR with data_range = the ground truth's max (fastMRI's `psnr`) and NMSE = ||x - g||^2 / ||g||^2:
  deepinv.metric (`PSNR(max_pixel=None, min_pixel=0)`, `NMSE`); they equal scikit-image's
  `peak_signal_noise_ratio(g, x, data_range=g.max())` and fastMRI's `nmse` (tests/test_recon.py).
- SSIM as fastMRI computes it: scikit-image's `structural_similarity(g, x, data_range=g.max())`,
  i.e. a uniform 7x7 window, K1 = 0.01, K2 = 0.03, sample covariances (N / (N - 1)) and the mean over
  the valid region (the same formula as fastMRI's `SSIMLoss`). Ours is that formula in torch, batched;
  deepinv's `SSIM` goes through torchmetrics (population covariances, padded borders) and gave
  0.878-0.881 where scikit-image gives 0.915 (noisy 64x64 test images), so it is not fastMRI's SSIM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB, data_range = max of each ground-truth image."""
    from deepinv.loss.metric import PSNR

    return PSNR(max_pixel=None, min_pixel=0.0)(x.float(), truth.float())


def nmse(x: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(B,) normalised MSE ||x - g||^2 / ||g||^2."""
    from deepinv.loss.metric import NMSE

    return NMSE()(x.float(), truth.float())


def ssim(x: torch.Tensor, truth: torch.Tensor, window: int = 7, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """(B,) SSIM of (B, 1, H, W) images as scikit-image / fastMRI compute it (data_range = g.max())."""
    x, g = x.float(), truth.float()
    data_range = g.amax(dim=(1, 2, 3)).view(-1, 1, 1, 1)
    w = torch.full((1, 1, window, window), 1.0 / window**2, device=x.device)
    n = window * window
    cov = n / (n - 1)  # sample covariance, as scikit-image's default
    ux, ug = F.conv2d(x, w), F.conv2d(g, w)
    vx = cov * (F.conv2d(x * x, w) - ux * ux)
    vg = cov * (F.conv2d(g * g, w) - ug * ug)
    vxg = cov * (F.conv2d(x * g, w) - ux * ug)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * ug + c1) * (2 * vxg + c2)) / ((ux * ux + ug * ug + c1) * (vx + vg + c2))
    return s.mean(dim=(1, 2, 3))


def recon_metrics(x: torch.Tensor, truth: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"psnr", "ssim", "nmse"}: (B,) each."""
    return {"psnr": psnr(x, truth), "ssim": ssim(x, truth), "nmse": nmse(x, truth)}
