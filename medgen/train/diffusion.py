"""`medgen train diffusion`: stage 2, a 2D/3D denoiser in latent or pixel space, with accelerate.

Latent mode (`autoencoder.run` set; Rombach et al. 2022, Medfusion: Mueller-Franzes et al. 2023,
Medical Diffusion: Khader et al. 2023): the training subjects' images, and only theirs, are
encoded once by the frozen stage-1 autoencoder into a latent cache (`RUN/latents`, `medgen encode`
format; or reuse `autoencoder.cache`, of which the training subjects are used). Which latents
(`latent.source`: VQ code vectors or the encoder's output before quantization) and how they are
scaled (`latent.scaling`: 1/std, the codebook's range to [-1, 1], or none) is computed on the
training subjects alone (medgen.diffusion.latents). The autoencoder's inference folder is copied
into the run (`RUN/autoencoder/`), so a run samples and decodes on its own. Pixel mode
(`autoencoder.run` unset): the denoiser trains on the preprocessed images/volumes in [-1, 1].
Validation and hold-out subjects never reach the denoiser, nor the run folder's latents.

EMA of the denoiser weights (diffusers' `EMAModel`, `ema.enabled`) is what previews and `model/`
use; it holds the denoiser's parameters only, never the frozen autoencoder. Every step count
(`train.max_steps`, `train.lr_warmup_steps`, `ema.every`, `ema.update_after`) is in optimizer
steps, whatever the number of processes and `train.gradient_accumulation_steps`.

Checkpoints (`checkpoints/step_N/`): accelerate state (weights as safetensors) plus
`ema.safetensors` and `ema.json`, written through accelerate's save/load-state hooks inside the
atomic checkpoint folder. `model/`: EMA weights + `config.json` (network, schedule, sample shape,
latent scaling, spacing, the sampler of the `sample:` section) for `medgen.load_pipeline` /
`medgen sample`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from medgen.config import to_dict
from medgen.diffusion import DiffusionLoss, NoiseSchedule, default_sampler, generators, sample_loop
from medgen.diffusion.latents import LatentScaling, decode_latents
from medgen.errors import ConfigError, RunError
from medgen.io import atomic_write_bytes, atomic_write_json, sha256_file
from medgen.models.unet import build_denoiser
from medgen.train.preview import grid_png, sample_captions
from medgen.train.schema import DiffusionConfig
from medgen.train.common import (
    CheckpointManager,
    EpochSampler,
    MetricsLogger,
    build_accelerator,
    cfg_get,
    check_finite,
    count_parameters,
    cpu_autocast,
    end_training,
    infinite_batches,
    init_tracker,
    load_run_config,
    log_preview,
    make_loader,
    prepare_run_dir,
    preserved_rng,
    progress_bar,
    removes_failed_run,
    save_inference_model,
)

log = logging.getLogger(__name__)

# Every key a config may set: the schema (types, defaults, allowed values, docs) in medgen/train/schema.py.
DEFAULTS = DiffusionConfig

EMA_WEIGHTS = "ema.safetensors"
EMA_STATE = "ema.json"


# ----------------------------------------------------------------------------- data


class LatentDataset(torch.utils.data.Dataset):
    """Scaled latents from a cache: item = {"image": (C, *S'), "label": long}.

    With `std` (the scaled posterior std of a KL autoencoder, `latent.source=posterior_sample`)
    each item is a fresh draw mean + std * N(0, 1) (Medfusion), from the global RNG, which the
    training loop's data stream (`common.DataRNG`) keeps apart from the training noise.
    """

    def __init__(self, latents: torch.Tensor, labels: list[int], std: torch.Tensor | None = None):
        self.latents, self.labels, self.std = latents, torch.tensor(labels, dtype=torch.long), std

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict[str, Any]:
        z = self.latents[i]
        if self.std is not None:
            z = z + self.std[i] * torch.randn_like(z)
        return {"image": z, "label": self.labels[i]}


def _autoencoder_model_dir(path: str | Path) -> Path:
    path = Path(path)
    model_dir = path / "model" if (path / "model" / "config.json").is_file() else path
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"autoencoder.run={path}: no autoencoder there (expected {path}/model/config.json from "
                          f"`medgen train autoencoder`, or a model folder)")
    return model_dir


def _data_cfg(cfg) -> dict:
    """The data section to use: pixel mode the config's; latent mode the autoencoder's, updated by the config's."""
    own = {k: v for k, v in dict(to_dict(cfg.data) or {}).items() if v is not None}
    run = cfg_get(cfg.autoencoder, "run")
    if run is None:
        return own
    ae_cfg = json.loads((_autoencoder_model_dir(run) / "config.json").read_text())
    merged = dict(ae_cfg.get("data") or {})
    merged.update(own)
    return merged


def _spacing(sample_path: str, data_cfg: dict) -> list[float]:
    from medgen.data import DataConfig, load
    from medgen.data.preprocess import output_spacing

    return [float(s) for s in output_spacing(load(sample_path), DataConfig.from_any(data_cfg))]


def build_training_data(cfg, run_dir: Path, accelerator) -> dict[str, Any]:
    """Training set plus what sampling needs later (shape, spacing, labels, latent info)."""
    from medgen.data import datasets_from_config

    data_cfg = _data_cfg(cfg)
    if not data_cfg.get("path"):
        raise ConfigError("data.path is not set; pass data.path=DIR (a dataset folder or manifest.csv)")
    with accelerator.main_process_first():  # the main process writes split.json first
        splits = datasets_from_config(data_cfg, run_dir)
    train_images = splits["train"]
    if len(train_images) == 0:
        raise ConfigError(f"the training split of {data_cfg['path']} is empty")
    labels_seen = sorted({s.label for s in train_images.samples if s.label is not None})
    info: dict[str, Any] = {"data": data_cfg, "spacing": _spacing(str(train_images.samples[0].path), data_cfg),
                            "num_labels": (max(labels_seen) + 1) if labels_seen else 0, "latent": None,
                            "image_shape": list(train_images[0]["image"].shape)}
    if cfg_get(cfg.autoencoder, "run") is None:
        info["dataset"] = train_images
        info["sample_shape"] = info["image_shape"]
        return info
    return {**info, **_training_latents(cfg, run_dir, accelerator, data_cfg, train_images)}


def _training_latents(cfg, run_dir: Path, accelerator, data_cfg: dict, train_images) -> dict[str, Any]:
    """Latent mode: the training subjects' latents, scaled on them alone (`latent.*`)."""
    from medgen.train.encode import encode_dataset, load_latent_cache, load_latent_logvar

    run = cfg_get(cfg.autoencoder, "run")
    source = str(cfg_get(cfg.latent, "source", "quantized"))
    model_dir = _autoencoder_model_dir(run)
    ae_sha = sha256_file(model_dir / "model.safetensors")
    cache = cfg_get(cfg.autoencoder, "cache")
    if cache is None:  # the run's own cache holds the training subjects and nothing else
        cache = run_dir / "latents"
        if accelerator.is_main_process and not (cache / "latents.json").is_file():
            encode_dataset(model_dir, data_cfg["path"], cache, data_cfg=data_cfg, samples=train_images.samples,
                           batch_size=int(cfg_get(cfg.autoencoder, "encode_batch_size", 8)),
                           device=accelerator.device, source=source)
        accelerator.wait_for_everyone()
    latents, meta = load_latent_cache(cache)
    if meta.get("autoencoder_sha256") != ae_sha:
        raise ConfigError(f"latent cache {cache} was made by another autoencoder (sha256 {meta.get('autoencoder_sha256')}) "
                          f"than autoencoder.run={run} ({ae_sha}); re-encode or drop autoencoder.cache")
    if meta.get("source", "quantized") != source:
        raise ConfigError(f"latent cache {cache} holds {meta.get('source', 'quantized')} latents but latent.source={source}; "
                          f"re-encode with `medgen encode --source {source}` or drop autoencoder.cache")
    train_subjects = {s.subject_id for s in train_images.samples}
    keep = [i for i, s in enumerate(meta["subject_ids"]) if s in train_subjects]
    if not keep:
        raise ConfigError(f"latent cache {cache} holds none of the training subjects of {data_cfg['path']}")
    train_latents = latents[keep]  # (N_train, C, *S')
    scaling = LatentScaling.fit(str(cfg_get(cfg.latent, "scaling", "std")), train_latents, meta.get("codebook_range"))
    std = None
    if source == "posterior_sample":  # scaled posterior std, for a fresh draw per item
        std = (0.5 * load_latent_logvar(cache)[keep]).exp() * scaling.scale_factor
    return {
        "dataset": LatentDataset(scaling.normalize(train_latents), [int(meta["labels"][i]) for i in keep], std),
        "sample_shape": list(latents.shape[1:]),
        "latent": {**scaling.to_dict(), "source": source, "autoencoder_sha256": ae_sha,
                   "autoencoder_source": str(Path(run).resolve()), "cache": str(Path(cache).resolve())},
        "autoencoder_dir": model_dir,
    }


# ----------------------------------------------------------------------------- EMA


def build_ema(ema_cfg, model: torch.nn.Module):
    """diffusers' `EMAModel` per the `ema:` section, or None when `ema.enabled` is false.

    `warmup: false` is a constant decay once the EMA starts (Medical Diffusion's `EMA`):
    diffusers would otherwise ramp it as (1 + k) / (10 + k), so min_decay pins it to `decay`.
    `update_after`: the EMA holds a copy of the weights through that optimizer step (at least
    step 1; diffusers' `update_after_step` counts one more).
    """
    from diffusers.training_utils import EMAModel

    if not bool(cfg_get(ema_cfg, "enabled", True)):
        return None
    decay, warmup = float(ema_cfg.decay), bool(ema_cfg.warmup)
    every = int(cfg_get(ema_cfg, "every", 1))
    if every < 1:
        raise ConfigError(f"ema.every={every} must be >= 1")
    return EMAModel(model.parameters(), decay=decay, use_ema_warmup=warmup, power=float(ema_cfg.power),
                    min_decay=0.0 if warmup else decay, update_after_step=max(int(ema_cfg.update_after) - 1, 0))


def ema_update(ema, parameters, step: int, every: int = 1) -> bool:
    """Update the EMA after optimizer step `step` (1-based) when due: after steps 1, 1 + every,
    1 + 2 every, ... (Medical Diffusion's trainer checks `step % update_ema_every == 0` on its
    0-based counter). diffusers counts its warm-up and `update_after_step` in calls of `step`;
    setting its counter to the optimizer step makes both count optimizer steps whatever `every`."""
    if (step - 1) % every:
        return False
    ema.optimization_step = step - 1  # EMAModel.step adds one
    ema.step(parameters)
    return True


def _ema_hooks(accelerator, ema) -> None:
    """Save/load the EMA inside accelerate's checkpoint folder without pickle."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_file({f"p{i}": p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)},
                      str(Path(output_dir) / EMA_WEIGHTS))
            atomic_write_json(Path(output_dir) / EMA_STATE, {"optimization_step": int(ema.optimization_step),
                                                             "decay": ema.decay})

    def load_hook(models, input_dir):
        path = Path(input_dir)
        if not (path / EMA_WEIGHTS).is_file():
            raise RunError(f"{path} has no {EMA_WEIGHTS}; it is not a diffusion checkpoint with EMA (ema.enabled)")
        tensors = load_file(str(path / EMA_WEIGHTS))
        state = json.loads((path / EMA_STATE).read_text())
        if len(tensors) != len(ema.shadow_params):
            raise RunError(f"{path / EMA_WEIGHTS} holds {len(tensors)} tensors, the model has {len(ema.shadow_params)}")
        for i, p in enumerate(ema.shadow_params):
            p.data.copy_(tensors[f"p{i}"].to(p.device))
        ema.optimization_step = int(state["optimization_step"])

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _inference_copy(raw, ema) -> torch.nn.Module:
    """A fresh denoiser (from its config, channels-first, no checkpointing) holding the EMA weights
    (the trained weights when the EMA is off)."""
    from medgen.models.unet import denoiser_from_config

    params = dict(raw.config)
    if params.get("backbone", "medgen") == "medgen":
        params.update(gradient_checkpointing=False, channels_last=False)
    net = denoiser_from_config(params)
    if ema is not None:
        ema.copy_to(net.parameters())
    else:
        net.load_state_dict(raw.state_dict())
    return net.eval()


# ----------------------------------------------------------------------------- model, optimizer, loss


def _num_classes(cfg, info) -> int:
    conditional = cfg_get(cfg.model, "conditional", "auto")
    if isinstance(conditional, str) and conditional != "auto":
        conditional = conditional.lower() in ("true", "1", "yes")
    n = cfg_get(cfg.model, "num_classes")
    if conditional is False:
        return 0
    n = int(n) if n is not None else info["num_labels"]
    if conditional is True and n == 0:
        raise ConfigError("model.conditional=true but the training data has no labels (manifest.csv label column)")
    return n


def build_model_from_config(cfg, in_channels: int, spatial_dims: int, num_classes: int) -> torch.nn.Module:
    m = dict(to_dict(cfg.model))
    try:
        return build_denoiser(
            str(m.get("backbone", "medgen")), spatial_dims=spatial_dims, in_channels=in_channels,
            channels=list(m["channels"]), num_res_blocks=int(m["num_res_blocks"]),
            attention_levels=[bool(a) for a in m["attention_levels"]], head_channels=int(m["head_channels"]),
            norm_groups=int(m["norm_groups"]), num_classes=num_classes, dropout=float(m["dropout"]),
            gradient_checkpointing=bool(m["gradient_checkpointing"]))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from None


def _check_divisible(model, shape, cfg) -> None:
    downsample = 2 ** getattr(model, "downsample_levels", 0)
    if any(s % downsample for s in shape):
        raise ConfigError(f"sample shape {list(shape)} is not divisible by {downsample} (2^(levels-1) of model.channels "
                          f"{list(cfg.model.channels)}); use fewer levels or another data.shape")


def lr_factor(step: int, warmup: int, total: int, kind: str = "constant") -> float:
    """The learning-rate multiplier of the optimizer step with 0-based index `step`.

    Warm-up: step t = step + 1 runs at t / warmup while t <= warmup (the first step is not wasted at
    lr 0). Then `constant`, or diffusers' cosine / linear decay (`get_cosine_schedule_with_warmup`,
    `get_linear_schedule_with_warmup`): progress p = (step - warmup) / (total - warmup), factor
    (1 + cos(pi p)) / 2 or 1 - p, 0 from `total` on (diffusers' cosine would climb again past it).
    The same formula as diffusers after the warm-up up to `total` (tested); ours during the warm-up,
    so that `constant` keeps the earlier runs' warm-up exactly.
    """
    import math

    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    p = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    return 0.5 * (1.0 + math.cos(math.pi * p)) if kind == "cosine" else 1.0 - p


def build_optimizer(tcfg, model: torch.nn.Module):
    """AdamW and its schedule: a linear warm-up over `train.lr_warmup_steps` optimizer steps, then
    `train.lr_schedule` (constant, cosine or linear decay reaching 0 at `train.lr_decay_steps`,
    default `train.max_steps`; `lr_factor`).

    The scheduler is stepped once per optimizer step that was taken (`_optimizer_step`), so its
    count is in optimizer steps whatever the processes and gradient accumulation; accelerate saves
    and restores its step count with the checkpoint, so a resumed run continues the same curve (give
    `train.lr_decay_steps` when a run will be extended past its first `train.max_steps`).
    """
    from functools import partial

    opt = torch.optim.AdamW(model.parameters(), lr=float(tcfg.lr), betas=tuple(float(b) for b in tcfg.betas),
                            weight_decay=float(tcfg.weight_decay))
    warm = int(cfg_get(tcfg, "lr_warmup_steps", 0))
    total = int(cfg_get(tcfg, "lr_decay_steps", None) or tcfg.max_steps)
    kind = str(cfg_get(tcfg, "lr_schedule", "constant"))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, warmup=warm, total=total, kind=kind))
    return opt, lr_sched


def build_loss(cfg, schedule: NoiseSchedule, device: torch.device | str = "cpu") -> DiffusionLoss:
    return DiffusionLoss(schedule.alphas_cumprod().to(device), prediction=schedule.prediction, loss=str(cfg.loss.type),
                         min_snr_gamma=cfg_get(cfg.loss, "min_snr_gamma"), cond_drop_prob=float(cfg.loss.cond_drop_prob),
                         cond_drop_mode=str(cfg_get(cfg.loss, "cond_drop_mode", "sample")))


def model_config_json(net, schedule: NoiseSchedule, info: dict, step: int, sample_cfg=None) -> dict:
    """`model/config.json`: everything `medgen.load_pipeline` needs, no training code."""
    params = dict(net.config)
    backbone = params.pop("backbone", "medgen")
    target = "medgen.models.unet.UNet" if backbone == "medgen" else "medgen.models.unet.MonaiUNet"
    sampling = {k: v for k, v in dict(to_dict(sample_cfg) or {}).items() if k in ("sampler", "steps", "guidance", "eta")}
    return {
        "target": target, "params": params, "kind": "diffusion", "backbone": backbone,
        "diffusion": schedule.to_dict(), "sample_shape": info["sample_shape"], "image_shape": info["image_shape"],
        "spatial_dims": net.spatial_dims, "num_classes": net.num_classes, "null_label": net.null_label,
        "latent": info["latent"], "spacing": info["spacing"], "data": info["data"], "step": int(step),
        "sampling": sampling,  # the run's default sampler (its config's `sample:` section)
    }


# ----------------------------------------------------------------------------- training


@dataclass
class _Training:
    """The prepared pieces one optimizer step works on."""

    accelerator: Any
    model: torch.nn.Module  # prepared by accelerate (DDP-wrapped on several processes)
    raw: torch.nn.Module  # the denoiser itself
    net: Callable  # what the loss calls: `model`, or its torch.compile
    ema: Any  # EMAModel or None
    opt: Any
    lr_sched: Any
    loss_fn: DiffusionLoss
    batches: Iterator[dict]
    num_classes: int


def _optimizer_step(t: _Training, step: int, accum: int, max_norm: float | None) -> dict[str, Any]:
    """`accum` micro-batches, one optimizer step, then one scheduler step (if the optimizer stepped).

    accelerate's `accumulate` skips `opt.step()` and `zero_grad()` on all but the last micro-batch;
    the scheduler is stepped here, after the optimizer, once per optimizer step.
    """
    acc, logs = t.accelerator, {}
    null_label = t.raw.null_label if t.num_classes > 0 else None
    for _ in range(accum):
        batch = next(t.batches)
        x, labels = batch["image"], batch["label"] if t.num_classes > 0 else None
        with acc.accumulate(t.model):
            with acc.autocast():
                loss = t.loss_fn(t.net, x, labels, null_label)
            check_finite(loss, step, "diffusion loss", acc)
            acc.backward(loss)
            if acc.sync_gradients:
                logs["lr"] = t.opt.param_groups[0]["lr"]  # the rate this optimizer step applies
                if max_norm:
                    logs["grad_norm"] = acc.clip_grad_norm_(t.model.parameters(), float(max_norm))
            t.opt.step()
            t.opt.zero_grad(set_to_none=True)
    if not acc.optimizer_step_was_skipped:  # fp16: a step skipped for overflow does not count
        t.lr_sched.step()
    logs["loss"] = acc.reduce(loss.detach(), reduction="mean")
    return logs


@removes_failed_run
def train_diffusion(cfg, out: str | Path, resume: str | None = None) -> Path:
    """Train per `cfg` (see DEFAULTS) into run directory `out`; returns the run directory."""
    from accelerate.utils import set_seed

    from medgen.data import DataConfig

    tcfg = cfg.train
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    DataConfig.from_any(_data_cfg(cfg))  # the data section (and the autoencoder run) check out before --out is made
    run_dir = prepare_run_dir(out, cfg, resume)
    accelerator = build_accelerator(tcfg, run_dir)
    set_seed(int(tcfg.seed), device_specific=True)  # different noise draws on each process
    info = build_training_data(cfg, run_dir, accelerator)
    shape = info["sample_shape"]  # (C, *S)
    num_classes = _num_classes(cfg, info)
    model = build_model_from_config(cfg, shape[0], len(shape) - 1, num_classes)
    _check_divisible(model, shape[1:], cfg)
    ema = build_ema(cfg.ema, model)
    opt, lr_sched = build_optimizer(tcfg, model)
    seed, accum = int(tcfg.seed), int(cfg_get(tcfg, "gradient_accumulation_steps", 1))
    sampler = EpochSampler(len(info["dataset"]), shuffle=True, seed=seed)
    loader = make_loader(info["dataset"], int(tcfg.batch_size), sampler, int(tcfg.num_workers), drop_last=True, seed=seed)
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model, opt, loader, lr_sched = accelerator.prepare(model, opt, loader, lr_sched)
    raw = accelerator.unwrap_model(model)
    if ema is not None:
        ema.to(accelerator.device)
        _ema_hooks(accelerator, ema)
    net = model
    if bool(cfg_get(tcfg, "compile", False)):
        if hasattr(raw, "set_channels_last") and accelerator.device.type == "cuda":
            raw.set_channels_last(True)
        if accelerator.is_main_process:
            log.info("train.compile: compiling the denoiser with torch.compile%s; the first steps are slow while it "
                     "compiles (minutes for a large 3D model)", " (regional: its repeated blocks)"
                     if hasattr(raw, "compile_blocks") else "")
        if hasattr(raw, "compile_blocks"):  # regional compilation: a fraction of the whole-network warm-up
            raw.compile_blocks()
        else:
            net = torch.compile(model)

    ckpt = CheckpointManager(run_dir, keep_last=int(tcfg.keep_last))
    start = int(ckpt.resume(accelerator, resume)["step"]) if resume else 0
    metrics_log = MetricsLogger(run_dir, accelerator, truncate_after=start if resume else None)
    init_tracker(accelerator, cfg, run_dir)
    if accelerator.is_main_process and start == 0:
        log.info("denoiser: %s, %.2fM parameters, %s mode, sample shape %s, %d classes",
                 type(raw).__name__, count_parameters(raw) / 1e6, "latent" if info["latent"] else "pixel", shape, num_classes)
    training = _Training(accelerator, model, raw, net, ema, opt, lr_sched, build_loss(cfg, schedule, accelerator.device),
                         infinite_batches(accelerator, loader, sampler, start * accum, seed=seed), num_classes)
    step = _train_loop(training, cfg, run_dir, ckpt, metrics_log, schedule, info, start, accum)
    if accelerator.is_main_process:
        _save_model(run_dir, raw, ema, schedule, info, step, cfg.sample)
    accelerator.wait_for_everyone()
    end_training(accelerator, run_dir)
    return run_dir


def _train_loop(t: _Training, cfg, run_dir: Path, ckpt: CheckpointManager, metrics_log: MetricsLogger,
                schedule: NoiseSchedule, info: dict, start: int, accum: int) -> int:
    """Optimizer steps start+1 .. train.max_steps with EMA updates, logging, previews and
    checkpoints; returns the last step."""
    tcfg, acc = cfg.train, t.accelerator
    max_steps, max_norm = int(tcfg.max_steps), cfg_get(tcfg, "grad_clip")
    ema_every = int(cfg_get(cfg.ema, "every", 1))
    autoencoder = None
    if info["latent"] is not None and acc.is_main_process:  # previews decode
        from medgen.models.autoencoder import load_autoencoder

        autoencoder = load_autoencoder(info["autoencoder_dir"], acc.device).requires_grad_(False)
    bar = progress_bar(acc, max_steps, start, desc="diffusion")
    tic = time.perf_counter()
    for step in range(start + 1, max_steps + 1):
        logs = _optimizer_step(t, step, accum, max_norm)
        if t.ema is not None:
            ema_update(t.ema, t.raw.parameters(), step, ema_every)
        if step % int(tcfg.log_every) == 0 or step == max_steps or step == start + 1:
            ema_decay = (t.ema.cur_decay_value or 0.0) if t.ema is not None else None
            metrics_log.log(step, dict(logs, ema_decay=ema_decay,
                                       steps_per_s=(step - start) / max(time.perf_counter() - tic, 1e-9)))
            bar.set_postfix(loss=f"{logs['loss'].item():.4f}")
        bar.update(1)
        if acc.is_main_process and (step % int(tcfg.preview_every) == 0 or step == max_steps):
            with preserved_rng():  # previews leave the training RNG untouched (resume stays identical)
                write_preview(run_dir / "samples" / f"step_{step}.png", _inference_copy(t.raw, t.ema), schedule,
                              cfg.sample, t.num_classes, autoencoder, info, acc.device)
            log_preview(acc, "samples/generated", run_dir / "samples" / f"step_{step}.png", step)
        if step % int(tcfg.checkpoint_every) == 0 or step == max_steps:
            ckpt.save(acc, step, {"max_steps": max_steps})
    bar.close()
    return max(start, max_steps)


# ----------------------------------------------------------------------------- previews, model/


@torch.no_grad()
def write_preview(path: Path, net, schedule, sample_cfg, num_classes, autoencoder, info, device) -> None:
    """Samples of `net` (labels cycling through the classes, seeds 0..n-1) as a PNG grid captioned with
    seed and label; 3D: three planes per volume."""
    net = net.to(device)
    n = int(sample_cfg.n_preview)
    labels = torch.arange(n) % num_classes if num_classes > 0 else None
    scaling = LatentScaling.from_dict(info["latent"]) if info["latent"] is not None else None
    sampler, steps = default_sampler(latent=info["latent"] is not None,  # for a null sample.sampler / sample.steps
                                     spatial_dims=len(info["sample_shape"]) - 1)
    z = sample_loop(net, schedule, info["sample_shape"], generators(range(n)), sampler=str(sample_cfg.sampler or sampler),
                    steps=int(sample_cfg.steps or steps), labels=labels, guidance=float(sample_cfg.guidance),
                    eta=float(cfg_get(sample_cfg, "eta", 0.0)), null_label=net.null_label if num_classes > 0 else None,
                    clip_x0=scaling is None or scaling.clip_x0, device=device)
    x = decode_latents(autoencoder, z, scaling) if autoencoder is not None else z
    atomic_write_bytes(path, grid_png(x.clamp(-1, 1), captions=sample_captions(range(n), None if labels is None else labels.tolist())))


def _save_model(run_dir: Path, raw, ema, schedule, info, step: int, sample_cfg) -> None:
    net = _inference_copy(raw, ema)
    save_inference_model(net, run_dir / "model", model_config_json(net, schedule, info, step, sample_cfg))
    if info["latent"] is not None:  # the run carries its own decoder
        dst = run_dir / "autoencoder"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(info["autoencoder_dir"], dst)
    log.info("diffusion model (%s) saved to %s", "EMA" if ema is not None else "no EMA", run_dir / "model")


def estimate_memory(cfg, steps: int = 2) -> dict[str, Any]:
    """Peak tensor memory of training steps (denoiser forward + backward, AdamW, EMA) at the
    config's batch size, measured on the CPU with medgen.profiling.TensorMemory; nothing is read
    but the autoencoder's config.

    The denoiser's input shape: latent mode (`autoencoder.run`) `data.shape` divided by the
    autoencoder's downsampling, with its latent channels; pixel mode `data.shape` x `data.channels`.
    To size a latent model before stage 1 exists, describe the latents directly, e.g.
    `autoencoder.run=null data.shape=[32,32,32] data.channels=8`.
    """
    from medgen.profiling import measure_steps

    data = _data_cfg(cfg)
    if not data.get("shape"):
        raise ConfigError("--estimate-memory needs data.shape, e.g. data.shape=[128,128,128]")
    shape = [int(v) for v in data["shape"]]
    run = cfg_get(cfg.autoencoder, "run")
    if run is not None:
        ae = json.loads((_autoencoder_model_dir(run) / "config.json").read_text())
        factors = [int(f) for f in ae["downsample_factors"]]
        if any(s % f for s, f in zip(shape, factors)):
            raise ConfigError(f"data.shape {shape} is not divisible by the autoencoder's downsampling {factors}")
        channels, shape = int(ae["latent_channels"]), [s // f for s, f in zip(shape, factors)]
    else:
        channels = int(data.get("channels") or 1)
    autocast = cpu_autocast(str(cfg.train.mixed_precision))
    num_classes = 0 if str(cfg_get(cfg.model, "conditional", "auto")).lower() in ("false", "0", "no") else \
        int(cfg_get(cfg.model, "num_classes") or 0)
    torch.manual_seed(int(cfg.train.seed))
    model = build_model_from_config(cfg, channels, len(shape), num_classes)
    _check_divisible(model, shape, cfg)
    loss_fn = build_loss(cfg, NoiseSchedule.from_config(cfg.diffusion))
    batch = int(cfg.train.batch_size)
    x = torch.randn(batch, channels, *shape)
    labels = torch.randint(0, num_classes, (batch,)) if num_classes else None
    null_label = model.null_label if num_classes else None
    ema = build_ema(cfg.ema, model)
    opt, _ = build_optimizer(cfg.train, model)

    def step() -> None:
        with autocast:
            loss = loss_fn(model, x, labels, null_label)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(model.parameters())

    # persistent: parameters, AdamW moments, EMA weights
    return {**measure_steps(step, [model], inputs=[x, labels], state=ema.shadow_params if ema is not None else [],
                            steps=steps),
            "batch": batch, "shape": shape, "channels": channels, "precision": str(cfg.train.mixed_precision),
            "gradient_checkpointing": bool(cfg.model.gradient_checkpointing)}


def train_from_args(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config, args.out, args.resume, args.overrides, DEFAULTS)
    train_diffusion(cfg, args.out, args.resume)
    return 0


# ----------------------------------------------------------------------------- demo


def demo_stage(ctx) -> None:
    """Train the demo denoiser (latent mode on ctx.state["autoencoder_run"], else pixel mode).

    Sets ctx.state["diffusion_run"]; the demo's `sample` stage (medgen.sample.commands) samples it.
    """
    from medgen.config import load_config
    from medgen.demo import demo_config
    from medgen.train.common import read_metrics

    ae_run = ctx.state.get("autoencoder_run")
    size = ctx.cohort_settings()["size"]
    if ae_run is not None:
        name = f"demo_diffusion_{ctx.dims}d.yaml"
        overrides = [f"autoencoder.run={ae_run}", f"data.path={ctx.cohort}"]
    else:
        name = "demo_diffusion_2d_pixel.yaml" if ctx.dims == 2 else "demo_diffusion_3d.yaml"
        overrides = [f"data.path={ctx.cohort}"]
    overrides += [f"data.shape={[size] * ctx.dims}", "train.tracker=none"]
    if ctx.quick:
        steps = 400 if ctx.dims == 2 else 40
        overrides += [f"train.max_steps={steps}", f"train.checkpoint_every={steps}", f"train.preview_every={steps}",
                      "train.log_every=10", "sample.n_preview=4"]
    cfg = load_config(demo_config(name), overrides, DEFAULTS)
    run = train_diffusion(cfg, Path(ctx.out) / "diffusion")
    ctx.state["diffusion_run"] = run
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    print(f"  diffusion: {run} ({'latent' if ae_run else 'pixel'} mode), loss {losses[0]:.3f} -> {losses[-1]:.3f}")
