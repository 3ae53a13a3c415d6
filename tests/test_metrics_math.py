"""Metric math against closed forms and reference implementations (clean-fid, torchmetrics,
Naeem et al.'s `prdc` code re-typed with sklearn, pytorch-msssim, scikit-image's SSIM) and
interval coverage on Gaussians with a closed-form Fréchet distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medgen.errors import DataError
from medgen.metrics.bootstrap import bootstrap_mean, fd_infinite_n, half_sample_two_sample
from medgen.metrics.fid import frechet_distance, frechet_distance_from_statistics, gaussian_statistics, trace_sqrt_product
from medgen.metrics.kid import kernel_inception_distance, mmd2_unbiased
from medgen.metrics.msssim import msssim_diversity, msssim_settings, pairwise_msssim, random_pairs
from medgen.metrics.prdc import density_coverage, precision_recall, prdc


def _exact_gaussian_sample(n, mu, cov, seed):
    """n rows whose sample mean and unbiased covariance are exactly mu and cov."""
    z = np.random.default_rng(seed).normal(size=(n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whiten: cov(z) = I
    return z @ np.linalg.cholesky(cov).T + mu


def _random_cov(d, seed):
    a = np.random.default_rng(seed).normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------- FID
def test_fid_of_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(300, 64)) * 5 + 2
    assert abs(frechet_distance(x, x)) < 1e-9 * np.trace(np.cov(x, rowvar=False))


def test_fid_closed_form_two_gaussians():
    """Diagonal covariances: d^2 = |mu1-mu2|^2 + sum (sqrt a_i - sqrt b_i)^2; rotated by a
    common orthogonal Q (commuting, non-diagonal) the value is unchanged."""
    d = 16
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.5, 4, d), rng.uniform(0.5, 4, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    x = _exact_gaussian_sample(400, mu1 @ q.T, q @ np.diag(a) @ q.T, 2)
    y = _exact_gaussian_sample(500, mu2 @ q.T, q @ np.diag(b) @ q.T, 3)
    assert frechet_distance(x, y) == pytest.approx(want, rel=1e-10)


def test_fid_non_commuting_closed_form_2d():
    """2x2: Tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M with non-negative eigenvalues."""
    s1 = np.array([[2.0, 0.3], [0.3, 1.0]])
    s2 = np.array([[1.0, -0.4], [-0.4, 3.0]])
    m = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    want = 1.0 + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    got = frechet_distance_from_statistics(np.zeros(2), s1, np.array([1.0, 0.0]), s2)
    assert got == pytest.approx(want, rel=1e-12)


def test_fid_equals_cleanfid_and_torchmetrics():
    from cleanfid.fid import frechet_distance as cleanfid_fd
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(4)
    mix = rng.normal(size=(64, 64))
    x = rng.normal(size=(600, 64)) @ mix
    y = (rng.normal(size=(500, 64)) * 1.3 + 0.2) @ mix
    ours = frechet_distance(x, y)
    mu1, s1 = np.mean(x, 0), np.cov(x, rowvar=False)
    mu2, s2 = np.mean(y, 0), np.cov(y, rowvar=False)
    ref = cleanfid_fd(mu1, s1, mu2, s2)
    tm = float(_compute_fid(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2))))
    assert ours == pytest.approx(ref, rel=1e-9)
    assert ours == pytest.approx(tm, rel=1e-9)


def test_fid_singular_covariance_route():
    """Fewer samples than dimensions: Cholesky fails; the general eigvals(S1 S2) route and
    the small-sample singular-value route both match clean-fid's sqrtm."""
    from cleanfid.fid import frechet_distance as cleanfid_fd

    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(20, 40)), rng.normal(size=(30, 40)) + 0.5
    mu1, s1 = gaussian_statistics(x)
    mu2, s2 = gaussian_statistics(y)
    assert int(torch.linalg.cholesky_ex(s1)[1]) != 0
    ref = cleanfid_fd(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy())
    assert frechet_distance_from_statistics(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(x, y) == pytest.approx(ref, rel=1e-6)  # (N, M) singular-value route
    # and both routes agree on a PD pair
    s1, s2 = torch.from_numpy(_random_cov(8, 6)), torch.from_numpy(_random_cov(8, 7))
    general = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
    assert float(trace_sqrt_product(s1, s2)) == pytest.approx(float(general), rel=1e-12)


def test_fid_bad_inputs():
    with pytest.raises(DataError, match="at least 2 samples"):
        frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(DataError, match="dimensions differ"):
        frechet_distance(np.ones((5, 4)), np.ones((5, 3)))


# ----------------------------------------------------------------------------- KID
def test_kid_matches_definition_cleanfid_and_torchmetrics():
    from cleanfid.fid import kernel_distance
    from torchmetrics.image.kid import poly_mmd

    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(40, 6)) + 0.3
    k = lambda a, b: (a @ b / 6 + 1) ** 3  # noqa: E731
    m = 40
    brute = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    brute -= 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    ours = float(mmd2_unbiased(torch.from_numpy(x), torch.from_numpy(y)))
    assert ours == pytest.approx(brute, rel=1e-10)
    # one subset of all rows: subset order does not change MMD, so the seeds don't matter
    assert kernel_inception_distance(x, y, num_subsets=1)["kid"] == pytest.approx(kernel_distance(x, y, 1, 1000), rel=1e-10)
    assert ours == pytest.approx(float(poly_mmd(torch.from_numpy(x), torch.from_numpy(y))), rel=1e-10)


def test_kid_point_masses_closed_form_and_unbiased_zero():
    """All x = a, all y = b: MMD^2_u = k(a,a) + k(b,b) - 2 k(a,b) exactly."""
    a, b = np.array([1.0, 2.0, -1.0]), np.array([0.5, -1.0, 2.0])
    k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
    out = kernel_inception_distance(np.tile(a, (10, 1)), np.tile(b, (12, 1)), num_subsets=3)
    assert out["kid"] == pytest.approx(k(a, a) + k(b, b) - 2 * k(a, b), rel=1e-12)
    assert out["subset_size"] == 10
    # same distribution: the unbiased estimator averages to ~0 (within 4 standard errors)
    rng = np.random.default_rng(8)
    out = kernel_inception_distance(rng.normal(size=(400, 16)), rng.normal(size=(400, 16)), num_subsets=50, subset_size=100)
    assert abs(out["kid"]) < 4 * out["kid_std"] / np.sqrt(50)


# ----------------------------------------------------------------------------- PRDC
def _naeem_reference(real, fake, k):
    """compute_prdc from github.com/clovaai/generative-evaluation-prdc (sklearn distances)."""
    from sklearn.metrics import pairwise_distances

    def kth(x):
        return np.partition(pairwise_distances(x, x), k, axis=-1)[:, k]

    rr, fr = kth(real), kth(fake)
    d = pairwise_distances(real, fake)
    return {
        "precision": (d < rr[:, None]).any(0).mean(),
        "recall": (d < fr[None, :]).any(1).mean(),
        "density": (1.0 / k) * (d < rr[:, None]).sum(0).mean(),
        "coverage": (d.min(1) < rr).mean(),
    }


@pytest.mark.parametrize("k", [3, 5])
def test_prdc_matches_reference_code(k):
    rng = np.random.default_rng(k)
    real, fake = rng.normal(size=(300, 20)), rng.normal(size=(250, 20)) * 1.2 + 0.1
    want = _naeem_reference(real, fake, k)
    got = prdc(real, fake, k_pr=k, k_dc=k, chunk_size=37)
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-12), name
    assert precision_recall(real, fake, k) == {n: got[n] for n in ("precision", "recall")}
    assert density_coverage(real, fake, k) == {n: got[n] for n in ("density", "coverage")}


def test_prdc_published_gaussian_reference():
    """Naeem et al.'s README example: N(0, I) real and fake, 10k x 10k, D=1000, k=5 for all
    four metrics -> precision 0.4772, recall 0.4705, density 1.0555, coverage 0.9735, from one
    unseeded draw. Tolerance: the metrics vary from draw to draw; over 6 seeds we measured
    (mean +- std) precision 0.474 +- 0.014, recall 0.483 +- 0.008, density 0.970 +- 0.055,
    coverage 0.964 +- 0.006 (the published draw is within 1.6 std of these). We allow ~4 std
    around the published values: 0.05, 0.035, 0.22, 0.025. A radius that counts the zero
    self-distance (NND_{k-1}) would move expected coverage from 1 - 2^-5 = 0.969 to
    1 - 2^-4 = 0.938 (Naeem et al. 2020, Sec. 4), outside the tolerance.
    """
    rng = np.random.default_rng(0)
    real = rng.normal(size=(10_000, 1000)).astype(np.float32)
    fake = rng.normal(size=(10_000, 1000)).astype(np.float32)
    got = prdc(real, fake, k_pr=5, k_dc=5, dtype=torch.float32)
    assert got["precision"] == pytest.approx(0.4772, abs=0.05)
    assert got["recall"] == pytest.approx(0.4705, abs=0.035)
    assert got["density"] == pytest.approx(1.0555, abs=0.22)
    assert got["coverage"] == pytest.approx(0.9735, abs=0.025)


def test_prdc_bad_inputs():
    x = np.random.default_rng(0).normal(size=(5, 3))
    with pytest.raises(DataError, match="k\\+1=6"):
        precision_recall(x, x, k=5)
    with pytest.raises(DataError, match="k\\+1=4"):
        precision_recall(np.ones((10, 3)), x[:3], k=3)
    with pytest.raises(DataError, match="dimensions differ"):
        density_coverage(np.ones((10, 3)), np.ones((10, 4)), k=3)


# ----------------------------------------------------------------------------- intervals
def test_bootstrap_mean_interval_of_a_proportion():
    terms = torch.from_numpy((np.random.default_rng(0).random(2000) < 0.3).astype(np.float64))
    ci = bootstrap_mean(terms, n_boot=400)
    half = 1.96 * np.sqrt(0.3 * 0.7 / 2000)  # normal approximation of a proportion's CI
    assert ci["low"] < float(terms.mean()) < ci["high"]
    assert (ci["high"] - ci["low"]) / 2 == pytest.approx(half, rel=0.2)


@pytest.fixture
def one_thread():
    """Thousands of small (16- or 32-d) FDs: one thread avoids oversubscription on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gaussian_pair(rng, n, m, mu2, var2):
    """(n, D) from N(0, I) and (m, D) from N(mu2, diag(var2)); FD_inf = |mu2|^2 + sum (1 - sqrt var2)^2."""
    x = rng.normal(size=(n, len(mu2)))
    y = rng.normal(size=(m, len(mu2))) * np.sqrt(var2) + mu2
    return torch.from_numpy(x), torch.from_numpy(y)


def test_fd_interval_covers_the_estimate_where_the_bootstrap_did_not(one_thread):
    """32-d, 200 vs 150 samples: FD's small-sample bias (~4 here) exceeds its spread. The
    with-replacement percentile bootstrap (the old interval) lies wholly above the estimate,
    as in the demo's FID 73.6 with "CI" [77.8, 102.2]; the half-sample interval contains it,
    and its infinite-N extrapolation contains the closed-form FD (3.01)."""
    rng = np.random.default_rng(0)
    d = 32
    mu2, var2 = np.eye(d)[0], np.linspace(1, 2, d)
    fd_inf = 1.0 + ((1 - np.sqrt(var2)) ** 2).sum()
    x, y = _gaussian_pair(rng, 200, 150, mu2, var2)
    point = frechet_distance(x, y)
    g = torch.Generator().manual_seed(0)
    boot = [frechet_distance(x[torch.randint(200, (200,), generator=g)], y[torch.randint(150, (150,), generator=g)]) for _ in range(100)]
    assert np.quantile(boot, 0.025) > point  # the failure this interval replaces
    ci = half_sample_two_sample(frechet_distance, x, y, n_sub=100)
    assert ci["low"] < point < ci["high"]
    assert ci["half_sample_mean"] > point  # FD_{N/2} is biased further up than FD_N
    inf = fd_infinite_n(point, ci)
    assert inf["ci95"][0] < fd_inf < inf["ci95"][1] < point


def test_fd_interval_coverage_on_gaussians(one_thread):
    """100 draws of 100 vs 80 samples from two 16-d Gaussians (closed-form FD 3.95; the plug-in
    FD averages 6.64 at these sizes, from 2000 draws). The interval must cover E[FD_N], and its
    extrapolation the closed-form FD, about 95% of the time (measured 94 and 95 of 100 with 50
    half-samples; the old percentile bootstrap covered E[FD_N] 7 times, percentiles of
    uncentred half-samples once), and be about as wide as the true sampling spread (1.14x)."""
    rng = np.random.default_rng(0)
    d = 16
    mu2, var2 = 0.8 * np.eye(d)[0], np.linspace(1, 3, d)
    fd_inf = 0.64 + ((1 - np.sqrt(var2)) ** 2).sum()
    draws = np.array([frechet_distance(*_gaussian_pair(rng, 100, 80, mu2, var2)) for _ in range(2000)])
    expected, spread = draws.mean(), np.diff(np.quantile(draws, [0.025, 0.975]))[0]
    covered, covered_inf, widths = 0, 0, []
    for t in range(100):
        x, y = _gaussian_pair(rng, 100, 80, mu2, var2)
        ci = half_sample_two_sample(frechet_distance, x, y, n_sub=50, seed=t)
        inf = fd_infinite_n(frechet_distance(x, y), ci)
        covered += ci["low"] <= expected <= ci["high"]
        covered_inf += inf["ci95"][0] <= fd_inf <= inf["ci95"][1]
        widths.append(ci["high"] - ci["low"])
    assert covered >= 88 and covered_inf >= 88
    assert 0.8 < np.mean(widths) / spread < 1.35


# ----------------------------------------------------------------------------- MS-SSIM
def _phantoms(n, shape, seed):
    """(n, 1, *shape) in [-1, 1]: a bright ellipse/ellipsoid with an intensity gradient, placed
    and sized at random on a dark background, plus faint noise (like the built-in cohort)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    out = []
    for _ in range(n):
        c, r = rng.uniform(-0.15, 0.15, len(shape)), rng.uniform(0.45, 0.7, len(shape))
        inside = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grids, c, r)) < 1
        out.append(inside * (0.5 + 0.2 * (grids[0] - c[0] + 1)) + 0.05 * rng.random(shape))
    return torch.from_numpy(np.stack(out)[:, None] * 2 - 1).float()


def _ssim_and_cs(a, b, win, sigma=1.5):
    """Mean SSIM and mean contrast-structure term over the valid windows (Wang et al. 2004),
    images on [0, 1], Gaussian window; float64 numpy, any number of dimensions."""
    from scipy.ndimage import correlate1d

    g = np.exp(-0.5 * ((np.arange(win) - win // 2) / sigma) ** 2)
    g /= g.sum()

    def blur(x):
        for axis in range(x.ndim):
            x = correlate1d(x, g, axis=axis, mode="reflect")
        return x[tuple(slice(win // 2, -(win // 2)) for _ in range(x.ndim))]  # valid windows only

    c1, c2 = 0.01**2, 0.03**2  # (K1 L)^2, (K2 L)^2 with L = 1
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    cs = (2 * cov + c2) / (var_a + var_b + c2)
    return float(((2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1) * cs).mean()), float(cs.mean())


def _msssim_reference(a, b, weights, win):
    """Wang et al. 2003: prod_j cs_j^w_j over the finer scales times SSIM^w_M at the coarsest,
    2x average pooling between scales, negative terms clipped at 0 (as pytorch-msssim, MONAI)."""
    terms = []
    for j, w in enumerate(weights):
        ssim, cs = _ssim_and_cs(a, b, win)
        terms.append(max(ssim if j == len(weights) - 1 else cs, 0.0) ** w)
        a, b = (x.reshape([s for n in x.shape for s in (n // 2, 2)]).mean(tuple(range(1, 2 * x.ndim, 2))) for x in (a, b))
    return float(np.prod(terms))


def test_msssim_settings_fit_sizes():
    assert msssim_settings((256, 256))["kernel_size"] == 11
    assert len(msssim_settings((128, 128, 128))["weights"]) == 5
    assert len(msssim_settings((64, 64, 64))["weights"]) == 4
    assert len(msssim_settings((32, 32))["weights"]) == 3
    for shape in [(64, 64, 64), (32, 32), (16, 16, 16)]:
        assert sum(msssim_settings(shape)["weights"]) == pytest.approx(1.0)
    with pytest.raises(DataError):
        msssim_settings((4, 4))


def test_msssim_matches_pytorch_msssim_2d():
    """128^2 (5 scales, 7-voxel window): equal to pytorch-msssim on [0, 1] with data_range=1.
    Scored on [-1, 1] with data_range=2 (the old convention) these pairs gave 0.41-0.59, not 0.54-0.67."""
    from pytorch_msssim import ms_ssim

    images = _phantoms(3, (128, 128), seed=0)
    pairs = random_pairs(3, 3)
    ours = pairwise_msssim(images, pairs)
    cfg = msssim_settings((128, 128))
    a, b = ((images[pairs[:, k]].double() + 1) / 2 for k in (0, 1))
    ref = ms_ssim(a, b, data_range=1.0, size_average=False, win_size=cfg["kernel_size"], win_sigma=1.5, weights=cfg["weights"])
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert (ours > 0.5).all()


@pytest.mark.parametrize("shape", [(32, 32), (32, 32, 32)])
def test_msssim_diversity_matches_reference_2d_3d(shape):
    """Against Wang et al.'s formula re-typed in numpy, whose single-scale SSIM is first checked
    against scikit-image's; a set's diversity is the mean over its pairs, identical pairs give 1."""
    from skimage.metrics import structural_similarity

    images = _phantoms(4, shape, seed=1)
    a, b = ((images[k, 0].double().numpy() + 1) / 2 for k in (0, 1))
    sk = structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert _ssim_and_cs(a, b, win=11)[0] == pytest.approx(sk, abs=1e-12)  # skimage's window: 11 at sigma 1.5

    images[3] = images[0]
    out = msssim_diversity(images, n_pairs=6)
    cfg = out["settings"]
    x = (images[:, 0].double().numpy() + 1) / 2
    ref = {(i, j): _msssim_reference(x[i], x[j], cfg["weights"], cfg["kernel_size"]) for i in range(4) for j in range(i + 1, 4)}
    got = dict(zip(map(tuple, random_pairs(4, 6).tolist()), out["per_pair"].tolist()))
    assert got == pytest.approx(ref, abs=2e-5)
    assert got[(0, 3)] == pytest.approx(1.0, abs=1e-5)
    assert out["msssim"] == pytest.approx(np.mean(list(ref.values())), abs=2e-5)
    assert min(ref.values()) > 0.4  # on [-1, 1] with data_range=2 these pairs scored 0.02-0.09 lower
    assert (cfg["data_range"], cfg["kernel_size"]) == (1.0, 7)  # the recipe the report records
