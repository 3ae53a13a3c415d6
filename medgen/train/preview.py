"""PNG previews shared by training (reconstructions, samples) and the sample directory's grid.png."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F


def mid_slices(x: torch.Tensor) -> torch.Tensor:
    """(N, C, D, H, W) -> (N, C, S, 3S): axial, coronal, sagittal mid slices side by side."""
    d, h, w = x.shape[2:]
    size = max(d, h, w)
    planes = [x[:, :, d // 2], x[:, :, :, h // 2], x[:, :, :, :, w // 2]]
    return torch.cat([F.interpolate(p.float(), size=(size, size), mode="nearest") for p in planes], dim=-1)


def grid_png(x: torch.Tensor, ncol: int | None = None) -> bytes:
    """PNG bytes of a grid of images (N, C, H, W) in [-1, 1], `ncol` per row (default: square).

    3D volumes (N, C, D, H, W) show their three mid slices, one volume per row unless `ncol` says.
    """
    from PIL import Image

    x = x.detach().float().cpu()
    n = x.shape[0]
    if x.ndim == 5:
        x, ncol = mid_slices(x), ncol or 1
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = math.ceil(n / ncol)
    pad = torch.full((nrow * ncol - n, *x.shape[1:]), -1.0)
    x = torch.cat([x, pad]).view(nrow, ncol, *x.shape[1:])  # (R, K, C, H, W)
    grid = torch.cat([torch.cat(list(row), dim=-1) for row in x], dim=-2)  # (C, R*H, K*W)
    img = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr = img[0].numpy() if img.shape[0] == 1 else img[:3].permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()
