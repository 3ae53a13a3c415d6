"""Utility (train on synthetic, test on real): AUROC and balanced accuracy against reference
implementations, a classifier that must learn the cohort's atrophy, a real-vs-real control that
must score like real, a shuffled-label control that must score at chance, the inputs it skips or
refuses, `medgen eval --utility` and `medgen sample --label all`."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medgen.cli import main
from medgen.errors import ConfigError, DataError
from medgen.metrics import utility as U

REPO = Path(__file__).resolve().parents[1]


def _manifest(path: Path, samples, labels=None, label_column: bool = True) -> Path:
    """A manifest.csv of cohort images by absolute path, with their labels or `labels`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"] if label_column else ["path"])
        for i, s in enumerate(samples):
            w.writerow([str(s.path), s.label if labels is None else labels[i]] if label_column else [str(s.path)])
    return path


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """120 subjects of the cohort at 32 px, three disjoint sets of 40 (real training, a real
    "synthetic" twin, test), and the twin with labels independent of the truth (in each true
    class, half relabelled 0 and half 1)."""
    from medgen.data import scan_dataset
    from medgen.data.cohort import synth_brain

    root = tmp_path_factory.mktemp("utility")
    samples = scan_dataset(synth_brain(root / "cohort", n=120, dims=2, size=32, seed=0))
    train, twin, test = samples[:40], samples[40:80], samples[80:]
    truth = np.array([s.label for s in twin])
    shuffled = np.zeros_like(truth)
    rng = np.random.default_rng(0)
    for c in (0, 1):
        members = rng.permutation(np.flatnonzero(truth == c))
        shuffled[members[: len(members) // 2]] = 1
    return {"train": _manifest(root / "train.csv", train), "twin": _manifest(root / "twin.csv", twin),
            "test": _manifest(root / "test.csv", test), "shuffled": _manifest(root / "shuffled.csv", twin, shuffled),
            "root": root, "samples": samples}


def test_auroc_and_balanced_accuracy_match_references():
    """AUROC against MONAI's (trapezoid over thresholds), ties included, for 2 and 3 classes; a
    bootstrap batch gives each row's own value; balanced accuracy against the confusion matrix."""
    from monai.metrics import compute_roc_auc

    rng = np.random.default_rng(0)
    for k in (2, 3):
        labels = rng.integers(0, k, 60)
        scores = np.round(rng.dirichlet(np.ones(k), 60) + 0.3 * np.eye(k)[labels], 1)  # rounded: many ties
        scores /= scores.sum(1, keepdims=True)
        want = compute_roc_auc(torch.as_tensor(scores), torch.nn.functional.one_hot(torch.as_tensor(labels), k), average="macro")
        assert U.auroc(scores, labels) == pytest.approx(float(want), abs=1e-12)
        confusion = np.zeros((k, k))
        np.add.at(confusion, (labels, scores.argmax(1)), 1)
        assert U.balanced_accuracy(scores, labels) == pytest.approx(np.mean(np.diag(confusion) / confusion.sum(1)))
        idx = U.stratified_bootstrap(labels, 7, seed=1)  # (7, 60)
        assert (np.sort(labels[idx], axis=1) == np.sort(labels)).all()  # each replicate keeps the class counts
        for fn in (U.auroc, U.balanced_accuracy):
            assert fn(scores[idx], labels[idx]) == pytest.approx([fn(scores[i], labels[i]) for i in idx])
    labels = np.array([0, 0, 1, 1])
    separated = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
    assert U.auroc(separated, labels) == 1.0 and U.auroc(separated[::-1], labels) == 0.0


def test_classifier_learns_atrophy_and_a_real_twin_scores_like_real(sets):
    """TRTR must beat chance clearly; a "synthetic" set of other real subjects must score like
    real (paired difference small, its interval holding 0); mixed trains on both."""
    result = U.synthetic_utility(sets["twin"], sets["train"], sets["test"], mixed=True, seeds=[0], progress=False)
    r, d = result["settings"], result["difference_to_trtr"]
    assert r["trtr"]["auroc"]["ci95"][0] > 0.5 and r["trtr"]["auroc"]["value"] > 0.8
    assert r["trtr"]["balanced_accuracy"]["ci95"][0] > 0.5
    assert abs(d["tstr"]["auroc"]["value"]) < 0.1 and abs(d["tstr"]["balanced_accuracy"]["value"]) < 0.15
    for metric in ("auroc", "balanced_accuracy"):  # the intervals overlap
        (a_lo, a_hi), (b_lo, b_hi) = r["tstr"][metric]["ci95"], r["trtr"][metric]["ci95"]
        assert a_lo <= b_hi and b_lo <= a_hi
    assert (r["tstr"]["n_train"], r["trtr"]["n_train"], r["mixed"]["n_train"]) == (40, 40, 80)
    assert result["test"]["n"] == 40 and sum(result["test"]["classes"].values()) == 40
    assert json.loads(json.dumps(result)) == result  # plain JSON for report.json and the data card
    rows = U.utility_rows(result)
    assert len(rows) == 2 + 3 + 2 and f"{r['tstr']['auroc']['value']:.3f}" in rows[2]


def test_shuffled_labels_score_at_chance(sets):
    """Labels independent of the images teach nothing: the mean over the recipe's three seeds
    (which also averages out the classifier's own noise) is at chance, 0.5 inside its interval."""
    from medgen.data import load_images

    x, samples = load_images(sets["shuffled"])
    x_test, test = load_images(sets["test"])
    y, y_test = torch.tensor([s.label for s in samples]), np.array([s.label for s in test])
    probs = [U.predict(U.train_classifier(x, y, 2, seed, "cpu"), x_test, "cpu") for seed in U.UTILITY_RECIPE["seeds"]]
    results, _ = U.score_settings({"tstr": probs}, y_test, n_boot=1000)
    for metric in ("auroc", "balanced_accuracy"):
        lo, hi = results["tstr"][metric]["ci95"]
        assert lo < 0.5 < hi and abs(results["tstr"][metric]["value"] - 0.5) < 0.15


def test_unlabelled_or_single_class_samples_are_skipped(sets, tmp_path):
    folder = tmp_path / "unconditional"
    folder.mkdir()
    for s in sets["samples"][:4]:
        shutil.copy(s.path, folder / s.path.name)
    result = U.synthetic_utility(folder, sets["train"], sets["test"])
    assert "needs labelled samples" in result["skipped"] and "--label all" in result["skipped"]
    assert "Skipped: utility needs labelled samples" in "\n".join(U.utility_markdown(result))
    one_class = _manifest(tmp_path / "one.csv", sets["samples"][:4], labels=[1] * 4)
    assert "at least two classes" in U.synthetic_utility(one_class, sets["train"], sets["test"])["skipped"]


def test_real_sets_without_labels_are_errors_naming_the_file(sets, tmp_path):
    unlabelled = _manifest(tmp_path / "real" / "manifest.csv", sets["samples"][:40], label_column=False)
    with pytest.raises(DataError, match=f"{unlabelled}.*no labels"):
        U.synthetic_utility(sets["twin"], unlabelled.parent, sets["test"])
    with pytest.raises(DataError, match=f"{unlabelled}.*held-out"):
        U.synthetic_utility(sets["twin"], sets["train"], unlabelled)


def test_eval_utility_cli(sets, tmp_path, monkeypatch, capsys):
    """`medgen eval --utility mixed` writes the section (a 2-step recipe: the plumbing, not the
    numbers); unlabelled samples give a skipped line; --utility without --holdout is refused."""
    monkeypatch.setenv("MEDGEN_OFFLINE", "1")
    monkeypatch.setenv("MEDGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(U.UTILITY_RECIPE, "steps", 2)
    monkeypatch.setitem(U.UTILITY_RECIPE, "seeds", [0])
    base = ["eval", "--real", str(sets["train"]), "--holdout", str(sets["test"]), "--features", "pca", "--metrics", "fid",
            "--bootstrap", "0", "--device", "cpu"]
    assert main([*base, "--fake", str(sets["twin"]), "--out", str(tmp_path / "r"), "--utility", "mixed"]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert set(report["utility"]["settings"]) == {"tstr", "trtr", "mixed"} and report["utility"]["recipe"]["steps"] == 2
    assert "## Utility: train on synthetic, test on real" in (tmp_path / "r" / "report.md").read_text()
    assert "TSTR AUROC" in capsys.readouterr().out
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for s in sets["samples"][40:50]:
        shutil.copy(s.path, folder / s.path.name)
    assert main([*base, "--fake", str(folder), "--out", str(tmp_path / "s"), "--utility"]) == 0
    assert "Skipped: utility needs labelled samples" in (tmp_path / "s" / "report.md").read_text()
    assert main(["eval", "--real", str(sets["train"]), "--fake", str(sets["twin"]), "--out", str(tmp_path / "t"), "--utility"]) == 2
    assert "pass --holdout DIR" in capsys.readouterr().err


def test_sample_label_all_cycles_the_classes(cohort_2d, tmp_path_factory):
    """`--label all`: sample i gets class i mod K (recorded in the manifest) and is the sample
    that `--label K --seed i` makes alone; an unconditional model is refused."""
    from medgen.config import load_config
    from medgen.sample.pipeline import cycled_labels
    from medgen.train.diffusion import DEFAULTS, train_diffusion

    out = tmp_path_factory.mktemp("label_all")
    cfg = load_config(REPO / "configs" / "demo_diffusion_2d_pixel.yaml",
                      ["train.tracker=none", f"data.path={cohort_2d}", "train.max_steps=1", "train.batch_size=4", "sample.n_preview=1",
                       "sample.steps=2", "train.checkpoint_every=1", "train.preview_every=1", "model.channels=[16,32]",
                       "model.num_res_blocks=1", "model.attention_levels=[false,false]", "model.norm_groups=8"], DEFAULTS)
    run = train_diffusion(cfg, out / "run")
    common = ["sample", "--run", str(run), "--device", "cpu", "--steps", "2", "--batch-size", "2"]
    assert main([*common, "--n", "3", "--label", "all", "--out", str(out / "all")]) == 0
    with open(out / "all" / "manifest.csv") as f:
        assert [row["label"] for row in csv.DictReader(f)] == ["0", "1", "0"]
    assert main([*common, "--n", "1", "--label", "1", "--seed", "1", "--out", str(out / "one")]) == 0
    pixels = [np.asarray(Image.open(out / d / f)) for d, f in (("all", "sample_00001.png"), ("one", "sample_00000.png"))]
    assert (pixels[0] == pixels[1]).all()

    class Unconditional:
        num_classes = 0

    with pytest.raises(ConfigError, match="unconditional"):
        cycled_labels(Unconditional(), 4)
