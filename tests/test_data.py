"""Data layer: every reader on files written here, bad-input errors, preprocessing, splits."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from medgen.data import DataConfig, check_samples, datasets_from_config, load, load_images, make_splits, preprocess, read_image, scan_dataset
from medgen.data.dataset import Sample
from medgen.errors import ConfigError, DataError

CT_SMALL = get_testdata_file("CT_small.dcm")


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
            h.update(str(p.stat().st_mtime_ns).encode())
    return h.hexdigest()


def write_nifti(path: Path, arr: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> None:
    nib.save(nib.Nifti1Image(arr.astype(np.float32), np.diag([*spacing, 1.0])), str(path))


# ---------------------------------------------------------------- readers


def test_png_8bit_gray_and_rgb(tmp_path):
    gray = (np.arange(20 * 30).reshape(20, 30) % 256).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    arr, spacing = read_image(tmp_path / "g.png")
    assert arr.shape == (1, 20, 30) and spacing == (1.0, 1.0)
    np.testing.assert_array_equal(arr[0], gray)
    rgb = np.stack([gray, 255 - gray, gray // 2], -1)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    arr, _ = read_image(tmp_path / "c.png")
    assert arr.shape == (3, 20, 30)
    np.testing.assert_array_equal(arr[1], 255 - gray)
    # 8-bit maps by dtype range: 0 -> -1, 255 -> 1
    t = preprocess(load(tmp_path / "g.png"), DataConfig())
    np.testing.assert_allclose(t[0].numpy(), gray / 255.0 * 2 - 1, atol=1e-6)


def test_png_16bit_keeps_full_range(tmp_path):
    img = (np.arange(16 * 16).reshape(16, 16) * 250).astype(np.uint16)  # up to 63750 > 255
    Image.fromarray(img).save(tmp_path / "d.png")
    loaded = load(tmp_path / "d.png")
    assert loaded.source_dtype == np.uint16
    np.testing.assert_array_equal(loaded.array[0], img)
    t = preprocess(loaded, DataConfig())
    np.testing.assert_allclose(t[0].numpy(), img / 65535.0 * 2 - 1, atol=1e-5)


def test_jpeg_and_tiff(tmp_path):
    img = np.full((12, 14), 100, np.uint8)
    Image.fromarray(img).save(tmp_path / "a.jpg", quality=100)
    Image.fromarray(img).save(tmp_path / "a.tif")
    assert np.abs(read_image(tmp_path / "a.jpg")[0] - 100).max() <= 1
    np.testing.assert_array_equal(read_image(tmp_path / "a.tif")[0][0], img)


def test_dicom_applies_rescale_slope_intercept(tmp_path):
    ds = pydicom.dcmread(CT_SMALL)
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    arr, spacing = read_image(CT_SMALL)
    np.testing.assert_allclose(arr[0], expected)
    assert spacing == tuple(float(s) for s in ds.PixelSpacing)
    # a modified slope/intercept is honoured (not a coincidence of the test file)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -500
    ds.save_as(tmp_path / "ct2.dcm")
    arr2, _ = read_image(tmp_path / "ct2.dcm")
    np.testing.assert_allclose(arr2[0], ds.pixel_array * 2.0 - 500)
    # CT window [-1000, 1000] HU -> [-1, 1], clipped
    t = preprocess(load(CT_SMALL), DataConfig(intensity={"mode": "ct", "window": [-1000, 1000]}))
    np.testing.assert_allclose(t[0].numpy(), np.clip(expected, -1000, 1000) / 1000, atol=1e-5)


def test_dicom_series_folder_is_one_volume(tmp_path):
    series = tmp_path / "ds" / "patient1"
    series.mkdir(parents=True)
    base = pydicom.dcmread(CT_SMALL)
    uid = pydicom.uid.generate_uid()
    for k in range(4):
        ds = pydicom.dcmread(CT_SMALL)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in base.ImagePositionPatient[:2]] + [float(base.ImagePositionPatient[2]) + 2.5 * k]
        ds.PixelData = (ds.pixel_array + 10 * k).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(series / f"slice{k}.dcm")
    samples = scan_dataset(tmp_path / "ds")
    assert [s.path for s in samples] == [series]
    arr, spacing = read_image(series)
    assert arr.shape[0] == 1 and sorted(arr.shape[1:]) == [4, 128, 128]
    assert spacing[2] == pytest.approx(2.5, rel=1e-3)
    # slices keep their order: mean grows by 10 * slope per slice
    means = [arr[0, :, :, k].mean() for k in range(4)]
    np.testing.assert_allclose(np.diff(means), 10 * float(base.RescaleSlope), rtol=1e-4)


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_nifti(tmp_path, name):
    vol = np.random.default_rng(0).normal(size=(10, 12, 8)).astype(np.float32)
    write_nifti(tmp_path / name, vol, spacing=(1.5, 1.0, 2.0))
    arr, spacing = read_image(tmp_path / name)
    np.testing.assert_allclose(arr[0], vol)
    assert spacing == (1.5, 1.0, 2.0)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_nrrd_mha_via_simpleitk(tmp_path, suffix):
    import SimpleITK as sitk

    vol = np.random.default_rng(1).integers(0, 1000, size=(6, 7, 9)).astype(np.int16)  # (z, y, x) in SimpleITK
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.5, 0.7, 3.0))
    sitk.WriteImage(img, str(tmp_path / f"v{suffix}"))
    arr, spacing = read_image(tmp_path / f"v{suffix}")
    assert arr.shape == (1, 9, 7, 6)  # torchio order (x, y, z)
    np.testing.assert_allclose(spacing, (0.5, 0.7, 3.0))
    np.testing.assert_array_equal(np.abs(arr[0]).sum(), np.abs(vol).sum())


def test_npy_2d_and_3d_no_pickle(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((5, 6), np.float32))
    np.save(tmp_path / "b.npy", np.ones((5, 6, 7), np.float32))
    assert read_image(tmp_path / "a.npy")[0].shape == (1, 5, 6)
    assert read_image(tmp_path / "b.npy")[0].shape == (1, 5, 6, 7)
    np.save(tmp_path / "c.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="c.npy"):
        read_image(tmp_path / "c.npy")


# ---------------------------------------------------------------- preprocessing


def test_percentile_zscore_crop_pad_resample(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.normal(100, 20, size=(20, 16, 12)).astype(np.float32)
    write_nifti(tmp_path / "v.nii.gz", vol, spacing=(1.0, 1.0, 1.0))
    loaded = load(tmp_path / "v.nii.gz")
    t = preprocess(loaded, DataConfig(intensity={"mode": "percentile", "lower": 1, "upper": 99}))
    lo, hi = np.percentile(vol, [1, 99])
    np.testing.assert_allclose(t[0].numpy(), (np.clip(vol, lo, hi) - lo) / (hi - lo) * 2 - 1, atol=1e-4)
    z = preprocess(loaded, DataConfig(intensity={"mode": "zscore"}))
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 1e-2
    cp = preprocess(loaded, DataConfig(shape=[16, 16, 16], intensity={"mode": "none"}))
    assert cp.shape == (1, 16, 16, 16)
    np.testing.assert_allclose(cp[0, :, :, 2:14].numpy(), vol[2:18, :, :])  # centred crop x, pad z
    rs = preprocess(loaded, DataConfig(spacing=[2.0, 2.0, 2.0], intensity={"mode": "none"}))
    assert rs.shape == (1, 10, 8, 6)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="data.intensity.mode"):
        DataConfig.from_any({"intensity": {"mode": "banana"}})
    with pytest.raises(ConfigError, match="window"):
        DataConfig.from_any({"intensity": {"mode": "ct"}})
    with pytest.raises(ConfigError, match="data.shape"):
        DataConfig.from_any({"spatial_dims": 2, "shape": [8, 8, 8]})


# ---------------------------------------------------------------- bad input


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*holds no images"):
        scan_dataset(tmp_path / "empty")


def test_corrupt_files_name_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "bad.nii.gz").write_bytes(b"not gzip at all")
    (tmp_path / "bad.dcm").write_bytes(b"\x00" * 50)
    for name in ("bad.png", "bad.nii.gz", "bad.dcm"):
        with pytest.raises(DataError, match=name.replace(".", r"\.")):
            load(tmp_path / name)


def test_nan_voxels(tmp_path):
    vol = np.zeros((4, 4, 4), np.float32)
    vol[1, 2, 3] = np.nan
    write_nifti(tmp_path / "nan.nii.gz", vol)
    with pytest.raises(DataError, match=r"nan\.nii\.gz.*NaN/Inf"):
        load(tmp_path / "nan.nii.gz")


def test_wrong_dimensionality_and_disagreeing_shapes(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "a.png")
    write_nifti(d / "b.nii.gz", np.ones((8, 8, 8)))
    with pytest.raises(DataError, match=r"b\.nii\.gz.*3 spatial dimensions.*2D"):
        check_samples(scan_dataset(d), DataConfig(spatial_dims=2))
    d2 = tmp_path / "shapes"
    d2.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d2 / "a.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(d2 / "b.png")
    with pytest.raises(DataError, match=r"b\.png: shape \(9, 8\) differs"):
        check_samples(scan_dataset(d2), DataConfig())
    good, _, _ = check_samples(scan_dataset(d2), DataConfig(shape=[8, 8]))  # crop/pad fixes it
    assert len(good) == 2


def test_manifest_missing_label_duplicate_and_missing_file(tmp_path):
    for i in range(3):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "manifest.csv").write_text("path,label,subject_id\n0.png,a,s0\n1.png,,s1\n")
    with pytest.raises(DataError, match=r"manifest\.csv: line 3: label missing for 1\.png"):
        scan_dataset(tmp_path)
    (tmp_path / "manifest.csv").write_text("path,label\n0.png,a\n./0.png,b\n")
    with pytest.raises(DataError, match="duplicate path"):
        scan_dataset(tmp_path)
    (tmp_path / "manifest.csv").write_text("path,label\n0.png,a\n9.png,b\n")
    with pytest.raises(DataError, match=r"9\.png does not exist"):
        scan_dataset(tmp_path)
    (tmp_path / "manifest.csv").write_text("path,label,subject_id\n0.png,tumor,s0\n1.png,healthy,s1\n2.png,tumor,s1\n")
    samples = scan_dataset(tmp_path)
    assert [(s.label, s.label_name, s.subject_id) for s in samples] == [(1, "tumor", "s0"), (0, "healthy", "s1"), (1, "tumor", "s1")]
    # a sample directory's manifest: `file` column, label empty on every row -> unlabelled
    (tmp_path / "manifest.csv").write_text("file,label,seed,sampler\n0.png,,0,ddim\n1.png,,1,ddim\n")
    assert [(s.path.name, s.label) for s in scan_dataset(tmp_path)] == [("0.png", None), ("1.png", None)]


def test_skip_mode_skips_and_logs(tmp_path, caplog):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"nope")
    good, bad, summary = check_samples(scan_dataset(tmp_path), DataConfig(on_bad_file="skip"))
    assert [s.path.name for s in good] == ["ok.png"] and bad[0][0].path.name == "broken.png"
    assert "broken.png" in caplog.text and summary["skipped"] == 1


def test_inputs_are_never_written(cohort_2d, tmp_path):
    before = tree_digest(cohort_2d)
    sets = datasets_from_config({"path": str(cohort_2d), "cache": True}, run_dir=tmp_path / "run")
    for ds in sets.values():
        for i in range(len(ds)):
            ds[i]
    load_images(cohort_2d)
    assert tree_digest(cohort_2d) == before
    assert (tmp_path / "run" / "split.json").exists()


# ---------------------------------------------------------------- splits and datasets


def _fake_samples(n_subjects: int, per_subject: int) -> list[Sample]:
    return [Sample(Path(f"/x/s{s}_{k}.png"), s % 2, str(s % 2), f"s{s}") for s in range(n_subjects) for k in range(per_subject)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_subject_leaks_across_splits(seed):
    samples = _fake_samples(37, 3)
    split = make_splits(samples, val=0.15, holdout=0.2, seed=seed)
    sets = [set(v) for v in split.values()]
    assert sum(len(s) for s in sets) == 37
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert len(split["holdout"]) == round(0.2 * 37) and len(split["val"]) == round(0.15 * 37)
    # deterministic, independent of file order; another seed gives another split
    assert make_splits(list(reversed(samples)), 0.15, 0.2, seed) == split
    assert make_splits(samples, 0.15, 0.2, seed + 10) != split


def test_datasets_from_config_splits_files_by_subject(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    rows = ["path,label,subject_id"]
    for s in range(10):
        for k in range(2):
            Image.fromarray(np.full((8, 8), s * 10 + k, np.uint8)).save(d / f"s{s}_{k}.png")
            rows.append(f"s{s}_{k}.png,{s % 2},subj{s}")
    (d / "manifest.csv").write_text("\n".join(rows) + "\n")
    sets = datasets_from_config({"path": str(d), "split": {"val": 0.2, "holdout": 0.2, "seed": 3}}, run_dir=tmp_path / "run")
    subjects = {name: {ds[i]["subject_id"] for i in range(len(ds))} for name, ds in sets.items()}
    assert sum(len(ds) for ds in sets.values()) == 20
    assert not subjects["train"] & subjects["holdout"] and not subjects["train"] & subjects["val"]
    item = sets["train"][0]
    assert item["image"].shape == (1, 8, 8) and item["label"].dtype == torch.long
    assert sets["train"].num_classes == 2
    # a resumed run reuses split.json even if the seed changes
    again = datasets_from_config({"path": str(d), "split": {"val": 0.2, "holdout": 0.2, "seed": 99}}, run_dir=tmp_path / "run")
    assert {ds[i]["subject_id"] for ds in [again["holdout"]] for i in range(len(ds))} == subjects["holdout"]


# ---------------------------------------------------------------- CLI


def _medgen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medgen", *args], capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_cli_data_check_and_clean_errors(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 9), i, np.uint8)).save(d / f"{i}.png")
    r = _medgen("data", "check", str(d))
    assert r.returncode == 0, r.stderr
    assert "images      3 (2D" in r.stdout and "8x9" in r.stdout
    (d / "3.png").write_bytes(b"corrupt")
    r = _medgen("data", "check", str(d))
    assert r.returncode == 2
    assert "3.png" in r.stderr and "Traceback" not in r.stderr
    r = _medgen("data", "check", str(d), "--on-bad-file", "skip")
    assert r.returncode == 0 and "skipped     " in r.stdout
    r = _medgen("--verbose", "data", "check", str(d))
    assert r.returncode == 2 and "Traceback" in r.stderr



def test_cli_overrides_may_follow_options(monkeypatch):
    """`key=value` overrides are collected wherever they sit among the options."""
    from medgen import cli

    seen = {}
    monkeypatch.setattr("medgen.train.autoencoder.train_from_args", lambda args: seen.update(vars(args)) or 0)
    assert cli.main(["train", "autoencoder", "--config", "c.yaml", "--out", "r", "a.b=1", "--resume", "latest", "c.d=2"]) == 0
    assert seen["overrides"] == ["a.b=1", "c.d=2"] and seen["resume"] == "latest"
    with pytest.raises(SystemExit):
        cli.main(["train", "autoencoder", "--config", "c.yaml", "--out", "r", "--bogus"])
