"""Readable figures: radiological orientation against a volume with known anatomy directions, sizes
per drawn image, one panel per plane / method, colourbars and intervals in the probe figures."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from medgen.figures import MIN_PX, PLANES, figure_png, radiological_planes
from medgen.recon.report import panels_figure, psnr_figure
from medgen.train.preview import grid_figure, grid_png, reconstruction_figure, reconstruction_png, sample_captions

SHAPE = (8, 10, 12)  # (X, Y, Z): all different, so a transposed plane has the wrong shape


def marked_volume() -> np.ndarray:
    """RAS+ volume, 0 except three bars: right-anterior (along Z), right-superior (along Y) and
    anterior-superior (along X). Each mid-plane cuts exactly one of them."""
    v = np.zeros(SHAPE, dtype=np.float32)
    X, Y, Z = SHAPE
    v[X - 2 :, Y - 3 :, :] = 1.0  # right, anterior: seen in the axial plane
    v[X - 2 :, :, Z - 4 :] = 1.0  # right, superior: seen in the coronal plane
    v[:, Y - 3 :, Z - 4 :] = 1.0  # anterior, superior: seen in the sagittal plane
    return v


def test_radiological_planes_put_right_anterior_superior_where_radiologists_expect():
    # Radiological convention: patient's right on the viewer's left (axial, coronal), anterior at
    # the top of the axial plane and on the left of the sagittal one, superior at the top: every
    # bar lands in the top-left corner of the one plane that cuts it.
    X, Y, Z = SHAPE
    axial, coronal, sagittal = radiological_planes(marked_volume())
    expected = {"axial": ((Y, X), (3, 2)), "coronal": ((Z, X), (4, 2)), "sagittal": ((Z, Y), (4, 3))}
    for name, plane in zip(PLANES, (axial, coronal, sagittal)):
        shape, (rows, cols) = expected[name]
        assert plane.shape == shape, name
        mark = np.zeros(shape)
        mark[:rows, :cols] = 1.0
        np.testing.assert_array_equal(plane, mark, err_msg=name)


def _image_axes(fig):
    return [ax for ax in fig.axes if ax.get_images()]


def _pixel_box(fig, ax):
    """(left, top, right, bottom) of an axes in the rendered PNG's pixels."""
    b = ax.get_window_extent()
    height = fig.bbox.height
    return round(b.x0), round(height - b.y1), round(b.x1), round(height - b.y0)


def test_volume_grid_three_planes_per_volume_oriented_and_large(tmp_path):
    vol = torch.from_numpy(marked_volume())[None, None] * 2 - 1  # (1, 1, X, Y, Z) in [-1, 1]
    x = torch.cat([vol, -torch.ones_like(vol)])  # a second, empty volume
    fig = grid_figure(x, captions=sample_captions([3, 4], 1))
    axes = _image_axes(fig)
    assert len(axes) == 3 * len(x)
    texts = [t.get_text() for t in fig.texts]
    assert texts.count("axial") == texts.count("coronal") == texts.count("sagittal") >= 1
    assert "seed 3, label 1" in texts and "seed 4, label 1" in texts
    png = np.asarray(Image.open(io.BytesIO(figure_png(fig))).convert("L")).astype(float)
    assert png.shape == (round(fig.bbox.height), round(fig.bbox.width))
    for ax in axes[:3]:  # the marked volume: the top-left quarter of each plane is the bright bar
        left, top, right, bottom = _pixel_box(fig, ax)
        assert min(right - left, bottom - top) >= MIN_PX[3] * 0.5 and max(right - left, bottom - top) >= MIN_PX[3]
        tile = png[top:bottom, left:right]
        h, w = tile.shape
        corner, far = tile[2 : h // 5, 2 : w // 6], tile[-h // 3 : -2, -w // 3 : -2]
        assert corner.mean() > 200 and far.mean() < 30
    assert all(png[slice(*_pixel_box(fig, ax)[1::2]), slice(*_pixel_box(fig, ax)[::2])].mean() < 40 for ax in axes[3:])


def test_2d_grid_sizes_captions_and_gutters():
    x = torch.rand(5, 1, 20, 24) * 2 - 1
    fig = grid_figure(x, captions=[f"seed {i}" for i in range(5)])
    axes = _image_axes(fig)
    assert len(axes) == 5
    boxes = sorted(_pixel_box(fig, ax) for ax in axes)
    for left, top, right, bottom in boxes:
        assert right - left >= MIN_PX[2]  # the longer side (24 px) enlarged to >= 256
    lefts = sorted({b[0] for b in boxes})
    rights = sorted({b[2] for b in boxes})
    assert all(lefts[i + 1] - rights[i] >= 6 for i in range(len(lefts) - 1))  # gutters between columns
    assert {t.get_text() for t in fig.texts} >= {f"seed {i}" for i in range(5)}
    img = axes[0].get_images()[0].get_array()
    assert img.shape[0] >= 200 and img.shape[1] >= MIN_PX[2]  # whole-pixel upscaling, no resampling by matplotlib


def test_reconstruction_preview_has_labelled_rows():
    real = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    fig = reconstruction_figure(real, real.flip(2))
    axes = _image_axes(fig)
    assert len(axes) == 2 * 2 * 3  # (input, reconstruction) x volumes x planes
    labels = {t.get_text(): t for t in fig.texts if t.get_text() in ("input", "reconstruction")}
    assert set(labels) == {"input", "reconstruction"}
    # each label sits at the height of its row, left of every tile
    row_y = sorted({round(ax.get_position().y0 + ax.get_position().height / 2, 3) for ax in axes}, reverse=True)
    assert len(row_y) == 2
    np.testing.assert_allclose([labels[k].get_position()[1] for k in ("input", "reconstruction")], row_y, atol=0.01)
    assert all(labels["reconstruction"].get_position()[0] <= ax.get_position().x0 for ax in axes)
    assert Image.open(io.BytesIO(reconstruction_png(real[:1], real[:1]))).size[0] >= 3 * MIN_PX[3]
    with pytest.raises(ValueError):
        grid_png(real, ncol=1, row_labels=["one label for two rows"])


# ---------------------------------------------------------------------------------------------- probe

METHODS = ("tv", "dps", "surrogate")
PSNR_IMAGES = {  # per-image PSNR (3 images): clean, then at eps 0.02 worst-case / random
    "clean": [20.0, 24.0, 22.0], "worst-case": [18.0, 23.0, 19.0], "random": [19.5, 23.8, 21.7]}


def _probe_report() -> dict:
    results, images = [], []
    for m in METHODS:
        for R in (4, 8):
            for kind in ("clean", "worst-case", "random"):
                pert = "none" if kind == "clean" else kind
                source = "white-box" if (kind == "worst-case" and m == "surrogate") else "surrogate" if kind == "worst-case" else None
                eps_values = [0.0] if kind == "clean" else [0.0, 0.02]
                for eps in eps_values:
                    values = PSNR_IMAGES["clean" if eps == 0 else kind]
                    results.append({"method": m, "acceleration": R, "eps": eps, "perturbation": pert, "source": source,
                                    "psnr": float(np.mean(values)), "psnr_std": 0.0, "n_images": 3})
                    if eps > 0 or kind == "clean":
                        images += [{"method": m, "acceleration": R, "eps": eps, "perturbation": pert, "source": source,
                                    "image": i, "psnr": v} for i, v in enumerate(values)]
    return {"results": results, "images": images}


def test_psnr_figure_one_panel_per_method_legend_outside_and_t_bands():
    fig = psnr_figure(_probe_report())
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_title().split(":")[0] for ax in axes] == list(METHODS)
    for ax in axes:
        assert len(ax.get_lines()) == 2 * 2 + 1  # (worst-case, random) x R in {4, 8}, and the zero line
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    assert all(not legend.overlaps(ax.get_window_extent()) for ax in axes)  # outside the data
    # the band at eps 0.02 is the Student t 95% interval of the per-image change against clean
    d = np.subtract(PSNR_IMAGES["worst-case"], PSNR_IMAGES["clean"])
    half = stats.t.ppf(0.975, df=2) * d.std(ddof=1) / np.sqrt(3)
    band = next(c for c in axes[0].collections if np.allclose(c.get_facecolor()[0][:3], (0.839, 0.153, 0.157), atol=1e-2))
    at = band.get_paths()[0].vertices
    ys = sorted({round(float(y), 6) for xv, y in at if abs(xv - 0.02) < 1e-9})
    np.testing.assert_allclose(ys, [d.mean() - half, d.mean() + half], rtol=1e-5)


def test_panels_figure_colourbars_on_difference_and_std():
    img = torch.rand(12, 12)
    panels = {"4": {"eps": 0.02, "truth": img, "zero_filled": img, "methods": {
        "dps": {"clean": img, "perturbed": img, "difference": img * 0.1, "std": img * 0.2, "source": "surrogate"},
        "tv": {"clean": img, "perturbed": img, "difference": img * 0.1, "std": torch.zeros(12, 12), "source": "surrogate"}}}}
    fig = panels_figure(panels)
    colourbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colourbars) == 2  # one per row, beside the difference and std maps
    assert [round(cb.get_ylim()[1], 4) for cb in colourbars] == [round(float((img * 0.2).max()), 4), round(float((img * 0.1).max()), 4)]
    assert len([ax for ax in fig.axes if ax.get_label() != "<colorbar>"]) == 2 * 6


def test_eval_samples_figure_three_planes_per_volume_in_labelled_rows():
    from medgen.metrics.report import SHOWN, samples_figure

    real = torch.rand(6, 1, 12, 16, 10) * 2 - 1
    fig = samples_figure(real, real[:5].flip(2))
    n = SHOWN[3]  # 4 of the 5 synthetic volumes
    axes = _image_axes(fig)
    assert len(axes) == 2 * n * 3  # (real, synthetic) x volumes x planes
    for ax in axes:
        left, top, right, bottom = _pixel_box(fig, ax)
        assert max(right - left, bottom - top) >= MIN_PX[3]
    texts = [t.get_text() for t in fig.texts]
    assert texts.count("axial") == n and {"real", "synthetic"} <= set(texts)
    # first row real, second synthetic, each volume's first tile its axial plane, radiologically oriented
    for ax, volume in ((axes[0], real[0]), (axes[3 * n], real[0].flip(1))):
        drawn, plane = ax.get_images()[0].get_array(), radiological_planes(((volume[0] + 1) / 2).numpy())[0]
        f = drawn.shape[0] // plane.shape[0]
        np.testing.assert_allclose(drawn[::f, ::f], plane, atol=1e-6)


def test_audit_top_pairs_labels_clear_of_every_image():
    from medgen.privacy.calibration import Scores
    from medgen.privacy.report import top_pairs_figure

    g = torch.Generator().manual_seed(0)
    train, synthetic = torch.rand(6, 1, 24, 24, generator=g) * 2 - 1, torch.rand(5, 1, 24, 24, generator=g) * 2 - 1
    names = [f"sub-{i:04d}_ses-01_run-01_T1w_long_name.png" for i in range(6)]
    similarity = torch.rand(5, 2, generator=g)
    sc = Scores(["pixel", "ssl"], similarity, torch.randint(6, (5, 2), generator=g), similarity - 0.5, [""] * 5)
    examples = [(train[i], i, "elastic", 0.99) for i in range(3)]
    fig = top_pairs_figure(sc, examples, "INCONCLUSIVE: a headline", train, synthetic, names, names[:5], top_k=4)
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)  # constrained layout places the axes
    images = [ax.get_window_extent(renderer) for ax in _image_axes(fig)]
    assert len(images) == 2 * 4 + 2 * 3  # (sample, nearest train) x 4, (control copy, its source) x 3
    labels = [t for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label) if t.get_text()] + fig.texts
    assert sum(ax.get_title().endswith("_long_name.png") for ax in fig.axes) == 4 + 4 + 3  # file names (shortened) as titles
    assert {"synthetic", "nearest train", "control copy", "its source"} <= {t.get_text() for t in labels}
    boxes = [t.get_window_extent(renderer) for t in labels]
    for t, box in zip(labels, boxes):
        assert not any(box.overlaps(image) for image in images), t.get_text()
        assert not any(box.overlaps(other) for other in boxes if other is not box), t.get_text()
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1, t.get_text()  # not cut off
