"""PNG previews shared by training (reconstructions, samples), a sample directory's grid.png and the
trackers: tensors in [-1, 1] drawn by `medgen.figures.image_grid` (2D images at least 256 px, each
volume as three radiological planes of at least 128 px, gutters, captions and row labels)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from medgen.figures import figure_png, image_grid

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def sample_captions(seeds: Sequence[int], labels: Sequence[int | None] | int | None = None) -> list[str]:
    """One caption per sample, "seed 7" or "seed 7, label 1" (one label for all, or one each)."""
    if labels is None or isinstance(labels, int):
        labels = [labels] * len(seeds)
    return [f"seed {s}" + ("" if c is None else f", label {int(c)}") for s, c in zip(seeds, labels)]


def _displayable(x: torch.Tensor) -> list[np.ndarray]:
    """(N, C, *S) in [-1, 1] -> N arrays in [0, 1]: (H, W, 3) for RGB images, else channel 0."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy()
    return [np.moveaxis(v, 0, -1) if v.shape[0] == 3 and v.ndim == 3 else v[0] for v in x]


def grid_figure(x: torch.Tensor, ncol: int | None = None, *, captions: Sequence[str] | None = None,
                row_labels: Sequence[str] | None = None) -> "Figure":
    """The Figure of a grid of images (N, C, H, W) or volumes (N, C, X, Y, Z) in [-1, 1] (RAS+ voxel
    order, as training sees them after torchio's ToCanonical), `ncol` per row (default: roughly
    square); see `medgen.figures.image_grid` for captions and labels."""
    return image_grid(_displayable(x), volumes=x.ndim == 5, ncol=ncol, captions=captions, row_labels=row_labels)


def grid_png(x: torch.Tensor, ncol: int | None = None, *, captions: Sequence[str] | None = None,
             row_labels: Sequence[str] | None = None) -> bytes:
    """PNG bytes of `grid_figure`."""
    return figure_png(grid_figure(x, ncol, captions=captions, row_labels=row_labels))


def reconstruction_figure(real: torch.Tensor, recon: torch.Tensor) -> "Figure":
    """The inputs in a row labelled "input", their reconstructions under them."""
    return grid_figure(torch.cat([real, recon]), ncol=real.shape[0], row_labels=["input", "reconstruction"])


def reconstruction_png(real: torch.Tensor, recon: torch.Tensor) -> bytes:
    """PNG bytes of `reconstruction_figure`."""
    return figure_png(reconstruction_figure(real, recon))
