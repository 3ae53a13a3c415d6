"""Slices for the probe: 2D magnitude images in [0, 1].

Any dataset medgen reads works (the built-in cohort's PNG slices, NIfTI or DICOM slices, a
manifest); images go through the usual reader and torchio preprocessing with the `data:` keys
given (shape, spacing), converted to one gray channel. Two intensity scalings:

- "prior" (the probe's default): the intensity mapping the prior was trained with (its run's
  `data.intensity`, to [-1, 1]) and then u -> (u + 1) / 2, so the probe's ground truth is what the
  prior learned to generate (the cohort's slices keep their own maxima, 0.54 to 1.0);
- "minmax": each image min-max scaled to [0, 1] (Han et al.'s fastMRI slices, and the surrogate's
  training data; invariant to any affine mapping before it).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable

import torch

from medgen.data import Sample

log = logging.getLogger(__name__)


def load_slices(path: str | os.PathLike | Iterable[Sample], data_cfg: dict[str, Any] | None = None, *,
                scaling: str = "minmax", intensity: dict[str, Any] | None = None) -> tuple[torch.Tensor, list[Sample]]:
    """(N, 1, H, W) float32 in [0, 1] and the samples kept; blank images (max = min) are dropped
    with a warning (their PSNR is undefined). scaling "prior" maps with `intensity` (a run's
    `data.intensity`; default medgen's auto mapping), "minmax" per image."""
    from medgen.data import load_images

    cfg = {k: v for k, v in dict(data_cfg or {}).items() if k in ("shape", "spacing", "on_bad_file", "canonical")}
    cfg.update(spatial_dims=2, channels=1, intensity={"mode": "none"} if scaling == "minmax" else dict(intensity or {"mode": "auto"}))
    x, samples = load_images(path, cfg)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    blank = (hi <= lo).flatten()
    if blank.any():
        log.warning("dropping %d blank image(s) (constant intensity), e.g. %s", int(blank.sum()),
                    samples[int(blank.nonzero()[0])].path)
    keep = (~blank).nonzero().flatten().tolist()
    x = ((x - lo) / (hi - lo).clamp_min(1e-12) if scaling == "minmax" else ((x + 1) / 2).clamp(0, 1))[keep]
    return x.float().contiguous(), [samples[i] for i in keep]
