"""`medgen release`: fails closed (audit, training data, leaks, interruptions), `--overwrite` as every
medgen output, a checked manifest and a data card that names nothing of the real data; the demo
ends with a release.

The slow tests share one `medgen demo --quick` (module fixture) and re-release its run."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from medgen.cli import main
from medgen.errors import ConfigError, RunError

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


def test_policy():
    from medgen.release.pipeline import ReleasePolicy

    assert ReleasePolicy.parse("max_copy_rate=0, max_rounds=3") == ReleasePolicy(max_copy_rate=0.0, max_rounds=3)
    assert ReleasePolicy.parse("") == ReleasePolicy()
    for bad, message in (("max_copy=0", "key one of alpha, max_copy_rate"), ("alpha=2", "must be in"),
                         ("max_rounds=0", ">= 1"), ("max_copy_rate=x", "not a number")):
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
    return ["release", "--run", str(out / "diffusion"), "--holdout-splits", "holdout,val", "--detector",
            f"{out / 'audit' / 'detector'},pixel-rank", "--bootstrap", "0", "--device", "cpu", *extra]


@pytest.mark.slow
def test_quick_demo_ends_with_a_release_and_a_summary(demo):
    out, stdout = demo
    release = out / "release"
    assert (release / "DATA_CARD.md").is_file() and (release / "data_card.json").is_file()
    assert json.loads((out / "demo.json").read_text())["state"]["release"] == str(release)
    summary = stdout[stdout.index("[demo] summary"):]
    assert re.search(r"audit verdict\s+pass", summary) and re.search(rf"release\s+{re.escape(str(release))}", summary)
    assert re.search(r"fd_pca\s+\d", summary) and "precision" in summary


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
    for path in release.rglob("*"):
        rel = path.relative_to(release).as_posix()
        text = path.read_text(errors="replace") if path.suffix in (".csv", ".json", ".md") else ""
        hits = [n for n in names if n in rel or n in text]
        assert not hits, (rel, hits[:3])
        if path.suffix == ".png":
            assert not Image.open(path).info  # no text chunks, no metadata of any kind
    card = json.loads((release / "data_card.json").read_text())
    assert card["model"]["resolved_config"]["data"]["path"] == "[withheld]"
    for key in ("metrics", "audit", "rounds", "dropped", "software", "intended_use", "limitations", "sampling"):
        assert card[key], key
    a = card["audit"]
    assert a["verdict"] == "pass" and a["control_recall"] == 1.0 and set(a["tau"]) == {"ssl", "pixel-rank"}
    assert card["software"]["torch"] == torch.__version__.split("+")[0] or card["software"]["torch"].startswith(torch.__version__[:3])
    assert "fd_pca" in card["metrics"]["values"] and card["metrics"]["values"]["fd_pca"]["ci95"]
    md = (release / "DATA_CARD.md").read_text()
    for heading in ("## Intended use", "## Privacy audit", "## Rounds", "## Limitations", "## Software"):
        assert heading in md


@pytest.mark.slow
def test_planted_copies_are_refused_and_leave_the_release_alone(demo, capsys, monkeypatch):
    """A "model" whose every other sample is a training image: the audit fails, the release is
    refused with exit 1, a new --out is never created, and an existing release under --overwrite
    stays as it was. An interrupted release leaves nothing either."""
    from medgen.data import load_images
    from medgen.privacy.audit import run_split
    from medgen.sample.pipeline import DiffusionPipeline

    out = demo[0]
    train, holdout, cfg = run_split(out / "diffusion", ("holdout", "val"))
    x_t, x_h = load_images(train, cfg)[0], load_images(holdout, cfg)[0]

    def copying_sample(self, n, *args, seed=0, **kwargs):  # index i -> a training image (even) or a new patient (odd)
        return torch.stack([x_t[i % len(x_t)] if i % 2 == 0 else x_h[i % len(x_h)] for i in range(seed, seed + n)])

    monkeypatch.setattr(DiffusionPipeline, "sample", copying_sample)
    before = {p.name: p.read_bytes() for p in (out / "release").iterdir()}
    code, _, err = run_cli(capsys, *_release_args(out, "--n", "16", "--out", out / "release", "--overwrite"))
    assert code == 1 and "release refused (nothing written)" in err and "verdict: fail" in err
    assert {p.name: p.read_bytes() for p in (out / "release").iterdir()} == before
    code, _, err = run_cli(capsys, *_release_args(out, "--n", "16", "--out", out / "release_copies"))
    assert code == 1 and leftovers(out) == ["release"]

    monkeypatch.undo()
    import medgen.privacy.verdict as verdict

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(verdict, "judge", interrupted)  # round 1's files are written, its audit is under way
    code, _, err = run_cli(capsys, *_release_args(out, "--n", "4", "--out", out / "release_interrupted"))
    assert code == 130 and leftovers(out) == ["release"]


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
