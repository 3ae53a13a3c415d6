"""Baselines without a generative prior: zero-filled and total-variation compressed sensing.

TV-CS (Lustig et al. 2007) solves min_x 1/2 ||A x - y||^2 + lambda TV(x) with deepinv.optim: accelerated
proximal gradient (`FISTA`, step 1 = 1/||A^H A||) with `L2` data fidelity and `TVPrior`, whose prox is
deepinv's Chambolle-Pock TV denoiser, warm-restarted across the outer iterations. Two settings make
the result a pure function of y, so that eps = 0 gives back the clean reconstruction exactly and a
batch gives what its elements give alone: the prox's early stop is off (its relative-change test
runs over the whole batch) and a fresh prior is built per call (deepinv keeps the last prox iterate
as the next call's warm start). The algorithm is built `unfold=True` with no trainable parameters,
only so that deepinv does not wrap it in `torch.no_grad()`: the white-box attack differentiates
through the iterations.

lambda is chosen on clean data (`calibrate_tv_lambda`): the grid value with the best mean PSNR on
calibration images that the probe does not evaluate; the grid and its PSNRs go into the report.
"""

from __future__ import annotations

from typing import Sequence

import torch

from medgen.recon.kspace import magnitude
from medgen.recon.metrics import psnr

TV_LAMBDA_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


def tv_reconstruct(physics, y: torch.Tensor, lam: float, *, iterations: int = 200, prox_iterations: int = 20) -> torch.Tensor:
    """(B, 2, H, W) TV-CS reconstructions; differentiable in y when grad is enabled."""
    from deepinv.optim import FISTA, L2, TVPrior

    model = FISTA(data_fidelity=L2(), prior=TVPrior(def_crit=0.0, n_it_max=prox_iterations), lambda_reg=float(lam),
                  stepsize=1.0, max_iter=int(iterations), early_stop=False, unfold=True, trainable_params=[])
    return model(y, physics)


@torch.no_grad()
def calibrate_tv_lambda(physics, y: torch.Tensor, truth: torch.Tensor, grid: Sequence[float] = TV_LAMBDA_GRID,
                        **tv_kwargs) -> dict:
    """lambda with the best mean PSNR of |TV(y)| against `truth` (B, 1, H, W) on clean data."""
    scores = [float(psnr(magnitude(tv_reconstruct(physics, y, lam, **tv_kwargs)), truth).mean()) for lam in grid]
    best = max(range(len(grid)), key=scores.__getitem__)
    return {"lambda": float(grid[best]), "grid": [float(v) for v in grid], "psnr": [round(s, 3) for s in scores],
            "n_images": int(y.shape[0]), "at_grid_edge": best in (0, len(grid) - 1)}
