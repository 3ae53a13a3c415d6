"""MS-SSIM diversity: mean MS-SSIM over random pairs of samples from one set.

MS-SSIM (Wang, Simoncelli & Bovik 2003) compares luminance at the coarsest scale and
contrast/structure at every scale of a dyadic pyramid. Odena et al. 2017 used the mean MS-SSIM
of random pairs *within* a set of generated images as a diversity score (lower = more
diverse); medical generative papers (e.g. Pinaya et al. 2022, Khader et al. 2023) report it for
synthetic sets next to the same number for real pairs. The real-data value is the target:
well below it means noise-like samples, well above it means mode collapse.

MONAI's `MultiScaleSSIMMetric` computes it for 2D and 3D. Its defaults (11-voxel Gaussian
window, 5 scales) require more than 160 voxels per side, so `msssim_settings` picks the window
and the number of scales from the image size: the standard 11/5 when the image allows, else a
7-voxel window (sigma 1.5, +-2 sigma) with as many scales as fit, weights being the first
Wang et al. weights renormalised to sum to 1 (64^3 -> 4 scales, 128^3 -> 5, 32^2 -> 3).

Images are scored on [0, 1] with `data_range=1`, the convention of Wang et al. (non-negative
intensities) and of the autoencoder's validation. On [-1, 1] the luminance term
(2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) turns negative wherever one window is mostly
background (mean < 0) and the other mostly tissue (mean > 0); MONAI clamps the coarsest-scale
SSIM at zero, so such pairs score exactly 0. On the 2D demo cohort that gave 0.36 with 41 % of
pairs at 0 instead of 0.69, on the 3D cohort 0.65 instead of 0.88 (eval/RESULTS.md).
"""

from __future__ import annotations

import torch

from medgen.errors import DataError

WANG_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, Table 1
DATA_RANGE = 1.0  # images are mapped from [-1, 1] to [0, 1] before scoring


def msssim_settings(spatial_shape) -> dict:
    """Window size and scale weights that MONAI accepts for images of this spatial shape."""
    side = min(spatial_shape)

    def fits(kernel: int, scales: int) -> bool:  # MONAI's own check (compute_ms_ssim)
        return side // max(1, scales - 1) ** 2 > kernel - 1

    if fits(11, 5):
        return {"kernel_size": 11, "kernel_sigma": 1.5, "weights": list(WANG_WEIGHTS)}
    scales = max((s for s in range(1, 6) if fits(7, s)), default=0)
    if scales == 0:
        raise DataError(f"MS-SSIM needs images of at least 7 voxels per side, got spatial shape {tuple(spatial_shape)}")
    w = torch.tensor(WANG_WEIGHTS[:scales], dtype=torch.float64)
    return {"kernel_size": 7, "kernel_sigma": 1.5, "weights": (w / w.sum()).tolist()}


def random_pairs(n: int, n_pairs: int, seed: int = 0) -> torch.Tensor:
    """(P, 2) index pairs i != j, drawn uniformly; P = min(n_pairs, n(n-1)/2) distinct pairs."""
    if n < 2:
        raise DataError(f"MS-SSIM diversity needs at least 2 samples, got {n}")
    total = n * (n - 1) // 2
    g = torch.Generator().manual_seed(seed)
    if n_pairs >= total:  # every unordered pair once
        return torch.combinations(torch.arange(n), 2)
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < n_pairs:
        i, j = torch.randint(n, (2,), generator=g).tolist()
        if i != j:
            pairs.add((min(i, j), max(i, j)))
    return torch.tensor(sorted(pairs))


def _images(images, indices: torch.Tensor) -> torch.Tensor:
    """Rows `indices` of a (N, C, *S) tensor, or read from a set on disk (`medgen.data.ImageSet`)."""
    return images[indices] if isinstance(images, torch.Tensor) else images.take(indices.tolist())


def _spatial_shape(images) -> tuple[int, ...]:
    return tuple(images.shape[2:] if isinstance(images, torch.Tensor) else images.shape[1:])  # an ImageSet's shape is (C, *S)


def pairwise_msssim(images, pairs: torch.Tensor, batch_size: int = 16, device=None) -> torch.Tensor:
    """(N, C, *S) images in [-1, 1] (a tensor, or a set read from disk, of which only the images of
    each batch of pairs are read), (P, 2) pairs -> (P,) MS-SSIM values on [0, 1] (float64, CPU)."""
    from monai.metrics import MultiScaleSSIMMetric

    spatial_dims = len(_spatial_shape(images))
    if spatial_dims not in (2, 3):
        raise DataError(f"MS-SSIM needs 2D or 3D images (N, C, *S), got spatial shape {_spatial_shape(images)}")
    cfg = msssim_settings(_spatial_shape(images))
    metric = MultiScaleSSIMMetric(spatial_dims=spatial_dims, data_range=DATA_RANGE, reduction="none", **cfg)
    if device is None:
        device = images.device if isinstance(images, torch.Tensor) else torch.device("cpu")
    out = []
    for s in range(0, len(pairs), batch_size):
        p = pairs[s : s + batch_size]
        a = (_images(images, p[:, 0]).to(device, torch.float32) + 1) / 2  # [-1, 1] -> [0, 1]
        b = (_images(images, p[:, 1]).to(device, torch.float32) + 1) / 2
        out.append(metric(a, b).reshape(-1).double().cpu())  # (B, C, *S) x 2 -> (B,)
    return torch.cat(out)


def msssim_diversity(images, n_pairs: int = 500, seed: int = 0, device=None) -> dict:
    """Mean MS-SSIM over random pairs of one set: {"msssim", "per_pair" (P,), "settings"}.

    `images`: (N, C, *S) in [-1, 1], or a set read from disk (`medgen.data.ImageSet`), of which
    only the images of one batch of pairs are in memory at a time. `settings` is the scoring
    recipe: window, sigma, scale weights and the intensity range."""
    pairs = random_pairs(len(images), n_pairs, seed)
    values = pairwise_msssim(images, pairs, device=device)
    settings = {**msssim_settings(_spatial_shape(images)), "intensity": "[0, 1] = (x + 1) / 2", "data_range": DATA_RANGE}
    return {"msssim": float(values.mean()), "per_pair": values, "settings": settings}
