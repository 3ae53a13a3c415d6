"""`medgen data ...`: build the built-in cohort, check a dataset folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medgen.data.dataset import check_samples, scan_dataset
from medgen.data.preprocess import DataConfig


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="datasets: build the built-in cohort, check a folder")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    synth = dsub.add_parser("synth-brain", help="build the built-in brain MRI cohort from nilearn's MNI152 template")
    synth.add_argument("--out", required=True, type=Path, help="output folder (must not exist unless --overwrite)")
    synth.add_argument("--n", type=int, default=200, help="number of subjects")
    synth.add_argument("--dims", type=int, choices=(2, 3), default=3, help="3: NIfTI volumes, 2: axial PNG slices")
    synth.add_argument("--size", type=int, default=64, help="side length in voxels/pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--atrophy-fraction", type=float, default=0.5, help="fraction of subjects with simulated atrophy (label 1)")
    synth.add_argument("--overwrite", action="store_true")
    synth.set_defaults(func=_synth_brain)

    check = dsub.add_parser("check", help="validate a dataset folder or manifest.csv and summarise it")
    check.add_argument("path", type=Path)
    check.add_argument("--dims", type=int, choices=(2, 3), default=None, help="expected spatial dims (default: infer)")
    check.add_argument("--shape", type=int, nargs="+", default=None, help="crop/pad target; without it all files must share one shape")
    check.add_argument("--on-bad-file", choices=("error", "skip"), default="error")
    check.add_argument("--json", action="store_true", help="print the summary as JSON")
    check.set_defaults(func=_check)


def _synth_brain(args: argparse.Namespace) -> int:
    from medgen.data.cohort import synth_brain

    out = synth_brain(args.out, n=args.n, dims=args.dims, size=args.size, seed=args.seed, atrophy_fraction=args.atrophy_fraction, overwrite=args.overwrite)
    print(f"wrote {args.n} subjects ({args.dims}D, {args.size}px) to {out}")
    return 0


def _check(args: argparse.Namespace) -> int:
    cfg = DataConfig(spatial_dims=args.dims, shape=args.shape, on_bad_file=args.on_bad_file, intensity={"mode": "none"})
    cfg.validate()
    samples = scan_dataset(args.path)
    _, bad, summary = check_samples(samples, cfg, require_same_shape=args.shape is None)
    summary["bad_files"] = [{"path": str(s.path), "reason": reason} for s, reason in bad]
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    print(f"dataset {args.path}")
    print(f"  images      {summary['count']} ({summary['spatial_dims']}D, channels {summary['channels']}), skipped {summary['skipped']}")
    print(f"  subjects    {summary['subjects']}")
    print(f"  shapes      {', '.join('x'.join(map(str, s)) for s in summary['shapes'])}")
    print(f"  spacings    {', '.join('x'.join(f'{v:g}' for v in s) for s in summary['spacings'])}")
    print(f"  intensity   [{summary['raw_intensity_range'][0]:g}, {summary['raw_intensity_range'][1]:g}]")
    labels = summary["labels"]
    print(f"  labels      {', '.join(f'{k}: {v}' for k, v in sorted(labels.items())) if labels else 'none'}")
    for item in summary["bad_files"]:
        print(f"  skipped     {item['reason']}")
    return 0
