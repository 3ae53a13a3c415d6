"""`medgen release` and the demo's release stage.

    medgen release --run RUN_DIR [--train DIR --holdout DIR] --n N --out RELEASE_DIR [--policy max_copy_rate=0.05] [--card card.yaml] ...

Exit codes: 0 released, 1 refused (audit fail, too few clean samples), 3 refused (audit
inconclusive), 2 an error a user can fix (bad input, training data that does not match the run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medgen.cli import ISSUES_URL
from medgen.errors import ReleaseRefused, RunError
from medgen.release.steward import CARD_FIELDS
from medgen.sample.commands import add_output_options, class_or_all

SAMPLERS = ("ddpm", "ddim", "dpmpp", "euler")  # = medgen.diffusion.sampling.SAMPLERS (no torch import to parse)
DEFAULT_DETECTORS = "auto"  # ssl,pixel-rank; pixel-rank,latent for a latent run (medgen.privacy.calibration.default_detectors)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "release", help="release a synthetic dataset with its data card, only when the privacy audit passes (exit 0, else 1/3)",
        description="Sample N images from a diffusion run, audit them for copies of training patients, drop flagged samples and "
                    "sample more (bounded rounds, all judged against the same calibrated audit; a pass means that at confidence "
                    "1 - alpha at most max_copy_rate of the model's outputs are copies), evaluate the set against the "
                    "training images, and write RELEASE_DIR: the files under neutral names, manifest.csv (file, sha256, seed, label, sampler, "
                    "steps, guidance, checkpoint_sha256, units, release_id), "
                    "grid.png, DATA_CARD.md and data_card.json. Fails closed: no folder appears when the audit fails, is inconclusive "
                    "or cannot run, when --train is not the run's training data, or when anything would name the real data. "
                    "Exit codes: 0 released, 1 refused (fail), 3 refused (inconclusive), 2 error.",
        epilog="Under `accelerate launch -m medgen release ...` the processes share the sampling of every round; the main "
               "process audits and writes.")
    p.add_argument("--run", type=Path, required=True, help="diffusion run directory (medgen train diffusion --out)")
    p.add_argument("--n", type=int, required=True, help="number of samples to release")
    p.add_argument("--out", type=Path, required=True, help="release folder to create (appears only when complete)")
    p.add_argument("--train", type=Path, default=None, help="the training images (folder or manifest.csv); must be exactly the "
                   "run's training subjects (split.json). Default: taken from the run's split")
    p.add_argument("--holdout", type=Path, default=None, help="held-out images of patients the model never saw (calibrate tau and "
                   "the null rate). Default: the run's --holdout-splits")
    p.add_argument("--holdout-splits", default="holdout", help="without --train/--holdout: the run's unseen splits that calibrate "
                   "tau, holdout and/or val (comma-separated; default holdout)")
    p.add_argument("--data", type=Path, default=None, help="without --train/--holdout: the run's dataset folder, when it moved")
    p.add_argument("--policy", default="", help="comma-separated key=value: max_copy_rate (0.05: release only when at most this share "
                   "of the model's outputs can be copies), alpha (0.05: 1 - confidence, spent over the run's release attempts), "
                   "audit_samples (400: round 1 judges at least this many samples), max_rounds (5: sampling rounds to replace dropped "
                   "samples), min_control_recall (0.8: share of its own control copies each detector must catch), bound "
                   "(conservative or null-adjusted)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the run's own")
    p.add_argument("--steps", type=int, default=None, help="default: the run's own")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale; default: the run's own")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta; default: the run's own")
    p.add_argument("--label", type=class_or_all, default=None,
                   help="class to generate (conditional models), or `all`: a balanced labelled release (sample index i gets class "
                        "i mod K; each file's label in manifest.csv) whose data card shows its utility (train on synthetic, test on "
                        "real, against train on real); default: unconditional")
    p.add_argument("--seed", type=int, default=0, help="sample index i uses seed+i (indices continue across rounds)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bit-depth", type=int, choices=(8, 16), default=8, help="PNG bit depth for 2D samples")
    add_output_options(p)
    p.add_argument("--detector", default=DEFAULT_DETECTORS, help="copy detectors, as `medgen audit --detector` (default auto: ssl,pixel-rank, "
                   "or pixel-rank,latent for a latent run; a folder from `medgen audit train-detector` skips training the SSL detector)")
    p.add_argument("--features", default="auto", help="feature extractor of the metrics, as `medgen eval --features`")
    p.add_argument("--bootstrap", type=int, default=200, help="replicates for the metrics' 95%% intervals")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available; each process's own GPU under accelerate)")
    p.add_argument("--overwrite", action="store_true", help="replace a release folder medgen wrote")
    p.add_argument("--card", type=Path, default=None, metavar="CARD_YAML", help="what the data steward says on the data card (YAML, "
                   f"field: text): {', '.join(CARD_FIELDS)}; a field left out reads \"not provided\"")
    p.add_argument("--card-field", action="append", default=[], metavar="KEY=VALUE", help="one card field, over the --card file's (repeatable)")
    p.set_defaults(func=_release)


def _release(args: argparse.Namespace) -> int:
    from medgen.release.pipeline import ReleasePolicy, make_release
    from medgen.release.steward import load_card_fields

    policy = ReleasePolicy.parse(args.policy)
    card_fields = load_card_fields(args.card, args.card_field)
    card = make_release(
        args.run, args.out, args.n, train=args.train, holdout=args.holdout,
        holdout_splits=[x.strip() for x in args.holdout_splits.split(",") if x.strip()], data=args.data, policy=policy,
        sampler=args.sampler, steps=args.steps, guidance=args.guidance, eta=args.eta, label=args.label, seed=args.seed,
        batch_size=args.batch_size, bit_depth=args.bit_depth, fmt=args.fmt, units=args.units, detector=args.detector, bootstrap=args.bootstrap,
        features=args.features, device=args.device, overwrite=args.overwrite, card_fields=card_fields,
    )
    if card is not None:
        print(summary_line(card))
    return 0


def summary_line(card: dict) -> str:
    a = card["audit"]
    b = a["bound"]
    return (f"released {card['dataset']['n']} samples: audit {a['verdict']} (at {100 * b['confidence']:.4g}% confidence at most "
            f"{b['upper_pct']:.2f}% of the model's outputs are copies, policy {100 * a['policy']['max_copy_rate']:.4g}%; "
            f"{a['all_samples']['n_copies']} of {a['all_samples']['n_synthetic']} samples above tau), {card['dropped']['copies']} "
            f"flagged and {card['dropped']['not_anatomy']} non-anatomical samples dropped in {len(card['rounds'])} round(s)"
            + _utility_clause(card["metrics"].get("utility")))


def _utility_clause(utility: dict | None) -> str:
    """'; utility: TSTR AUROC 0.810 [...]; TRTR AUROC 0.880 [...] (n_test=...)' when the release was labelled."""
    if not utility or "skipped" in utility:
        return ""
    from medgen.metrics.utility import utility_summary

    return f"; utility: {utility_summary(utility)}"


# ----------------------------------------------------------------------------- demo

# The demo's card: its cohort is simulated from the MNI152 template nilearn ships (medgen.data.cohort). The template's
# terms are McGill's notice (nilearn's description of it, datasets/description/icbm152_2009.rst, says "unknown"); they ask
# for the notice in every copy, so the release is CC-BY-4.0 (attribution) rather than CC0.
DEMO_CARD = {
    "pretty_name": "medgen demo: synthetic brain MRI",
    "modality": "MRI (T1-weighted)",
    "anatomy": "brain",
    "source_dataset": "medgen's built-in cohort (medgen data synth-brain): pseudo-subjects simulated from the MNI ICBM 2009a "
                      "nonlinear symmetric T1 template (1 mm) that ships with nilearn, with enlarged lateral ventricles (label 1), "
                      "random affine and elastic deformations, a bias field, gamma contrast and Rician noise; no real patient",
    "source_license": "the MNI ICBM 2009a template's notice: Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, "
                      "Montreal Neurological Institute, McGill University; permission to use, copy, modify and distribute it for any "
                      "purpose without fee, provided the copyright notice appears in all copies; provided as is, without warranty",
    "ethics_approval": "not required: no patient data; the only source is a published average of 152 adults' MRI scans, and every "
                       "subject of the cohort is simulated",
    "license": "CC-BY-4.0",
    "contact": f"the medgen project, {ISSUES_URL}",
    "citation": "medgen demo release (synthetic). The template: Fonov et al., NeuroImage 54(1):313-327, 2011, "
                "doi:10.1016/j.neuroimage.2010.07.033; Fonov et al., NeuroImage 47(S1):S102, 2009, doi:10.1016/S1053-8119(09)70884-5",
}


def demo_stage(ctx) -> None:
    """Release the demo's samples: same run, same split (held-out + validation subjects) and the
    SSL detector the audit stage trained, so the release is judged by the audit the demo showed.
    A refusal is a result: ctx.state["release_refused"] says why. The card's steward fields are
    the demo's own (DEMO_CARD), written to card.yaml beside the release as an example. A
    class-conditional model releases a balanced labelled set (`--label all`), so the card shows
    its utility beside real vs real.
    """
    from medgen.io import atomic_write_text
    from medgen.release.pipeline import make_release
    from medgen.release.steward import card_yaml, load_card_fields

    run = ctx.state.get("diffusion_run")
    if run is None:
        raise RunError("the release stage needs the diffusion stage first")
    detector = DEFAULT_DETECTORS
    audit_dir = ctx.state.get("audit_dir")
    if audit_dir is not None and (Path(audit_dir) / "detector").is_dir():  # a pixel-space run: reuse the SSL detector the audit trained
        detector = f"{Path(audit_dir) / 'detector'},pixel-rank"
    out = Path(ctx.out) / "release"
    n = 16 if ctx.quick else (64 if ctx.dims == 2 else 48)
    card_file = Path(ctx.out) / "card.yaml"  # an example for a user's own release
    atomic_write_text(card_file, card_yaml(DEMO_CARD, "What the data steward says on the demo's data card: medgen release ... "
                                                      "--card card.yaml\n(--card-field key=value overrides a field). Write your own for your data."))
    try:
        label = "all" if json.loads((Path(run) / "model" / "config.json").read_text()).get("num_classes") else None
        card = make_release(run, out, n, holdout_splits=("holdout", "val"), detector=detector, bootstrap=50 if ctx.quick else 200, label=label,
                            overwrite=True, card_fields=load_card_fields(card_file), echo=lambda m: print(f"  {m}"))
    except ReleaseRefused as e:
        ctx.state["release_refused"] = e.summary
        print(f"  {e}")
        return
    ctx.state["release"] = out
    print(f"  {summary_line(card)}\n  data card: {out / 'DATA_CARD.md'}")
