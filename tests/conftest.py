"""Shared fixtures. Tests write their own inputs; nothing is downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest


@pytest.fixture(scope="session", autouse=True)
def _wandb_folders(tmp_path_factory):
    """wandb's data and artifact caches (model artifacts copy the weights) stay inside the test's temp folder."""
    root = tmp_path_factory.mktemp("wandb")
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_ARTIFACT_DIR"):
        os.environ.setdefault(var, str(root / var.lower()))


@pytest.fixture(scope="session")
def cohort_2d(tmp_path_factory):
    """12 subjects, 32x32 axial PNG slices of the built-in cohort (labels 0/1)."""
    from medgen.data.cohort import synth_brain

    return synth_brain(tmp_path_factory.mktemp("cohort") / "c2d", n=12, dims=2, size=32, seed=0)


@pytest.fixture(scope="session")
def cohort_3d(tmp_path_factory):
    """8 subjects, 16^3 NIfTI volumes of the built-in cohort (labels 0/1)."""
    from medgen.data.cohort import synth_brain

    return synth_brain(tmp_path_factory.mktemp("cohort") / "c3d", n=8, dims=3, size=16, seed=0)
