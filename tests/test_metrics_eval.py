"""Feature extractors, weights resolution, cache, and `medgen eval` end to end (no network:
every weights file is written by the test)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medgen.errors import DataError, WeightsError
from medgen.metrics import features as F


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDGEN_OFFLINE", "1")
    monkeypatch.setenv("MEDGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDGEN_WEIGHTS_DIR", raising=False)
    monkeypatch.setattr(F, "weights_present", _no_tmp_weights(F.weights_present))


def _no_tmp_weights(orig):
    """Ignore a real clean-fid download in /tmp so `auto` behaves the same on every machine."""
    import os

    def present(name, weights=None):
        if weights is None and not os.environ.get("MEDGEN_WEIGHTS_DIR"):
            return False
        return orig(name, weights)

    return present


def _blobs(folder: Path, n: int, shape, seed: int, radius: float = 0.3, bits: int = 8) -> Path:
    """n images (PNG) or volumes (NIfTI) of a bright blob on noise."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    for i in range(n):
        c, r = rng.uniform(-0.2, 0.2, len(shape)), radius * rng.uniform(0.8, 1.2)
        img = np.clip(1.2 - np.sqrt(sum((g - ci) ** 2 for g, ci in zip(grids, c))) / r, 0, 1) * 0.8 + 0.1 * rng.random(shape)
        if len(shape) == 2:
            arr = (img * 255).astype(np.uint8)
            Image.fromarray(arr.astype(np.uint16) * 257 if bits == 16 else arr).save(folder / f"img{i:03d}.png")
        else:
            nib.save(nib.Nifti1Image(img.astype(np.float32), np.eye(4)), folder / f"vol{i:03d}.nii.gz")
    return folder


class _FakeInceptionBase(torch.nn.Module):
    """Same interface as inception-2015-12-05.pt: `.layers` maps (B,3,299,299) -> (B,2048)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 7, stride=8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(16, 2048),
        )

    def forward(self, x, return_features: bool = False):
        return self.layers(x)


def _write_inception(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / F.INCEPTION_FILE
    torch.jit.script(_FakeInceptionBase().eval()).save(str(path))
    return path


# ----------------------------------------------------------------------------- inputs
def test_to_unit_interval_explicit_encodings():
    assert torch.allclose(F.to_unit_interval(torch.tensor([0, 255], dtype=torch.uint8)), torch.tensor([0.0, 1.0]))
    assert torch.allclose(F.to_unit_interval(torch.tensor([0, 65535], dtype=torch.int32)), torch.tensor([0.0, 1.0]))
    assert torch.allclose(F.to_unit_interval(torch.tensor([-1.0, 1.0])), torch.tensor([0.0, 1.0]))
    assert torch.allclose(F.to_unit_interval(torch.tensor([0.0, 0.5]), "0,1"), torch.tensor([0.0, 0.5]))
    with pytest.raises(DataError, match="outside the declared range"):
        F.to_unit_interval(torch.tensor([0.0, 200.0]))


# ----------------------------------------------------------------------------- inception
def test_inception_matches_cleanfid_pipeline(tmp_path, monkeypatch):
    """Our features of a PNG folder == clean-fid's ResizeDataset('clean') + InceptionV3W."""
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.utils import ResizeDataset

    from medgen.data import load_images

    weights = _write_inception(tmp_path / "w")
    monkeypatch.setenv("MEDGEN_WEIGHTS_DIR", str(tmp_path / "w"))
    folder = _blobs(tmp_path / "png", 3, (40, 40), seed=0)
    images, samples = load_images(folder)
    ex = F.get_extractor("inception", device="cpu")
    ours = ex(images)

    ref_model = InceptionV3W(str(weights.parent), download=False).eval()
    ds = ResizeDataset([str(s.path) for s in samples], mode="clean")
    with torch.no_grad():
        ref = ref_model(torch.stack([ds[i] for i in range(len(ds))]))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert ours.shape == (3, 2048)
    assert ex.recipe["weights_sha256"] == F.sha256_file(weights)
    assert "bicubic" in ex.recipe["resize"] and "uint8" in ex.recipe["quantisation"]


def test_16bit_png_gives_same_inception_features_as_8bit(tmp_path, monkeypatch):
    from medgen.data import load_images

    _write_inception(tmp_path / "w")
    monkeypatch.setenv("MEDGEN_WEIGHTS_DIR", str(tmp_path / "w"))
    a, _ = load_images(_blobs(tmp_path / "p8", 2, (32, 32), seed=3))
    b, _ = load_images(_blobs(tmp_path / "p16", 2, (32, 32), seed=3, bits=16))
    ex = F.get_extractor("inception", device="cpu")
    torch.testing.assert_close(ex(a), ex(b))


def test_weights_errors_say_which_file_where(tmp_path):
    with pytest.raises(WeightsError) as e:
        F.resolve_weights(F.INCEPTION_FILE, "Inception", library_dirs=[tmp_path / "libcache"],
                          download=lambda d: pytest.fail("no download offline"), source=F.INCEPTION_URL)
    msg = str(e.value)
    assert F.INCEPTION_FILE in msg and str(tmp_path / "cache" / "weights" / F.INCEPTION_FILE) in msg and "--weights" in msg
    with pytest.raises(WeightsError, match="do not exist"):
        F.get_extractor("inception", weights=str(tmp_path / "missing.pt"))
    with pytest.raises(WeightsError, match="unknown feature extractor"):
        F.get_extractor("no-such-net")
    with pytest.raises(WeightsError, match="DINOv2"):
        F.get_extractor("dinov2")


def test_torchscript_path_extractor(tmp_path):
    net = torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 8 * 8, 5)))
    net.save(str(tmp_path / "mine.pt"))
    x = torch.rand(3, 2, 8, 8) * 2 - 1
    ex = F.get_extractor(str(tmp_path / "mine.pt"), device="cpu")
    torch.testing.assert_close(ex(x), net(x))
    assert ex.recipe["extractor"] == "torchscript:mine.pt"


def test_medicalnet_loads_medicalnet_checkpoint_format(tmp_path, monkeypatch):
    """A checkpoint in MedicalNet's format ({"state_dict": {"module.*"}}) loads strictly."""
    from monai.networks.nets import resnet10

    net = resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="B", bias_downsample=False, conv1_t_stride=2)
    (tmp_path / "w").mkdir()
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "w" / F.MEDICALNET_FILE)
    monkeypatch.setenv("MEDGEN_WEIGHTS_DIR", str(tmp_path / "w"))
    ex = F.get_extractor("medicalnet", device="cpu")
    vols = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    feats = ex(vols)
    assert feats.shape == (2, 512)
    z = (vols + 1) / 2
    z = (z - z.mean((2, 3, 4), keepdim=True)) / (z.std((2, 3, 4), keepdim=True) + 1e-5)
    torch.testing.assert_close(feats, net.eval()(z), rtol=1e-4, atol=1e-5)
    with pytest.raises(DataError, match="3D"):
        ex(torch.rand(2, 1, 16, 16))


def test_pca_extractor_is_the_real_principal_subspace():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(20, 1, 8, 8, generator=g) * 2 - 1
    ex = F.PCAExtractor(n_components=5).fit(real)
    feats = ex(real)
    x = real.flatten(1).double()
    u, s, _ = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    # projections onto the top components: same magnitudes as U S (signs are fixed by fit)
    torch.testing.assert_close(feats.abs().double(), (u[:, :5] * s[:5]).abs(), rtol=1e-4, atol=1e-4)
    with pytest.raises(DataError, match="fitted"):
        F.PCAExtractor()(real)


# ----------------------------------------------------------------------------- cache
def test_feature_cache_key_and_hit(tmp_path):
    f = tmp_path / "a.png"
    f.write_bytes(b"x")
    key = F.cache_key([f], {"extractor": "e"})
    calls = []
    compute = lambda: calls.append(1) or {"features": torch.ones(2, 3)}  # noqa: E731
    a, hit_a = F.cached_features(key, compute)
    b, hit_b = F.cached_features(key, compute)
    assert (hit_a, hit_b) == (False, True) and len(calls) == 1 and torch.equal(a["features"], b["features"])
    assert (tmp_path / "cache" / "features" / f"{key}.safetensors").is_file()
    f.write_bytes(b"xy")  # size (and mtime) change -> new key
    assert F.cache_key([f], {"extractor": "e"}) != key
    assert F.cache_key([f], {"extractor": "other"}) != F.cache_key([f], {"extractor": "e"})


# ----------------------------------------------------------------------------- evaluate
def _assert_in_interval(entry):
    lo, hi = entry["ci95"]
    assert lo <= entry["value"] <= hi


def test_eval_2d_report_with_inception(tmp_path, monkeypatch):
    """Every number in report.json against an independent computation: clean-fid's feature
    pipeline and `frechet_distance` / `kernel_distance`, Naeem et al.'s PRDC re-typed, and
    MS-SSIM re-typed from Wang et al. on the PNGs read with PIL."""
    from cleanfid.fid import frechet_distance as cleanfid_fd, kernel_distance
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.utils import ResizeDataset
    from test_metrics_math import _msssim_reference, _naeem_reference

    from medgen.cli import main
    from medgen.metrics.msssim import random_pairs

    _write_inception(tmp_path / "w")
    monkeypatch.setenv("MEDGEN_WEIGHTS_DIR", str(tmp_path / "w"))
    real = _blobs(tmp_path / "real", 12, (32, 32), seed=0)
    fake = _blobs(tmp_path / "fake", 12, (32, 32), seed=1, radius=0.45)
    before = sorted(p.name for p in real.iterdir())
    out = tmp_path / "report"
    assert main(["eval", "--real", str(real), "--fake", str(fake), "--out", str(out), "--bootstrap", "10", "--msssim-pairs", "8"]) == 0
    rep = json.loads((out / "report.json").read_text())
    m = rep["metrics"]
    assert set(m) == {"fid", "kid", "precision", "recall", "density", "coverage", "msssim_fake", "msssim_real"}
    assert rep["recipe"]["features"]["extractor"] == "inception"
    assert rep["recipe"]["features"]["weights_sha256"] == F.sha256_file(tmp_path / "w" / F.INCEPTION_FILE)
    assert (rep["recipe"]["n_real"], rep["recipe"]["n_fake"]) == (12, 12)

    net = InceptionV3W(str(tmp_path / "w"), download=False).eval()
    files = {name: sorted(str(p) for p in folder.glob("*.png")) for name, folder in (("real", real), ("fake", fake))}
    with torch.no_grad():
        feats = {name: net(torch.stack(list(ResizeDataset(fs, mode="clean")))).double().numpy() for name, fs in files.items()}
    r, f = feats["real"], feats["fake"]
    # FD is invariant under rotations: in an orthonormal basis of the 24 points' span (about the
    # real mean) it is the same number, and clean-fid's sqrtm takes 24x24 instead of 2048x2048
    q, _ = np.linalg.qr((np.concatenate([r, f]) - r.mean(0)).T)  # (2048, 24)
    rq, fq = (r - r.mean(0)) @ q, (f - r.mean(0)) @ q
    want_fid = cleanfid_fd(rq.mean(0), np.cov(rq, rowvar=False), fq.mean(0), np.cov(fq, rowvar=False))
    assert m["fid"]["value"] == pytest.approx(want_fid, rel=1e-4)
    # 12 vs 12 rows: every KID subset is the whole set, so clean-fid's single subset is exact
    assert m["kid"]["value"] == pytest.approx(1e3 * kernel_distance(r, f, num_subsets=1, max_subset_size=1000), rel=1e-4)
    assert m["kid"]["scale"] == 1000
    naeem = {**_naeem_reference(r, f, 3), **{k: v for k, v in _naeem_reference(r, f, 5).items() if k in ("density", "coverage")}}
    for name in ("precision", "recall", "density", "coverage"):
        assert m[name]["value"] == pytest.approx(naeem[name], abs=1e-9), name
    for name in ("fake", "real"):
        x = [np.asarray(Image.open(p), dtype=np.float64) / 255 for p in files[name]]
        pairs = random_pairs(12, 8, seed=0).tolist()
        cfg = rep["recipe"]["msssim"]
        want = np.mean([_msssim_reference(x[i], x[j], cfg["weights"], cfg["kernel_size"]) for i, j in pairs])
        assert m[f"msssim_{name}"]["value"] == pytest.approx(want, abs=2e-5)
    for entry in m.values():
        _assert_in_interval(entry)
    md = (out / "report.md").read_text()
    assert "| fid |" in md and "| kid (x1000) |" in md and "negative" in md

    for name in ("report.md", "metrics.png", "samples.png"):
        assert (out / name).is_file()
    assert sorted(p.name for p in real.iterdir()) == before  # inputs untouched
    # an existing report is not replaced without --overwrite
    assert main(["eval", "--real", str(real), "--fake", str(fake), "--out", str(out), "--bootstrap", "0"]) == 2


def test_eval_3d_volume_and_2p5d(tmp_path):
    """PCA features are reported as fd_pca/kid_pca (never `fid`), with values equal to an
    independent computation: numpy PCA of the real volumes + clean-fid's FD and KID."""
    from cleanfid.fid import frechet_distance as cleanfid_fd, kernel_distance

    from medgen.data import load_images
    from medgen.metrics.report import evaluate

    real = _blobs(tmp_path / "real", 8, (16, 16, 16), seed=0)
    fake = _blobs(tmp_path / "fake", 8, (16, 16, 16), seed=1, radius=0.45)
    rep = evaluate(real, fake, tmp_path / "r3", bootstrap=5, msssim_pairs=4, metrics=("fid", "kid", "prdc", "msssim"))
    m = rep["metrics"]
    assert not any(k.startswith("fid") or k == "kid" for k in m)
    assert set(m["fd_pca_2.5d"]) >= {"xy", "zx", "yz", "mean"}
    assert m["fd_pca_2.5d"]["mean"]["value"] == pytest.approx(np.mean([m["fd_pca_2.5d"][p]["value"] for p in ("xy", "zx", "yz")]))
    assert m["fd_pca_2.5d"]["n_slices"] == {"xy": 16, "zx": 16, "yz": 16}
    assert rep["recipe"]["features"]["extractor"] == "pca" and rep["recipe"]["features_2.5d"]["extractor"] == "pca"
    assert rep["recipe"]["metric_keys"] == {"fid": "fd_pca", "kid": "kid_pca"}

    # 8 real volumes -> 7 components span the centred real set, so any basis of it gives this FD
    x = load_images(real)[0].flatten(1).double().numpy()
    y = load_images(fake)[0].flatten(1).double().numpy()
    _, _, vh = np.linalg.svd(x - x.mean(0), full_matrices=False)
    r, f = (x - x.mean(0)) @ vh[:7].T, (y - x.mean(0)) @ vh[:7].T
    want = cleanfid_fd(r.mean(0), np.cov(r, rowvar=False), f.mean(0), np.cov(f, rowvar=False))
    assert m["fd_pca"]["value"] == pytest.approx(want, rel=1e-6)
    assert m["kid_pca"]["value"] == pytest.approx(1e3 * kernel_distance(r, f, num_subsets=1, max_subset_size=1000), rel=1e-6)
    for entry in [m["fd_pca"], m["kid_pca"], *(m["fd_pca_2.5d"][p] for p in ("xy", "zx", "yz", "mean"))]:
        _assert_in_interval(entry)
    md = (tmp_path / "r3" / "report.md").read_text()
    assert "| fd_pca |" in md and "| kid_pca (x1000) |" in md and "| fid" not in md
    # a set against itself: every FD is ~0
    same = evaluate(real, real, None, bootstrap=0, metrics=("fid",))
    assert abs(same["metrics"]["fd_pca"]["value"]) < 1e-6
    assert all(abs(same["metrics"]["fd_pca_2.5d"][p]["value"]) < 1e-6 for p in ("xy", "zx", "yz"))


def test_eval_bad_inputs(tmp_path):
    from medgen.cli import main
    from medgen.metrics.report import evaluate

    (tmp_path / "empty").mkdir()
    real = _blobs(tmp_path / "real", 6, (16, 16), seed=0)
    with pytest.raises(DataError):
        evaluate(tmp_path / "empty", real, None, bootstrap=0)
    with pytest.raises(DataError, match="2D.*3D|3D.*2D"):
        evaluate(real, _blobs(tmp_path / "vol", 3, (16, 16, 16), seed=0), None, bootstrap=0)
    with pytest.raises(DataError, match="at least 2"):
        evaluate(real, _blobs(tmp_path / "one", 1, (16, 16), seed=0), None, bootstrap=0)
    with pytest.raises(DataError, match="k\\+1"):
        evaluate(real, _blobs(tmp_path / "three", 3, (16, 16), seed=0), None, bootstrap=0, metrics=("prdc",))
    mixed = _blobs(tmp_path / "mixed", 3, (16, 16), seed=0)
    _blobs(mixed, 1, (16, 16, 16), seed=0)  # a NIfTI volume among PNG images
    with pytest.raises(DataError):
        evaluate(real, mixed, None, bootstrap=0)
    assert main(["eval", "--real", str(tmp_path / "empty"), "--fake", str(real), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
