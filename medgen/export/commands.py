"""`medgen export --run RUN --out DIR`: a diffusion run as a model folder others can load."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="a trained diffusion run as a model folder medgen, diffusers and MONAI load, with a model card",
        description="Write DIR: the run's EMA weights and configs (model/, autoencoder/ for a latent run; paths withheld), "
                    "the default sampler as a diffusers scheduler (scheduler/), 2D runs also as diffusers' UNet2DModel "
                    "(unet/), model.backbone=monai runs also as a MONAI bundle (monai_bundle/), README.md (a Hugging Face "
                    "model card: training data as counts, the run's privacy audits) and medgen_export.json (every file's "
                    "sha256). medgen.load_pipeline(DIR) and `medgen sample --run DIR` read it. The folder appears complete "
                    "or not at all, and not when it would name a subject, file or folder of the training data.")
    p.add_argument("--run", required=True, help="diffusion run directory (medgen train diffusion --out)")
    p.add_argument("--out", required=True, help="export folder to create")
    p.add_argument("--license", default="other", help="the model's licence as a Hugging Face id (cc-by-nc-4.0, apache-2.0, ...); "
                   "default other: the card says none was chosen and the training data's agreement applies")
    p.add_argument("--modality", default=None, help="imaging modality for the card and the MONAI metadata, e.g. 'MRI (T1-weighted)' "
                   "(runs do not record it)")
    p.add_argument("--overwrite", action="store_true", help="replace an export folder medgen wrote")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from medgen.export.pipeline import export_model

    export_model(args.run, args.out, license=args.license, modality=args.modality, overwrite=args.overwrite, echo=print)
    return 0
