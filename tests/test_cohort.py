"""Built-in cohort: byte determinism, labels, simulated atrophy, file formats, atomic output."""

from __future__ import annotations

import csv
import hashlib
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medgen.data import read_image, scan_dataset
from medgen.data import cohort
from medgen.data.cohort import preview_figure, subject_labels, synth_brain, synth_subject
from medgen.errors import ConfigError, RunError
from medgen.io import OUTPUT_MARKER

SIZE, N = 32, 6
SUFFIX = {2: ".png", 3: ".nii.gz"}


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("cohort")
    return {dims: synth_brain(root / f"c{dims}d", n=N, dims=dims, size=SIZE, seed=0) for dims in (2, 3)}


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def load_pixels(path: Path) -> np.ndarray:
    """(X, Y, Z) float volume from NIfTI, (H, W) float image from PNG."""
    if path.suffix == ".png":
        return np.asarray(Image.open(path), dtype=np.float64)
    return np.asarray(nib.load(str(path)).get_fdata(), dtype=np.float64)


def periventricular_dark(image: np.ndarray, dims: int, png: bool = False) -> int:
    """Voxels within 12 mm of the template's lateral ventricles that are CSF-dark: below half the
    subject's own white-matter level (90th percentile of the brain). Grows with ventricle size."""
    tpl = cohort._template(SIZE)
    region = tpl.proximity > cohort.PROXIMITY_MM - 12.0  # (X, Y, Z)
    if dims == 2:
        region = region[:, :, int(round(tpl.ventricle_z))]  # (X, Y)
        if png:
            region = np.flipud(region.T)  # PNG rows run anterior -> posterior
    white = np.percentile(image[image > 0.25 * image.max()], 90)
    return int((image[region] < 0.5 * white).sum())


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("dims", [2, 3])
def test_same_seed_gives_identical_bytes(cohorts, tmp_path, dims):
    torch.manual_seed(123)  # the global RNG state must not leak into subjects
    np.random.seed(7)
    again = synth_brain(tmp_path / "again", n=N, dims=dims, size=SIZE, seed=0)
    assert digests(again) == digests(cohorts[dims])
    # A subject depends on (seed, index) only, not on n.
    short = synth_brain(tmp_path / "short", n=2, dims=dims, size=SIZE, seed=0)
    for name in (f"sub-0000{SUFFIX[dims]}", f"sub-0001{SUFFIX[dims]}"):
        assert (short / name).read_bytes() == (cohorts[dims] / name).read_bytes()


@pytest.mark.parametrize("dims", [2, 3])
def test_other_seed_gives_other_subjects(cohorts, tmp_path, dims):
    other = synth_brain(tmp_path / "seed1", n=3, dims=dims, size=SIZE, seed=1)
    for i in range(3):
        name = f"sub-{i:04d}{SUFFIX[dims]}"
        a, b = load_pixels(cohorts[dims] / name), load_pixels(other / name)
        assert a.shape == b.shape
        assert np.abs(a - b).mean() > 0.03 * np.abs(a).mean()  # different subjects, not a few bits


def test_files_carry_no_timestamps(cohorts):
    nii = (cohorts[3] / "sub-0000.nii.gz").read_bytes()
    assert nii[:2] == b"\x1f\x8b" and nii[4:8] == b"\x00\x00\x00\x00"  # gzip MTIME = 0
    png = (cohorts[2] / "sub-0000.png").read_bytes()
    chunks, pos = [], 8
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        chunks.append(png[pos + 4 : pos + 8])
        pos += 12 + length
    assert set(chunks) == {b"IHDR", b"IDAT", b"IEND"}  # no tIME / tEXt metadata


# ---------------------------------------------------------------- manifest and labels


@pytest.mark.parametrize("dims", [2, 3])
def test_manifest_columns_labels_subjects(cohorts, dims):
    folder = cohorts[dims]
    with open(folder / "manifest.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["path", "label", "subject_id"]
    assert [r["path"] for r in rows] == [f"sub-{i:04d}{SUFFIX[dims]}" for i in range(N)]
    assert [r["subject_id"] for r in rows] == [f"sub-{i:04d}" for i in range(N)]
    labels = [int(r["label"]) for r in rows]
    assert labels == subject_labels(N, seed=0) and set(labels) == {0, 1}
    assert sorted(p.name for p in folder.iterdir()) == sorted([r["path"] for r in rows] + ["manifest.csv", OUTPUT_MARKER])
    samples = scan_dataset(folder)  # the data layer reads it back
    assert [s.label for s in samples] == labels
    assert [s.subject_id for s in samples] == [r["subject_id"] for r in rows]


def test_labels_follow_the_fraction_and_do_not_depend_on_n():
    labels = subject_labels(1000, seed=3, atrophy_fraction=0.3)
    assert abs(np.mean(labels) - 0.3) <= 0.002  # low-discrepancy: every prefix is balanced
    assert all(abs(np.mean(labels[:k]) - 0.3) <= 2.0 / k for k in range(1, 1000))
    assert subject_labels(40, seed=3, atrophy_fraction=0.3) == labels[:40]
    assert subject_labels(40, seed=4) != subject_labels(40, seed=3)
    assert set(subject_labels(20, atrophy_fraction=0.0)) == {0}
    assert set(subject_labels(20, atrophy_fraction=1.0)) == {1}


# ---------------------------------------------------------------- simulated atrophy


@pytest.mark.parametrize("dims", [2, 3])
def test_atrophy_enlarges_the_ventricles(dims):
    # Same subject (same seed and index, hence same warp, bias and noise) with and without atrophy.
    for i in range(N):
        healthy = periventricular_dark(synth_subject(i, seed=5, label=0, dims=dims, size=SIZE), dims)
        atrophy = periventricular_dark(synth_subject(i, seed=5, label=1, dims=dims, size=SIZE), dims)
        assert atrophy >= healthy + (15 if dims == 2 else 40), (i, healthy, atrophy)


@pytest.mark.parametrize("dims", [2, 3])
def test_cohort_labels_match_ventricle_size(cohorts, dims):
    dark = {0: [], 1: []}
    for sample in scan_dataset(cohorts[dims]):
        dark[sample.label].append(periventricular_dark(load_pixels(sample.path), dims, png=dims == 2))
    assert np.mean(dark[1]) > 3.0 * np.mean(dark[0]) + 10, dark
    assert min(dark[1]) > max(dark[0]), dark


# ---------------------------------------------------------------- formats


def test_volumes_are_float32_isotropic_and_brain_centred(cohorts):
    img = nib.load(str(cohorts[3] / "sub-0001.nii.gz"))
    assert img.shape == (SIZE, SIZE, SIZE) and img.get_data_dtype() == np.float32
    spacing = cohort.FOV_MM / SIZE
    np.testing.assert_allclose(img.header.get_zooms(), (spacing,) * 3)
    assert img.header.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(img.affine[:3, :3], np.eye(3) * spacing)
    np.testing.assert_allclose(img.get_qform(), img.get_sform())
    centre = img.affine @ np.array([(SIZE - 1) / 2.0] * 3 + [1.0])
    np.testing.assert_allclose(centre[:3], [0.0, -17.0, 5.0], atol=1.0)  # MNI brain bounding-box centre
    vol = np.asarray(img.get_fdata())
    corners = vol[[0, -1]][:, [0, -1]][:, :, [0, -1]]
    brain = vol[SIZE // 4 : 3 * SIZE // 4, SIZE // 4 : 3 * SIZE // 4, SIZE // 4 : 3 * SIZE // 4]
    assert vol.min() >= 0.0 and corners.mean() < 0.1 and brain.mean() > 0.4  # background ~0
    arr, read_spacing = read_image(cohorts[3] / "sub-0001.nii.gz")
    assert arr.shape == (1, SIZE, SIZE, SIZE) and tuple(read_spacing) == pytest.approx((spacing,) * 3)


def test_slices_are_8bit_grayscale_png(cohorts):
    img = Image.open(cohorts[2] / "sub-0001.png")
    assert img.mode == "L" and img.size == (SIZE, SIZE)
    pixels = np.asarray(img)
    corners = pixels[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert corners.max() < 25 and pixels[SIZE // 4 : 3 * SIZE // 4, SIZE // 4 : 3 * SIZE // 4].mean() > 60


# ---------------------------------------------------------------- output handling


def test_refuses_to_overwrite_unless_asked(tmp_path):
    out = tmp_path / "cohort"
    synth_brain(out, n=3, dims=2, size=SIZE)
    with pytest.raises(RunError, match="cohort"):
        synth_brain(out, n=2, dims=2, size=SIZE)
    synth_brain(out, n=2, dims=2, size=SIZE, overwrite=True)  # medgen's own folder: replaced
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "manifest.csv", "sub-0000.png", "sub-0001.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["cohort"]  # no temp folders left behind
    (out / "keep.txt").write_text("mine")  # a file medgen did not write stops --overwrite
    with pytest.raises(RunError, match="holds 1 entry it did not write: keep.txt"):
        synth_brain(out, n=2, dims=2, size=SIZE, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"


def test_failure_leaves_no_output(tmp_path, monkeypatch):
    def broken(index, **kwargs):
        if index == 1:
            raise RuntimeError("disk full")
        return np.zeros((SIZE, SIZE), np.float32)

    monkeypatch.setattr(cohort, "synth_subject", broken)
    with pytest.raises(RuntimeError):
        synth_brain(tmp_path / "cohort", n=3, dims=2, size=SIZE)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs", [{"dims": 4}, {"n": 0}, {"size": 4}, {"atrophy_fraction": 1.5}, {"seed": -1}], ids=str
)
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        synth_brain(tmp_path / "c", **{"n": 2, "size": SIZE, **kwargs})
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("dims", [2, 3])
def test_preview_figure(cohorts, tmp_path, dims):
    out = preview_figure(cohorts[dims], tmp_path / "preview.png", n=4)
    img = Image.open(out)
    assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 150
    assert np.asarray(img.convert("L")).std() > 10  # something was drawn
