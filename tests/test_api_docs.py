"""docs/API.md is a test: its ```python blocks run in order in one namespace, as a user would type
them in one session, on a tiny run (`runs/dm2d`) and its split's images (`data/train`,
`data/holdout`), in a temp folder, with the sizes the page says (`SMALL`). No block may raise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_readme import DETECTOR_STEPS, readme_blocks

REPO = Path(__file__).resolve().parents[1]
API = REPO / "docs" / "API.md"
# the sizes a user would type, as this test runs them (said at the top of docs/API.md)
SMALL = [("n=1000", "n=8"), ("audit_samples=400", "audit_samples=16"), ("bootstrap=200", "bootstrap=10"),
         ("msssim_pairs=500", "msssim_pairs=20")]
TINY = ["model.channels=[16,32]", "model.num_res_blocks=1", "model.attention_levels=[false,true]", "model.head_channels=16",
        "model.norm_groups=8", "train.tracker=none", "train.batch_size=4", "train.max_steps=2", "train.checkpoint_every=2",
        "train.preview_every=2", "sample.steps=2", "sample.n_preview=2"]


@pytest.fixture(scope="module")
def workspace(cohort_2d, tmp_path_factory):
    """runs/dm2d (a 2-step class-conditional pixel run on the 12-subject cohort), data/train and
    data/holdout (its training images; its held-out and validation images)."""
    from medgen.config import load_config
    from medgen.train.diffusion import DEFAULTS, train_diffusion

    root = tmp_path_factory.mktemp("api")
    cfg = load_config(REPO / "configs" / "demo_diffusion_2d_pixel.yaml", [*TINY, f"data.path={cohort_2d}"], DEFAULTS)
    run = train_diffusion(cfg, root / "runs" / "dm2d")
    files = json.loads((run / "split.json").read_text())["files"]
    for folder, splits in (("train", ["train"]), ("holdout", ["holdout", "val"])):
        (root / "data" / folder).mkdir(parents=True)
        for f in (f for s in splits for f in files[s]):
            shutil.copy(f, root / "data" / folder)
    return root


def test_api_page_is_linked_from_the_readme():
    assert "docs/API.md" in (REPO / "README.md").read_text()


def test_api_snippets_run_in_order(workspace, monkeypatch):
    blocks = [b for b in readme_blocks(API) if b.lang == "python"]
    assert [b.section for b in blocks] == ["Load", "Sample", "Evaluate", "Audit", "Release", "Export"]
    monkeypatch.setattr("medgen.privacy.detector.default_steps", lambda n_images, batch_size: DETECTOR_STEPS)
    assert all(written in API.read_text() for written, _ in SMALL)  # each size the test shrinks is on the page
    monkeypatch.chdir(workspace)
    namespace: dict = {"__name__": "__api__"}
    for block in blocks:
        code = block.text
        for written, small in SMALL:
            code = code.replace(written, small)
        try:
            exec(compile(code, f"{API}:{block.line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"docs/API.md line {block.line} ({block.section}): {type(e).__name__}: {e}") from e
    for out in ("samples/dm2d/manifest.csv", "eval/dm2d/report.json", "audit/dm2d/report.json", "export/dm2d/medgen_export.json"):
        assert (workspace / out).is_file(), out
    assert namespace["result"].verdict in ("pass", "fail", "inconclusive")
    assert (workspace / "export/dm2d/unet/config.json").is_file()
