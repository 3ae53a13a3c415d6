"""`medgen sample`: generate a sample directory from a trained diffusion run."""

from __future__ import annotations

import argparse

# = medgen.diffusion.sampling.SAMPLERS, spelled out to keep `medgen --help` free of torch imports
SAMPLERS = ("ddpm", "ddim", "dpmpp", "euler")
FORMATS, UNITS = ("png", "nifti", "dicom"), ("source", "raw")  # = medgen.sample.formats.FORMATS, UNITS


def add_output_options(p) -> None:
    """--format and --units, as `medgen sample` and `medgen release` take them (medgen.sample.formats)."""
    p.add_argument("--format", dest="fmt", choices=FORMATS, default=None,
                   help="png (2D), nifti (3D) or dicom (2D: a file per sample; 3D: a series folder per volume); "
                        "default png for 2D, nifti for 3D")
    p.add_argument("--units", choices=UNITS, default="source",
                   help="source (default): the intensity units the model was trained on (HU for data.intensity.mode ct, "
                        "in_range for fixed; [0, 1] after a per-image normalization, which cannot be inverted); "
                        "raw: the model's [-1, 1]")


def register(subparsers) -> None:
    p = subparsers.add_parser("sample", help="generate images/volumes from a trained diffusion run",
                              description="Write N samples (PNG for 2D, NIfTI for 3D, or DICOM; in the units the model was trained "
                              "on, each file marked synthetic) + manifest.csv + grid.png to a new folder. "
                              "Under `accelerate launch` the processes share the indices (sample i uses seed+i whatever "
                              "their number) and the main process writes the manifest.")
    p.add_argument("--run", required=True, help="diffusion run directory (medgen train diffusion --out)")
    p.add_argument("--n", type=int, required=True, help="number of samples")
    p.add_argument("--out", required=True, help="sample folder to create")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="default: the run's own (its config's sample.sampler; null there: the measured default for "
                        "the model's space: dpmpp, ddpm for 3D pixel models; eval/RESULTS.md \"Samplers\")")
    p.add_argument("--steps", type=int, default=None, help="default: the run's own (sample.steps; null there: 25)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (1: none); default: the run's own (sample.guidance)")
    p.add_argument("--label", type=class_or_all, default=None,
                   help="class to generate (conditional models), or `all`: sample i gets class i mod K, a balanced "
                        "labelled set for `medgen eval --utility`; the manifest records each; default: unconditional")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed+i (same samples whatever the batch size)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM eta (0 deterministic, 1 ancestral); default: the run's own (sample.eta)")
    p.add_argument("--bit-depth", type=int, choices=(8, 16), default=8, help="PNG bit depth for 2D samples")
    add_output_options(p)
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="replace a sample folder medgen wrote")
    p.set_defaults(func=_sample_cmd)


def class_or_all(value: str) -> int | str:
    """`--label` of `medgen sample` and `medgen release`: a class number or `all`."""
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a class number or `all`, got {value!r}") from None


MAX_SEED = 2**64 - 1  # torch.Generator seeds are unsigned 64-bit


def check_sample_arguments(args: argparse.Namespace) -> None:
    """Counts are >= 1 (`--steps 0` would fall back to the run's default) and every seed
    seed + i (i < n) fits a generator: a ConfigError naming the option, before any work."""
    from medgen.config import check_counts
    from medgen.errors import ConfigError

    check_counts({"--n": args.n, "--steps": args.steps, "--batch-size": args.batch_size})
    if not 0 <= args.seed <= MAX_SEED - (args.n - 1):
        raise ConfigError(f"--seed {args.seed}: expected an integer from 0 to {MAX_SEED - (args.n - 1)} "
                          f"(sample i uses seed + i, and seeds are unsigned 64-bit integers)")


def sample_file_bytes(pipe, bit_depth: int, fmt: str | None = None) -> int:
    """Uncompressed size of one sample file (PNG of `bit_depth` bits, float32 NIfTI, 16-bit
    DICOM): the estimate of the space a sample set needs."""
    import math

    channels, *size = pipe.sample_shape  # the denoiser's; a latent model's decoder upsamples it
    if pipe.autoencoder is not None:
        channels = pipe.autoencoder.in_channels
        size = [s * f for s, f in zip(size, pipe.autoencoder.downsample_factors)]
    return math.prod(size) * channels * (2 if fmt == "dicom" else bit_depth // 8 if pipe.spatial_dims == 2 else 4)


def _sample_cmd(args: argparse.Namespace) -> int:
    from medgen.io import check_writable, ensure_new_output
    from medgen.sample.pipeline import cycled_labels, load_pipeline, write_samples
    from medgen.sample.shard import ProcessGroup

    check_sample_arguments(args)
    ensure_new_output(args.out, args.overwrite, "sample folder", inputs={"--run": args.run})  # before loading anything
    processes = ProcessGroup.current(args.device)  # several under `accelerate launch`: each samples its share
    pipe = load_pipeline(args.run, processes.device or args.device)
    check_writable(args.out, args.n * sample_file_bytes(pipe, args.bit_depth, args.fmt), "sample folder")  # room for every file
    out = write_samples(pipe, args.out, args.n, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                        label=cycled_labels(pipe, args.n) if args.label == "all" else args.label, seed=args.seed,
                        batch_size=args.batch_size, bit_depth=args.bit_depth,
                        overwrite=args.overwrite, eta=args.eta, progress=processes.is_main, processes=processes,
                        fmt=args.fmt, units=args.units)
    if processes.is_main:
        print(f"{args.n} samples in {out} (manifest.csv, grid.png)"
              + (f", sampled by {processes.num_processes} processes" if processes.num_processes > 1 else ""))
    return 0


def demo_stage(ctx) -> None:
    """Sample the demo's diffusion run (ctx.state["diffusion_run"]) with its own sampler settings.

    Sets ctx.state["samples"] (a sample directory). A class-conditional model samples every class in
    turn (`--label all`), so the eval stage can train a classifier on the samples.
    """
    from pathlib import Path

    import torch

    from medgen.sample.pipeline import cycled_labels, load_pipeline, write_samples

    pipe = load_pipeline(ctx.state["diffusion_run"], device="cpu" if not torch.cuda.is_available() else None)
    # the audit bounds the share of copies: 400 samples put an honest model's bound under 5% (eval/RESULTS.md)
    n = 400
    labels = cycled_labels(pipe, n) if pipe.num_classes else None
    samples = write_samples(pipe, Path(ctx.out) / "samples", n, label=labels, overwrite=True)
    ctx.state["samples"] = samples
    print(f"  samples: {n} in {samples} (grid: {samples / 'grid.png'})")
