"""`medgen release`: fails closed (audit, training data, leaks, interruptions), `--overwrite` as every
medgen output, a checked manifest and a data card that names nothing of the real data; the demo
ends with a release.

The slow tests share one `medgen demo --quick` (module fixture) and re-release its run."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from medgen.cli import main
from medgen.errors import ConfigError, DataError, RunError

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.channels=[16,32]", "model.num_res_blocks=1", "model.attention_levels=[false,true]",
              "model.head_channels=16", "model.norm_groups=8"]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def leftovers(folder: Path) -> list[str]:
    """Anything in `folder` that looks like a release or a piece of one (temp folders included)."""
    return sorted(p.name for p in folder.iterdir() if "release" in p.name or p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------- fast checks


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cohort_2d):
    """A run folder as far as the release's checks read it: split.json of the 12-subject cohort
    (10 train, 1 val, 1 holdout) and the data config (no model: nothing here gets to sampling)."""
    from medgen.data import make_splits, save_split, scan_dataset
    from medgen.io import atomic_write_json

    run = tmp_path_factory.mktemp("release") / "run"
    samples = scan_dataset(cohort_2d)
    save_split(make_splits(samples), samples, run / "split.json", {"data": str(cohort_2d)})
    atomic_write_json(run / "model" / "config.json", {"kind": "diffusion", "data": {"path": str(cohort_2d), "shape": [32, 32]}})
    return run


def _manifest(path: Path, samples) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "subject_id"])
        w.writerows([str(s.path), s.subject_id] for s in samples)
    return path


def test_training_data_must_be_the_runs(tiny_run, cohort_2d, tmp_path):
    from medgen.data import load_split, scan_dataset
    from medgen.release.pipeline import training_sets

    split = load_split(tiny_run / "split.json")
    samples = scan_dataset(cohort_2d)
    by_split = {k: [s for s in samples if s.subject_id in set(v)] for k, v in split.items()}
    train = _manifest(tmp_path / "train.csv", by_split["train"])
    holdout = _manifest(tmp_path / "holdout.csv", by_split["holdout"] + by_split["val"])
    t, h, cfg, info = training_sets(tiny_run, train, holdout)
    assert sorted(s.subject_id for s in t) == sorted(split["train"]) and len(h) == 2 and cfg["shape"] == [32, 32]
    assert info["split_json_sha256"] == hashlib.sha256((tiny_run / "split.json").read_bytes()).hexdigest()

    with pytest.raises(RunError, match=r"does not match the training data .*: 2 subject\(s\) of --train were not trained on"):
        training_sets(tiny_run, cohort_2d, holdout)  # the whole cohort: held-out subjects too
    short = _manifest(tmp_path / "short.csv", by_split["train"][1:])
    with pytest.raises(RunError, match=rf"1 of the run's 10 training subjects are not in --train \({by_split['train'][0].subject_id}\)"):
        training_sets(tiny_run, short, holdout)
    leaky = _manifest(tmp_path / "leaky.csv", by_split["holdout"] + by_split["train"][:1])
    with pytest.raises(RunError, match=r"--holdout .*: 1 subject\(s\) were trained on"):
        training_sets(tiny_run, train, leaky)
    with pytest.raises(RunError, match="pass both --train and --holdout, or neither"):
        training_sets(tiny_run, train, None)


def test_training_data_is_matched_by_content_not_names(tiny_run, cohort_2d, tmp_path):
    """Issue 22 #2: a cohort made with another seed has the same subject ids and file names but
    other images. Passed as --train, or as the run's moved dataset (--data), it is refused:
    split.json records every file's sha256."""
    from medgen.data import load_split, scan_dataset
    from medgen.data.cohort import synth_brain
    from medgen.privacy.audit import run_split
    from medgen.release.pipeline import training_sets

    assert json.loads((tiny_run / "split.json").read_text())["sha256"]
    other = synth_brain(tmp_path / "other", n=12, dims=2, size=32, seed=1)  # same ids and names, other images
    split = load_split(tiny_run / "split.json")
    by_split = lambda root: {k: [s for s in scan_dataset(root) if s.subject_id in set(v)] for k, v in split.items()}  # noqa: E731
    mine, theirs = by_split(cohort_2d), by_split(other)
    assert [s.path.name for s in mine["train"]] == [s.path.name for s in theirs["train"]]
    holdout = _manifest(tmp_path / "holdout.csv", mine["holdout"] + mine["val"])
    with pytest.raises(RunError, match=r"names but not its content .*: 10 of 10 file\(s\) differ"):
        training_sets(tiny_run, _manifest(tmp_path / "train.csv", theirs["train"]), holdout)
    with pytest.raises(DataError, match="not the ones the run recorded"):
        run_split(tiny_run, data=other)
    # a held-out file that is a training file under another name: refused too
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "new_patient.png").write_bytes(mine["train"][0].path.read_bytes())
    leaky = _manifest(tmp_path / "leaky.csv", mine["holdout"] + scan_dataset(renamed))
    with pytest.raises(RunError, match="byte-identical to training files"):
        training_sets(tiny_run, _manifest(tmp_path / "train.csv", mine["train"]), leaky)


def test_policy():
    from medgen.release.pipeline import ReleasePolicy

    assert ReleasePolicy.parse("max_copy_rate=0.01, max_rounds=3, bound=null-adjusted") == \
        ReleasePolicy(max_copy_rate=0.01, max_rounds=3, bound="null-adjusted")
    assert ReleasePolicy.parse("") == ReleasePolicy() and ReleasePolicy().max_copy_rate == 0.05
    for bad, message in (("max_copy=0", "key one of alpha, audit_samples, bound, max_copy_rate"), ("alpha=2", "must be in"),
                         ("max_rounds=0", ">= 1"), ("max_copy_rate=x", "expected a number"), ("alpha=", "alpha=\\(empty\\): expected a number"),
                         ("alpha=none", "expected a number"), ("alpha=nan", "expected a number"), ("max_copy_rate=0", "a bound is never 0"),
                         ("bound=loose", "one of conservative, null-adjusted"), ("audit_samples=1.5", "expected a whole number")):
        with pytest.raises(ConfigError, match=message):
            ReleasePolicy.parse(bad)


def test_leak_check_finds_real_names(tmp_path):
    from medgen.release.card import find_leaks

    ids = {"sub-0007", "sub-0007.png", "1234567"}
    (tmp_path / "data_card.json").write_text('{"n": 16, "p": 0.1234567, "tau": 0.98, "note": "synthetic_00007.png"}')
    assert find_leaks(tmp_path, ids) == []  # numbers and neutral names are not identifiers
    (tmp_path / "DATA_CARD.md").write_text("nearest training image: /data/sub-0007.png")
    (tmp_path / "id_1234567.png").write_bytes(b"")
    assert find_leaks(tmp_path, ids) == ["DATA_CARD.md: sub-0007.png", "file name id_1234567.png: 1234567"]


def test_data_folder_names_are_withheld_and_checked(tmp_path):
    """Issue 22 #5: a run trained with data.path=StMary_2019_patients (relative, no '/') and a
    detector trained on StMary_train: the card withholds both, and the leak check knows the
    folders' names (not generic ones like data or cohort, which the card's own words contain)."""
    from medgen.release.card import WITHHELD, find_leaks, folder_names, withhold_paths

    config = {"data": {"path": "StMary_2019_patients", "shape": [32, 32]}, "autoencoder": {"run": "ae_run"},
              "detector": {"recipe": {"training": {"train": "StMary_train", "steps": 500}}}, "note": "half-samples / bootstrap"}
    held = withhold_paths(config)
    assert held["data"] == {"path": WITHHELD, "shape": [32, 32]} and held["autoencoder"]["run"] == WITHHELD
    assert held["detector"]["recipe"]["training"] == {"train": WITHHELD, "steps": 500} and held["note"] == config["note"]
    names = folder_names("StMary_2019_patients", Path("/x/StMary_train"), "data", Path("runs/cohort"), Path("/y/Hospital_A/manifest.csv"))
    assert names == {"StMary_2019_patients", "StMary_train", "Hospital_A"}
    (tmp_path / "data_card.json").write_text(json.dumps({"training data": "cohort data", "trained_on": "StMary_2019_patients"}))
    assert find_leaks(tmp_path, names) == ["data_card.json: StMary_2019_patients"]


def test_overwrite_refuses_before_any_work(tiny_run, tmp_path, capsys):
    out = tmp_path / "rel"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "release", "--run", tiny_run, "--n", "4", "--out", out)
    assert code == 2 and "release folder" in err and "already holds files; pass --overwrite" in err
    code, _, err = run_cli(capsys, "release", "--run", tiny_run, "--n", "4", "--out", out, "--overwrite")
    assert code == 2 and "it did not write: notes.txt" in err
    code, _, err = run_cli(capsys, "release", "--run", tiny_run, "--n", "4", "--out", tiny_run / "rel")
    assert code == 2 and "overlaps the --run input" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and not (tiny_run / "rel").exists()


# ----------------------------------------------------------------------------- the quick demo's release


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`medgen demo --quick` in a fresh folder: (folder, its stdout)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo") / "demo"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["demo", "--quick", "--out", str(out)])
    assert code == 0, buf.getvalue()[-3000:]
    return out, buf.getvalue()


def _release_args(out: Path, *extra) -> list[str]:
    """The quick demo's run is a latent one: the default union (pixel-rank, latent) trains nothing."""
    return ["release", "--run", str(out / "diffusion"), "--holdout-splits", "holdout,val", "--bootstrap", "0", "--device", "cpu", *extra]


def _copying_model(monkeypatch, out: Path, kind: str):
    """Wrap the demo run's sampler so that a fifth of its outputs (every sample index divisible by
    5) are copies of training images: `exact` the images themselves (a pixel model that memorized
    them), `autoencoder` their round trips through the run's own autoencoder (a latent model that
    reproduces a training latent). The other outputs are the model's own samples."""
    from medgen.data import load_images
    from medgen.privacy.audit import run_split
    from medgen.privacy.families import run_roundtrip
    from medgen.sample.pipeline import DiffusionPipeline

    train, _, cfg = run_split(out / "diffusion", ("holdout", "val"))
    x_t = load_images(train, cfg)[0]
    roundtrip = run_roundtrip(out / "diffusion")
    own = DiffusionPipeline.sample_batches

    def sample_batches(self, n, *args, seed=0, **kwargs):
        i = seed  # batches come in index order: sample index i used seed i
        for x in own(self, n, *args, seed=seed, **kwargs):
            for j in range(len(x)):
                if (i + j) % 5 == 0:
                    source = x_t[((i + j) // 5) % len(x_t)][None]
                    x[j] = (source if kind == "exact" else roundtrip(source))[0]
            i += len(x)
            yield x

    monkeypatch.setattr(DiffusionPipeline, "sample_batches", sample_batches)


@pytest.mark.slow
def test_quick_demo_ends_with_a_release_and_a_summary(demo):
    out, stdout = demo
    release = out / "release"
    assert (release / "DATA_CARD.md").is_file() and (release / "data_card.json").is_file()
    assert json.loads((out / "demo.json").read_text())["state"]["release"] == str(release)
    summary = stdout[stdout.index("[demo] summary"):]
    assert re.search(r"audit verdict\s+pass", summary) and re.search(rf"release\s+{re.escape(str(release))}", summary)
    assert re.search(r"fd_pca\s+\d", summary) and "precision" in summary
    # the demo model is class-conditional: a balanced labelled release, each file labelled as it was sampled
    card = json.loads((release / "data_card.json").read_text())
    rows = list(csv.DictReader(open(release / "manifest.csv")))
    k = card["model"]["num_classes"]
    assert k >= 2 and card["dataset"]["label"] == "all"
    assert [int(r["label"]) for r in rows] == [(int(r["seed"]) - card["sampling"]["seed"]) % k for r in rows]
    assert card["dataset"]["classes"] == {str(c): sum(int(r["label"]) == c for r in rows) for c in range(k)}
    assert max(card["dataset"]["classes"].values()) - min(card["dataset"]["classes"].values()) <= 1
    described = [part.split(" (", 1)[0] for part in card["dataset"]["manifest"].split(": ", 1)[1].split("; ")]
    assert described == list(rows[0])  # the card describes the manifest's columns, in order
    # the card: each metric beside real vs real, and the utility (train on synthetic vs on real, tested on held-out)
    md = (release / "DATA_CARD.md").read_text()
    rvr, utility = card["metrics"]["real_vs_real"], card["metrics"]["utility"]
    assert "| metric | model | 95% interval |" in md and "| real vs real | 95% interval | ratio | better |" in md
    assert re.search(r"\| fd_pca \| \d[\d.]* \| \[.*\] \|( \d[\d.]* \|)? \d[\d.]* \| \[.*\] \| \d[\d.]* \| lower \|", md)
    assert f"| {rvr['ratio']['fd_pca']:.4g} | lower |" in md and f"with {rvr['n']['held_out']} held-out real images" in md
    assert set(utility["settings"]) == {"tstr", "trtr"} and utility["test"]["n"] == card["training_data"]["n_holdout_images"]
    assert re.search(r"\| synthetic \(TSTR\) \| \d+ \| \d\.\d{3} \[", md) and re.search(r"\| real \(TRTR\) \| \d+ \| \d\.\d{3} \[", md)
    assert re.search(r"released \d+ samples: .*; utility: TSTR AUROC \d\.\d{3} \[.*\]; TRTR AUROC \d\.\d{3} \[", stdout)
    # the probe's line: the paired difference over 2 images with its interval, and a verdict
    assert re.search(r"probe projection R=8\s+PSNR [+-]\d\.\d\d dB at eps 0\.08 .*worst - random [+-]\d\.\d\d dB, "
                     r"95% CI \[.*\], n=2\): (transfers|no evidence of transfer)", summary), summary


@pytest.mark.slow
def test_manifest_checksums_match_the_files(demo):
    from medgen.data import scan_dataset

    release = demo[0] / "release"
    card = json.loads((release / "data_card.json").read_text())
    rows = list(csv.DictReader(open(release / "manifest.csv")))
    assert len(rows) == card["dataset"]["n"] == 16
    assert [r["file"] for r in rows] == [f"synthetic_{j:05d}.png" for j in range(16)]
    images = sorted(p.name for p in release.glob("*.png") if p.name != "grid.png")
    assert images == [r["file"] for r in rows]
    for r in rows:
        assert hashlib.sha256((release / r["file"]).read_bytes()).hexdigest() == r["sha256"]
    seeds = [int(r["seed"]) for r in rows]
    assert len(set(seeds)) == 16 and seeds == sorted(seeds)  # sample index i used seed 0 + i, in order
    kept = sum(r["kept"] for r in card["rounds"])
    assert kept >= 16 and card["dropped"]["sampled"] == sum(r["sampled"] for r in card["rounds"])
    assert len(scan_dataset(release)) == 16  # a sample directory other commands read
    model = demo[0] / "diffusion" / "model" / "model.safetensors"
    assert card["model"]["checkpoint_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert {r["checkpoint_sha256"] for r in rows} == {card["model"]["checkpoint_sha256"]}


@pytest.mark.slow
def test_data_card_names_nothing_of_the_cohort(demo):
    from PIL import Image

    from medgen.data import scan_dataset

    out = demo[0]
    release = out / "release"
    cohort = scan_dataset(out / "cohort")
    names = {s.subject_id for s in cohort} | {s.path.name for s in cohort} | {str(out / "cohort")}
    assert len(names) >= 64
    card = json.loads((release / "data_card.json").read_text())
    for path in release.rglob("*"):
        rel = path.relative_to(release).as_posix()
        text = path.read_text(errors="replace") if path.suffix in (".csv", ".json", ".md") else ""
        hits = [n for n in names if n in rel or n in text]
        assert not hits, (rel, hits[:3])
        if path.suffix == ".png":  # metadata names nothing of the cohort; a sample's is its synthetic markers (issue 23)
            info = Image.open(path).info
            assert not [n for n in names if n in str(info)]
            if path.name != "grid.png":
                assert set(info) == {"Description", "Software", "Release ID"} and info["Release ID"] == card["output"]["release_id"]
    assert card["model"]["resolved_config"]["data"]["path"] == "[withheld]"
    for key in ("metrics", "audit", "rounds", "dropped", "software", "intended_use", "limitations", "sampling"):
        assert card[key], key
    a = card["audit"]
    assert a["verdict"] == "pass" and set(a["tau"]) == {"pixel-rank", "latent"}
    assert a["control_recall"] == pytest.approx(a["control"]["caught"] / a["control"]["n"], abs=1e-4) == a["bound"]["recall"]
    assert a["bound"]["upper_pct"] <= 100 * a["policy"]["max_copy_rate"] and a["bound"]["n_samples"] >= 400
    assert a["decoded_calibration"] and "latent" in a["control"]["by_detector"]
    assert card["software"]["torch"] == torch.__version__.split("+")[0] or card["software"]["torch"].startswith(torch.__version__[:3])
    assert "fd_pca" in card["metrics"]["values"] and card["metrics"]["values"]["fd_pca"]["ci95"]
    md = (release / "DATA_CARD.md").read_text()
    for heading in ("## Motivation", "## Composition", "### Privacy audit", "### Rounds", "## Uses", "### Limitations", "### Software"):
        assert heading in md
    # the demo's own card (issue 23): written as card.yaml beside the release, every field provided
    from medgen.release.commands import DEMO_CARD

    assert card["steward"] == DEMO_CARD and card["not_provided"] == [] and "not provided" not in md
    assert md.startswith("---\nlicense: cc-by-4.0\n") and (out / "card.yaml").is_file()
    image_shape = json.loads((out / "diffusion" / "model" / "config.json").read_text())["image_shape"]
    assert [card["dataset"]["channels"], *card["dataset"]["shape"]] == image_shape
    assert f"- each image: {' x '.join(map(str, image_shape[1:]))} pixels, 1 channel, " in md
    assert f"At 97.5% confidence, at most {a['bound']['upper_pct']:.2f}% of this model's outputs are copies" in md


@pytest.mark.slow
def test_models_that_copy_a_fifth_are_refused_and_every_attempt_is_on_the_record(demo, capsys, monkeypatch):
    """A model whose outputs are 20% exact training images, and one whose outputs are 20% round
    trips of training images through its own autoencoder: both releases are refused (exit 1 or 3),
    nothing is written (an existing release under --overwrite stays as it was), and both attempts
    are in the run's log. The next, honest release is attempt 3: it is judged at alpha / 2^3 and
    its card lists the refused attempts."""
    from medgen.privacy.attempts import read_attempts

    out = demo[0]
    run = out / "diffusion"
    before = {p.name: p.read_bytes() for p in (out / "release").iterdir()}
    first = len([a for a in read_attempts(run) if a.get("kind") == "release" and a.get("event") == "start"])
    for kind in ("exact", "autoencoder"):
        with monkeypatch.context() as m:
            _copying_model(m, out, kind)
            code, _, err = run_cli(capsys, *_release_args(out, "--n", "16", "--out", out / "release", "--overwrite"))
        # refused: `fail`, or `inconclusive` when the quick demo's 23 held-out images cannot make the
        # excess significant at this attempt's alpha; either way the bound is far above the policy
        assert code in (1, 3) and "release refused (nothing written)" in err and re.search(r"verdict: (fail|inconclusive)", err), err[-2000:]
        assert {p.name: p.read_bytes() for p in (out / "release").iterdir()} == before
        assert leftovers(out) == ["release"]
    verdicts = [a for a in read_attempts(run) if a.get("kind") == "release" and a.get("event") == "verdict"]
    assert {a["verdict"] for a in verdicts[-2:]} <= {"fail", "inconclusive"} and [a["attempt"] for a in verdicts[-2:]] == [first + 1, first + 2]
    assert all(a["bound_upper_pct"] > 15 for a in verdicts[-2:])  # a fifth copied: the bound says so

    code, _, err = run_cli(capsys, *_release_args(out, "--n", "16", "--out", out / "release_honest", "--card", out / "card.yaml",
                                                  "--card-field", "contact=steward@example.org"))
    card = json.loads((out / "release_honest" / "data_card.json").read_text())
    assert card["steward"]["contact"] == "steward@example.org" and card["steward"]["license"] == "CC-BY-4.0"  # the field over the file
    a = card["audit"]
    assert code == 0 and a["attempt"] == first + 3 and a["alpha_used"] == pytest.approx(0.05 / 2 ** (first + 3))
    refused = [e for e in a["earlier_attempts"] if e.get("kind") == "release" and e.get("released") is False]
    assert len(refused) >= 2 and all(e["verdict"] in ("fail", "inconclusive") for e in refused[-2:])
    assert "refused" in (out / "release_honest" / "DATA_CARD.md").read_text()
    shutil.rmtree(out / "release_honest")


@pytest.mark.slow
def test_an_interrupted_release_leaves_nothing(demo, capsys, monkeypatch):
    import medgen.privacy.verdict as verdict

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(verdict, "judge", interrupted)  # round 1's files are written, its audit is under way
    code, _, err = run_cli(capsys, *_release_args(demo[0], "--n", "4", "--out", demo[0] / "release_interrupted"))
    assert code == 130 and leftovers(demo[0]) == ["release"]


@pytest.mark.slow
def test_a_card_that_would_name_a_patient_refuses_the_release(demo, capsys, monkeypatch):
    import medgen.release.card as card

    subject = json.loads((demo[0] / "diffusion" / "split.json").read_text())["subjects"]["train"][0]
    build = card.build_card

    def careless(**kwargs):  # a card that slipped a subject id into a note
        return {**build(**kwargs), "note": f"closest training subject {subject}"}

    monkeypatch.setattr(card, "build_card", careless)
    code, _, err = run_cli(capsys, *_release_args(demo[0], "--n", "16", "--out", demo[0] / "release_leak"))
    assert code == 1 and f"the release would name real data: data_card.json: {subject}" in err
    assert leftovers(demo[0]) == ["release"]


def test_quality_floor_is_coverage_relative_to_held_out_patients(tmp_path):
    """Issue 22 #8/#16: other patients cover the training images as well as held-out patients do
    (ratio near 1); blobs (a model that learned nothing) cover none of them: below the default floor."""
    from medgen.data import load_images
    from medgen.data.cohort import synth_brain
    from medgen.privacy.families import gaussian_blur
    from medgen.release.pipeline import ReleasePolicy, relative_coverage

    x, _ = load_images(synth_brain(tmp_path / "c", n=90, dims=2, size=32, seed=4))
    train, holdout, others = x[:50], x[50:70], x[70:]
    honest = relative_coverage(train, holdout, others)
    assert honest["m"] == 20 and 0.6 <= honest["ratio"] <= 1.6, honest
    g = torch.Generator().manual_seed(0)
    blobs = torch.stack([gaussian_blur(v, 3.0) for v in torch.randn((20, 1, 32, 32), generator=g)]).mul(4).clamp(-1, 1)
    poor = relative_coverage(train, holdout, blobs)
    assert poor["coverage"] < 0.1 and poor["ratio"] < ReleasePolicy().min_coverage, poor


def test_labelled_rounds_keep_each_file_its_label(tmp_path):
    """--label all across rounds: index g is sampled as class g mod K (what `medgen sample --label
    all` gives sample g of one folder), the release takes each class's share although round 1
    dropped every class-0 sample, and each released file (its content: its index) is moved with
    its own seed and label."""
    import types

    from medgen.release.pipeline import ROUNDS, choose_released, index_labels, move_released_files
    from medgen.sample.pipeline import cycled_labels, sample_name

    k, n, seed, output = 3, 7, 100, types.SimpleNamespace(suffix=".png")
    rounds = [{"indices": [0, 10]}, {"indices": [10, 16]}]
    labels = [index_labels("all", k, a, b - a) for a, b in (r["indices"] for r in rounds)]
    assert sum(labels, []) == cycled_labels(types.SimpleNamespace(num_classes=k), 16)
    for r, (a, b) in enumerate(r["indices"] for r in rounds):
        (tmp_path / ROUNDS / f"round_{r + 1}").mkdir(parents=True)
        for g in range(a, b):
            (tmp_path / ROUNDS / f"round_{r + 1}" / sample_name(g - a, output)).write_text(str(g))
    kept = [g for g in range(16) if g not in (0, 3, 6)]  # round 1's class-0 samples were dropped
    chosen = choose_released(kept, n, k)
    assert chosen == [1, 2, 4, 5, 9, 12, 15]  # classes 0, 1, 2: 3, 2, 2 (as cycled_labels of 7 samples)
    rows = list(csv.DictReader(io.StringIO(move_released_files(tmp_path, rounds, chosen, output, seed, {"label": ""},
                                                               [g % k for g in chosen]))))
    for j, row in enumerate(rows):
        g = int((tmp_path / row["file"]).read_text())
        assert row["file"] == f"synthetic_{j:05d}.png" and g == chosen[j]
        assert int(row["seed"]) == seed + g and int(row["label"]) == sum(labels, [])[g]
    assert choose_released(kept, n) == kept[:n]  # one label or none: the first n kept


def test_label_all_needs_a_class_conditional_model(tiny_run, tmp_path, capsys, monkeypatch):
    """--label all on an unconditional model: a clear error before the audit is fitted."""
    import types

    import medgen.privacy.calibration as calibration
    import medgen.sample.pipeline as sample_pipeline

    monkeypatch.setattr(calibration.CopyAudit, "fit", lambda *a, **k: pytest.fail("the audit was fitted"))
    monkeypatch.setattr(sample_pipeline, "load_pipeline", lambda *a, **k: types.SimpleNamespace(num_classes=0))
    code, _, err = run_cli(capsys, "release", "--run", tiny_run, "--n", "4", "--out", tmp_path / "rel", "--label", "all")
    assert code == 2 and "this model is unconditional; --label all needs a class-conditional model" in err, err
    assert not (tmp_path / "rel").exists()


def test_bad_arguments_are_refused_before_any_work(tiny_run, tmp_path, capsys, monkeypatch):
    """Issue 22 #8/#10: counts, seeds and policy values are checked before the audit is fitted
    (here the run has no model: reaching the sampler or the audit would be another error)."""
    import medgen.privacy.calibration as calibration

    monkeypatch.setattr(calibration.CopyAudit, "fit", lambda *a, **k: pytest.fail("the audit was fitted"))
    for extra, message in ((["--batch-size", "0"], "--batch-size 0: expected an integer >= 1"),
                           (["--steps", "0"], "--steps 0: expected an integer >= 1"),
                           (["--seed", str(2**64)], "--seed 18446744073709551616: expected an integer from 0"),
                           (["--policy", "alpha="], "alpha=(empty): expected a number"),
                           (["--policy", "max_copy_rate=0"], "a bound is never 0")):
        code, _, err = run_cli(capsys, "release", "--run", tiny_run, "--n", "4", "--out", tmp_path / "rel", *extra)
        assert code == 2 and message in err and err.count("\n") == 1, (extra, err)
    assert not (tmp_path / "rel").exists()


@pytest.mark.slow
def test_killed_releases_leave_nothing_usable(demo):
    """Issue 20 #6: SIGTERM (timeout, Slurm, docker stop) mid-round removes the staging folder,
    round files included (exit 143); a kill -9 leaves it, and the next release of that --out
    sweeps it before it does anything else, even when it is refused."""
    import signal
    import subprocess
    import sys
    import time

    out = demo[0]
    target = out / "release_killed"
    argv = [sys.executable, "-m", "medgen", *_release_args(out, "--n", "16", "--out", str(target))]

    def start_mid_round():
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 600
        while time.time() < deadline:
            files = list(out.glob(f".{target.name}.*.tmp/.rounds/round_1/*"))
            if files:
                return proc, files
            if proc.poll() is not None:
                pytest.fail(f"the release ended before its first round was written: {proc.stderr.read()[-2000:]}")
            time.sleep(0.1)
        proc.kill()
        pytest.fail("no round files within 10 minutes")

    proc, _ = start_mid_round()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 143
    assert not list(out.glob(f".{target.name}*.tmp")) and not target.exists()

    proc, files = start_mid_round()
    proc.kill()
    proc.wait(60)
    assert list(out.glob(f".{target.name}.*.tmp")) and any(f.exists() for f in files)  # kill -9: nothing can clean up
    refused = subprocess.run([*argv, "--policy", "max_copy_rate=0.0001"], capture_output=True, text=True, timeout=900)
    assert refused.returncode in (1, 3), refused.stderr[-2000:]
    assert not list(out.glob(f".{target.name}*.tmp")) and not target.exists()
