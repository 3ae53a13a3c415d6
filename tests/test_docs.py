"""docs/ARCHITECTURE.md stays true: it names every package of medgen, the docstrings that cite it
find it, and every extension point it tells a contributor to use exists under that name."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "ARCHITECTURE.md"

# (module, name) pairs the "Where to add" section sends a contributor to
EXTENSION_POINTS = [
    ("medgen.privacy.detector", "build_detectors"), ("medgen.privacy.calibration", "DETECTOR_CONTROL_FAMILIES"),
    ("medgen.metrics.report", "ALL_METRICS"), ("medgen.metrics.report", "feature_metrics"),
    ("medgen.metrics.report", "metric_cells"), ("medgen.metrics.features", "REGISTRY"),
    ("medgen.metrics.commands", "REGISTRY_NAMES"), ("medgen.diffusion.sampling", "make_scheduler"),
    ("medgen.diffusion.sampling", "SAMPLERS"), ("medgen.diffusion.sampling", "DEFAULT_SAMPLER"),
    ("medgen.recon.settings", "METHODS"), ("medgen.recon.probe", "Reconstructors"),
    ("medgen.recon.sampling", "DIFFUSION_METHODS"),
]


def test_every_package_is_in_the_architecture_document():
    text = DOC.read_text()
    packages = sorted(p.parent.name for p in (REPO / "medgen").glob("*/__init__.py"))
    assert packages and all(f"`{name}/`" in text for name in packages), [n for n in packages if f"`{n}/`" not in text]


def test_docstrings_cite_the_document_that_exists():
    cites = [(p, line) for p in (REPO / "medgen").rglob("*.py") for line in p.read_text().splitlines() if "ARCHITECTURE.md" in line]
    assert cites and DOC.is_file()
    assert all("docs/ARCHITECTURE.md" in line for _, line in cites), [str(p) for p, line in cites if "docs/" not in line]


def test_the_extension_points_it_names_exist():
    text = DOC.read_text()
    for module, name in EXTENSION_POINTS:
        assert re.search(rf"\b{name}\b", text), f"{name} is no longer named in {DOC.name}"
        assert hasattr(importlib.import_module(module), name), f"{module}.{name} is gone: update {DOC.name}"
