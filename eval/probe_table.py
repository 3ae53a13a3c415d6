"""The probe table of eval/RESULTS.md: Han et al. 2024's experiment on the built-in cohort, one command.

    python eval/probe_table.py --out runs/probe_table            # CPU-sized defaults (about an hour on 2 cores)
    # GPU (the faithful regime: 64 px, 1000 posterior steps, 1000 attack steps):
    python eval/probe_table.py --out runs/probe_table_gpu --device cuda --size 64 --prior-steps 20000 --n-images 32 \
        --posterior-samples 4 --steps 1000 --attack-steps 1000 --tv-iterations 300

Builds the 2D cohort (`medgen data synth-brain`), trains a pixel-space prior with
`configs/demo_diffusion_2d_pixel.yaml` (`medgen train diffusion`; reused when OUT/prior exists, so a
rerun after a change to the probe costs only the probe; pass --retrain-prior after a change to the
diffusion code), trains the surrogate (`medgen probe train-surrogate`, R=8 equispaced; reused likewise)
and runs `medgen probe mri` once per --seeds value (the attack's start, the control's noise and the
posterior seeds change; images, prior and surrogate do not) on held-out subjects, with the probe's
defaults: a fixed equispaced mask, the prior's own intensity scaling, the control on the sampled
k-space with the worst case's measured norm, paired statistics over images with Holm's correction.
Prints, per seed, the PSNR table and the transfer cells with their intervals and verdicts.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/probe_table"))
    ap.add_argument("--size", type=int, default=64, help="cohort image size (px)")
    ap.add_argument("--subjects", type=int, default=200)
    ap.add_argument("--prior", type=Path, default=None, help="use this pixel-space run instead of training one")
    ap.add_argument("--prior-steps", type=int, default=1500)
    ap.add_argument("--retrain-prior", action="store_true")
    ap.add_argument("--prior-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override of the prior's config (repeatable), e.g. diffusion.prediction=eps")
    ap.add_argument("--surrogate-steps", type=int, default=1000)
    ap.add_argument("--eps", default="0,0.04,0.08")
    ap.add_argument("--acceleration", default="4,8", help="comma-separated R")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated probe seeds, one probe each")
    ap.add_argument("--n-images", type=int, default=24)
    ap.add_argument("--posterior-samples", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50, help="posterior sampling steps")
    ap.add_argument("--attack-steps", type=int, default=100)
    ap.add_argument("--dps-weight", type=float, default=None, help="default: the probe's (auto: chosen on clean data)")
    ap.add_argument("--tv-iterations", type=int, default=100, help="TV-CS FISTA iterations")
    ap.add_argument("--full-kspace-control", action="store_true", help="also the older control (Gaussian on the full k-space)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the probe's methods (default: all)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from medgen.config import load_config
    from medgen.data.cohort import synth_brain
    from medgen.recon.commands import print_summary
    from medgen.recon.probe import run_probe
    from medgen.recon.settings import ProbeSettings
    from medgen.recon.surrogate import save_surrogate, surrogate_config, train_surrogate
    from medgen.train.diffusion import DEFAULTS, train_diffusion

    device = None if args.device == "auto" else args.device
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    cohort = out / "cohort"
    if not (cohort / "manifest.csv").is_file():
        synth_brain(cohort, n=args.subjects, dims=2, size=args.size, seed=0)

    prior = args.prior or out / "prior"
    if args.prior is None and (args.retrain_prior or not (prior / "model" / "config.json").is_file()):
        shutil.rmtree(prior, ignore_errors=True)
        tic = time.perf_counter()
        cfg = load_config(ROOT / "configs" / "demo_diffusion_2d_pixel.yaml",
                          [f"data.path={cohort}", f"data.shape=[{args.size},{args.size}]", f"train.max_steps={args.prior_steps}",
                           f"train.checkpoint_every={args.prior_steps}", f"train.preview_every={args.prior_steps}",
                           "train.tracker=none", f"train.cpu={device == 'cpu'}", *args.prior_set], DEFAULTS)
        train_diffusion(cfg, prior)
        timings["prior_s"] = round(time.perf_counter() - tic)

    surrogate = out / "surrogate"
    if not (surrogate / "config.json").is_file():
        tic = time.perf_counter()
        cfg = surrogate_config([f"train.max_steps={args.surrogate_steps}"], acceleration=8, mask="equispaced",
                               data={"path": str(cohort)})
        save_surrogate(train_surrogate(cfg, device), surrogate, overwrite=True)
        timings["surrogate_s"] = round(time.perf_counter() - tic)

    reports = {}
    for seed in [int(v) for v in args.seeds.split(",") if v.strip()]:
        settings = ProbeSettings(accelerations=[int(v) for v in args.acceleration.split(",") if v.strip()],
                                 eps=[float(e) for e in args.eps.split(",")], posterior_samples=args.posterior_samples,
                                 steps=args.steps, attack_steps=args.attack_steps, n_images=args.n_images,
                                 tv_iterations=args.tv_iterations, seed=seed, full_kspace_control=args.full_kspace_control)
        if args.methods:
            settings.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if args.dps_weight is not None:
            settings.dps_weight = args.dps_weight
        tic = time.perf_counter()
        report = run_probe(prior, cohort, out / f"report_seed{seed}", surrogate=surrogate, settings=settings, device=device,
                           overwrite=True)
        timings[f"probe_seed{seed}_s"] = round(time.perf_counter() - tic)
        print(f"\n## seed {seed}\n")
        print_summary(report)
        print()
        print(markdown_table(report))
        reports[seed] = report
    print("\n## transfer cells, every seed\n")
    print(seeds_table(reports))
    print(f"\ntimings: {json.dumps(timings)}; reports: {out}/report_seed*/report.md")


def markdown_table(report: dict) -> str:
    """report.md's tables: PSNR of every method against eps per R, then the transfer cells."""
    from medgen.recon.report import psnr_table, transfer_table

    out = []
    for R in sorted({r["acceleration"] for r in report["results"]}):
        out += [f"R={R}", ""] + psnr_table(report["results"], R) + [""]
    return "\n".join(out + transfer_table(report["transfer"]))


def seeds_table(reports: dict[int, dict]) -> str:
    """One row per (method, R, eps) and seed: worst-case and control drops, worst - control with its
    95% interval over images, and the verdict (Holm within each seed's probe)."""
    lines = ["| method | R | eps | seed | drop, worst-case | drop, random | worst - random [95% CI] | Holm p | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    cells = sorted({(t["method"], t["acceleration"], t["eps"]) for r in reports.values() for t in r["transfer"]},
                   key=lambda c: (c[1], c[0] == "surrogate", c[0], c[2]))
    for method, R, eps in cells:
        for seed, report in reports.items():
            t = next(t for t in report["transfer"] if (t["method"], t["acceleration"], t["eps"]) == (method, R, eps))
            ci = "n/a" if not t.get("ci95") else f"[{t['ci95'][0]:+.2f}, {t['ci95'][1]:+.2f}]"
            p = "n/a" if t.get("p_holm") is None else f"{t['p_holm']:.3g}"
            lines.append(f"| {method} | {R} | {eps:g} | {seed} | {t['psnr_drop_worst_case']:.2f} | {t['psnr_drop_random']:.2f} | "
                         f"{t['difference']:+.2f} {ci} | {p} | {t['verdict']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
