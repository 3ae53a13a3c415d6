"""`medgen train <stage>`: one top-level command, one sub-command per training stage.

Every stage shares `--config`, `--out`, `--resume`, `--estimate-memory` and positional
`key=value` overrides and provides `train_from_args(args) -> int`, `DEFAULTS` (its config
schema, medgen/train/schema.py; `medgen config show STAGE` prints it) and
`estimate_memory(cfg) -> dict` in `medgen.train.<stage>`. Adding a stage is one more entry in
`STAGES`; its module is imported only when that stage runs.
"""

from __future__ import annotations

import argparse
import importlib

from medgen.errors import ConfigError

# name -> (module with train_from_args, help)
STAGES: dict[str, tuple[str, str]] = {
    "autoencoder": ("medgen.train.autoencoder", "stage 1: VQ-GAN or KL-VAE autoencoder (2D/3D)"),
    "diffusion": ("medgen.train.diffusion", "stage 2: latent or pixel diffusion model (2D/3D)"),
}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML (configs/*.yaml); optional with --resume of a run")
    parser.add_argument("--out", help="run directory to create (or to resume)")
    parser.add_argument("--resume", metavar="latest|CKPT",
                        help="continue from the newest checkpoint in --out ('latest') or a checkpoint folder")
    parser.add_argument("--estimate-memory", action="store_true",
                        help="measure the peak tensor memory of a training step at the config's sizes "
                             "(on the CPU, nothing written), print it and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. data.path=DIR train.max_steps=2000 train.mixed_precision=bf16 "
                             "(`medgen config show STAGE` lists every key)")


def _run(name: str, module: str):
    def run(args: argparse.Namespace) -> int:
        stage = importlib.import_module(module)
        if args.estimate_memory:  # every stage module has DEFAULTS (its schema) and estimate_memory(cfg)
            from medgen.config import load_config
            from medgen.train.common import print_memory_estimate

            print_memory_estimate(stage.estimate_memory(load_config(args.config, args.overrides, stage.DEFAULTS)), name)
            return 0
        if not args.out:
            raise ConfigError("--out is required: the run directory to create (or to resume)")
        return stage.train_from_args(args)

    return run


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a model (autoencoder, diffusion)",
                                   description="Train one stage; launch multi-GPU with `accelerate launch -m medgen train ...`.")
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, (module, help_text) in STAGES.items():
        sub = stages.add_parser(name, help=help_text, description=help_text)
        add_common_arguments(sub)
        sub.set_defaults(func=_run(name, module))
