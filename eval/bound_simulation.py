"""The privacy gate's operating characteristics, with known truth.

1. Exact (`--part exact`): P(pass) of the bound (medgen.privacy.bound) for copy rates 0, 2, 5, 10
   and 20% at the demo's sizes and at a typical study's (1,000 samples), and its coverage (the
   bound is at least the true copy rate) over a grid of copy rates, detector recalls and
   non-copy flag rates; beside it the old gate (a one-sided Fisher test of the flagged rate
   against a 30% held-out null, 64 samples, 40 held-out images: issue 20's numbers) and the
   null-adjusted bound when the model's non-copies exceed tau less often than new patients.
   Sums over the binomial laws, no sampling error.
2. Images (`--part images`): the audit of a latent model fitted on a harness cohort (2D 64^2,
   the demo's VQ-GAN; eval/audit_harness.py), every image of a pool scored once, decoded as the
   model would output it: new subjects (an honest latent model at best) and copies of training
   images from the control's families and from a family outside it. A simulated model outputs a copy with probability pi (its family
   drawn uniformly) and a decoded new subject otherwise; each of `--reps` sets of N samples is
   judged by the bound, against the audit's own positive control. Reported: how often the bound
   covers pi, and how often the set passes. Copies from outside the control (zooms) are what the
   bound does not promise to count: the table shows what that costs.

    python eval/bound_simulation.py --part exact --markdown
    python eval/bound_simulation.py --part images --markdown
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medgen.privacy.bound import CopyBound, attempt_alpha, coverage, pass_probability  # noqa: E402
from medgen.versions import cpu_name  # noqa: E402

RATES = (0.0, 0.02, 0.05, 0.1, 0.2)
POLICY = 0.05
ALPHA = 0.05


def old_gate_pass(copy_rate: float, n_samples: int = 64, n_holdout: int = 40, null: float = 0.3, recall: float = 1.0, alpha: float = ALPHA) -> float:
    """P(pass) of the gate before issue 20: fail when a one-sided Fisher exact test finds the
    flagged rate above the held-out null rate; copies flagged with probability `recall`."""
    from scipy.stats import binom, fisher_exact

    p = copy_rate * recall + (1 - copy_rate) * null
    px, ph = binom.pmf(np.arange(n_samples + 1), n_samples, p), binom.pmf(np.arange(n_holdout + 1), n_holdout, null)
    total = 0.0
    for x in range(n_samples + 1):
        if px[x] < 1e-12:
            continue
        for h in range(n_holdout + 1):
            if ph[h] < 1e-12:
                continue
            if fisher_exact([[x, n_samples - x], [h, n_holdout - h]], alternative="greater")[1] >= alpha:
                total += px[x] * ph[h]
    return total


def exact_part() -> dict:
    a1 = attempt_alpha(ALPHA, 1)  # a run's first release
    settings = {
        "demo (400 samples, 60 control copies)": {"n_samples": 400, "n_control": 60},
        "demo, latent model (400 samples, 100 control copies)": {"n_samples": 400, "n_control": 100},
        "typical study (1,000 samples, 100 control copies)": {"n_samples": 1000, "n_control": 100},
        "the old demo size (64 samples, 60 control copies)": {"n_samples": 64, "n_control": 60},
    }
    scenarios = {"recall 100%, non-copies above tau 1%": (1.0, 0.01), "recall 90%, non-copies above tau 2%": (0.9, 0.02)}
    table = {}
    for name, size in settings.items():
        for scen, (recall, nonc) in scenarios.items():
            table[f"{name}; {scen}"] = [round(pass_probability(r, recall=recall, nonc_rate=nonc, max_copy_rate=POLICY, alpha=a1, **size), 4) for r in RATES]
    old = [round(old_gate_pass(r), 4) for r in RATES]
    grid = []
    for n_s, n_c in ((64, 60), (400, 60), (400, 100), (1000, 100), (5000, 100)):
        for recall in (0.6, 0.8, 0.95, 1.0):
            for nonc in (0.0, 0.01, 0.05):
                for r in (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5):
                    grid.append(coverage(r, n_samples=n_s, n_control=n_c, recall=recall, nonc_rate=nonc, alpha=a1))
    adjusted = {f"non-copies above tau {100 * q:g}% (new patients 15%)": round(coverage(0.1, n_samples=1000, n_control=100, recall=0.9, nonc_rate=q,
                                                                                               alpha=ALPHA, method="null-adjusted", null_rate=0.15, n_null=200), 4)
                for q in (0.0, 0.075, 0.15)}
    conservative = {f"non-copies above tau {100 * q:g}%": round(coverage(0.1, n_samples=1000, n_control=100, recall=0.9, nonc_rate=q, alpha=ALPHA), 4)
                    for q in (0.0, 0.075, 0.15)}
    return {"alpha": a1, "policy": POLICY, "rates": RATES, "pass_probability": table, "old_gate_pass_probability": old,
            "coverage_min": round(min(grid), 5), "coverage_cells": len(grid),
            "null_adjusted_coverage_at_10pct": adjusted, "conservative_coverage_at_10pct": conservative}


def images_part(reps: int, n_samples: int, seeds: list[int], threads: int, cohort_seed: int) -> dict:
    import torch

    from medgen.data import load_images
    from medgen.data.cohort import synth_brain
    from medgen.privacy.calibration import CopyAudit
    from medgen.privacy.families import LATENT_FAMILIES
    from medgen.privacy.planting import family_copies, train_roundtrip_autoencoder

    torch.set_num_threads(threads)
    n_t, n_h, n_g, pool = 100, 60, 200, 100  # = eval/audit_harness.py 2D; 200 new subjects, 100 copies per family
    with tempfile.TemporaryDirectory() as tmp:
        cohort = synth_brain(Path(tmp) / "c", n=n_t + n_h + n_g, dims=2, size=64, seed=cohort_seed)
        x, samples = load_images(cohort)
        roundtrip = train_roundtrip_autoencoder([s.path for s in samples[:n_t]], 2, 64, 200, Path(tmp))
    train, holdout, genuine = x[:n_t], x[n_t : n_t + n_h], roundtrip(x[n_t + n_h :])
    inside, outside = ("autoencoder", "latent-noise", "gamma", "blend", "elastic"), ("zoom",)
    rng = np.random.default_rng(0)
    out = {}
    for seed in seeds:
        audit = CopyAudit.fit(train, holdout, autoencoder=roundtrip, seed=seed)  # a latent model's default union
        flags = {"genuine": audit.score(genuine).is_copy.numpy()}
        for fam in inside + outside:
            copies, _ = family_copies(train, fam, pool, seed=100 + seed, autoencoder=roundtrip)
            if fam not in LATENT_FAMILIES:
                copies = roundtrip(copies)  # what a latent model outputs: decoded images
            flags[fam] = audit.score(copies).is_copy.numpy()
        caught, n_control = audit.control.n_caught, audit.control.n
        for mix, fams in (("control families", inside), ("zoom (outside the control)", outside)):
            for rate in RATES:
                covered = passed = 0
                for _ in range(reps):
                    is_copy = rng.random(n_samples) < rate
                    fam = rng.integers(len(fams), size=n_samples)
                    pick = rng.integers(pool, size=n_samples)
                    flagged = np.where(is_copy, [flags[fams[f]][p] for f, p in zip(fam, pick)], flags["genuine"][rng.integers(len(genuine), size=n_samples)])
                    b = CopyBound(int(flagged.sum()), n_samples, caught, n_control, attempt_alpha(ALPHA, 1))
                    covered += b.upper >= rate
                    passed += b.upper <= POLICY
                cell = out.setdefault(mix, {}).setdefault(rate, {"covered": 0, "passed": 0, "reps": 0})
                cell["covered"] += covered
                cell["passed"] += passed
                cell["reps"] += reps
        out.setdefault("audits", []).append({"seed": seed, "control": f"{caught}/{n_control}",
                                             "genuine_flagged": float(flags["genuine"].mean()), **{f: float(flags[f].mean()) for f in inside + outside}})
    return {"n_samples": n_samples, "reps_per_audit": reps, "seeds": seeds, "policy": POLICY, "alpha": attempt_alpha(ALPHA, 1), "cells": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("exact", "images"), default="exact")
    ap.add_argument("--reps", type=int, default=1000)
    ap.add_argument("--n", type=int, default=400, help="samples per simulated set (images part)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cohort-seed", type=int, default=7, help="the harness's test cohort")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    start = time.perf_counter()
    if args.part == "exact":
        result = exact_part()
        if args.markdown:
            print("| setting | " + " | ".join(f"{100 * r:.0f}% copies" for r in RATES) + " |")
            print("|---|" + "---|" * len(RATES))
            print("| **before** (Fisher test vs a 30% null; 64 samples, 40 held-out; every copy flagged) | "
                  + " | ".join(f"{100 * p:.1f}%" for p in result["old_gate_pass_probability"]) + " |")
            for name, row in result["pass_probability"].items():
                print(f"| {name} | " + " | ".join(f"{100 * p:.1f}%" for p in row) + " |")
            print(f"\ncoverage of the bound, smallest over {result['coverage_cells']} cells: {100 * result['coverage_min']:.2f}% (nominal {100 * (1 - result['alpha']):.1f}%)")
            print("null-adjusted coverage at a 10% copy rate:", result["null_adjusted_coverage_at_10pct"])
            print("conservative coverage at a 10% copy rate:", result["conservative_coverage_at_10pct"])
    else:
        result = images_part(args.reps, args.n, [int(s) for s in args.seeds.split(",")], args.threads, args.cohort_seed)
        if args.markdown:
            print("| copies from | " + " | ".join(f"{100 * r:.0f}%: covered / passed" for r in RATES) + " |")
            print("|---|" + "---|" * len(RATES))
            for mix, cells in result["cells"].items():
                if mix == "audits":
                    continue
                print(f"| {mix} | " + " | ".join(f"{100 * c['covered'] / c['reps']:.1f}% / {100 * c['passed'] / c['reps']:.1f}%" for c in cells.values()) + " |")
            for a in result["cells"]["audits"]:
                print(a)
    result.update(machine=cpu_name(), seconds=round(time.perf_counter() - start, 1))
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
