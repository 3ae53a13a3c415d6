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

from medgen.errors import DataError, RunError
from medgen.privacy.detector import CopyEncoder, PixelDetector, SSLCopyDetector, augment, load_detector, nt_xent_loss, train_detector
from medgen.privacy.memorization import authpct, best_match, c_t_statistic, carlini_relative_l2, copy_threshold

torch.set_num_threads(2)


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
    still = dict(max_rotation_deg=0, max_shift=0, max_scale=0, intensity=0, max_noise=0)
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
