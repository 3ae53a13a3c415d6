"""The data card to the standard (issue 23): Hugging Face metadata as YAML front matter, the
sections of Datasheets for Datasets, what medgen knows filled in (shape, spacing, preprocessing,
model, audit, quality, software), what only the data steward knows taken from `--card card.yaml`
and `--card-field key=value` ("not provided" and a printed list when left out), every value
written for a person.

The card here is built by `build_card` from a real fitted audit, a real verdict and real metrics on
small smooth random images (no diffusion model: the pipeline stands in with the attributes a run
records); the quick demo's release is checked end to end in test_release.py."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import pytest
import yaml

from medgen.cli import main
from medgen.errors import ConfigError, RunError
from medgen.release.steward import STEWARD_FIELDS, card_yaml, load_card_fields, missing_fields

FIELDS = {"modality": "MRI (T1-weighted)", "anatomy": "brain", "source_dataset": "Example Hospital brain MRI 2019-2021, v2",
          "source_license": "data-use agreement DUA-17 with Example Hospital", "ethics_approval": "Example IRB 2023-045",
          "license": "CC-BY-4.0", "contact": "data-office@example.org", "citation": "Example et al., synthetic brain MRI, 2025"}
SECTIONS = ["## Motivation", "## Composition", "### Quality", "### Privacy audit", "## Generation process", "### Rounds",
            "## Preprocessing", "## Uses", "### Limitations", "## Distribution", "## Maintenance"]


@pytest.fixture(scope="module")
def card_parts():
    """build_card's inputs from a real audit of 40 honest 'samples' (smooth random images, the
    same distribution as 30 training and 24 held-out images) and their real metrics, beside real
    vs real (the held-out images in the samples' place)."""
    import torch

    from medgen.metrics.report import evaluate
    from medgen.privacy.calibration import CopyAudit
    from medgen.privacy.families import gaussian_blur
    from medgen.privacy.verdict import judge

    g = torch.Generator().manual_seed(0)
    x = torch.stack([gaussian_blur(v, 2.0) for v in torch.randn((94, 1, 32, 32), generator=g)]).mul(4).clamp(-1, 1)
    train, holdout, samples = x[:30], x[30:54], x[54:]
    result = judge(CopyAudit.fit(train, holdout, "pixel-rank", seed=0), samples, max_copy_rate=0.5)
    assert result.verdict == "pass", result.reasons
    pipe = types.SimpleNamespace(  # what a run records about its model (DiffusionPipeline's attributes)
        config={"image_shape": [1, 32, 32], "sample_shape": [1, 32, 32], "latent": None,
                "data": {"path": "/data/Example_Hospital", "spacing": [1.5, 1.5], "shape": [32, 32], "resize": False,
                         "intensity": {"mode": "percentile", "lower": 1.0, "upper": 99.0}}},
        sample_shape=(1, 32, 32), spatial_dims=2, spacing=[1.5, 1.5], checkpoint_sha256="ab" * 32, num_classes=0)
    policy = {"alpha": 0.05, "max_copy_rate": 0.5, "audit_samples": 40, "max_rounds": 5, "min_control_recall": 0.8,
              "bound": "conservative", "min_coverage": 0.5}
    return dict(
        n=16, ext=".png", pipe=pipe, run=Path("/nonexistent/run"), settings={"sampler": "ddim", "steps": 10, "guidance": 0.0, "eta": 0.0},
        label=None, seed=0, bit_depth=8, policy=policy, first=result, combined=result,
        rounds=[{"round": 1, "indices": [0, 40], "seeds": [0, 39], "sampled": 40, "copies": 0, "not_anatomy": 0, "kept": 40}],
        chosen=list(range(16)), metrics=evaluate(train, samples[:16], holdout=holdout[:16], features="pca", bootstrap=20, seed=0,
                                                 metrics=("fid", "prdc")),
        quality={"coverage": 0.5, "holdout_coverage": 0.6, "ratio": 0.83, "m": 16, "k": 5, "features": "pca"},
        split_info={"split_json_sha256": "cd" * 32, "holdout_splits": ["holdout"], "source": "the run's split.json"},
        n_train=30, n_holdout=24, n_train_subjects=30, n_holdout_subjects=24)


@pytest.fixture(scope="module")
def labelled_utility(tmp_path_factory):
    """A real TSTR/TRTR result (`synthetic_utility`, a shortened recipe): 16x16 PNGs of two
    classes (a bright or a dark disc on noise), 12 'released', 12 real training, 12 held-out."""
    import numpy as np
    from PIL import Image

    from medgen.metrics.utility import UTILITY_RECIPE, synthetic_utility

    root, rng = tmp_path_factory.mktemp("utility"), np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]
    disc = (yy - 8) ** 2 + (xx - 8) ** 2 < 20
    sets = {}
    for name in ("synthetic", "train", "test"):
        (root / name).mkdir()
        rows = ["path,label"]
        for i in range(12):
            image = np.clip(rng.normal(128, 20, (16, 16)) + np.where(disc, 80 if i % 2 else -80, 0), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / name / f"{i}.png")
            rows.append(f"{i}.png,{i % 2}")
        (root / name / "manifest.csv").write_text("\n".join(rows) + "\n")
        sets[name] = root / name / "manifest.csv"
    return synthetic_utility(sets["synthetic"], sets["train"], sets["test"], device="cpu", seeds=[0], progress=False,
                             recipe={**UTILITY_RECIPE, "steps": 15, "batch_size": 12, "bootstrap": 100})


def front_matter(md: str) -> dict:
    """The YAML between the opening '---' lines of DATA_CARD.md."""
    assert md.startswith("---\n"), md[:100]
    return yaml.safe_load(md[4:md.index("\n---\n", 4)])


def raw_reprs(md: str) -> list[str]:
    """Python reprs in prose: dicts, lists of strings or of lists, None/True/False, lists of
    numbers (a metric's interval in its table row is the one bracket pair allowed)."""
    prose = "\n".join(line for line in md.splitlines() if not line.startswith("|"))
    return re.findall(r"\{'|\['|\[\[|\bNone\b|\bTrue\b|\bFalse\b|\[-?\d[\d.]*, -?\d", prose)


# ----------------------------------------------------------------------------- the card


def test_a_complete_card_follows_the_standard(card_parts):
    from medgen.release.card import build_card, card_markdown

    card = build_card(**card_parts, card_fields=FIELDS)
    md = card_markdown(card)
    meta = front_matter(md)
    assert meta == card["metadata"] == json.loads(json.dumps(card))["metadata"]
    assert meta["license"] == "cc-by-4.0" and meta["size_categories"] == ["n<1K"]
    assert meta["task_categories"] == ["unconditional-image-generation"]  # no label: the default
    assert meta["pretty_name"] == "Synthetic brain MRI (T1-weighted) images"
    assert meta["tags"] == ["synthetic", "medical", "mri-t1-weighted", "brain", "medgen"]
    positions = [md.index("\n" + s) for s in SECTIONS]
    assert positions == sorted(positions)  # Datasheets' order
    for key, value in FIELDS.items():
        assert value in md and card["steward"][key] == value, key
    assert card["not_provided"] == [] and "not provided" not in md
    assert raw_reprs(md) == []
    # what medgen knows: the image, the run's preprocessing, the audit's sentence, software
    assert "- each image: 32 x 32 pixels, 1 channel, 1.5 x 1.5 mm" in md
    assert "1. resampled to 1.5 x 1.5 mm voxels (torchio Resample)\n2. centre-cropped or zero-padded to 32 x 32\n" in md
    assert "3. intensity: each image's percentiles 1 to 99 mapped linearly to -1 to 1 (clipped)" in md
    assert card["preprocessing"]["config"]["path"] == "[withheld]" and "Example_Hospital" not in md
    assert card["audit"]["statement"][1:] in md and "- verdict: **pass**" in md
    assert f"torch {card['software']['torch']}" in md and "released indices 0 to 15" in md
    assert (card["dataset"]["shape"], card["dataset"]["channels"], card["dataset"]["spacing_mm"]) == ([32, 32], 1, [1.5, 1.5])


def test_the_card_shows_real_vs_real_and_utility(card_parts, labelled_utility):
    """The quality table puts each metric beside the held-out images' (real vs real) with the
    ratio; the utility rows (TSTR against TRTR) follow; data_card.json carries both, paths withheld."""
    from medgen.metrics.report import reference_cells
    from medgen.release.card import build_card, card_markdown

    report = {**card_parts["metrics"], "utility": labelled_utility}
    card = build_card(**{**card_parts, "metrics": report, "label": "all", "labels": [i % 2 for i in range(16)]})
    md = card_markdown(card)
    assert "| metric | model | 95% interval | real vs real | 95% interval | ratio | better |" in md
    for c in reference_cells(report["metrics"], report["reference"]):
        assert f"| {c['metric']} | {c['value']} | {c['ci'] or '-'} | {c['reference']} | {c['reference_ci'] or '-'} | {c['ratio']} | {c['better']} |" in md
    assert "16 held-out real images" in md and "what a model that samples new patients from the same population scores" in md
    tstr, trtr = (labelled_utility["settings"][k]["auroc"] for k in ("tstr", "trtr"))
    assert re.search(rf"\| synthetic \(TSTR\) \| 12 \| {tstr['value']:.3f} \[{tstr['ci95'][0]:.3f}, {tstr['ci95'][1]:.3f}\]", md)
    assert re.search(rf"\| real \(TRTR\) \| 12 \| {trtr['value']:.3f} ", md) and "tested on 12 held-out real images" in md
    assert "- instances: 16 synthetic 2D images, balanced over 2 classes: class 0: 8, class 1: 8" in md
    assert front_matter(md)["task_categories"] == ["image-classification"] and raw_reprs(md) == []
    saved = json.loads(json.dumps(card))["metrics"]
    assert saved["real_vs_real"]["metrics"] == json.loads(json.dumps(report["reference"]["metrics"]))
    assert saved["utility"]["settings"]["tstr"]["auroc"]["value"] == tstr["value"]
    assert saved["utility"]["test"]["source"] == saved["utility"]["inputs"]["synthetic"]["source"] == "[withheld]"
    assert card["dataset"]["classes"] == {"0": 8, "1": 8}


def test_a_card_says_why_utility_and_real_vs_real_are_missing(card_parts):
    """An unlabelled release: one line saying why there is no utility; no held-out images: why
    there is no real-vs-real column."""
    import torch

    from medgen.metrics.report import evaluate
    from medgen.release.card import build_card, card_markdown
    from medgen.release.pipeline import release_utility

    utility = release_utility(Path("unused"), None, [], [], data_cfg=None, read_cfg=None)
    g = torch.Generator().manual_seed(1)
    x = torch.rand((32, 1, 16, 16), generator=g) * 2 - 1
    report = {**evaluate(x[:16], x[16:], features="pca", bootstrap=0, seed=0, metrics=("fid",)), "utility": utility}
    md = card_markdown(build_card(**{**card_parts, "metrics": report}))
    assert "Not measured: utility needs labels: release with --label all." in md
    assert "Real vs real: skipped: no real-vs-real reference" in md and "| metric | value | 95% interval |" in md


def test_a_card_without_the_stewards_fields_says_not_provided(card_parts):
    from medgen.release.card import build_card, card_markdown

    card = build_card(**card_parts)
    md = card_markdown(card)
    assert card["not_provided"] == list(STEWARD_FIELDS) and all(card["steward"][k] is None for k in STEWARD_FIELDS)
    for label in ("modality", "anatomy", "source data", "ethics approval", "licence of this release", "licence of the source data",
                  "citation", "contact"):
        assert re.search(rf"- {label}: not provided$", md, re.M), label
    assert f"fields the data steward did not provide: {', '.join(STEWARD_FIELDS)}" in md
    meta = front_matter(md)
    assert meta["license"] == "unknown" and meta["tags"] == ["synthetic", "medical", "medgen"] and raw_reprs(md) == []


def test_the_files_as_the_release_writes_them(card_parts):
    """`output` (the format module's description of the files) replaces the PNG default."""
    from medgen.release.card import build_card, card_markdown

    default = card_markdown(build_card(**card_parts))
    assert "0 to 255 (8-bit grayscale)" in default and "range 0 to 255" in default
    output = {"format": "dicom", "units": "HU", "intensity": "Hounsfield units as the model's CT window maps them back",
              "value_range": [-1000, 2000], "release_id": "rel-7f3a", "markers": ["DICOM ImageType DERIVED\\SYNTHETIC", "the file name"]}
    card = build_card(**card_parts, output=output, card_fields={"license": "my hospital's terms, see LICENSE.txt",
                                                                "task_categories": "image-classification, image-segmentation"})
    md = card_markdown(card)
    assert card["output"] == output and card["dataset"]["format"] == "DICOM" and card["dataset"]["bit_depth"] is None
    assert "- values: Hounsfield units as the model's CT window maps them back; units HU; range -1000 to 2000" in md
    assert "marked as synthetic by: DICOM ImageType DERIVED\\SYNTHETIC; the file name; release id `rel-7f3a`" in md
    assert front_matter(md)["license"] == "other" and "licence of this release: my hospital's terms, see LICENSE.txt" in md
    assert front_matter(md)["task_categories"] == ["image-classification", "image-segmentation"]


# ----------------------------------------------------------------------------- the steward's fields


def test_card_fields_from_a_file_and_the_command_line(tmp_path):
    from medgen.release.commands import DEMO_CARD

    card = tmp_path / "card.yaml"
    card.write_text("modality: CT\nanatomy: chest\nlicense: CC0-1.0\ncontact: null\ncitation: ''\ntask_categories: [image-classification, image-segmentation]\n")
    fields = load_card_fields(card, ["license=CC-BY-4.0", "contact=a = b <a@b.org>", "anatomy="])
    assert fields == {"modality": "CT", "license": "CC-BY-4.0", "contact": "a = b <a@b.org>",
                      "task_categories": "image-classification, image-segmentation"}
    assert missing_fields(fields) == ["anatomy", "source_dataset", "source_license", "ethics_approval", "citation"]
    # the demo's card: complete, and what card_yaml writes reads back the same
    assert missing_fields(DEMO_CARD) == []
    (tmp_path / "demo.yaml").write_text(card_yaml({**DEMO_CARD, "citation": "@misc{demo,\n  title = {A: b # c}\n}"}, "a header"))
    assert load_card_fields(tmp_path / "demo.yaml") == {**DEMO_CARD, "citation": "@misc{demo,\n  title = {A: b # c}\n}"}


@pytest.mark.parametrize("text, message", [
    ("modality: MRI\nanatomy: [brain\n", r"card\.yaml:3:1: not valid YAML: while parsing a flow sequence"),
    ("modalty: MRI\n", r"card\.yaml: unknown card field modalty; did you mean modality\? the fields are modality, anatomy, source_dataset"),
    ("anatomy: {region: brain}\n", r"card\.yaml: anatomy: expected text, got dict \{'region': 'brain'\}"),
    ("- modality\n", r"--card .*card\.yaml must hold field: value lines"),
])
def test_a_bad_card_file_is_a_clear_error(tmp_path, text, message):
    (tmp_path / "card.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_card_fields(tmp_path / "card.yaml")


def test_a_bad_card_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """Errors before the run is read (here there is none); without the fields the release says
    which the card will lack before it starts."""
    (tmp_path / "bad.yaml").write_text("modality: MRI\n  anatomy: brain\n")
    for extra, message in ((["--card", tmp_path / "bad.yaml"], f"{tmp_path / 'bad.yaml'}:2:10: not valid YAML"),
                           (["--card", tmp_path / "none.yaml"], f"--card {tmp_path / 'none.yaml'}: does not exist"),
                           (["--card-field", "modalty=MRI"], "--card-field: unknown card field modalty; did you mean modality?"),
                           (["--card-field", "modality"], "--card-field 'modality': expected key=value")):
        code = main(["release", "--run", str(tmp_path / "run"), "--n", "4", "--out", str(tmp_path / "rel"), *map(str, extra)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (extra, err)

    from medgen.release.pipeline import make_release

    said: list[str] = []
    (tmp_path / "run").mkdir()
    with pytest.raises(RunError, match="has no split.json"):  # the first work: reading the run
        make_release(tmp_path / "run", tmp_path / "rel", 4, card_fields={"modality": "MRI", "anatomy": ""}, echo=said.append)
    assert said == ['release: the data card will say "not provided" for anatomy, source_dataset, source_license, ethics_approval, '
                    'license, contact, citation (pass --card card.yaml or --card-field key=value)']
    with pytest.raises(ConfigError, match="unknown card field modalty"):
        make_release(tmp_path / "run", tmp_path / "rel", 4, card_fields={"modalty": "MRI"}, echo=said.append)
    assert not (tmp_path / "rel").exists()
