"""Privacy audit: detector math against reference computations, the calibrated threshold in
closed form, planted copies in 2D and 3D on the built-in cohort, degenerate input, filter-out,
and the CLI end to end."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm

from medgen.errors import DataError, RunError
from medgen.privacy.detector import CopyEncoder, PixelDetector, SSLCopyDetector, augment, load_detector, nt_xent_loss, train_detector
from medgen.privacy.memorization import authpct, best_match, c_t_statistic, carlini_relative_l2, copy_threshold, leave_one_out_exceedances



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # 1 thread: on a shared 2-core machine two threads per process made the conv steps ~5x slower
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- math vs references


def test_nt_xent_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    t = 0.07
    z = torch.nn.functional.normalize(torch.cat([z1, z2]).double(), dim=1)
    n, b = z.shape[0], z1.shape[0]
    total = 0.0
    for i in range(n):  # Chen et al. 2020, eq. 1, literally
        j = (i + b) % n
        num = math.exp(float(z[i] @ z[j]) / t)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n) if k != i)
        total += -math.log(num / den)
    assert nt_xent_loss(z1, z2, t).item() == pytest.approx(total / n, rel=1e-5)
    # identical views and orthogonal images: the loss is at its minimum, near 0
    eye = torch.eye(4) * 10
    assert nt_xent_loss(eye, eye, t).item() < 1e-5


def test_augment_identity_and_flips_are_exact():
    x = torch.rand(3, 1, 8, 10) * 2 - 1
    still = dict(max_rotation_deg=0, max_shift=0, min_shift_px=0, max_scale=0, intensity=0, max_noise=0)
    assert torch.allclose(augment(x, flip_prob=0, **still), x, atol=1e-5)
    assert torch.allclose(augment(x, flip_prob=1, **still), x.flip(-1).flip(-2), atol=1e-5)
    v = torch.rand(2, 1, 6, 6, 6) * 2 - 1
    assert torch.allclose(augment(v, flip_prob=1, **still), v.flip(-1).flip(-2).flip(-3), atol=1e-5)
    # without flips, a default view of a smooth image is a small perturbation of it
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    blob = (2 * torch.exp(-(xx**2 + yy**2) / 0.2) - 1)[None, None].repeat(4, 1, 1, 1)
    y = augment(blob, torch.Generator().manual_seed(1), flip_prob=0)
    assert y.shape == blob.shape and not torch.allclose(y, blob)
    assert 0 < (y - blob).abs().mean() < 0.15


def test_encoder_shapes_and_save_load_roundtrip(tmp_path):
    enc2, enc3 = CopyEncoder(2), CopyEncoder(3)
    assert enc2(torch.randn(2, 1, 32, 32)).shape == (2, 128)  # Dar et al. 2024: 128-d in 2D
    assert enc3(torch.randn(2, 1, 16, 16, 16)).shape == (2, 32)  # 32-d in 3D
    det = SSLCopyDetector(enc2, image_size=32, train_info={"steps": 0})
    det.save(tmp_path / "det")
    assert (tmp_path / "det" / "model.safetensors").is_file()
    loaded = load_detector(tmp_path / "det")
    x = torch.rand(3, 1, 40, 40) * 2 - 1
    assert torch.allclose(loaded.embed(x), det.embed(x))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    from medgen.errors import WeightsError

    with pytest.raises(WeightsError, match="not a medgen copy detector"):
        load_detector(tmp_path / "bad")


def test_best_match_is_pearson_and_threshold_is_percentile_closed_form():
    g = torch.Generator().manual_seed(0)
    t, h = torch.randn(37, 16, generator=g), torch.randn(23, 16, generator=g)
    values, idx = best_match(t, h, "pearson")
    corr = np.corrcoef(np.concatenate([t.numpy(), h.numpy()]))[:37, 37:]  # reference Pearson
    assert np.allclose(values.numpy(), corr.max(1), atol=1e-5)
    assert (idx.numpy() == corr.argmax(1)).all()
    # tau: numpy-style linear interpolation between order statistics, by hand
    v = np.sort(values.double().numpy())
    for p in (95.0, 50.0, 99.0, 100.0):
        hpos = (len(v) - 1) * p / 100
        lo = int(math.floor(hpos))
        expected = v[lo] + (hpos - lo) * (v[min(lo + 1, len(v) - 1)] - v[lo])
        assert copy_threshold(values, p) == pytest.approx(expected, abs=1e-12)
    assert copy_threshold(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), 95) == pytest.approx(0.385)


def test_authpct_matches_dgm_eval_formula():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(50, 6, generator=g)
    gen = torch.cat([torch.randn(30, 6, generator=g), train[:10] + 1e-3])
    real = torch.cdist(train.double(), train.double())
    real.fill_diagonal_(float("inf"))
    gen_d = torch.cdist(train.double(), gen.double())
    real_min, gen_min = real.min(0), gen_d.min(0)
    expected = 100 * (real_min.values[gen_min.indices] < gen_min.values).double().mean().item()
    assert authpct(train, gen) == pytest.approx(expected)
    assert authpct(train, train[:10] + 1e-4) == 0.0  # copies are never authentic


def test_c_t_matches_reference_and_detects_copying():
    from scipy.cluster.vq import kmeans2, vq
    from scipy.stats import mannwhitneyu

    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(300, 5, generator=g).double(), torch.randn(150, 5, generator=g).double()
    fresh = torch.randn(150, 5, generator=g).double()
    ours, reason = c_t_statistic(train, test, fresh, n_cells=3, seed=0)
    assert reason is None

    # reference: Meehan et al. 2020 with the same cells; nearest-neighbour distances by brute force
    t, p, q = train.numpy(), test.numpy(), fresh.numpy()
    cent, t_cells = kmeans2(t, 3, seed=0, minit="++")
    p_cells, q_cells = vq(p, cent)[0], vq(q, cent)[0]
    zs, ws = [], []
    for c in range(3):
        tc, pc, qc = t[t_cells == c], p[p_cells == c], q[q_cells == c]
        if len(qc) <= 20:
            continue
        lq = np.linalg.norm(qc[:, None] - tc[None], axis=2).min(1)
        lp = np.linalg.norm(pc[:, None] - tc[None], axis=2).min(1)
        u = mannwhitneyu(lq, lp, alternative="less").statistic
        m, n = len(lq), len(lp)
        zs.append((u - (m * n / 2 - 0.5)) / math.sqrt(m * n * (m + n + 1) / 12))
        ws.append(len(pc) / len(p))
    assert ours == pytest.approx(np.dot(ws, zs) / np.sum(ws), rel=1e-9)
    assert abs(ours) < 3  # fresh samples from the training distribution: no copying
    copies, _ = c_t_statistic(train, test, train[:150] + 1e-3, seed=0)
    assert copies < -5  # copies sit far closer to training than held-out data does


def test_carlini_relative_l2_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(80, 12, generator=g)
    gen = torch.cat([torch.randn(5, 12, generator=g), train[:3] + 0.01 * torch.randn(3, 12, generator=g)])
    ratio, idx = carlini_relative_l2(gen, train, n=50, alpha=0.5)
    d = torch.cdist(gen.double(), train.double())
    top = d.topk(50, dim=1, largest=False).values
    expected = top[:, 0] / (0.5 * top.mean(1))
    assert torch.allclose(ratio.double(), expected, rtol=1e-4)
    assert (idx[-3:] == torch.arange(3)).all()
    assert (ratio[-3:] < 1 / 3).all() and (ratio[:5] > 1).all()


# ----------------------------------------------------------------------------- cohort


@pytest.fixture(scope="module")
def cohort_150_2d(tmp_path_factory):
    from medgen.data import load_images
    from medgen.data.cohort import synth_brain

    path = synth_brain(tmp_path_factory.mktemp("audit") / "c2d", n=150, dims=2, size=32, seed=0)
    return load_images(path)


# ----------------------------------------------------------------------------- degenerate input


def test_degenerate_inputs_error_or_inconclusive_never_nan(cohort_150_2d):
    from medgen.privacy.audit import audit_images

    x, _ = cohort_150_2d
    pixel = PixelDetector(2)
    train, holdout, synth = x[:20], x[20:45], x[45:55]

    with pytest.raises(DataError, match="at least 2"):  # tiny sets
        audit_images(x[:1], holdout, synth, pixel)
    with pytest.raises(DataError, match="at least 2"):
        audit_images(train, x[:1], synth, pixel)
    with pytest.raises(DataError, match="shapes"):
        audit_images(train, holdout, torch.zeros(2, 1, 16, 16), pixel)
    with pytest.raises(DataError, match="NaN"):
        audit_images(train, holdout, torch.cat([synth, torch.full_like(synth[:1], float("nan"))]), pixel, names={"synthetic": [f"s{i}.png" for i in range(11)]})

    # a holdout that is the training set: calibration impossible -> error naming the problem
    with pytest.raises(DataError, match="overlaps the training set"):
        audit_images(train, train.clone(), synth, pixel)
    # partial overlap: those images are left out of the calibration, and the verdict is inconclusive
    mixed = torch.cat([train[:5], holdout])
    r = audit_images(train, mixed, synth, pixel)
    assert r.report["n_holdout"] == len(holdout) and r.report["holdout_dropped"] == 5
    assert r.verdict == "inconclusive" and any("identical to training images" in w for w in r.reasons)
    assert r.report["thresholds"]["pixel"] == pytest.approx(audit_images(train, holdout, synth, pixel).report["thresholds"]["pixel"])

    # identical training images: the embedding collapses to a point -> inconclusive, never NaN
    same = x[:1].repeat(6, 1, 1, 1)
    r = audit_images(same, holdout, same[:3], pixel)
    assert r.verdict == "inconclusive" and any("collapsed" in w for w in r.reasons)
    json.dumps(r.report, allow_nan=False)

    # blank (constant) images: Pearson is undefined -> similarity 0, reported as blank, never NaN
    blank = torch.full((4, 1, 32, 32), -1.0)
    r = audit_images(torch.cat([train, blank[:2]]), holdout, torch.cat([synth, blank[2:]]), pixel)
    assert r.report["not_anatomy"]["blank"] == 2 and not r.is_copy[-2:].any()
    assert torch.isfinite(r.synthetic_best).all() and torch.isfinite(r.audit.fits[0].holdout_train_best).all()
    json.dumps(r.report, allow_nan=False)

    # near-identical held-out and training images put tau at 1: nothing can exceed it -> inconclusive
    twins = torch.cat([x[:1], x[:1] + 1e-3])  # near-identical, not bit-identical
    r = audit_images(twins, twins + 5e-4, twins, pixel)
    assert r.verdict == "inconclusive" and any("largest possible similarity" in w for w in r.reasons)

    with pytest.raises(DataError, match="at least 2 training images"):
        train_detector(x[:1], steps=1, progress=False)
    with pytest.raises(DataError, match="constant"):
        train_detector(blank, steps=1, progress=False)


# ----------------------------------------------------------------------------- files and CLI


def _tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def audit_folders(tmp_path):
    """train/holdout/synthetic folders of real cohort files; synthetic = 4 other subjects plus
    byte-identical copies of 2 training files, with a manifest.csv."""
    import shutil

    from medgen.data.cohort import synth_brain

    cohort = synth_brain(tmp_path / "cohort", n=36, dims=2, size=32, seed=1)
    files = sorted(cohort.glob("*.png"))
    folders = {name: tmp_path / name for name in ("train", "holdout", "synthetic")}
    for name, chunk in (("train", files[:16]), ("holdout", files[16:30]), ("synthetic", files[30:34])):
        folders[name].mkdir()
        for f in chunk:
            shutil.copy(f, folders[name] / f.name)
    for i, f in enumerate(files[:2]):
        shutil.copy(f, folders["synthetic"] / f"copy_{i}.png")
    rows = ["file,label,seed"] + [f"{p.name},0,{i}" for i, p in enumerate(sorted(folders["synthetic"].glob("*.png")))]
    (folders["synthetic"] / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folders


def test_run_audit_writes_report_and_filter_out_copies_without_touching_inputs(audit_folders, tmp_path):
    from medgen.privacy.audit import run_audit

    before = {k: _tree_digest(v) for k, v in audit_folders.items()}
    synth_samples = sorted(p.name for p in audit_folders["synthetic"].glob("*.png"))
    out, kept = tmp_path / "audit", tmp_path / "kept"
    synthetic = audit_folders["synthetic"]  # a sample folder: files + manifest.csv (file,label,seed)
    report = run_audit(audit_folders["train"], audit_folders["holdout"], synthetic, out, detector="pixel", filter_out=kept)

    assert {k: _tree_digest(v) for k, v in audit_folders.items()} == before  # inputs untouched
    for name in ("report.json", "report.md", "pairs.csv", "similarity_histogram.png", "top_pairs.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    rows = list(csv.DictReader((out / "pairs.csv").open()))
    assert list(rows[0].keys())[:4] == ["synthetic", "nearest_train", "similarity", "is_copy"]  # the contract columns first
    assert {"flagged_by", "not_anatomy", "similarity_pixel", "nearest_train_pixel"} <= set(rows[0])
    assert report["verdict"] == "inconclusive" and any("held-out images" in r for r in report["reasons"])  # 14 held-out < 20
    # the figures show what the verdict tests: the null (held-out -> train) beside the samples and the control's copies,
    # flags apart from confirmed copies, and the bound against the policy in the titles
    fig = report["figures"]
    series = fig["histogram_series"]["pixel"]
    assert (series["null_holdout_to_train"], series["synthetic_to_train"], series["control_copies"]) == (report["n_holdout"], 6, report["control"]["n"])
    assert series["tau"] == pytest.approx(report["thresholds"]["pixel"], abs=1e-6)
    assert fig["title"].startswith("INCONCLUSIVE: at 95% confidence at most") and "(policy 5%)" in fig["title"]
    assert fig["pairs"]["control_examples"] > 0
    flagged = {Path(r["synthetic"]).name for r in rows if r["is_copy"] == "true"}
    assert {"copy_0.png", "copy_1.png"} <= flagged
    by_name = {Path(r["synthetic"]).name: r for r in rows}
    assert float(by_name["copy_0.png"]["similarity"]) == pytest.approx(1.0, abs=1e-5) and by_name["copy_0.png"]["flagged_by"] == "pixel"
    # filtered set: byte-identical copies of exactly the files not flagged
    kept_files = sorted(p.name for p in kept.glob("*.png"))
    assert kept_files == sorted(set(synth_samples) - flagged)
    for n in kept_files:
        assert (kept / n).read_bytes() == (audit_folders["synthetic"] / n).read_bytes()
    assert report["filter_out"] == {"path": str(kept), "kept": len(kept_files), "removed": len(flagged)}
    manifest = list(csv.DictReader((kept / "manifest.csv").open()))
    assert sorted(r["file"] for r in manifest) == kept_files and list(manifest[0]) == ["file", "label", "seed"]
    # existing outputs are refused without --overwrite; outputs may never land inside an input
    with pytest.raises(RunError, match="overwrite"):
        run_audit(audit_folders["train"], audit_folders["holdout"], synthetic, out, detector="pixel")
    with pytest.raises(RunError, match="input folder"):
        run_audit(audit_folders["train"], audit_folders["holdout"], synthetic, out, detector="pixel", overwrite=True, filter_out=audit_folders["synthetic"] / "f")
    # any extractor of the evaluation registry works as a detector (pca: fitted on the training set)
    r = run_audit(audit_folders["train"], audit_folders["holdout"], synthetic, out, detector="pca", overwrite=True)
    assert r["detector"] == "pca" and r["detectors"]["pca"]["recipe"]["recipe"]["extractor"] == "pca"
    rows = {Path(row["synthetic"]).name: row for row in csv.DictReader((out / "pairs.csv").open())}
    assert rows["copy_0.png"]["is_copy"] == rows["copy_1.png"]["is_copy"] == "true"
    # a list of samples counts as an input folder too (their common folder)
    from medgen.data import scan_dataset

    with pytest.raises(RunError, match="input folder"):
        run_audit(audit_folders["train"], audit_folders["holdout"], scan_dataset(synthetic), out, detector="pixel", overwrite=True, filter_out=audit_folders["synthetic"] / "f")
    assert {k: _tree_digest(v) for k, v in audit_folders.items()} == before


def test_cli_train_detector_then_audit_end_to_end(audit_folders, tmp_path, capsys):
    from medgen.cli import main

    det = tmp_path / "detector"
    assert main(["audit", "train-detector", "--train", str(audit_folders["train"]), "--out", str(det), "--steps", "30", "--batch-size", "16"]) == 0
    assert (det / "model.safetensors").is_file() and json.loads((det / "config.json").read_text())["encoder"]["embed_dim"] == 128
    # manifest-free synthetic folder for the flat form
    synth = tmp_path / "synth_plain"
    synth.mkdir()
    for p in audit_folders["synthetic"].glob("*.png"):
        synth.joinpath(p.name).write_bytes(p.read_bytes())
    out = tmp_path / "audit"
    code = main(["audit", "--train", str(audit_folders["train"]), "--holdout", str(audit_folders["holdout"]), "--synthetic", str(synth),
                 "--out", str(out), "--detector", str(det), "--percentile", "90", "--filter-out", str(tmp_path / "kept")])
    report = json.loads((out / "report.json").read_text())
    # 30 steps do not train the detector and 14 held-out images are too few: never a pass, exit code 3
    assert code == 3 and report["verdict"] == "inconclusive"
    assert any("did not converge" in r for r in report["reasons"]) and any("held-out images" in r for r in report["reasons"])
    assert report["dar"]["percentile"] == 90 and report["detector"] == "ssl" and report["detectors"]["ssl"]["recipe"]["source"] == str(det)
    printed = capsys.readouterr().out
    assert "verdict: inconclusive" in printed and "inconclusive: " in printed
    flagged = {Path(r["synthetic"]).name for r in csv.DictReader((out / "pairs.csv").open()) if r["is_copy"] == "true"}
    assert {"copy_0.png", "copy_1.png"} <= flagged  # exact copies are still listed and filtered whatever the verdict
    assert not (tmp_path / "kept" / "copy_0.png").exists() and (tmp_path / "kept").is_dir()
    # the default union: the SSL detector is trained on the fly and saved beside the audit
    code = main(["audit", "--train", str(audit_folders["train"]), "--holdout", str(audit_folders["holdout"]), "--synthetic", str(synth),
                 "--out", str(out), "--overwrite", "--steps", "20", "--batch-size", "16"])
    report = json.loads((out / "report.json").read_text())
    assert code == 3 and report["detector"] == "ssl+pixel-rank" and report["detectors"]["ssl"]["saved_to"] == "detector/"
    assert load_detector(out / "detector").encoder.config["embed_dim"] == 128
    # errors: missing options, an existing output
    with pytest.raises(SystemExit):
        main(["audit", "--train", str(audit_folders["train"])])
    assert main(["audit", "--train", str(audit_folders["train"]), "--holdout", str(audit_folders["holdout"]), "--synthetic", str(synth), "--out", str(out), "--detector", "pixel"]) == 2
    assert "already holds files" in capsys.readouterr().err


def test_ssl_audit_3d_pipeline(tmp_path):
    """3D end to end at toy size (the quality check is the slow 3D test of test_privacy_audit):
    the 3D encoder trains, exact copies are flagged with similarity 1, figures are drawn from slices."""
    from medgen.data import load_images
    from medgen.data.cohort import synth_brain
    from medgen.privacy.audit import run_audit

    cohort = synth_brain(tmp_path / "c3d", n=20, dims=3, size=16, seed=0)
    x, samples = load_images(cohort)
    train, holdout = samples[:10], samples[10:16]
    synthetic = samples[16:] + samples[:2]  # 4 other subjects + 2 training volumes
    report = run_audit(train, holdout, synthetic, tmp_path / "audit", detector="ssl", detector_options={"steps": 40, "batch_size": 10})
    rows = list(csv.DictReader((tmp_path / "audit" / "pairs.csv").open()))
    copies = [r for r in rows if Path(r["synthetic"]).name in {samples[0].path.name, samples[1].path.name}]
    assert all(r["is_copy"] == "true" and float(r["similarity"]) == pytest.approx(1.0, abs=1e-5) for r in copies)
    assert report["detectors"]["ssl"]["recipe"]["encoder"]["embed_dim"] == 32 and report["spatial_dims"] == 3
    assert report["verdict"] == "inconclusive"  # 6 held-out volumes, a 40-step detector
    assert (tmp_path / "audit" / "top_pairs.png").stat().st_size > 0
    json.dumps(report, allow_nan=False)


def test_augment_shift_floor_is_at_least_one_pixel():
    """On tiny inputs the relative shift range is below a pixel; the floor keeps whole-pixel
    shifts (what a copy shows) among the positives."""
    x = torch.zeros(64, 1, 16, 16)
    x[:, :, 8, 8] = 1  # a single bright pixel: its displacement is the shift
    g = torch.Generator().manual_seed(0)
    only_shift = dict(max_rotation_deg=0, max_scale=0, flip_prob=0, intensity=0, max_noise=0)
    grid = torch.arange(16.0)
    col = lambda y: (y[:, 0].sum(1) * grid).sum(1) / y[:, 0].sum((1, 2))  # centre of mass along W
    assert (col(augment(x, g, min_shift_px=0, **only_shift)) - 8).abs().max() < 0.7  # 4% of 16 px
    assert (col(augment(x, g, **only_shift)) - 8).abs().max() > 0.85


def test_audit_threshold_and_flags_match_brute_force_pearson(cohort_150_2d):
    """Through the whole audit: tau = the conformal quantile of each held-out image's best Pearson
    correlation with the training set (the direction samples are scored in); a sample is above
    tau when its best training correlation exceeds it. Dar et al.'s tau (percentile of each
    training image's best held-out correlation) is reported beside it."""
    from medgen.privacy.audit import audit_images

    x, _ = cohort_150_2d
    train, holdout = x[:25].clone(), x[25:45]
    train[1] = train[0] + 0.02 * torch.randn(train[0].shape, generator=torch.Generator().manual_seed(0))  # two scans of one patient
    synth = torch.cat([x[45:57], train[:1], train[5:6], train[9:10]])  # new subjects and three copies
    flat = lambda t: t.flatten(1).double().numpy()  # the 32^2 pixel detector embeds the image itself
    corr = np.corrcoef(np.concatenate([flat(train), flat(holdout)]))[:25, 25:]  # (train, holdout)
    holdout_train, train_holdout = np.sort(corr.max(0)), corr.max(1)
    synth_train = np.corrcoef(np.concatenate([flat(synth), flat(train)]))[:15, 15:]
    for level, rank in ((0.005, 20), (0.2, 17)):  # ceil(21 (1 - level)): the max of 20, then the 17th smallest
        r = audit_images(train, holdout, synth, PixelDetector(2), null_level=level, percentile=80.0, control_families=[])
        tail = np.tanh(np.arctanh(holdout_train).mean() + norm.ppf(1 - level) * np.arctanh(holdout_train).std(ddof=1))
        tau = max(holdout_train[rank - 1], tail)  # the conformal quantile, or the Gaussian tail of the z-scores beyond it
        assert r.report["threshold"] == pytest.approx(tau, abs=1e-6)
        assert r.report["detectors"]["pixel"]["null_pct"] == pytest.approx(100 * float(leave_one_out_exceedances(torch.from_numpy(holdout_train), level).double().mean()))
        assert r.report["dar"]["thresholds"]["pixel"] == pytest.approx(np.percentile(train_holdout, 80.0), abs=1e-6)
        assert (r.is_copy.numpy() == (synth_train.max(1) > tau)).all()
        assert (r.synthetic_nearest.numpy() == synth_train.argmax(1)).all()
        assert r.report["n_copy_sources"] == len(set(synth_train.argmax(1)[synth_train.max(1) > tau]))
        assert r.report["n_mem"] == int((synth_train.max(0) > tau).sum())  # Dar et al.: training images with a synthetic match above tau
        assert r.report["n_mem"] > r.report["n_copy_sources"]  # the copy of scan 0 also exposes scan 1, but points at one
        assert r.verdict == "inconclusive" and r.bound is None  # no positive control: no bound, never a pass


# ----------------------------------------------------------------------------- new measures vs references


def test_pixel_rank_similarity_is_spearman_with_ties():
    from scipy.stats import rankdata, spearmanr

    from medgen.privacy.detector import average_ranks

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (6, 40), generator=g).float()  # many ties, as in a flat background
    assert torch.equal(average_ranks(x), torch.from_numpy(rankdata(x.numpy(), axis=1) - 1).float())
    images = torch.rand(5, 1, 32, 32, generator=g) * 2 - 1
    images[:, :, :8] = -1  # a constant band: ties
    det = PixelDetector(2, size=16, ranks=True, smooth=0)
    values, idx = best_match(det.embed(images[:3]), det.embed(images[3:]))
    small = torch.nn.functional.interpolate(images, size=(16, 16), mode="area").flatten(1).numpy()
    rho = np.array([[spearmanr(small[i], small[j]).statistic for j in (3, 4)] for i in range(3)])
    assert np.allclose(values.numpy(), rho.max(1), atol=1e-6) and (idx.numpy() == rho.argmax(1)).all()
    assert torch.equal(PixelDetector(2, size=16, ranks=True).embed(images), det.embed(images))  # no smoothing in 2D
    # 3D smooths first (sigma 1 voxel at the input): the same as ranking a blurred volume
    from medgen.privacy.families import gaussian_blur

    vols = torch.rand(3, 1, 16, 16, 16, generator=g) * 2 - 1
    smoothed = torch.stack([gaussian_blur(v, 1.0) for v in vols])
    assert torch.allclose(PixelDetector(3, ranks=True).embed(vols), PixelDetector(3, ranks=True, smooth=0).embed(smoothed))


def test_copy_rate_test_is_the_one_sided_hypergeometric_tail():
    from scipy.stats import fisher_exact, hypergeom

    from medgen.privacy.memorization import copy_rate_test

    for k_s, n_s, k_h, n_h in [(18, 64, 4, 40), (3, 64, 4, 40), (0, 10, 0, 20), (12, 12, 1, 30)]:
        # permutation null: given k_s + k_h flagged among n_s + n_h images, P(synthetic holds >= k_s of them)
        tail = hypergeom(n_s + n_h, k_s + k_h, n_s).sf(k_s - 1)
        assert copy_rate_test(k_s, n_s, k_h, n_h) == pytest.approx(tail, rel=1e-9)
        assert copy_rate_test(k_s, n_s, k_h, n_h) == pytest.approx(fisher_exact([[k_s, n_s - k_s], [k_h, n_h - k_h]], alternative="greater")[1])
    assert copy_rate_test(18, 64, 4, 40) < 0.05 < copy_rate_test(6, 64, 4, 40)


def test_effective_rank_closed_forms():
    from medgen.privacy.memorization import effective_rank

    g = torch.Generator().manual_seed(0)
    assert effective_rank(torch.ones(10, 8) * 3) == 0.0  # collapsed to a point
    line = torch.randn(50, 1, generator=g) * torch.randn(1, 8, generator=g) + 5
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-4)  # float32 rounding leaves tiny singular values
    # two orthogonal directions with equal singular values: exp(log 2) = 2
    basis = torch.eye(8)[:2]
    coeff = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert effective_rank(coeff @ basis) == pytest.approx(2.0, abs=1e-6)
    assert effective_rank(torch.randn(2000, 16, generator=g)) > 15


def _blob(shape, centre, width=0.02):
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    return (2 * torch.exp(-sum((a - c) ** 2 for a, c in zip(axes, centre)) / width) - 1)[None]  # (1, *S)


def _centre(img):  # centre of mass of the bright part in grid coordinates (-1..1), per axis
    w = (img[0] + 1).clamp_min(0)
    w = torch.where(w > 0.5 * w.max(), w, torch.zeros_like(w))
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in img.shape[1:]], indexing="ij")
    return torch.stack([(a * w).sum() / w.sum() for a in axes])


def test_copy_families_against_closed_forms_2d_and_3d():
    from scipy.ndimage import gaussian_filter

    from medgen.privacy.families import VALIDATION_FAMILIES, gaussian_blur, make_copies

    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 24, 20, generator=g) * 2 - 1
    ref = gaussian_filter(img[0].double().numpy(), sigma=1.0, mode="mirror", truncate=3.0)  # torch's reflect = scipy's mirror
    assert np.allclose(gaussian_blur(img, 1.0)[0].numpy(), ref, atol=1e-5)

    train = torch.rand(6, 1, 24, 24, generator=g) * 2 - 1
    gam = make_copies(train, "gamma", [0, 1], seed=3)
    u, v = (train[:2] + 1) / 2, (gam + 1) / 2
    mask = (u > 0.05) & (u < 0.95)
    exponent = (v[mask].log() / u[mask].log()).view(-1)  # one exponent per image, in [1.4, 1.6] or its inverse
    per_image = [(v[k][mask[k]].log() / u[k][mask[k]].log()) for k in range(2)]
    for e in per_image:
        assert e.std() < 1e-3 and (1.4 <= e.mean() <= 1.6 or 1 / 1.6 <= e.mean() <= 1 / 1.4)
    assert exponent.numel() > 0
    mixed = make_copies(train, "blend", [2], seed=1)[0]
    assert any(torch.allclose(mixed, (0.7 * train[2] + 0.3 * train[j]).clamp(-1, 1), atol=1e-6) for j in range(6) if j != 2)

    # geometry on a blob off the centre: rotation by 10-15 deg, zoom by 1/0.90..1/0.85, elastic <= 3% of the view
    blob = _blob((64, 64), (0.0, 0.5))[None]  # (1, 1, 64, 64): at row 0, column +0.5
    c0 = _centre(blob[0])
    rot = _centre(make_copies(blob, "rotation", [0], seed=0)[0])
    angle = math.degrees(abs(math.atan2(rot[0], rot[1]) - math.atan2(c0[0], c0[1])))
    assert 9.5 <= angle <= 15.5 and abs(rot.norm() - c0.norm()) < 0.02
    zoomed = _centre(make_copies(blob, "zoom", [0], seed=0)[0])
    assert 1 / 0.91 <= float(zoomed[1] / c0[1]) <= 1 / 0.84
    moved = _centre(make_copies(blob, "elastic", [0], seed=0)[0]) - c0
    assert 0 < moved.norm() <= 2 * 0.03 * math.sqrt(2) + 0.01  # grid spans 2: 3% of the view = 0.06
    flat = torch.zeros(1, 1, 16, 16)
    assert torch.allclose(make_copies(flat, "downup", [0])[0], flat[0]) and torch.allclose(make_copies(flat, "blur", [0])[0], flat[0])

    vol = torch.rand(4, 1, 12, 12, 12, generator=g) * 2 - 1
    for fam in VALIDATION_FAMILIES:
        if fam == "autoencoder":
            out = make_copies(vol, fam, [0, 1], autoencoder=lambda b: b * 0.5)
            assert torch.allclose(out, vol[:2] * 0.5)
            continue
        out = make_copies(vol, fam, [0, 1], seed=0)
        assert out.shape == (2, 1, 12, 12, 12) and out.abs().max() <= 1 and not torch.allclose(out, vol[:2])


def test_smoothness_tells_noise_from_images():
    from medgen.privacy.calibration import smoothness
    from medgen.privacy.families import gaussian_blur

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 1, 64, 64, generator=g)
    assert smoothness(noise).abs().max() < 0.05
    smooth = torch.stack([gaussian_blur(n, 3.0) for n in noise])
    assert smoothness(smooth).min() > 0.9
    assert smoothness(torch.randn(2, 1, 16, 16, 16, generator=g)).abs().max() < 0.1
