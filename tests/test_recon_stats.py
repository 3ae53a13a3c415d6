"""The probe's controls and statistics: the control's measured norm, the paired t summary against
scipy, Holm against its closed form, TV against zero-filled on held-out cohort slices, the fixed
mask, and planted cases: a deliberately unstable reconstruction must be called "transfers", one
that only copies the measured data must not."""

from __future__ import annotations

import pytest
import torch

from medgen.recon.attack import random_measured_perturbation, random_perturbation, worst_case_perturbation
from medgen.recon.kspace import apply_mask, fixed_equispaced_mask, fully_sampled, kspace_mask, magnitude, mri_physics, to_complex
from medgen.recon.stats import holm, paired_summary, verdict


def _norms(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1)


@pytest.mark.parametrize("coils", [1, 3])
def test_control_has_the_worst_case_measured_norm_and_lives_on_the_samples(coils):
    mask = kspace_mask((32, 32), 8, "equispaced-fixed")
    physics = mri_physics(mask, coils)
    k = fully_sampled(physics).A(to_complex(torch.rand(4, 1, 32, 32)))
    like = torch.randn_like(k) * torch.rand(4).view(-1, *([1] * (k.ndim - 1)))  # any delta, norms differing per image
    gen = torch.Generator().manual_seed(0)
    control = random_measured_perturbation(like, physics.mask, gen)
    torch.testing.assert_close(_norms(apply_mask(control, physics.mask)), _norms(apply_mask(like, physics.mask)))
    assert torch.equal(apply_mask(control, physics.mask), control)  # nothing off the sampled columns
    # the older full-k-space control keeps the full norm, so only ~1/R of it is measured
    full = random_perturbation(like, gen)
    share = _norms(apply_mask(full, physics.mask)) / _norms(full)
    assert share.max() < 0.5 and (share.mean() - (4 / 32) ** 0.5).abs() < 0.1


def test_paired_summary_matches_scipy():
    from scipy import stats

    d = [0.3, -0.1, 0.25, 0.4, 0.05, 0.2, -0.05, 0.15]
    s = paired_summary(d, alpha=0.05, family_size=6)
    ref = stats.ttest_1samp(d, 0.0, alternative="greater")
    assert s["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=sum(d) / len(d), scale=stats.sem(d))
    assert s["ci"] == pytest.approx([lo, hi], rel=1e-9)
    lo6, hi6 = stats.t.interval(1 - 0.05 / 6, len(d) - 1, loc=sum(d) / len(d), scale=stats.sem(d))
    assert s["ci_corrected"] == pytest.approx([lo6, hi6], rel=1e-9)
    assert paired_summary([0.4])["ci"] is None and paired_summary([0.4])["p_value"] is None  # one image: no interval


def test_holm_matches_its_closed_form():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.2, None, 0.5]) == [pytest.approx(0.4), None, pytest.approx(0.5)]  # None is outside the family
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert verdict(0.3, 0.01) and not verdict(0.05, 0.01) and not verdict(0.3, 0.2) and not verdict(0.3, None)


def test_fixed_mask_states_its_lines():
    m = fixed_equispaced_mask((32, 32), 8, 1)[0]
    assert m.nonzero().flatten().tolist() == [0, 8, 16, 24]  # the centre column 16 and every 8th from it
    m = fixed_equispaced_mask((32, 32), 4, 3)[0]
    assert {15, 16, 17} <= set(m.nonzero().flatten().tolist()) and int(m.sum()) == 10
    assert torch.equal(kspace_mask((32, 32), 8, "equispaced-fixed", seed=0), kspace_mask((32, 32), 8, "equispaced-fixed", seed=5))


def test_tv_beats_zero_filled_at_r4_on_held_out_slices(cohort_2d):
    """lambda chosen on some cohort slices, scored on the others (prior scaling, fixed mask)."""
    from medgen.recon.baselines import calibrate_tv_lambda, tv_reconstruct
    from medgen.recon.data import load_slices
    from medgen.recon.kspace import zero_filled
    from medgen.recon.metrics import psnr

    x, _ = load_slices(cohort_2d, scaling="prior")
    cal, test = x[:4], x[4:]
    physics = mri_physics(kspace_mask((32, 32), 4, "equispaced-fixed"))
    full = fully_sampled(physics)
    chosen = calibrate_tv_lambda(physics, apply_mask(full.A(to_complex(cal)), physics.mask), cal, grid=(0.003, 0.01, 0.03, 0.1),
                                 iterations=100, prox_iterations=20)
    y = apply_mask(full.A(to_complex(test)), physics.mask)
    with torch.no_grad():
        gain = psnr(magnitude(tv_reconstruct(physics, y, chosen["lambda"], iterations=100, prox_iterations=20)), test) \
            - psnr(magnitude(zero_filled(physics, y)), test)
    assert gain.min() > 0.5 and gain.mean() > 1.0, gain


def test_planted_transfer_is_found_and_measured_copying_is_not(cohort_2d):
    """A reconstruction with one hugely amplified k-space direction (zero-filled + G <y, v> u) is
    attacked; its worst case transfers to itself by construction. A reconstruction that only copies
    the measured data into a fixed image changes by A^H M delta, the same energy for the worst case
    and the control: no evidence of transfer."""
    from medgen.recon.data import load_slices
    from medgen.recon.kspace import zero_filled
    from medgen.recon.probe import Condition, Reconstructors, _transfer, finalize_transfer, image_stats, reconstruct_all
    from medgen.recon.settings import ProbeSettings

    x, _ = load_slices(cohort_2d, scaling="prior")
    N = len(x)
    physics = mri_physics(kspace_mask((32, 32), 4, "equispaced-fixed"))
    k = fully_sampled(physics).A(to_complex(x))
    gen = torch.Generator().manual_seed(0)
    v = apply_mask(torch.randn(1, *k.shape[1:], generator=gen), physics.mask)
    v = v / v.norm()
    u = torch.zeros(1, 2, 32, 32)
    u[:, 0, 8:24, 8:24] = 1.0

    def unstable(y: torch.Tensor) -> torch.Tensor:
        return magnitude(zero_filled(physics, y) + 30.0 * (y * v).flatten(1).sum(1).view(-1, 1, 1, 1) * u)

    base = to_complex(x.mean(0, keepdim=True))

    def copies_measured(y: torch.Tensor) -> torch.Tensor:
        return magnitude(base + zero_filled(physics, y - physics.A(base.expand(len(y), -1, -1, -1))))

    eps = [0.05]
    delta, _ = worst_case_perturbation(unstable, k, physics.mask, eps, steps=40, lr=0.1, generator=gen)
    control = random_measured_perturbation(delta, physics.mask, gen)
    conditions = [Condition("none", None, 0.0, None), Condition("worst-case", "surrogate", 0.05, delta),
                  Condition("random", None, 0.05, control)]
    settings = ProbeSettings(batch_size=64)
    recons = Reconstructors(physics, settings, extra={"unstable": unstable, "copy": copies_measured})
    rows = []
    for method in ("unstable", "copy"):
        res = reconstruct_all(recons, method, k, physics.mask, conditions, x, settings)
        stats = image_stats(res, physics, x)
        rows += _transfer(method, 4, res, stats)
        if method == "copy":  # the measured-copy baseline predicts this method (up to the phase it does not keep)
            torch.testing.assert_close(stats["measured_copy_psnr"][1:], stats["psnr"][1:], atol=0.1, rtol=0)
    rows = finalize_transfer(rows)
    by = {r["method"]: r for r in rows}
    assert by["unstable"]["verdict"] == "transfers" and by["unstable"]["ci95"][0] > 1.0, by["unstable"]
    assert by["copy"]["verdict"] == "no evidence of transfer", by["copy"]
    assert abs(by["copy"]["difference"]) < 0.1 and by["copy"]["n_images"] == N
    assert by["copy"]["p_holm"] >= by["copy"]["p_value"] and by["copy"]["family_size"] == 2
