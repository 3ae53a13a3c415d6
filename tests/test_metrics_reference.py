"""The real-vs-real reference of `medgen eval` (issue 24): the same metrics with held-out real
images in the synthetic images' place, at matched set sizes, side by side in report.json,
report.md, the summaries and metrics.png (one panel per metric, no empty panel)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from PIL import Image

from medgen.errors import DataError
from test_metrics_eval import _blobs

FEATURE_METRICS = ("fid", "kid", "prdc")


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDGEN_OFFLINE", "1")
    monkeypatch.setenv("MEDGEN_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Blob images (16x16): a real set, held-out images and a synthetic set from the same
    distribution, and a synthetic set of larger blobs (a clearly different distribution)."""
    root = tmp_path_factory.mktemp("reference")
    return {"real": _blobs(root / "real", 40, (16, 16), seed=0), "holdout": _blobs(root / "holdout", 40, (16, 16), seed=1),
            "same": _blobs(root / "same", 40, (16, 16), seed=2), "different": _blobs(root / "different", 40, (16, 16), seed=3, radius=0.45)}


def _overlap(a: dict, b: dict) -> bool:
    return a["ci95"][0] <= b["ci95"][1] and b["ci95"][0] <= a["ci95"][1]


def test_reference_is_real_vs_held_out_and_knows_the_truth(sets):
    """The reference is evaluate(real, held-out) at the synthetic set's size; a "model" drawing
    from the real distribution scores like it (FD ratio near 1, every interval meets the
    reference's), a model of another distribution scores far from it (ratio > 3, disjoint)."""
    from medgen.metrics.report import evaluate

    kw = {"features": "pca", "bootstrap": 50, "use_cache": False, "metrics": FEATURE_METRICS}
    same = evaluate(sets["real"], sets["same"], None, holdout=sets["holdout"], **kw)
    ref = same["reference"]
    assert ref["n"] == {"real": 40, "held_out": 40, "synthetic": 40} and "model_matched" not in ref
    direct = evaluate(sets["real"], sets["holdout"], None, **kw)["metrics"]  # real vs real, computed as a model's row
    assert ref["metrics"].keys() == same["metrics"].keys() == direct.keys()
    for name, entry in direct.items():
        assert ref["metrics"][name]["value"] == pytest.approx(entry["value"], rel=1e-9), name
    assert ref["metrics"]["kid_pca"]["subset_size"] == same["metrics"]["kid_pca"]["subset_size"] == 40  # 40 a side
    assert 0.33 < ref["ratio"]["fd_pca"] < 3
    assert ref["ratio"]["fd_pca"] == pytest.approx(same["metrics"]["fd_pca"]["value"] / ref["metrics"]["fd_pca"]["value"], rel=1e-3)
    for name in ("fd_pca", "kid_pca"):  # (PRDC intervals hold the manifolds fixed: too narrow for this, see below)
        assert _overlap(same["metrics"][name], ref["metrics"][name]), name
    assert ref["ratio"]["kid_pca"] is None  # the real-vs-real KID's interval holds 0: no ratio to noise

    far = evaluate(sets["real"], sets["different"], None, holdout=sets["holdout"], **kw)
    assert far["reference"]["metrics"] == ref["metrics"]  # the same real-vs-real numbers whatever the model
    assert far["reference"]["ratio"]["fd_pca"] > 3
    assert far["metrics"]["fd_pca"]["ci95"][0] > ref["metrics"]["fd_pca"]["ci95"][1]
    assert far["metrics"]["kid_pca"]["ci95"][0] > ref["metrics"]["kid_pca"]["ci95"][1]
    for name in ("precision", "recall", "density", "coverage"):  # the same-distribution model is nearer real vs real
        gap = lambda rep: abs(rep["metrics"][name]["value"] - ref["metrics"][name]["value"])  # noqa: E731
        assert gap(same) < gap(far), name


def test_fewer_held_out_images_match_sizes_and_say_so(sets, tmp_path):
    """12 held-out images for 40 synthetic ones: the reference uses all 12, the model is also
    scored on 12 synthetic images, and the ratio divides those at equal sizes."""
    from medgen.metrics.report import evaluate

    few = tmp_path / "few"
    few.mkdir()
    for f in sorted(sets["holdout"].iterdir())[:12]:
        shutil.copy(f, few)
    rep = evaluate(sets["real"], sets["different"], None, holdout=few, features="pca", bootstrap=0, use_cache=False, metrics=("fid", "kid"))
    ref = rep["reference"]
    assert ref["n"] == {"real": 40, "held_out": 12, "synthetic": 40} and ref["holdout"]["n"] == 12
    assert ref["metrics"]["kid_pca"]["subset_size"] == ref["model_matched"]["kid_pca"]["subset_size"] == 12
    assert rep["metrics"]["kid_pca"]["subset_size"] == 40
    assert ref["ratio"]["fd_pca"] == pytest.approx(ref["model_matched"]["fd_pca"]["value"] / ref["metrics"]["fd_pca"]["value"], rel=1e-3)
    assert any("only 12 held-out images for 40 synthetic" in n for n in rep["notes"])


def test_eval_cli_writes_both_columns_and_one_figure(sets, tmp_path, capsys):
    from medgen.cli import main
    from medgen.metrics.report import _rows, metrics_figure

    out = tmp_path / "report"
    code = main(["eval", "--real", str(sets["real"]), "--fake", str(sets["different"]), "--holdout", str(sets["holdout"]),
                 "--out", str(out), "--features", "pca", "--bootstrap", "20", "--msssim-pairs", "10", "--no-cache"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| real vs real" in printed and "| ratio" in printed
    report = json.loads((out / "report.json").read_text())
    assert set(report["reference"]["metrics"]) == set(report["metrics"]) - {"msssim_real"}
    md = (out / "report.md").read_text()
    assert "| metric | model | 95% CI | real vs real | 95% CI | ratio | better |" in md
    fd_row = next(line for line in md.splitlines() if line.startswith("| fd_pca |"))
    assert f"{report['reference']['ratio']['fd_pca']:.4g}" in fd_row and "| lower |" in fd_row

    fig = metrics_figure(report)
    panels = [key for key, _, _ in _rows(report["metrics"]) if key != "msssim_real"]  # msssim_real: the target line
    assert len(fig.axes) == len(panels) == 7
    for ax, key in zip(fig.axes, panels):
        assert key in ax.get_title()
        assert "better" in ax.get_title() or "best" in ax.get_title()
        assert [t.get_text() for t in ax.get_xticklabels()] == ["model", "real\nvs real"]
        assert sum(len(line.get_xdata()) for line in ax.lines) >= 2, f"panel {key} draws no point"
    with Image.open(out / "metrics.png") as png:  # the figure written is this one
        assert png.size == tuple(round(s * 110) for s in fig.get_size_inches())


def test_figure_draws_zero_and_names_what_was_not_computed():
    """recall = 0 still shows its point; a NaN metric says "not computed" (no empty panel)."""
    from medgen.metrics.report import metrics_figure

    entry = lambda v, lo, hi: {"value": v, "ci95": [lo, hi]}  # noqa: E731
    report = {"recipe": {"n_real": 10, "n_fake": 10}, "metrics": {"recall": entry(0.0, 0.0, 0.0), "coverage": {"value": float("nan")}},
              "reference": {"metrics": {"recall": entry(0.6, 0.4, 0.8)}, "n": {"real": 10, "held_out": 10, "synthetic": 10}, "ratio": {}}}
    recall, coverage = metrics_figure(report).axes
    model_point = recall.lines[0]
    assert list(model_point.get_ydata()) == [0.0] and recall.get_ylim()[0] < 0 < recall.get_ylim()[1]
    texts = [t.get_text() for t in coverage.texts]
    assert texts.count("not\ncomputed") == 2  # the model's and the reference's
    assert not coverage.lines


def test_reference_skipped_without_held_out_images(sets, tmp_path):
    from medgen.metrics.report import evaluate, metrics_figure, summary_rows

    rep = evaluate(sets["real"], sets["same"], tmp_path / "r", features="pca", bootstrap=0, use_cache=False, metrics=("fid",))
    assert set(rep["reference"]) == {"skipped"} and "--holdout" in rep["reference"]["skipped"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| metric | value | 95% CI | better |" in md and "Real vs real: no real-vs-real reference" in md
    assert summary_rows(rep)[-1] == ("real vs real", rep["reference"]["skipped"])
    assert "no real-vs-real reference" in metrics_figure(rep)._suptitle.get_text()


def test_held_out_images_must_be_new_and_alike(sets, tmp_path):
    from medgen.metrics.report import evaluate

    mixed = tmp_path / "mixed"
    shutil.copytree(sets["holdout"], mixed)
    shutil.copy(sets["real"] / "img000.png", mixed / "copy.png")
    with pytest.raises(DataError, match="1 of its images are also in the real set"):
        evaluate(sets["real"], sets["same"], None, holdout=mixed, features="pca", bootstrap=0, metrics=("fid",))
    with pytest.raises(DataError, match="held-out images are"):
        evaluate(sets["real"], sets["same"], None, holdout=_blobs(tmp_path / "big", 4, (24, 24), seed=5), features="pca",
                 bootstrap=0, metrics=("fid",))


def test_3d_reference_per_plane(tmp_path):
    """Volumes: the 2.5D distance per plane gets its reference and ratio too, equal to the
    real-vs-held-out evaluation; in-memory sets (as the release passes them) work the same."""
    from medgen.data import load_images
    from medgen.metrics.report import evaluate

    real, hold, fake = (_blobs(tmp_path / n, 6, (12, 12, 12), seed=s, radius=r) for n, s, r in
                        (("real", 0, 0.3), ("hold", 1, 0.3), ("fake", 2, 0.5)))
    kw = {"features": "pca", "features_3d": "pca", "bootstrap": 4, "use_cache": False, "metrics": ("fid",)}
    rep = evaluate(real, fake, None, holdout=hold, **kw)
    direct = evaluate(real, hold, None, **kw)["metrics"]["fd_pca_2.5d"]
    ref = rep["reference"]
    for plane in ("xy", "zx", "yz", "mean"):
        assert ref["metrics"]["fd_pca_2.5d"][plane]["value"] == pytest.approx(direct[plane]["value"], rel=1e-9)
        ratio = ref["ratio"][f"fd_pca_2.5d/{plane}"]
        assert ratio == pytest.approx(rep["metrics"]["fd_pca_2.5d"][plane]["value"] / direct[plane]["value"], rel=1e-3)
    tensors = evaluate(*(load_images(p)[0] for p in (real, fake)), None, holdout=load_images(hold)[0], **kw)
    assert tensors["reference"]["ratio"] == pytest.approx(ref["ratio"], rel=1e-6)
    assert math.isfinite(tensors["reference"]["metrics"]["fd_pca"]["value"])
    with pytest.raises(DataError, match="also in the real set"):
        leaky = torch.cat([load_images(hold)[0], load_images(real)[0][:1]])  # a real image among the held-out ones
        evaluate(load_images(real)[0], load_images(fake)[0], None, holdout=leaky, **kw)
