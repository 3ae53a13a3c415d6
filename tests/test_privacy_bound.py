"""The privacy bound and the calibration under it, against closed forms and simulations with
known truth: Clopper-Pearson bounds against scipy's exact binomial interval, the bound's coverage
(exact enumeration, checked itself by Monte Carlo) at or above 1 - alpha for every copy rate,
the null-adjusted variant failing when the model's non-copies exceed tau less often than new
patients (why it is not the default), alpha spent over reruns, and the conformal tau at its
nominal level on exchangeable scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from medgen.privacy.bound import (CopyBound, attempt_alpha, clopper_pearson_lower, clopper_pearson_upper, coverage,
                                  pass_probability)
from medgen.privacy.memorization import calibrated_threshold, conformal_threshold, leave_one_out_exceedances, tail_threshold


@pytest.mark.parametrize("x,n", [(0, 10), (3, 64), (17, 400), (64, 64), (1, 1000)])
def test_clopper_pearson_matches_scipys_exact_interval(x, n):
    alpha = 0.025
    ci = binomtest(x, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact")  # two-sided 1 - 2a = two one-sided a
    assert clopper_pearson_lower(x, n, alpha) == pytest.approx(ci.low, abs=1e-9)
    assert clopper_pearson_upper(x, n, alpha) == pytest.approx(ci.high, abs=1e-9)
    # vectorised over counts, the same values
    xs = np.arange(n + 1)
    assert clopper_pearson_upper(xs, n, alpha)[x] == pytest.approx(ci.high, abs=1e-9)


def _simulate(copy_rate, recall, nonc_rate, n_samples, n_control, alpha, reps, seed, method="conservative", null_rate=None, n_null=0):
    """Monte Carlo with known truth: copies drawn per sample, flagged with prob `recall`; the
    control's copies likewise; the other samples flagged with prob `nonc_rate`."""
    rng = np.random.default_rng(seed)
    is_copy = rng.random((reps, n_samples)) < copy_rate
    flagged = np.where(is_copy, rng.random((reps, n_samples)) < recall, rng.random((reps, n_samples)) < nonc_rate).sum(1)
    caught = rng.binomial(n_control, recall, reps)
    null = rng.binomial(n_null, nonc_rate if null_rate is None else null_rate, reps) if n_null else np.zeros(reps, int)
    true_rate = is_copy.mean(1)  # the realised share; the bound is on the model's rate
    uppers = np.array([CopyBound(int(f), n_samples, int(c), n_control, alpha, method, int(h), n_null).upper
                       for f, c, h in zip(flagged, caught, null)])
    return uppers, true_rate


def test_bound_covers_the_true_copy_rate_exact_and_simulated():
    alpha = attempt_alpha(0.05, 1)  # a first release: 97.5%
    for copy_rate in (0.0, 0.02, 0.05, 0.1, 0.2, 0.5):
        for recall, nonc in ((0.95, 0.01), (0.7, 0.0), (1.0, 0.05)):
            for n_s, n_c in ((64, 60), (400, 100), (1000, 100)):
                cov = coverage(copy_rate, n_samples=n_s, n_control=n_c, recall=recall, nonc_rate=nonc, alpha=alpha)
                assert cov >= 1 - alpha - 1e-9, (copy_rate, recall, nonc, n_s, n_c, cov)
    # the exact enumeration agrees with a simulation of the same model (so it is not its own judge)
    uppers, _ = _simulate(0.1, 0.8, 0.02, 300, 60, alpha, reps=4000, seed=1)
    simulated = float((uppers >= 0.1).mean())
    exact = coverage(0.1, n_samples=300, n_control=60, recall=0.8, nonc_rate=0.02, alpha=alpha)
    assert simulated == pytest.approx(exact, abs=3 * math.sqrt(exact * (1 - exact) / 4000) + 1e-3)
    assert simulated >= 1 - alpha - 3 * math.sqrt(alpha * (1 - alpha) / 4000)


def test_pass_probability_is_the_simulated_pass_rate_and_copiers_fail():
    alpha, policy = attempt_alpha(0.05, 1), 0.05
    kw = dict(n_samples=400, n_control=60, recall=0.95, nonc_rate=0.01, alpha=alpha)
    exact = pass_probability(0.0, max_copy_rate=policy, **kw)
    uppers, _ = _simulate(0.0, 0.95, 0.01, 400, 60, alpha, reps=3000, seed=2)
    assert float((uppers <= policy).mean()) == pytest.approx(exact, abs=0.03)
    assert exact > 0.9  # an honest model at these sizes passes
    probs = [pass_probability(r, max_copy_rate=policy, **kw) for r in (0.0, 0.02, 0.05, 0.1, 0.2)]
    assert probs == sorted(probs, reverse=True)  # more copying, fewer passes
    assert probs[2] <= alpha and probs[4] < 1e-6  # at the policy a copier passes at most alpha of the time; at 20% never


def test_null_adjusted_bound_fails_when_non_copies_exceed_tau_less_than_new_patients():
    """The reason the conservative bound is the default: subtracting the held-out null hides
    copies when the model's own non-copies are farther from the training set than new patients
    (observed on the demo's model). The conservative bound holds whatever they do."""
    alpha, n_s, n_c, n_h = 0.05, 1000, 100, 200
    adjusted = coverage(0.1, n_samples=n_s, n_control=n_c, recall=0.9, nonc_rate=0.0, alpha=alpha, method="null-adjusted", null_rate=0.15, n_null=n_h)
    assert adjusted < 0.5  # the bound undercovers badly
    assert coverage(0.1, n_samples=n_s, n_control=n_c, recall=0.9, nonc_rate=0.0, alpha=alpha) >= 1 - alpha
    # when non-copies do exceed tau as often as new patients, the adjusted bound holds too (its assumption)
    assert coverage(0.1, n_samples=n_s, n_control=n_c, recall=0.9, nonc_rate=0.15, alpha=alpha, method="null-adjusted", n_null=n_h) >= 1 - alpha
    uppers, _ = _simulate(0.1, 0.9, 0.0, n_s, n_c, alpha, reps=400, seed=3, method="null-adjusted", null_rate=0.15, n_null=n_h)
    assert float((uppers >= 0.1).mean()) < 0.5


def test_reruns_cannot_buy_a_pass():
    """Attempt k is judged at alpha / 2^k: a model copying at the policy's rate passes at least
    once in K attempts with probability at most alpha, however large K."""
    alpha, policy = 0.05, 0.05
    kw = dict(n_samples=400, n_control=60, recall=0.95, nonc_rate=0.01, max_copy_rate=policy)
    assert sum(attempt_alpha(alpha, k) for k in range(1, 60)) <= alpha
    never = 1.0
    for k in range(1, 11):
        never *= 1 - pass_probability(policy, alpha=attempt_alpha(alpha, k), **kw)
    assert 1 - never <= alpha
    for k in (1, 3, 6):
        assert pass_probability(policy, alpha=attempt_alpha(alpha, k), **kw) <= attempt_alpha(alpha, k)
    with pytest.raises(ValueError):
        attempt_alpha(alpha, 0)


def test_samples_to_pass_is_the_smallest_sample_size_that_passes():
    b = CopyBound(6, 200, 58, 60, 0.025)
    need = b.samples_to_pass(0.05)
    assert need is not None and need > 200
    rate = 6 / 200
    at = lambda n: CopyBound(math.floor(rate * n), n, 58, 60, 0.025).upper  # noqa: E731
    assert at(need) <= 0.05 < at(need - 1)
    assert CopyBound(30, 200, 58, 60, 0.025).samples_to_pass(0.05) is None  # 15% flagged: no sample size passes 5%
    assert CopyBound(0, 400, 58, 60, 0.025).samples_to_pass(0.05) == 400  # already passes
    s = b.summary(0.05)
    assert s["upper_pct"] == pytest.approx(100 * b.upper, abs=1e-3) and s["within_policy"] is False and "at most" in s["sentence"]


def test_conformal_tau_attains_its_level_on_exchangeable_scores():
    rng = np.random.default_rng(0)
    for n, level in ((40, 0.01), (40, 0.1), (199, 0.01)):
        exceed = []
        for _ in range(3000):
            s = rng.standard_normal(n + 1)
            tau, attained = conformal_threshold(torch.from_numpy(s[:n]), level)
            exceed.append(s[n] > tau)
        k = min(n, math.ceil((n + 1) * (1 - level)))
        assert attained == pytest.approx((n - k + 1) / (n + 1))
        assert np.mean(exceed) == pytest.approx(attained, abs=4 * math.sqrt(attained * (1 - attained) / 3000))
        assert attained <= max(level, 1 / (n + 1)) + 1e-12 and attained > min(level, 1 / (n + 1)) - 1 / (n + 1)
    with pytest.raises(ValueError):
        conformal_threshold(torch.zeros(5), 0)


def test_tail_threshold_extrapolates_past_the_held_out_maximum():
    """Correlations whose Fisher z is Gaussian: the tail quantile at 0.5% from 60 held-out values
    is exceeded by new ones about 0.5% of the time, where the conformal quantile (their maximum)
    attains only 1/61; tau is the larger of the two, so the conformal guarantee still holds."""
    rng = np.random.default_rng(2)
    exceed_tail, exceed_tau = [], []
    for _ in range(2000):
        s = np.tanh(1.2 + 0.25 * rng.standard_normal(61))
        held, new = torch.from_numpy(s[:60]), s[60]
        tau, attained = calibrated_threshold(held, 0.005)
        assert tau >= conformal_threshold(held, 0.005)[0] and attained == pytest.approx(1 / 61)
        exceed_tail.append(new > tail_threshold(held, 0.005))
        exceed_tau.append(new > tau)
    assert np.mean(exceed_tail) < 0.015 and np.mean(exceed_tau) <= np.mean(exceed_tail)
    assert np.mean(exceed_tau) < 1 / 61  # below what the maximum alone attains


def test_leave_one_out_exceedances_match_recalibration_without_each_image():
    rng = np.random.default_rng(1)
    for level in (0.005, 0.1, 0.3):
        s = torch.from_numpy(np.round(np.tanh(1 + 0.4 * rng.standard_normal(37)), 2))  # rounded: ties included
        loo = leave_one_out_exceedances(s, level)
        for j in range(len(s)):
            rest = torch.cat([s[:j], s[j + 1 :]])
            assert bool(loo[j]) == bool(s[j] > calibrated_threshold(rest, level)[0]), (level, j)
