"""`medgen encode`: latents of a dataset through a trained autoencoder, cached for stage 2.

CACHE/latents.safetensors: key `latents`, (N, C, *S') float32, unscaled. `source` says which
latents: `quantized` (VQ: the code vectors) or `encoder` (VQ: the encoder's output before
quantization, what Medical Diffusion's DDPM trains on); a KL autoencoder gives its posterior
mean for both. `posterior_sample` (KL) adds key `logvar`: training then draws a fresh
z ~ N(mean, exp(logvar)) each time an item is loaded, as Medfusion, which encodes every batch anew.
CACHE/latents.json: `scale_factor` = 1 / std of these latents (Rombach et al. 2022, sec. 4.3 /
appendix G; `medgen train diffusion` recomputes its scaling on the training subjects alone, see
medgen.diffusion.latents), `codebook_range` (VQ: the codebook's min and max entry), `source`,
plus labels, subject_ids, paths, the autoencoder's sha256, spatial_dims and the data config used.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from medgen.errors import ConfigError, DataError, RunError
from medgen.io import atomic_dir, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

LATENTS_FILE = "latents.safetensors"
META_FILE = "latents.json"
SOURCES = ("quantized", "encoder", "posterior_sample")


def _autoencoder_and_data_cfg(autoencoder: Any, device):
    """Model, the data config it was trained with (if known), and a sha256 identifying its weights."""
    import torch

    from medgen.models.autoencoder import load_autoencoder

    if isinstance(autoencoder, torch.nn.Module):
        from safetensors.torch import save

        state = {k: v.detach().cpu().contiguous() for k, v in autoencoder.state_dict().items()}
        return autoencoder.to(device).eval(), None, hashlib.sha256(save(state)).hexdigest()
    path = Path(autoencoder)
    model = load_autoencoder(path, device)
    model_dir = path / "model" if (path / "model" / "config.json").is_file() else path
    data_cfg = json.loads((model_dir / "config.json").read_text()).get("data")
    return model, data_cfg, sha256_file(model_dir / "model.safetensors")


def encode_dataset(autoencoder: Any, data_path: str | os.PathLike, out_dir: str | os.PathLike,
                   data_cfg: Any = None, batch_size: int = 8, device: Any = None, overwrite: bool = False,
                   samples: Sequence[Any] | None = None, source: str = "quantized") -> Path:
    """Encode the images of `data_path` (folder or manifest.csv) and write the latent cache.

    `autoencoder`: a run directory, a model folder or an `Autoencoder`. `data_cfg` defaults to
    the `data:` section the autoencoder was trained with (same spacing, crop and intensity
    mapping), with `path` replaced by `data_path`. `samples`: encode only these (a split's
    `MedicalDataset.samples`; a diffusion run encodes its training subjects alone), default all.
    `source`: `quantized`, `encoder` or `posterior_sample` (see the module docstring).
    """
    import torch
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader

    from medgen.data import MedicalDataset, scan_dataset
    from medgen.data.preprocess import DataConfig

    if source not in SOURCES:
        raise ConfigError(f"latent source {source!r}; use one of {', '.join(SOURCES)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, trained_cfg, ae_sha = _autoencoder_and_data_cfg(autoencoder, device)
    cfg = DataConfig.from_any(data_cfg if data_cfg is not None else trained_cfg)
    cfg = dataclasses.replace(cfg, path=str(data_path))
    samples = list(samples) if samples is not None else scan_dataset(data_path)
    if not samples:
        raise DataError(f"{data_path}: no images to encode")
    dataset = MedicalDataset(samples, cfg)
    loader = DataLoader(dataset, batch_size=int(batch_size), shuffle=False, num_workers=int(cfg.num_workers))
    if source == "posterior_sample" and model.latent != "kl":
        raise ConfigError("latent source posterior_sample needs a KL autoencoder; use quantized or encoder")
    latents, logvars, labels, subjects, paths = [], [], [], [], []
    for batch in loader:
        x = batch["image"].to(device)  # (B, C, *S)
        if x.shape[1] != model.in_channels or x.ndim - 2 != model.spatial_dims:
            raise DataError(f"{batch['path'][0]}: image of shape {tuple(x.shape[1:])} does not fit the autoencoder "
                            f"({model.in_channels} channels, {model.spatial_dims}D)")
        try:
            model.check_shape(x)
        except ValueError as e:
            raise DataError(f"{batch['path'][0]}: {e}; set data.shape to a multiple") from None
        with torch.no_grad():
            if source == "posterior_sample":
                mean, logvar = model.posterior(x)
                latents.append(mean.cpu())  # (B, C, *S')
                logvars.append(logvar.cpu())
            else:
                latents.append(model.encode(x, quantize=source == "quantized").float().cpu())  # (B, C, *S')
        labels += batch["label"].tolist()
        subjects += list(batch["subject_id"])
        paths += list(batch["path"])
    z = torch.cat(latents)
    std = z.std().item()
    if not std > 0:
        raise RunError(f"latents of {data_path} have zero variance; is the autoencoder trained?")
    meta = {
        "scale_factor": 1.0 / std,
        "latent_mean": z.mean().item(),
        "latent_std": std,
        "shape": list(z.shape),
        "labels": labels,
        "subject_ids": subjects,
        "paths": paths,
        "autoencoder": None if isinstance(autoencoder, torch.nn.Module) else str(autoencoder),
        "autoencoder_sha256": ae_sha,
        "spatial_dims": model.spatial_dims,
        "latent_kind": model.latent,
        "source": source,
        "codebook_range": list(model.codebook_range()) if model.latent == "vq" else None,
        "data": dataclasses.asdict(cfg),
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        tensors = {"latents": z.contiguous()}
        if logvars:
            tensors["logvar"] = torch.cat(logvars).contiguous()
        save_file(tensors, str(tmp / LATENTS_FILE))
        atomic_write_json(tmp / META_FILE, meta)
    log.info("encoded %d images to %s, latents %s, scale_factor %.4f", len(z), out_dir, list(z.shape[1:]), 1 / std)
    return Path(out_dir)


def load_latent_logvar(cache_dir: str | os.PathLike):
    """The posterior log-variances (N, C, *S') of a `posterior_sample` cache."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(cache_dir) / LATENTS_FILE))
    if "logvar" not in tensors:
        raise RunError(f"{cache_dir} holds no posterior log-variances; re-encode with --source posterior_sample")
    return tensors["logvar"]


def load_latent_cache(cache_dir: str | os.PathLike):
    """(latents (N, C, *S') float32 unscaled, meta dict) from a `medgen encode` folder."""
    from safetensors.torch import load_file

    cache_dir = Path(cache_dir)
    if not (cache_dir / LATENTS_FILE).is_file() or not (cache_dir / META_FILE).is_file():
        raise RunError(f"{cache_dir} is not a latent cache (expected {LATENTS_FILE} and {META_FILE}; "
                       f"create it with `medgen encode --autoencoder RUN --data DIR --out {cache_dir}`)")
    try:
        latents = load_file(str(cache_dir / LATENTS_FILE))["latents"]
        meta = json.loads((cache_dir / META_FILE).read_text())
    except (KeyError, ValueError, OSError) as e:
        raise RunError(f"{cache_dir}: unreadable latent cache ({e})") from None
    return latents, meta


def register(subparsers) -> None:
    p = subparsers.add_parser("encode", help="encode a dataset to latents with a trained autoencoder",
                              description="Write CACHE/latents.safetensors + latents.json (scale factor 1/std) for latent diffusion.")
    p.add_argument("--autoencoder", required=True, help="autoencoder run directory (or its model/ folder)")
    p.add_argument("--data", required=True, help="dataset folder or manifest.csv")
    p.add_argument("--out", required=True, help="cache folder to create")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--source", choices=SOURCES, default="quantized",
                   help="VQ: quantized code vectors, or the encoder's output before quantization; "
                        "KL: posterior_sample keeps the log-variances for a fresh draw per training batch")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="replace a cache folder medgen wrote")
    p.set_defaults(func=_encode_cmd)


def _encode_cmd(args: argparse.Namespace) -> int:
    from medgen.config import check_counts
    from medgen.io import ensure_new_output

    check_counts({"--batch-size": args.batch_size})
    ensure_new_output(args.out, args.overwrite, "cache folder", inputs={"--autoencoder": args.autoencoder, "--data": args.data})
    out = encode_dataset(args.autoencoder, args.data, args.out, batch_size=args.batch_size, device=args.device,
                         overwrite=args.overwrite, source=args.source)
    _, meta = load_latent_cache(out)
    print(f"{meta['shape'][0]} latents of shape {meta['shape'][1:]} in {out} (scale_factor {meta['scale_factor']:.4f})")
    return 0
