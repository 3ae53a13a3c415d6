"""Validation harness of the copy audit: recall on copy families the detectors never train on.

On the built-in cohort (a cohort seed other than the one the detector settings were chosen on),
disjoint subjects form the training set, the held-out calibration set (60) and genuine other
subjects (60). The default audit (`CopyAudit.fit`: SSL + pixel-rank in union, each tau at the
95th percentile) is fitted with the settings frozen in medgen, then scores:

- copies of training images from each validation family (`medgen.privacy.families`; k each),
  including a round trip through a medgen autoencoder trained on the training images; a copy
  counts when a detector flags it *and* points at its source (`Scores.caught`);
- the same transforms applied to other subjects (not copies): flagged there means a detector
  reacts to the transform itself, which would inflate its recall;
- copies made with the SSL detector's own training augmentations (shift, flip, scale,
  intensity, noise): listed for contrast, not evidence;
- genuine other subjects (false flags), the held-out null rate, and non-anatomical images
  (white noise, smooth noise, blank, inverted contrast, decoded random latents of the
  autoencoder): these must never count as copies.

Per detector seed: recall of each detector and of the union; the summary gives mean and min
over seeds. `--markdown` prints the table for eval/RESULTS.md.

    python eval/audit_harness.py --dims 2 --seeds 0,1,2
    python eval/audit_harness.py --dims 3 --seeds 0,1,2

Prints one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medgen.data import load_images  # noqa: E402
from medgen.data.cohort import synth_brain  # noqa: E402
from medgen.privacy.calibration import CopyAudit  # noqa: E402
from medgen.privacy.families import TRAINING_AUGMENTATIONS, VALIDATION_FAMILIES, gaussian_blur  # noqa: E402
from medgen.privacy.planting import family_copies, train_roundtrip_autoencoder  # noqa: E402

# Settings per dims: the unit-test sizes (tests/test_privacy_audit.py asserts these rates).
SETTINGS = {2: {"size": 32, "n_train": 30, "steps": 400, "batch_size": 64}, 3: {"size": 16, "n_train": 45, "steps": 600, "batch_size": 64}}
N_HOLDOUT = N_GENUINE = 60


def non_anatomical(genuine: torch.Tensor, g: torch.Generator, roundtrip=None) -> dict[str, torch.Tensor]:
    shape = tuple(genuine.shape[1:])
    n = 12
    sets = {
        "white noise": (torch.randn((n,) + shape, generator=g) * 0.5).clamp(-1, 1),
        "smooth noise": torch.stack([gaussian_blur(x, 2.0) for x in torch.randn((n,) + shape, generator=g)]).mul(3).clamp(-1, 1),
        "blank": torch.cat([torch.full((n // 2,) + shape, -1.0), torch.full((n - n // 2,) + shape, 0.0)]),
        "inverted contrast": -genuine[:n],
    }
    if roundtrip is not None:
        ae = roundtrip.autoencoder
        with torch.no_grad():
            z = torch.randn((n,) + tuple(ae.latent_shape(shape[1:])), generator=g)
            sets["decoded random latents"] = ae.decode(z).clamp(-1, 1)
    return sets


def rates(scores, detectors: list[str], sources=None) -> dict[str, float]:
    """Share flagged per detector and for the union; with `sources`, a copy counts only when
    the flagging detector's nearest training image is its source (`Scores.caught`)."""
    if sources is None:
        out = {d: float(scores.flagged[:, k].double().mean()) for k, d in enumerate(detectors)}
        out["union"] = float(scores.is_copy.double().mean())
    else:
        src = torch.tensor(sources)
        out = {d: float((scores.flagged[:, k] & (scores.nearest[:, k] == src)).double().mean()) for k, d in enumerate(detectors)}
        out["union"] = float(scores.caught(sources).double().mean())
    return {k: round(v, 4) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, choices=(2, 3), default=2)
    ap.add_argument("--cohort-seed", type=int, default=1, help="cohort seed (detector settings were chosen on seed 0)")
    ap.add_argument("--seeds", default="0,1,2", help="detector (and copy) seeds")
    ap.add_argument("--k", type=int, default=12, help="copies per family")
    ap.add_argument("--ae-steps", type=int, default=300, help="autoencoder training steps for the autoencoder family (0: skip)")
    ap.add_argument("--steps", type=int, default=None, help="SSL training steps (default: the test setting)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    st = dict(SETTINGS[args.dims])
    if args.steps:
        st["steps"] = args.steps
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cohort = synth_brain(Path(tmp) / "cohort", n=st["n_train"] + N_HOLDOUT + N_GENUINE, dims=args.dims, size=st["size"], seed=args.cohort_seed)
        x, samples = load_images(cohort)
        roundtrip = train_roundtrip_autoencoder([s.path for s in samples[: st["n_train"]]], args.dims, st["size"], args.ae_steps, Path(tmp)) if args.ae_steps else None
    train, holdout = x[: st["n_train"]], x[st["n_train"] : st["n_train"] + N_HOLDOUT]
    genuine = x[st["n_train"] + N_HOLDOUT :]
    families = [f for f in VALIDATION_FAMILIES if f != "autoencoder" or roundtrip is not None]
    runs = []
    for seed in seeds:
        t0 = time.perf_counter()
        audit = CopyAudit.fit(train, holdout, detector_options={"steps": st["steps"], "batch_size": st["batch_size"]}, seed=seed)
        fit_s = time.perf_counter() - t0
        names = [f.name for f in audit.fits]
        g = torch.Generator().manual_seed(100 + seed)
        run = {"seed": seed, "fit_seconds": round(fit_s, 1), "thresholds": audit.thresholds, "reasons": audit.reasons,
               "control_recall": None if audit.control is None else audit.control.recall,
               "null": {d: round(float(f.holdout_flagged.double().mean()), 4) for d, f in zip(names, audit.fits)} | {"union": round(audit.null_rate, 4)},
               "validation": {}, "transformed_others": {}, "training_augmentations": {}, "not_anatomy": {}}
        run["genuine"] = rates(audit.score(genuine), names)
        for fam in families:
            copies, sources = family_copies(train, fam, args.k, seed=seed, autoencoder=roundtrip)
            run["validation"][fam] = rates(audit.score(copies), names, sources)
            # the same transform applied to other subjects: flagged means the detector reacts to the transform, not the patient
            others, _ = family_copies(genuine, fam, args.k, seed=seed, autoencoder=roundtrip)
            run["transformed_others"][fam] = rates(audit.score(others), names)
        for kind in TRAINING_AUGMENTATIONS:
            copies, sources = family_copies(train, kind, args.k, seed=seed)
            run["training_augmentations"][kind] = rates(audit.score(copies), names, sources)
        for name, imgs in non_anatomical(genuine, g, roundtrip).items():
            sc = audit.score(imgs)
            run["not_anatomy"][name] = {"flagged_as_copy": round(float(sc.is_copy.double().mean()), 4),
                                        "reported_not_anatomy": round(1 - float(sc.anatomical.double().mean()), 4),
                                        "ssl_above_tau": round(float(sc.flagged[:, 0].double().mean()), 4)}
        runs.append(run)
        print(json.dumps(run), flush=True)

    def agg(get) -> dict[str, float]:
        vals = [get(r) for r in runs]
        return {"mean": round(sum(vals) / len(vals), 4), "min": round(min(vals), 4), "max": round(max(vals), 4)}

    detectors = list(runs[0]["genuine"])
    summary = {
        "validation": {fam: {d: agg(lambda r: r["validation"][fam][d]) for d in detectors} for fam in families},
        "transformed_others": {fam: {d: agg(lambda r: r["transformed_others"][fam][d]) for d in detectors} for fam in families},
        "training_augmentations": {k: {d: agg(lambda r: r["training_augmentations"][k][d]) for d in detectors} for k in TRAINING_AUGMENTATIONS},
        "genuine": {d: agg(lambda r: r["genuine"][d]) for d in detectors},
        "null": {d: agg(lambda r: r["null"][d]) for d in detectors},
        "not_anatomy": {k: {m: agg(lambda r: r["not_anatomy"][k][m]) for m in runs[0]["not_anatomy"][k]} for k in runs[0]["not_anatomy"]},
        "control_recall": agg(lambda r: r["control_recall"] or 0.0),
    }
    result = {"harness": "audit", "dims": args.dims, "cohort_seed": args.cohort_seed, "settings": st, "k": args.k, "seeds": seeds,
              "n_holdout": N_HOLDOUT, "n_genuine": N_GENUINE, "machine": platform.processor() or platform.machine(), "threads": args.threads,
              "seconds": round(time.perf_counter() - start, 1), "summary": summary, "runs": runs}
    if args.markdown:
        fmt = lambda a: f"{100 * a['mean']:.0f}% ({100 * a['min']:.0f}-{100 * a['max']:.0f})"  # noqa: E731
        print(f"\n| copy family ({args.dims}D) | " + " | ".join(detectors) + " | same transform of other subjects, union |")
        print("|---|" + "---|" * (len(detectors) + 1))
        for fam in families:
            print(f"| {fam} | " + " | ".join(fmt(summary["validation"][fam][d]) for d in detectors) + f" | {fmt(summary['transformed_others'][fam]['union'])} |")
        for k in TRAINING_AUGMENTATIONS:
            print(f"| ({k}: training augmentation) | " + " | ".join(fmt(summary["training_augmentations"][k][d]) for d in detectors) + " | |")
        print("| genuine other subjects (false flags) | " + " | ".join(fmt(summary["genuine"][d]) for d in detectors) + " | |")
        print("| held-out null rate (leave-one-out) | " + " | ".join(fmt(summary["null"][d]) for d in detectors) + " | |")
        print(f"\n| non-anatomical ({args.dims}D) | counted as copies | reported as not anatomy | SSL alone above its tau |\n|---|---|---|---|")
        for k, v in summary["not_anatomy"].items():
            print(f"| {k} | {fmt(v['flagged_as_copy'])} | {fmt(v['reported_not_anatomy'])} | {fmt(v['ssl_above_tau'])} |")
        print(f"\npositive control recall: {fmt(summary['control_recall'])}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
