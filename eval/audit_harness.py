"""Validation harness of the copy audit: recall on copy families the detectors never train on,
the null on new subjects, and every detector's positive control, at the demo's sizes.

On the built-in cohort, disjoint subjects form the training set, the held-out calibration set
and genuine other subjects. A VQ-GAN is trained on the training images the way the demo trains
it (`configs/demo_autoencoder_{2,3}d.yaml`, the demo's steps); it stands for a latent model's
autoencoder. Two audits are fitted with the settings frozen in medgen, sharing one SSL detector:

- `pixel`: the audit of a pixel-space model (ssl + pixel-rank, calibrated on held-out images);
- `latent`: the audit of a latent model (pixel-rank + latent in the decoded space: training and
  held-out images decoded through the autoencoder; latent control families). A latent model
  outputs decoded images only, so in this mode every image scored is first decoded through the
  autoencoder (its copy of a gamma-changed patient is that image decoded; the null is decoded
  new subjects).

Each then scores:

- copies of training images from each family (`medgen.privacy.families`; k each); a copy counts
  when a detector flags it *and* points at its source (`Scores.caught`);
- the same transforms applied to other subjects (not copies): flagged there means a detector
  reacts to the transform, not the patient;
- copies made with the SSL detector's own training augmentations: listed for contrast, not evidence;
- genuine other subjects (the null on new subjects; decoded through the autoencoder for the
  latent audit: what an honest latent model outputs at best) and non-anatomical images.

`--cohort-seed 0` and 3 were looked at while the settings were chosen; 7 (the default) is the test cohort, and
the one eval/RESULTS.md reports. `--markdown` prints its tables. Prints one JSON line at the end.

    python eval/audit_harness.py --dims 2 --seeds 0,1,2 --markdown
    python eval/audit_harness.py --dims 3 --seeds 0,1,2 --markdown
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medgen.data import load_images  # noqa: E402
from medgen.data.cohort import synth_brain  # noqa: E402
from medgen.privacy.calibration import CopyAudit  # noqa: E402
from medgen.privacy.detector import train_detector  # noqa: E402
from medgen.privacy.families import LATENT_FAMILIES, TRAINING_AUGMENTATIONS, VALIDATION_FAMILIES, RoundTrip, gaussian_blur, run_roundtrip  # noqa: E402
from medgen.privacy.planting import family_copies, train_roundtrip_autoencoder  # noqa: E402
from medgen.versions import cpu_name  # noqa: E402

# The demo's sizes: 2D 64^2 (the full 2D demo), 3D 32^3 (the full 3D demo); autoencoder steps as the demo's config.
SETTINGS = {
    2: {"size": 64, "n_train": 100, "n_holdout": 60, "n_genuine": 60, "steps": 500, "batch_size": 64, "ae_steps": 200},
    3: {"size": 32, "n_train": 60, "n_holdout": 40, "n_genuine": 40, "steps": 300, "batch_size": 32, "ae_steps": 120},
}


def non_anatomical(genuine: torch.Tensor, g: torch.Generator, roundtrip: RoundTrip | None) -> dict[str, torch.Tensor]:
    shape = tuple(genuine.shape[1:])
    n = 12
    sets = {
        "white noise": (torch.randn((n,) + shape, generator=g) * 0.5).clamp(-1, 1),
        "smooth noise": torch.stack([gaussian_blur(x, 2.0) for x in torch.randn((n,) + shape, generator=g)]).mul(3).clamp(-1, 1),
        "blank": torch.cat([torch.full((n // 2,) + shape, -1.0), torch.full((n - n // 2,) + shape, 0.0)]),
        "inverted contrast": -genuine[:n],
    }
    if roundtrip is not None:
        z = roundtrip.encode(genuine[:n])
        sets["decoded random latents"] = roundtrip.decode(torch.randn(z.shape, generator=g) * z.std() + z.mean())
    return sets


def rates(scores, sources=None) -> dict[str, float]:
    """Share flagged per detector and for the union; with `sources`, a copy counts only when
    the flagging detector's nearest training image is its source."""
    detectors = scores.detectors
    if sources is None:
        out = {d: float((scores.flagged[:, k] & scores.anatomical).double().mean()) for k, d in enumerate(detectors)}
        out["union"] = float(scores.is_copy.double().mean())
    else:
        src = torch.tensor(sources)
        out = {d: float((scores.anatomical & scores.flagged[:, k] & (scores.nearest[:, k] == src)).double().mean()) for k, d in enumerate(detectors)}
        out["union"] = float(scores.caught(sources).double().mean())
    return {k: round(v, 4) for k, v in out.items()}


def evaluate(audit: CopyAudit, train, genuine, families, k, seed, roundtrip) -> dict:
    """Score every family, other subjects and non-anatomical images. For the latent audit every
    image is first decoded through the autoencoder (`seen`): a latent model outputs nothing else,
    and a raw image scored against a tau calibrated on decoded ones would overstate recall."""
    g = torch.Generator().manual_seed(100 + seed)
    seen = roundtrip if audit.decoded else (lambda x: x)
    c = audit.control
    out = {
        "thresholds": audit.thresholds, "reasons": audit.reasons, "null_holdout": round(audit.null_rate, 4),
        "control": {"n": c.n, "recall": round(c.recall, 4), "by_detector": {d: v["recall"] for d, v in c.summary()["by_detector"].items()},
                    "blind": c.blind_detectors()},
        "genuine": rates(audit.score(seen(genuine))),
        "validation": {}, "transformed_others": {}, "training_augmentations": {}, "not_anatomy": {},
    }
    decoded = set(LATENT_FAMILIES)  # already decoded
    for fam in families:
        copies, sources = family_copies(train, fam, k, seed=seed, autoencoder=roundtrip)
        out["validation"][fam] = rates(audit.score(copies if fam in decoded else seen(copies)), sources)
        others, _ = family_copies(genuine, fam, k, seed=seed, autoencoder=roundtrip)
        out["transformed_others"][fam] = rates(audit.score(others if fam in decoded else seen(others)))
    for kind in TRAINING_AUGMENTATIONS:
        copies, sources = family_copies(train, kind, k, seed=seed)
        out["training_augmentations"][kind] = rates(audit.score(seen(copies)), sources)
    # a training image exactly as stored, never decoded: what a wrapper, a bug or a leak outputs (issue 20)
    sources = torch.randperm(train.shape[0], generator=g)[:k].tolist()
    out["exact"] = rates(audit.score(train[sources]), sources)
    for name, imgs in non_anatomical(genuine, g, roundtrip).items():
        sc = audit.score(imgs if name == "decoded random latents" else seen(imgs))
        out["not_anatomy"][name] = {"counted_as_copy": round(float(sc.is_copy.double().mean()), 4),
                                    "reported_not_anatomy": round(1 - float(sc.anatomical.double().mean()), 4)}
    return out


def agg(runs: list[dict], get) -> dict[str, float]:
    vals = [get(r) for r in runs]
    return {"mean": round(sum(vals) / len(vals), 4), "min": round(min(vals), 4), "max": round(max(vals), 4)}


def markdown(mode: str, runs: list[dict], families: list[str], dims: int) -> str:
    fmt = lambda a: f"{100 * a['mean']:.0f}% ({100 * a['min']:.0f}-{100 * a['max']:.0f})"  # noqa: E731
    detectors = list(runs[0]["genuine"])
    lines = [f"\n{mode} audit ({dims}D): " + ", ".join(d for d in detectors if d != "union"),
             "", f"| copy family | " + " | ".join(detectors) + " | same transform of other subjects (union) |",
             "|---|" + "---|" * (len(detectors) + 1)]
    for fam in families:
        lines.append(f"| {fam} | " + " | ".join(fmt(agg(runs, lambda r: r["validation"][fam][d])) for d in detectors)
                     + f" | {fmt(agg(runs, lambda r: r['transformed_others'][fam]['union']))} |")
    lines.append("| exact training image, as stored | " + " | ".join(fmt(agg(runs, lambda r: r["exact"][d])) for d in detectors) + " | |")
    for kind in TRAINING_AUGMENTATIONS:
        lines.append(f"| ({kind}: training augmentation) | " + " | ".join(fmt(agg(runs, lambda r: r["training_augmentations"][kind][d])) for d in detectors) + " | |")
    lines.append("| **new subjects (false flags: the null)** | " + " | ".join(fmt(agg(runs, lambda r: r["genuine"][d])) for d in detectors) + " | |")
    ctrl = runs[0]["control"]["by_detector"]
    lines.append("| control recall, own families | " + " | ".join(fmt(agg(runs, lambda r: r["control"]["by_detector"][d])) if d in ctrl else "" for d in detectors[:-1])
                 + f" | {fmt(agg(runs, lambda r: r['control']['recall']))} (pooled) | |")
    lines += ["", "| non-anatomical | counted as copies | reported as not anatomy |", "|---|---|---|"]
    for name in runs[0]["not_anatomy"]:
        lines.append(f"| {name} | {fmt(agg(runs, lambda r: r['not_anatomy'][name]['counted_as_copy']))} | "
                     f"{fmt(agg(runs, lambda r: r['not_anatomy'][name]['reported_not_anatomy']))} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, choices=(2, 3), default=2)
    ap.add_argument("--cohort-seed", type=int, default=7, help="cohort seed (0 and 3 were looked at while tuning; 7 is the test cohort)")
    ap.add_argument("--seeds", default="0,1,2", help="detector (and copy) seeds")
    ap.add_argument("--k", type=int, default=20, help="copies per family")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the cohort and the autoencoder here and reuse them on the next run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    st = SETTINGS[args.dims]
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.perf_counter()
    n_t, n_h, n_g = st["n_train"], st["n_holdout"], st["n_genuine"]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir / f"{args.dims}d_seed{args.cohort_seed}" if args.workdir else Path(tmp)
        cohort = work / "cohort"
        if not cohort.is_dir():
            synth_brain(cohort, n=n_t + n_h + n_g, dims=args.dims, size=st["size"], seed=args.cohort_seed)
        x, samples = load_images(cohort)
        if (work / "autoencoder" / "model" / "config.json").is_file():
            roundtrip = run_roundtrip(work / "autoencoder")
        else:
            roundtrip = train_roundtrip_autoencoder([s.path for s in samples[:n_t]], args.dims, st["size"], st["ae_steps"], work)
    recon_l1 = float((roundtrip(x[:n_t]) - x[:n_t]).abs().mean())
    train, holdout, genuine = x[:n_t], x[n_t : n_t + n_h], x[n_t + n_h :]
    families = {"pixel": list(VALIDATION_FAMILIES), "latent": list(VALIDATION_FAMILIES) + list(LATENT_FAMILIES[1:])}
    # the SSL detector is trained for the pixel audit only: a latent model's default union leaves it out
    runs: dict[str, list] = {"pixel": [], "latent": []}
    for seed in seeds:
        t0 = time.perf_counter()
        ssl = train_detector(train, steps=st["steps"], batch_size=st["batch_size"], seed=seed, progress=False)
        ssl_s = time.perf_counter() - t0
        for mode in ("pixel", "latent"):
            t0 = time.perf_counter()
            detectors = [ssl, "pixel-rank"] if mode == "pixel" else "auto"  # auto with an autoencoder: pixel-rank,latent
            audit = CopyAudit.fit(train, holdout, detectors, autoencoder=roundtrip if mode == "latent" else None, seed=seed)
            run = {"seed": seed, "ssl_seconds": round(ssl_s, 1), "fit_seconds": round(time.perf_counter() - t0, 1),
                   **evaluate(audit, train, genuine, families[mode], args.k, seed, roundtrip)}
            runs[mode].append(run)
            print(json.dumps({"mode": mode, **run}), flush=True)
    result = {"harness": "audit", "dims": args.dims, "cohort_seed": args.cohort_seed, "settings": st, "k": args.k, "seeds": seeds,
              "autoencoder_recon_l1": round(recon_l1, 4), "machine": cpu_name(), "threads": args.threads,
              "seconds": round(time.perf_counter() - start, 1), "runs": runs}
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        for mode in ("pixel", "latent"):
            print(markdown(mode, runs[mode], families[mode], args.dims))
        print(f"\nautoencoder round trip L1 on the training images: {recon_l1:.3f}; {result['seconds']:.0f} s on {cpu_name()}")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))


if __name__ == "__main__":
    main()
