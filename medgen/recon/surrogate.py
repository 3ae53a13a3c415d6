"""The supervised surrogate of Han et al. 2024: a U-Net from zero-filled images to the ground truth.

The network is deepinv's `models.UNet` (residual, batch norm), on complex images: input the
zero-filled A^H y (B, 2, H, W), output the image (B, 2, H, W); the reconstruction is its magnitude.
It trains with L1 loss against the complex ground truth [x, 0] on the data's training split (the
subject split every medgen stage uses: `data.split`, seeded), each image with a fresh mask of the
configured kind and acceleration (equispaced: a random offset; random: random outer columns), so
it covers whichever fixed mask the probe draws. A plain loop on one device (it is small); Adam.

Saved like every medgen model: `model.safetensors` + `config.json` (the network's constructor
arguments, the physics it was trained for, the training files and numbers), loaded without pickle.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medgen.config import section, setting
from medgen.data.config import SplitConfig
from medgen.errors import ConfigError, DataError, TrainingError, WeightsError
from medgen.recon.kspace import (MASK_KINDS, apply_mask, center_fraction_for, check_acceleration, check_coils, kspace_mask, magnitude,
                                 to_complex)

log = logging.getLogger(__name__)

SURROGATE_KIND = "recon_surrogate"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# ----------------------------------------------------------------------------- the surrogate's config
# `medgen probe train-surrogate ... key=value` is checked against this schema like a training config
# (medgen/config.py: unknown keys with suggestions, types, ranges); the trained surrogate's
# config.json holds the resolved keys.


@dataclass
class SurrogateNetwork:
    """`network:` deepinv.models.UNet (zero-filled image -> ground truth)."""

    channels_per_scale: list[int] = setting([32, 64, 128], ge=1)  # one entry per scale; H and W must divide by 2^(scales - 1)
    batch_norm: bool = True


@dataclass
class SurrogateTrain:
    """`train:` Adam on the L1 loss, a fresh mask of the configured kind per step."""

    max_steps: int = setting(2000, ge=1)  # optimizer steps (the trainers' key; `train.steps` is its old name)
    batch_size: int = setting(16, ge=1)
    lr: float = setting(1.0e-3, gt=0)
    seed: int = setting(0, ge=0)  # network init, masks and batches
    log_every: int = setting(100, ge=1)


@dataclass
class SurrogateData:
    """`data:` the keys of medgen's readers the probe uses; intensities are min-max scaled per image."""

    path: str | None = setting(None, exists=True)  # 2D images: folder or manifest.csv
    shape: list[int] | None = setting(None, ge=1, length=2)  # crop/pad target [H, W]; null: keep
    spacing: list[float] | None = setting(None, gt=0, length=2)  # resample to this pixel size in mm first; null: keep
    canonical: bool = True
    split: SplitConfig = section(SplitConfig)  # the surrogate trains on the train split only
    on_bad_file: str = setting("error", choices=("error", "skip"))


@dataclass
class SurrogateConfig:
    """Every key `medgen probe train-surrogate` understands as key=value, with its default."""

    acceleration: int = setting(8, ge=2)  # R of the training masks
    mask: str = setting("equispaced", choices=MASK_KINDS)
    center_fraction: float | None = setting(None, gt=0, lt=1)  # null: fastMRI's (0.08 at R=4, 0.04 at R=8, else 0.32 / R)
    coils: int = setting(1, ge=1)  # 1: single-coil MRI; N > 1: MultiCoilMRI with N simulated birdcage coils
    network: SurrogateNetwork = section(SurrogateNetwork)
    train: SurrogateTrain = section(SurrogateTrain)
    data: SurrogateData = section(SurrogateData)


def build_network(params: dict) -> torch.nn.Module:
    from deepinv.models import UNet

    return UNet(in_channels=2, out_channels=2, residual=True, scales=len(params["channels_per_scale"]),
                channels_per_scale=list(params["channels_per_scale"]), batch_norm=bool(params.get("batch_norm", True)))


class Surrogate(torch.nn.Module):
    """f(y) = |UNet(A^H y)|: measured k-space -> (B, 1, H, W) magnitude."""

    def __init__(self, net: torch.nn.Module, config: dict):
        super().__init__()
        self.net = net
        self.config = config

    def forward(self, physics, y: torch.Tensor) -> torch.Tensor:
        return magnitude(self.net(physics.A_adjoint(y)))


class _FixedMasks:
    """The one fixed mask, served like deepinv's generators: step(batch_size) -> {"mask": (b, 2, H, W)}."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def step(self, batch_size: int = 1, seed: int | None = None) -> dict[str, torch.Tensor]:
        return {"mask": self.mask.expand(int(batch_size), 2, *self.mask.shape).clone()}


def _mask_generator(kind: str, shape, acceleration: int, center_fraction: float, seed: int):
    from deepinv.physics.generator import EquispacedMaskGenerator, RandomMaskGenerator

    if kind not in MASK_KINDS:
        raise ConfigError(f"mask must be one of {', '.join(MASK_KINDS)}, got {kind!r}")
    if kind == "equispaced-fixed":
        return _FixedMasks(kspace_mask(shape, acceleration, kind, center_fraction))
    cls = {"equispaced": EquispacedMaskGenerator, "random": RandomMaskGenerator}[kind]
    return cls(tuple(shape), acceleration=int(acceleration), center_fraction=center_fraction,
               rng=torch.Generator().manual_seed(int(seed)))


def train_surrogate(cfg: dict, device: str | torch.device | None = None) -> Surrogate:
    """Train per `cfg` (`surrogate_config`: the schema's defaults and the user's keys); returns the model (eval)."""
    from medgen.data import make_splits, scan_dataset
    from medgen.privacy.detector import default_device
    from medgen.recon.data import load_slices
    from medgen.recon.kspace import fully_sampled, mri_physics

    dev = default_device(device)
    data_cfg = dict(cfg["data"])
    if not data_cfg.get("path"):
        raise ConfigError("the surrogate needs --data DIR (data.path)")
    check_coils(cfg["coils"])
    samples = scan_dataset(data_cfg["path"])
    split = data_cfg.get("split") or {}
    subjects = make_splits(samples, float(split.get("val", 0.1)), float(split.get("holdout", 0.1)), int(split.get("seed", 0)))
    train_ids, val_ids = set(subjects["train"]), set(subjects["val"]) | set(subjects["holdout"])
    candidates = [s for s in samples if s.subject_id in train_ids]
    x_train, train_samples = load_slices(candidates, data_cfg)
    if not train_samples:
        raise DataError(f"all {len(candidates)} training images of {data_cfg['path']} are blank (constant intensity, "
                        f"e.g. {candidates[0].path}); the surrogate needs images with contrast: check --data and "
                        f"data.shape (a crop of the background is blank)")
    val = [s for s in samples if s.subject_id in val_ids]
    x_val = load_slices(val, data_cfg)[0] if val else x_train[:0]
    H, W = x_train.shape[-2:]
    R = int(cfg["acceleration"])
    cf = center_fraction_for(R) if cfg.get("center_fraction") is None else float(cfg["center_fraction"])
    check_acceleration(W, R, cf)
    params = dict(cfg["network"])
    down = 2 ** (len(params["channels_per_scale"]) - 1)
    if H % down or W % down:
        raise ConfigError(f"images are {H}x{W}; the surrogate's {len(params['channels_per_scale'])} scales need sizes "
                          f"divisible by {down}: set network.channels_per_scale with fewer entries or data.shape")
    tcfg = cfg["train"]
    seed = int(tcfg["seed"])
    torch.manual_seed(seed)
    net = build_network(params).to(dev)
    physics = fully_sampled(mri_physics(torch.ones(H, W), int(cfg["coils"]), dev))
    masks = _mask_generator(str(cfg["mask"]), (H, W), R, cf, seed)
    opt = torch.optim.Adam(net.parameters(), lr=float(tcfg["lr"]))
    gen = torch.Generator().manual_seed(seed)
    steps, batch = int(tcfg["max_steps"]), int(tcfg["batch_size"])
    losses, tic = [], time.perf_counter()
    net.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x_train), (batch,), generator=gen)
        truth = to_complex(x_train[idx].to(dev))  # (b, 2, H, W)
        mask = masks.step(batch_size=batch)["mask"][:, 0].to(dev)  # (b, H, W): a fresh mask per image
        zf = physics.A_adjoint(apply_mask(physics.A(truth), mask))
        loss = (net(zf) - truth).abs().mean()
        if not torch.isfinite(loss):
            raise TrainingError(f"surrogate training diverged at step {step} (loss {loss.item()}); lower train.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % int(tcfg["log_every"]) == 0 or step == steps:
            log.info("surrogate step %d/%d: L1 %.4f", step, steps, sum(losses[-50:]) / len(losses[-50:]))
    net.eval()
    info = {"steps": steps, "seconds": round(time.perf_counter() - tic, 1), "initial_loss": losses[0],
            "final_loss": sum(losses[-50:]) / len(losses[-50:]), "n_train": len(x_train), "n_val": len(x_val),
            "train_files": [str(Path(s.path).resolve()) for s in train_samples]}
    if len(x_val):
        info["val"] = _validate(net, physics, x_val.to(dev), masks.step(batch_size=1, seed=seed)["mask"][0, 0].to(dev))
    config = {"kind": SURROGATE_KIND, "network": "deepinv.models.UNet", "params": params, "acceleration": R,
              "mask": str(cfg["mask"]), "center_fraction": cf, "coils": int(cfg["coils"]), "image_shape": [H, W],
              "data": {k: v for k, v in data_cfg.items()}, "train": {**{k: v for k, v in tcfg.items()}, **info}}
    return Surrogate(net, config).eval()


@torch.no_grad()
def _validate(net, physics, x: torch.Tensor, mask: torch.Tensor) -> dict:
    """Mean PSNR of zero-filled and surrogate reconstructions on validation images (one mask)."""
    from medgen.recon.metrics import psnr

    zf = physics.A_adjoint(apply_mask(physics.A(to_complex(x)), mask))
    return {"psnr_zero_filled": round(float(psnr(magnitude(zf), x).mean()), 3),
            "psnr_surrogate": round(float(psnr(magnitude(net(zf)), x).mean()), 3)}


def save_surrogate(model: Surrogate, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """`model.safetensors` + `config.json`, written atomically."""
    from safetensors.torch import save_model

    from medgen.io import atomic_dir, atomic_write_json

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_model(model.net, str(tmp / WEIGHTS_FILE), metadata={"kind": SURROGATE_KIND})
        atomic_write_json(tmp / CONFIG_FILE, model.config)
    return Path(out_dir)


def load_surrogate(path: str | os.PathLike, device: str | torch.device = "cpu") -> Surrogate:
    """Rebuild a surrogate from `config.json` + `model.safetensors` (no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    p = Path(path)
    try:
        config = json.loads((p / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"--surrogate {p}: cannot read {CONFIG_FILE} ({e}); train one with `medgen probe train-surrogate`") from None
    if config.get("kind") != SURROGATE_KIND:
        raise WeightsError(f"--surrogate {p}: {CONFIG_FILE} is not a probe surrogate (kind={config.get('kind')!r})")
    net = build_network(config["params"])
    try:
        load_model(net, str(p / WEIGHTS_FILE), strict=True, device=str(device))
    except (OSError, RuntimeError, SafetensorError) as e:
        raise WeightsError(f"--surrogate {p}: {WEIGHTS_FILE} does not match {CONFIG_FILE} ({str(e).splitlines()[0]})") from None
    return Surrogate(net.to(device).eval().requires_grad_(False), config).eval()


def surrogate_data(data_cfg: dict | None) -> dict:
    """The keys of a `data:` section (e.g. the probe's --config) that the surrogate's reader uses."""
    return {k: v for k, v in dict(data_cfg or {}).items() if k in ("shape", "spacing", "on_bad_file", "canonical")}


RENAMED_KEYS = {"train.steps": "train.max_steps"}  # old name -> the key every medgen trainer uses
_warned_renames: set[str] = set()


def _renamed(override: str) -> str:
    """`train.steps=500` as `train.max_steps=500`, with a warning the first time in a process."""
    key, sep, value = override.partition("=")
    new = RENAMED_KEYS.get(key.strip())
    if new is None:
        return override
    if key.strip() not in _warned_renames:
        _warned_renames.add(key.strip())
        log.warning("%s is now %s (as in every medgen trainer); the old name still works", key.strip(), new)
    return f"{new}{sep}{value}"


def surrogate_config(overrides: list[str] | None = None, **values: Any) -> dict:
    """`SurrogateConfig` defaults <- `values` (top-level keys, e.g. acceleration=8; None: not set)
    <- dotted overrides, checked against the schema (`SurrogateConfig`)."""
    from medgen.config import merge_config, parse_overrides, to_dict

    layers = [({k: v for k, v in values.items() if v is not None}, "")]
    if overrides:
        layers.append((parse_overrides([_renamed(item) for item in overrides]), ""))
    cfg = to_dict(merge_config(SurrogateConfig, layers))
    if not cfg["data"].get("path"):
        raise DataError("the surrogate needs training data: pass --data DIR")
    return cfg
