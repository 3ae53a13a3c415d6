"""`medgen audit ...` and the demo's audit stage.

Two forms share one subcommand:

    medgen audit --train DIR --holdout DIR --synthetic DIR --out AUDIT_DIR [--detector ssl,pixel-rank] ...
    medgen audit --run RUN_DIR --synthetic DIR --out AUDIT_DIR ...
    medgen audit train-detector --train DIR --out DETECTOR_DIR [--steps N] ...

Exit codes: 0 pass, 1 fail, 3 inconclusive (2: an error a user can fix).

The flat form is the parent parser's own options; `train-detector` is an optional nested
subcommand (argparse subparsers with required=False), so each form gets its own --help.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medgen.errors import RunError
from medgen.io import ensure_new_output
from medgen.tracking import add_tracker_options, log_report, report_tracker

DEFAULT_DETECTORS = "auto"  # ssl,pixel-rank; pixel-rank,latent for a latent model (medgen.privacy.calibration.default_detectors)


def _data_cfg(config: Path | None):
    if config is None:
        return None
    from medgen.config import load_config, select

    return select(load_config(config), "data")


def _add_training_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SSL detector training")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 400 epochs, clamped to 400..4000 steps)")
    g.add_argument("--batch-size", type=int, default=128, help="images per step; the other images of the batch are the negatives")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 2e-3 in 2D, 5e-4 in 3D)")
    g.add_argument("--temperature", type=float, default=0.07, help="NT-Xent temperature (Dar et al. 2024: 0.07)")
    g.add_argument("--image-size", type=int, default=None, help="longest side the images are area-resized to (default 32 in 2D, 32 in 3D)")
    g.add_argument("--embed-dim", type=int, default=None, help="embedding size (default 128 in 2D, 32 in 3D)")


def _training_options(args: argparse.Namespace) -> dict:
    opts = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "temperature": args.temperature, "image_size": args.image_size, "embed_dim": args.embed_dim, "seed": args.seed}
    return {k: v for k, v in opts.items() if v is not None}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="memorization audit: bound the share of synthetic samples that copy training patients (exit 0 pass, 1 fail, 3 inconclusive)",
        description="Flag synthetic samples that copy training images (Dar et al. 2024): embed with copy detectors, calibrate each tau "
        "on held-out->train similarities (a new patient exceeds it with probability <= --null-level), flag samples whose best training "
        "similarity exceeds a tau, and bound the share of copies: flagged share over the detectors' recall on a positive control, at "
        "confidence 1 - alpha. 'pass' when the bound is within --max-copy-rate, 'fail' when samples exceed tau significantly more often "
        "than held-out patients do, 'inconclusive' otherwise or when the audit could not have seen copies (a detector blind to its "
        "control, collapsed detector, shared subjects, too few images). Exit codes: 0 pass, 1 fail, 3 inconclusive, 2 error. "
        "Use `medgen audit train-detector --help` to train the SSL detector separately.",
    )
    p.add_argument("--train", type=Path, help="training images the model saw (folder or manifest.csv)")
    p.add_argument("--holdout", type=Path, help="held-out images of patients NOT used for training (calibrates tau)")
    p.add_argument("--run", type=Path, default=None, help="a training run: its split.json gives the training and held-out subjects and its data config preprocesses all sets (instead of --train/--holdout)")
    p.add_argument("--holdout-splits", default="holdout", help="with --run: the unseen splits that calibrate tau, holdout and/or val (comma-separated; default holdout)")
    p.add_argument("--data", type=Path, default=None, help="with --run: the dataset folder, when it moved since training")
    p.add_argument("--synthetic", type=Path, help="synthetic images to audit (folder or manifest.csv)")
    p.add_argument("--out", type=Path, help="audit folder to write (report.json, report.md, pairs.csv, figures)")
    p.add_argument("--detector", default=DEFAULT_DETECTORS, help="comma-separated detectors, flagged when any flags (default auto: ssl,pixel-rank, "
                   "or pixel-rank,latent for a latent model): ssl (trained on --train now), pixel-rank, pixel, latent (needs the model's autoencoder), "
                   "a folder from `medgen audit train-detector`, or a feature extractor of the evaluation registry (name or TorchScript path)")
    p.add_argument("--autoencoder", type=Path, default=None, help="the latent model's autoencoder (a latent diffusion run, an autoencoder run "
                   "or model folder): held-out images are decoded through it and the latent detector joins (with --run: the run's own)")
    p.add_argument("--similarity", choices=("pearson", "cosine"), default="pearson")
    p.add_argument("--null-level", type=float, default=None, help="tau: the larger of the held-out images' conformal quantile "
                   "(a new patient exceeds it with probability at most this or 1/(held-out images + 1), whichever is larger) and "
                   "their Gaussian tail quantile at this level (default 0.005: medgen.privacy.calibration.NULL_LEVEL)")
    p.add_argument("--percentile", type=float, default=95.0, help="Dar et al.'s tau (this percentile of train->held-out best similarities), "
                   "reported as a measure (default 95)")
    p.add_argument("--alpha", type=float, default=0.05, help="1 - confidence of the bound, and the level of the test against the null (default 0.05)")
    p.add_argument("--max-copy-rate", type=float, default=0.05, help="policy: pass only when at most this share of the model's outputs "
                   "can be copies at confidence 1 - alpha (default 0.05 = 5%%)")
    p.add_argument("--bound", choices=("conservative", "null-adjusted"), default="conservative", help="conservative (default): every "
                   "sample above tau may be a copy; null-adjusted: subtract the held-out null (valid only if the model's non-copies "
                   "exceed tau at least as often as new patients)")
    p.add_argument("--min-control-recall", type=float, default=None, help="share of the copies of its own control families each "
                   "detector must catch, else inconclusive (default 0.8)")
    p.add_argument("--filter-out", type=Path, default=None, help="write copies of the synthetic files NOT flagged to this folder, whatever the verdict (inputs are never moved)")
    p.add_argument("--top-k", type=int, default=8, help="pairs shown in top_pairs.png")
    p.add_argument("--config", type=Path, default=None, help="YAML whose data: section preprocesses all three sets (e.g. data.shape); with --run: instead of the run's")
    p.add_argument("--weights", default=None, help="weights file for a registry feature extractor")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out / --filter-out folder")
    add_tracker_options(p, "--run")
    _add_training_options(p)
    p.set_defaults(func=lambda a: _audit(a, p))

    actions = p.add_subparsers(dest="audit_action", metavar="[train-detector]")
    t = actions.add_parser("train-detector", help="train the SSL copy detector on a training set and save it (safetensors + config.json)")
    t.add_argument("--train", type=Path, required=True, help="training images (folder or manifest.csv)")
    t.add_argument("--out", type=Path, required=True, help="detector folder to write; pass it to `medgen audit --detector`")
    t.add_argument("--config", type=Path, default=None, help="YAML whose data: section preprocesses the images")
    t.add_argument("--device", default="auto")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true")
    _add_training_options(t)
    t.set_defaults(func=_train_detector)


def _audit(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from medgen.privacy.audit import run_audit
    from medgen.privacy.calibration import NULL_LEVEL
    from medgen.privacy.verdict import EXIT_CODES

    required = ("synthetic", "out") if args.run is not None else ("train", "holdout", "synthetic", "out")
    missing = [f"--{k}" for k in required if getattr(args, k) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)} (or use --run RUN_DIR, or `medgen audit train-detector`)")
    if args.run is not None and (args.train is not None or args.holdout is not None):
        parser.error("--run takes the training and held-out subjects from the run; drop --train/--holdout")
    ensure_new_output(args.out, args.overwrite, "audit folder",
                      inputs={f"--{k}": getattr(args, k) for k in ("train", "holdout", "synthetic", "run", "autoencoder")})
    tracker = report_tracker(args.tracker, args.run)
    options = {**_training_options(args), "weights": args.weights}
    report = run_audit(
        args.train, args.holdout, args.synthetic, args.out, run=args.run, data=args.data,
        holdout_splits=[x.strip() for x in args.holdout_splits.split(",") if x.strip()],
        detector=args.detector, similarity=args.similarity, null_level=NULL_LEVEL if args.null_level is None else args.null_level, percentile=args.percentile, alpha=args.alpha,
        max_copy_rate=args.max_copy_rate, bound_method=args.bound, min_control_recall=args.min_control_recall, autoencoder=args.autoencoder,
        filter_out=args.filter_out, overwrite=args.overwrite, data_cfg=_data_cfg(args.config),
        detector_options=options, top_k=args.top_k, device=None if args.device == "auto" else args.device, seed=args.seed,
    )
    print(verdict_line(report))
    print(f"report: {args.out / 'report.md'}")
    for r in report["reasons"]:
        print(f"inconclusive: {r}")
    for w in report["warnings"]:
        print(f"warning: {w}")
    log_report(args.out, tracker, args.tracker_dir, job="audit")
    return EXIT_CODES[report["verdict"]]


def verdict_line(report: dict) -> str:
    t, c, b = report["test"], report.get("control") or {}, report.get("bound") or {}
    control = f"  control recall: {100 * c['recall']:.0f}%" if c else ""
    bound = (f"  copies <= {b['upper_pct']:.2f}% at {100 * b['confidence']:.4g}% (policy {100 * report['policy']['max_copy_rate']:.4g}%)"
             if b else "")
    return (f"verdict: {report['verdict']}{bound}  above tau: {report['n_copies']}/{report['n_synthetic']}  "
            f"null: {t['null_rate_pct']:.2f}%  p: {t['p_value']:.3g}  memorized training images: {report['n_mem_pct']:.2f}%  "
            f"not anatomy: {report['n_not_anatomy']}{control}")


def _train_detector(args: argparse.Namespace) -> int:
    from medgen.data import load_images
    from medgen.io import atomic_dir
    from medgen.privacy.detector import train_detector

    ensure_new_output(args.out, args.overwrite, "detector folder", inputs={"--train": args.train})
    images, _ = load_images(args.train, _data_cfg(args.config))
    detector = train_detector(images, device=None if args.device == "auto" else args.device, **_training_options(args))
    detector.train_info["train"] = str(args.train)
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        detector.save(tmp)
    info = detector.train_info
    print(f"trained copy detector on {info['n_images']} images: NT-Xent {info['initial_loss']:.3f} -> {info['final_loss']:.3f} "
          f"in {info['steps']} steps ({info['images_per_second']:.0f} images/s) -> {args.out}")
    return 0


# ----------------------------------------------------------------------------- demo


def _demo_split(ctx) -> tuple[list, list, dict | None]:
    """Training and calibration samples of the cohort and the data config: the split of the
    demo's run (held-out and validation subjects were both unseen by the model), else a seeded
    subject split made here."""
    from medgen.data import make_splits, scan_dataset
    from medgen.privacy.audit import run_split

    for key in ("diffusion_run", "autoencoder_run"):
        run = ctx.state.get(key)
        if run is not None and (Path(run) / "split.json").is_file():
            return run_split(run, holdout_splits=("holdout", "val"))
    samples = scan_dataset(ctx.cohort)
    split = make_splits(samples, val=0.0, holdout=0.5, seed=0)
    train_ids, unseen = set(split["train"]), set(split["holdout"])
    return [s for s in samples if s.subject_id in train_ids], [s for s in samples if s.subject_id in unseen], None


def _planted_set(train, holdout, data_cfg, out: Path) -> Path:
    """A stand-in synthetic set when no samples exist: held-out images (genuine non-copies) plus
    exact and lightly transformed copies of training images."""
    from medgen.data import load_images
    from medgen.privacy.planting import plant_copies, write_images

    x_t, _ = load_images(train, data_cfg)
    x_h, _ = load_images(holdout, data_cfg)
    images, kinds, _ = plant_copies(x_t, x_h, k=max(1, min(len(x_t) // 4, 8)), seed=0)
    write_images(images, out, [f"{i:03d}_{kind.replace(':', '_')}" for i, kind in enumerate(kinds)])
    return out


def demo_stage(ctx) -> None:
    """Audit the demo's synthetic samples (ctx.state["samples"]) against its training split.
    Every verdict is a result, not an error: the stage reports it and the demo goes on."""
    from medgen.privacy.audit import run_audit

    if ctx.cohort is None:
        raise RunError("the audit stage needs the cohort stage first")
    samples = ctx.state.get("samples")
    run = ctx.state.get("diffusion_run")
    # CPU-sized detector training: quick < 60 s for the stage, full < 5 min
    steps = {(2, True): 100, (3, True): 500, (2, False): 500, (3, False): 300}[(ctx.dims, bool(ctx.quick))]
    options = {"detector_options": {"steps": steps, "batch_size": 64 if ctx.dims == 2 else 32}, "filter_out": ctx.out / "samples_filtered",
               "overwrite": True}
    if samples is not None and run is not None and (Path(run) / "split.json").is_file():
        # the run's own split (held-out and validation subjects were both unseen), its autoencoder for a
        # latent run, and the attempt on the run's record: `medgen audit --run`
        report = run_audit(synthetic=samples, out=ctx.out / "audit", run=run, holdout_splits=("holdout", "val"), **options)
    else:
        train, holdout, data_cfg = _demo_split(ctx)
        if samples is None:
            samples = _planted_set(train, holdout, data_cfg, ctx.out / "audit_planted")
            print(f"  no synthetic samples in this demo run; auditing a planted set instead: {samples}")
        report = run_audit(train, holdout, samples, ctx.out / "audit", data_cfg=data_cfg, **options)
    ctx.state["audit_dir"] = ctx.out / "audit"
    ctx.state["audit_report"] = ctx.out / "audit" / "report.json"
    ctx.state["audit_verdict"] = report["verdict"]
    print(f"  audit: {verdict_line(report)}  -> {ctx.out / 'audit' / 'report.md'}")
    for r in report["reasons"]:
        print(f"  inconclusive: {r}")
