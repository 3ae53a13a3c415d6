"""How medgen draws images: grids with gutters, labels and captions; volumes as three orthogonal
mid-planes in radiological orientation; matplotlib Figures rendered to PNG bytes.

Training previews, a sample directory's grid.png, the cohort preview, the audit's pairs and the
probe's figures draw through here, so a volume looks the same in every figure. Figures are `matplotlib.figure.Figure`
objects on an Agg canvas, never pyplot's global state: the functions that build them return the
Figure (tests count its axes and colourbars), and `figure_png` renders it.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLANES = ("axial", "coronal", "sagittal")
# Letters at the (left, right, top) edges of each plane as `radiological_planes` orients it.
PLANE_MARKERS = {"axial": ("R", "L", "A"), "coronal": ("R", "L", "S"), "sagittal": ("A", "P", "S")}
MIN_PX = {2: 256, 3: 128}  # the shortest a drawn image's longer side may be: 2D image / each plane of a volume
DPI = 100
FONT = 10  # pt: labels and captions
PAD = 8  # px around the grid and between labels and tiles
GUTTER = 6  # px between the planes of one volume
CELL_GAP = 16  # px between images or volumes


def agg_figure(**kwargs) -> "Figure":
    """A Figure on its own Agg canvas (pyplot's backend and state are never touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**{"dpi": DPI, **kwargs})
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: "Figure") -> bytes:
    """PNG bytes of `fig` at its own size and dpi."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return buf.getvalue()


def radiological_planes(volume: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal and sagittal mid-planes of an (X, Y, Z) volume in RAS+ voxel order (what
    medgen's readers and torchio's ToCanonical give), as 2D arrays to draw (rows top to bottom).

    Radiological convention: the viewer faces the patient, so the patient's right is on the left of
    the axial and coronal planes; anterior is at the top of the axial plane and on the left of the
    sagittal one; superior is at the top of the coronal and sagittal planes (`PLANE_MARKERS`).
    """
    if volume.ndim != 3:
        raise ValueError(f"radiological_planes: expected an (X, Y, Z) volume, got shape {volume.shape}")
    x, y, z = (s // 2 for s in volume.shape)
    # Each plane is (horizontal axis, vertical axis); transposed, rows run along the vertical axis.
    # Flipping both puts the positive ends of RAS+ (right, anterior, superior) left and on top.
    return [np.flip(p.T, (0, 1)) for p in (volume[:, :, z], volume[:, y, :], volume[x, :, :])]


def _measure(fig: "Figure", renderer, text: str, **kwargs):
    """A figure text and its (width, height) in pixels; placed later with `set_position`."""
    t = fig.text(0, 0, text, fontsize=kwargs.pop("fontsize", FONT), **kwargs)
    box = t.get_window_extent(renderer)
    return t, math.ceil(box.width), math.ceil(box.height)


def image_grid(images: Sequence[np.ndarray], *, volumes: bool, ncol: int | None = None, captions: Sequence[str] | None = None,
               row_labels: Sequence[str] | None = None) -> "Figure":
    """A readable grid of images with values in [0, 1]: 2D (H, W) or RGB (H, W, 3), or, with
    `volumes`, (X, Y, Z) volumes drawn as their three `radiological_planes` side by side, each
    plane with its orientation letters and the plane names above the first row.

    Every drawn image is enlarged by one integer factor (nearest neighbour: a voxel stays a square)
    until the longer side of each reaches MIN_PX (256 px per 2D image, 128 px per plane). `ncol` images or
    volumes per row (default: a roughly square figure); `captions` one per image, above it (seed,
    label); `row_labels` one per row, at its left ("input", "reconstruction").
    One Axes per drawn image or plane, in order.
    """
    n = len(images)
    if n == 0:
        raise ValueError("image_grid: no images to draw")
    cells = [radiological_planes(np.asarray(v)) if volumes else [np.asarray(v)] for v in images]
    per_cell = len(cells[0])
    ncol = max(1, min(n, ncol or math.ceil(math.sqrt(n / per_cell))))
    nrow = math.ceil(n / ncol)
    if captions is not None and len(captions) != n:
        raise ValueError(f"image_grid: {len(captions)} captions for {n} images")
    if row_labels is not None and len(row_labels) != nrow:
        raise ValueError(f"image_grid: {len(row_labels)} row labels for {nrow} rows")

    shortest = min(max(p.shape[:2]) for cell in cells for p in cell)  # the smallest drawn image, by its longer side
    factor = max(1, math.ceil(MIN_PX[3 if volumes else 2] / shortest))  # one factor: every voxel is drawn the same size
    slot_w = [factor * max(cell[j].shape[1] for cell in cells) for j in range(per_cell)]  # px per plane column
    slot_h = factor * max(p.shape[0] for cell in cells for p in cell)
    cell_w = sum(slot_w) + GUTTER * (per_cell - 1)

    fig = agg_figure(facecolor="white")
    renderer = fig.canvas.get_renderer()
    placed = []  # (text, x, y) in px from the top-left corner, anchored as the text's alignment says

    def put(text, x, y, **kwargs):
        t, w, h = _measure(fig, renderer, text, **kwargs)
        placed.append((t, x, y))
        return w, h

    left = PAD
    labels = [_measure(fig, renderer, s, ha="right", va="center") for s in row_labels or []]
    if labels:
        left += max(w for _, w, _ in labels) + PAD
    y = PAD
    if volumes:  # plane names over the first row
        heights = [put(name, left + c * (cell_w + CELL_GAP) + sum(slot_w[:j]) + GUTTER * j + slot_w[j] / 2, y, ha="center", va="top")[1]
                   for c in range(ncol) for j, name in enumerate(PLANES)]
        y += max(heights) + 2
    tiles = []  # (array, x, y, w, h, plane index)
    for r in range(nrow):
        if captions is not None:
            y += max(put(captions[i], left + (i - r * ncol) * (cell_w + CELL_GAP), y, ha="left", va="top", fontsize=FONT - 1)[1]
                     for i in range(r * ncol, min(n, (r + 1) * ncol))) + 2
        if labels:
            t, _, _ = labels[r]
            placed.append((t, left - PAD, y + slot_h // 2))
        for i in range(r * ncol, min(n, (r + 1) * ncol)):
            x = left + (i - r * ncol) * (cell_w + CELL_GAP)
            for j, plane in enumerate(cells[i]):
                h, w = plane.shape[0] * factor, plane.shape[1] * factor
                tiles.append((plane, x + (slot_w[j] - w) // 2, y + (slot_h - h) // 2, w, h, j))
                x += slot_w[j] + GUTTER
        y += slot_h + CELL_GAP
    width = left + ncol * cell_w + (ncol - 1) * CELL_GAP + PAD
    height = y - CELL_GAP + PAD
    fig.set_size_inches(width / DPI, height / DPI)
    for t, x, ty in placed:
        t.set_position((x / width, 1 - ty / height))
    for plane, x, ty, w, h, j in tiles:
        ax = fig.add_axes((x / width, 1 - (ty + h) / height, w / width, h / height))
        big = plane.repeat(factor, 0).repeat(factor, 1)  # nearest neighbour, whole pixels
        ax.imshow(big, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
        ax.set_axis_off()
        if volumes:
            _orientation_letters(ax, PLANE_MARKERS[PLANES[j]])
    return fig


def _orientation_letters(ax, letters: tuple[str, str, str]) -> None:
    """The patient directions at the left, right and top edges of a plane, as a scanner console shows them."""
    from matplotlib import patheffects

    style = {"color": "yellow", "fontsize": 8, "transform": ax.transAxes,
             "path_effects": [patheffects.withStroke(linewidth=2, foreground="black")]}  # readable on any tissue
    left, right, top = letters
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
