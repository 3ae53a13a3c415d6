"""Planted-copy harness: how well each copy detector separates copies from other patients.

On the built-in cohort (every subject a deformation of one MNI152 template, so other patients
correlate highly in pixel space), disjoint subjects form the training set, the held-out
calibration set (60) and the genuine non-copies (60); the synthetic set is the genuine images plus
K exact and K lightly transformed copies (shift, left-right flip, noise, intensity scaling) of
training images. For each detector: share of planted copies flagged (per kind), share of genuine
images flagged, at the default 95th-percentile threshold. Detectors: the SSL detector (defaults),
the same encoder without flip averaging, and the pixel-correlation baseline.

    python eval/audit_planted.py --dims 2 --n-train 30 --steps 400
    python eval/audit_planted.py --dims 3 --n-train 45 --steps 600

Prints one JSON line at the end.
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
from medgen.privacy.audit import audit_images  # noqa: E402
from medgen.privacy.detector import PixelDetector, SSLCopyDetector, train_detector  # noqa: E402
from medgen.privacy.planting import plant_copies  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, choices=(2, 3), default=2)
    ap.add_argument("--size", type=int, default=None, help="cohort side (default 32 in 2D, 16 in 3D)")
    ap.add_argument("--n-train", type=int, default=30)
    ap.add_argument("--k", type=int, default=6, help="exact and transformed copies each")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = args.size or (32 if args.dims == 2 else 16)
    with tempfile.TemporaryDirectory() as tmp:
        x, _ = load_images(synth_brain(Path(tmp) / "cohort", n=args.n_train + 120, dims=args.dims, size=size, seed=args.seed))
    train, holdout, genuine = x[: args.n_train], x[args.n_train : args.n_train + 60], x[args.n_train + 60 :]
    synthetic, kinds, _ = plant_copies(train, genuine, k=args.k, seed=args.seed)
    start = time.perf_counter()
    ssl = train_detector(train, steps=args.steps, batch_size=64, seed=args.seed, device=args.device, progress=False)
    train_seconds = time.perf_counter() - start
    detectors = {
        "ssl": ssl,
        "ssl_no_flip_averaging": SSLCopyDetector(ssl.encoder, ssl.image_size, ssl.train_info, flip_invariant=False),
        "pixel": PixelDetector(args.dims),
    }
    results = {"dims": args.dims, "size": size, "n_train": args.n_train, "n_holdout": 60, "n_genuine": 60, "k": args.k,
               "steps": args.steps, "train_seconds": round(train_seconds, 1), "final_loss": round(ssl.train_info["final_loss"], 4), "detectors": {}}
    for name, det in detectors.items():
        r = audit_images(train, holdout, synthetic, det, device=args.device)
        by_kind = {}
        for kind in sorted(set(kinds)):
            idx = torch.tensor([k == kind for k in kinds])
            by_kind[kind] = {"flagged_pct": round(100 * r.is_copy[idx].float().mean().item(), 1), "min_similarity": round(r.synthetic_best[idx].min().item(), 4)}
        planted = torch.tensor([k != "genuine" for k in kinds])
        entry = {"threshold": r.report["threshold"], "planted_flagged_pct": round(100 * r.is_copy[planted].float().mean().item(), 1),
                 "genuine_flagged_pct": round(100 * r.is_copy[~planted].float().mean().item(), 1),
                 "genuine_max_similarity": round(r.synthetic_best[~planted].max().item(), 4), "by_kind": by_kind}
        results["detectors"][name] = entry
        print(f"{name:>22}: tau {entry['threshold']:.4f}  planted flagged {entry['planted_flagged_pct']:5.1f}%  genuine flagged {entry['genuine_flagged_pct']:4.1f}%  "
              + "  ".join(f"{k.split(':')[-1]} {v['min_similarity']:.4f}" for k, v in by_kind.items() if k != "genuine"), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
