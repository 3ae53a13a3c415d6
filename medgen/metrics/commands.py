"""`medgen eval` and the demo's evaluation stage."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from medgen.errors import ConfigError, DataError
from medgen.tracking import add_tracker_options, log_report, report_tracker

# = medgen.metrics.features.REGISTRY (+ auto), spelled out to keep `medgen --help` free of torch imports
REGISTRY_NAMES = ("auto", "inception", "dinov2", "medicalnet", "pca")


def _metrics(value: str) -> list[str]:
    from medgen.metrics.report import ALL_METRICS

    names = [m.strip() for m in value.split(",") if m.strip()]
    bad = [m for m in names if m not in ALL_METRICS]
    if bad or not names:
        raise ConfigError(f"--metrics {value!r}: choose from {','.join(ALL_METRICS)}")
    return names


def _extractor_file(value: str) -> str | None:
    """`--features` given as a file path (not a registry name): the path, to check it exists."""
    return value if ("/" in value or os.sep in value or Path(value).suffix) and value not in REGISTRY_NAMES else None


def check_sizes(real: Path, fake: Path, allow_mismatch: bool) -> None:
    """Refuse sets of different image sizes unless asked: feature extractors resize both to
    their input size, which hides the resolution gap the comparison should show."""
    from medgen.data import load, scan_dataset

    shapes = {name: load(scan_dataset(path)[0].path).shape for name, path in (("real", real), ("synthetic", fake))}
    if shapes["real"] == shapes["synthetic"]:
        return
    text = {k: "x".join(map(str, v)) for k, v in shapes.items()}
    if not allow_mismatch:
        raise DataError(f"real images are {text['real']} ({real}) but synthetic ones are {text['synthetic']} ({fake}); "
                        f"the extractor would resize both and hide the difference. Sample at the real size, or pass "
                        f"--allow-size-mismatch to compare anyway")
    print(f"warning: real images are {text['real']}, synthetic ones {text['synthetic']}; both are resized to the "
          f"feature extractor's input (the report lists both shapes)", file=sys.stderr)


def run_eval(args: argparse.Namespace) -> int:
    from medgen.config import check_counts
    from medgen.io import ensure_new_output
    from medgen.metrics.report import evaluate

    check_counts({"--bootstrap": args.bootstrap}, minimum=0)
    check_counts({"--slice-step": args.slice_step, "--msssim-pairs": args.msssim_pairs})
    if args.utility and args.holdout is None:
        raise ConfigError("--utility tests its classifiers on labelled real images the model never saw: pass --holdout DIR")
    ensure_new_output(args.out, args.overwrite, "report folder",
                      inputs={"--real": args.real, "--fake": args.fake, "--holdout": args.holdout, "--features": _extractor_file(args.features),
                              "--features-3d": _extractor_file(args.features_3d), "--weights": args.weights})
    check_sizes(args.real, args.fake, args.allow_size_mismatch)
    tracker = report_tracker(args.tracker)
    utility = None
    if args.utility:
        from medgen.metrics.utility import synthetic_utility

        utility = synthetic_utility(args.fake, args.real, args.holdout, mixed=args.utility == "mixed", device=args.device)
    report = evaluate(
        args.real, args.fake, args.out, holdout=args.holdout, features=args.features, features_3d=args.features_3d, weights=args.weights,
        metrics=_metrics(args.metrics), bootstrap=args.bootstrap, seed=args.seed, slice_step=args.slice_step,
        msssim_pairs=args.msssim_pairs, device=args.device, use_cache=not args.no_cache, overwrite=args.overwrite,
        utility=utility,
    )
    _print_summary(report)
    print(f"report: {args.out / 'report.md'}")
    log_report(args.out, tracker, args.tracker_dir, job="eval")
    return 0


def _print_summary(report: dict) -> None:
    from medgen.metrics.report import summary_rows

    feats = report["recipe"].get("features", {}).get("extractor", "-")
    print(f"features: {feats}  (n_real={report['recipe']['n_real']}, n_fake={report['recipe']['n_fake']})")
    for name, text in summary_rows(report):
        print(f"  {name:<16} {text}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="FID/KID/precision-recall/density-coverage/MS-SSIM of a synthetic set against real data",
                       description="Evaluate synthetic images against real ones; writes report.json, report.md and figures.")
    p.add_argument("--real", type=Path, required=True, help="folder (or manifest.csv) of real images/volumes")
    p.add_argument("--fake", type=Path, required=True, help="folder of synthetic images/volumes (e.g. a sample directory)")
    p.add_argument("--out", type=Path, required=True, help="report folder to create")
    p.add_argument("--holdout", type=Path, default=None,
                   help="real images of patients the model never saw (folder or manifest.csv)")
    p.add_argument("--features", default="auto",
                   help="2D / 2.5D extractor: inception, dinov2, pca (in-domain), a TorchScript path, or auto "
                        "(Inception when its weights are present locally, else pca)")
    p.add_argument("--features-3d", default="auto", help="volume-level extractor for 3D data: medicalnet, pca, a TorchScript path, or auto")
    p.add_argument("--weights", default=None, help="weights file for the (2D) extractor; default: $MEDGEN_WEIGHTS_DIR, the library cache, download")
    p.add_argument("--metrics", default="fid,kid,prdc,msssim", help="comma-separated subset of fid,kid,prdc,msssim; fid and kid are reported as "
                        "fd_<features>/kid_<features> unless the features are Inception's")
    p.add_argument("--bootstrap", type=int, default=200, help="replicates for the 95%% intervals (Fréchet distances: half-samples; the rest: bootstrap; 0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slice-step", type=int, default=1, help="2.5D FID: use every k-th slice along each axis")
    p.add_argument("--msssim-pairs", type=int, default=500, help="random pairs per set for MS-SSIM diversity")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--no-cache", action="store_true", help="recompute features instead of using the feature cache")
    p.add_argument("--allow-size-mismatch", action="store_true",
                   help="compare sets of different image sizes (refused by default: the extractor resizes both)")
    p.add_argument("--utility", nargs="?", const="tstr", choices=("tstr", "mixed"), default=None,
                   help="train a classifier on the labelled synthetic images and test it on the labelled --holdout images "
                        "(TSTR), beside one trained on as many --real images (TRTR); `--utility mixed` adds real + synthetic. "
                        "Labels come from the manifests' label column; unlabelled samples are skipped with a note")
    p.add_argument("--overwrite", action="store_true", help="replace a report folder medgen wrote")
    add_tracker_options(p)
    p.set_defaults(func=run_eval)


def _demo_sets(ctx) -> tuple:
    """The cohort's subjects the diffusion run trained on and those it never saw (held-out and
    validation, as the audit's), from its split.json; the whole cohort and None without one."""
    from medgen.data import load_split, scan_dataset

    run = ctx.state.get("diffusion_run")
    if run is None or not (Path(run) / "split.json").is_file():
        return ctx.cohort, None
    split = load_split(Path(run) / "split.json")
    trained, unseen = set(split.get("train", [])), set(split.get("holdout", []) + split.get("val", []))
    samples = scan_dataset(ctx.cohort)
    return [s for s in samples if s.subject_id in trained], [s for s in samples if s.subject_id in unseen] or None


def demo_stage(ctx) -> None:
    """Evaluate the diffusion stage's samples against the run's training subjects with
    `--features auto`, beside real vs real (its unseen subjects in the samples' place), and their
    utility: a classifier trained on them and tested on the unseen subjects (TSTR against TRTR)."""
    from medgen.metrics.report import evaluate

    samples = ctx.state.get("samples")
    if samples is None:
        print("  eval: no samples from the diffusion stage; skipped")
        return
    real, holdout = _demo_sets(ctx)
    utility = None
    if holdout is not None:  # TSTR against TRTR on the unseen subjects; quick: one classifier seed per setting
        from medgen.metrics.utility import UTILITY_RECIPE, synthetic_utility, utility_summary

        utility = synthetic_utility(samples, real, holdout, seeds=UTILITY_RECIPE["seeds"][:1] if ctx.quick else None)
    report = evaluate(
        real, samples, ctx.out / "eval", holdout=holdout, features="auto",
        bootstrap=50 if ctx.quick else 200, msssim_pairs=50 if ctx.quick else 300, slice_step=2 if ctx.dims == 3 else 1,
        utility=utility,
    )
    ctx.state["eval_report"] = ctx.out / "eval"
    if utility is not None:  # TSTR and TRTR AUROC, or why utility was skipped (demo.json)
        ctx.state["utility"] = utility_summary(utility)
    ctx.state["eval_ratio"] = report["reference"].get("ratio")  # model / real vs real per FD and KID (demo.json)
    from medgen.metrics.report import summary_rows

    ctx.state["eval_summary"] = summary_rows(report)  # the demo's closing table: each metric beside real vs real
    _print_summary(report)
    print(f"  report: {ctx.out / 'eval' / 'report.md'}")
