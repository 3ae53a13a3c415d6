"""`medgen train diffusion`: stage 2, a 2D/3D denoiser in latent or pixel space, with accelerate.

Latent mode (`autoencoder.run` set; Rombach et al. 2022, Medfusion: Mueller-Franzes et al. 2023,
Medical Diffusion: Khader et al. 2023): the dataset is encoded once by the frozen stage-1
autoencoder into a latent cache (`medgen encode` format; or reuse `autoencoder.cache`), the
latents are multiplied by the cache's `scale_factor` (1/std), and the denoiser trains on the
training subjects' latents only. The autoencoder's inference folder is copied into the run
(`RUN/autoencoder/`), so a run samples and decodes on its own. Pixel mode (`autoencoder.run`
unset): the denoiser trains on the preprocessed images/volumes in [-1, 1].

EMA of the denoiser weights (diffusers' `EMAModel`) is what previews and `model/` use; it holds
the denoiser's parameters only, never the frozen autoencoder.

Checkpoints (`checkpoints/step_N/`): accelerate state (weights as safetensors) plus
`ema.safetensors` and `ema.json`, written through accelerate's save/load-state hooks inside the
atomic checkpoint folder. `model/`: EMA weights + `config.json` (network, schedule, sample shape,
latent scale factor, spacing) for `medgen.load_pipeline` / `medgen sample`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from medgen.config import to_dict
from medgen.diffusion import DiffusionLoss, NoiseSchedule, default_sampler, generators, sample_loop
from medgen.errors import ConfigError, RunError
from medgen.io import atomic_write_bytes, atomic_write_json, sha256_file
from medgen.models.unet import build_denoiser
from medgen.train.preview import grid_png
from medgen.train.common import (
    CheckpointManager,
    EpochSampler,
    MetricsLogger,
    build_accelerator,
    cfg_get,
    check_finite,
    count_parameters,
    cpu_autocast,
    infinite_batches,
    init_tracker,
    load_run_config,
    make_loader,
    prepare_run_dir,
    preserved_rng,
    progress_bar,
    read_metrics,
    save_inference_model,
)

log = logging.getLogger(__name__)

# Every key a config may set, with its default. Documented here, where it is declared.
DEFAULTS: dict[str, Any] = {
    # pixel mode: the dataset; latent mode: defaults to the autoencoder run's data section
    "data": {"path": None, "spatial_dims": None, "channels": None, "shape": None},
    "autoencoder": {
        "run": None,  # stage-1 run dir (or model folder): latent mode; null: pixel mode
        "cache": None,  # an existing `medgen encode` folder; null: encode into RUN/latents
        "encode_batch_size": 8,
    },
    "model": {
        "backbone": "medgen",  # medgen (ours) | monai (MONAI DiffusionModelUNet, the reference)
        "channels": [64, 128, 256, 512],  # width per level; each level after the first halves the size
        "num_res_blocks": 2,
        "attention_levels": [False, False, True, True],
        "head_channels": 64,
        "norm_groups": 32,
        "dropout": 0.0,
        "gradient_checkpointing": False,
        "conditional": "auto",  # auto (class-conditional when the data has labels) | true | false
        "num_classes": None,  # default: max label + 1
    },
    "diffusion": {  # medgen.diffusion.NoiseSchedule
        "schedule": "scaled_linear",  # linear | scaled_linear | cosine
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "zero_terminal_snr": False,  # Lin et al. 2024; needs prediction v or x0
        "prediction": "v",  # v | eps | x0; v: every sampler clean in pixel space (eval/RESULTS.md "Samplers")
    },
    "loss": {
        "type": "l2",  # l2 | l1
        "min_snr_gamma": None,  # e.g. 5.0 (Hang et al. 2023)
        "cond_drop_prob": 0.1,  # per-sample label dropout for classifier-free guidance
    },
    "ema": {"decay": 0.9999, "warmup": True, "power": 0.6667, "update_after": 0},
    # previews; sampler/steps null: the measured default per space (medgen.diffusion.default_sampler)
    "sample": {"sampler": None, "steps": None, "guidance": 1.0, "n_preview": 8},
    "train": {
        "max_steps": 100000,
        "batch_size": 16,
        "lr": 1.0e-4,
        "lr_warmup_steps": 0,
        "betas": [0.9, 0.999],
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "mixed_precision": "no",  # no | fp16 | bf16
        "gradient_accumulation_steps": 1,
        "tracker": "none",  # none | wandb
        "seed": 0,
        "cpu": False,
        "num_workers": 0,
        "log_every": 10,
        "checkpoint_every": 1000,
        "keep_last": 3,
        "preview_every": 1000,
        "compile": False,  # torch.compile the denoiser (GPU; runs it channels-last)
    },
}

EMA_WEIGHTS = "ema.safetensors"
EMA_STATE = "ema.json"


# ----------------------------------------------------------------------------- data


class LatentDataset(torch.utils.data.Dataset):
    """Scaled latents from a cache: item = {"image": (C, *S'), "label": long}."""

    def __init__(self, latents: torch.Tensor, labels: list[int]):
        self.latents, self.labels = latents, torch.tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.latents[i], "label": self.labels[i]}


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
                            "num_labels": (max(labels_seen) + 1) if labels_seen else 0, "latent": None}
    run = cfg_get(cfg.autoencoder, "run")
    if run is None:
        info["dataset"] = train_images
        info["image_shape"] = list(train_images[0]["image"].shape)
        info["sample_shape"] = info["image_shape"]
        return info

    # ---- latent mode
    from medgen.train.encode import encode_dataset, load_latent_cache

    model_dir = _autoencoder_model_dir(run)
    ae_sha = sha256_file(model_dir / "model.safetensors")
    cache = cfg_get(cfg.autoencoder, "cache")
    if cache is None:
        cache = run_dir / "latents"
        if accelerator.is_main_process and not (cache / "latents.json").is_file():
            encode_dataset(model_dir, data_cfg["path"], cache, data_cfg=data_cfg,
                           batch_size=int(cfg_get(cfg.autoencoder, "encode_batch_size", 8)), device=accelerator.device)
        accelerator.wait_for_everyone()
    latents, meta = load_latent_cache(cache)
    if meta.get("autoencoder_sha256") != ae_sha:
        raise ConfigError(f"latent cache {cache} was made by another autoencoder (sha256 {meta.get('autoencoder_sha256')}) "
                          f"than autoencoder.run={run} ({ae_sha}); re-encode or drop autoencoder.cache")
    train_subjects = {s.subject_id for s in train_images.samples}
    keep = [i for i, s in enumerate(meta["subject_ids"]) if s in train_subjects]
    if not keep:
        raise ConfigError(f"latent cache {cache} holds none of the training subjects of {data_cfg['path']}")
    scale = float(meta["scale_factor"])
    info["dataset"] = LatentDataset(latents[keep] * scale, [int(meta["labels"][i]) for i in keep])
    info["sample_shape"] = list(latents.shape[1:])
    info["image_shape"] = list(train_images[0]["image"].shape)
    info["latent"] = {"scale_factor": scale, "autoencoder_sha256": ae_sha, "autoencoder_source": str(Path(run).resolve()),
                      "cache": str(Path(cache).resolve())}
    info["autoencoder_dir"] = model_dir
    return info


# ----------------------------------------------------------------------------- previews


# ----------------------------------------------------------------------------- EMA state (safetensors + JSON)


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
            raise RunError(f"{path} has no {EMA_WEIGHTS}; it is not a diffusion checkpoint")
        tensors = load_file(str(path / EMA_WEIGHTS))
        state = json.loads((path / EMA_STATE).read_text())
        if len(tensors) != len(ema.shadow_params):
            raise RunError(f"{path / EMA_WEIGHTS} holds {len(tensors)} tensors, the model has {len(ema.shadow_params)}")
        for i, p in enumerate(ema.shadow_params):
            p.data.copy_(tensors[f"p{i}"].to(p.device))
        ema.optimization_step = int(state["optimization_step"])

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ----------------------------------------------------------------------------- training


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


def model_config_json(net, schedule: NoiseSchedule, info: dict, step: int) -> dict:
    """`model/config.json`: everything `medgen.load_pipeline` needs, no training code."""
    params = dict(net.config)
    backbone = params.pop("backbone", "medgen")
    target = "medgen.models.unet.UNet" if backbone == "medgen" else "medgen.models.unet.MonaiUNet"
    return {
        "target": target, "params": params, "kind": "diffusion", "backbone": backbone,
        "diffusion": schedule.to_dict(), "sample_shape": info["sample_shape"], "image_shape": info["image_shape"],
        "spatial_dims": net.spatial_dims, "num_classes": net.num_classes, "null_label": net.null_label,
        "latent": info["latent"], "spacing": info["spacing"], "data": info["data"], "step": int(step),
    }


def train_diffusion(cfg, out: str | Path, resume: str | None = None) -> Path:
    """Train per `cfg` (see DEFAULTS) into run directory `out`; returns the run directory."""
    from diffusers.training_utils import EMAModel

    tcfg = cfg.train
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    run_dir = prepare_run_dir(out, cfg, resume)
    accelerator = build_accelerator(tcfg, run_dir)
    from accelerate.utils import set_seed

    set_seed(int(tcfg.seed), device_specific=True)  # different noise draws on each process
    info = build_training_data(cfg, run_dir, accelerator)
    dataset = info["dataset"]
    shape = info["sample_shape"]  # (C, *S)
    spatial_dims = len(shape) - 1
    num_classes = _num_classes(cfg, info)

    model = build_model_from_config(cfg, shape[0], spatial_dims, num_classes)
    downsample = 2 ** getattr(model, "downsample_levels", 0)
    if any(s % downsample for s in shape[1:]):
        raise ConfigError(f"sample shape {shape[1:]} is not divisible by {downsample} (2^(levels-1) of model.channels "
                          f"{list(cfg.model.channels)}); use fewer levels or another data.shape")
    ema = EMAModel(model.parameters(), decay=float(cfg.ema.decay), use_ema_warmup=bool(cfg.ema.warmup),
                   power=float(cfg.ema.power), update_after_step=int(cfg.ema.update_after))
    opt = torch.optim.AdamW(model.parameters(), lr=float(tcfg.lr), betas=tuple(float(b) for b in tcfg.betas),
                            weight_decay=float(tcfg.weight_decay))
    warm = int(cfg_get(tcfg, "lr_warmup_steps", 0))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)

    seed = int(tcfg.seed)
    batch_size = int(tcfg.batch_size)
    sampler = EpochSampler(len(dataset), shuffle=True, seed=seed)
    loader = make_loader(dataset, batch_size, sampler, int(tcfg.num_workers), drop_last=True, seed=seed)
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model, opt, loader, lr_sched = accelerator.prepare(model, opt, loader, lr_sched)
    raw = accelerator.unwrap_model(model)
    ema.to(accelerator.device)
    _ema_hooks(accelerator, ema)
    net = model
    if bool(cfg_get(tcfg, "compile", False)):
        if hasattr(raw, "set_channels_last") and accelerator.device.type == "cuda":
            raw.set_channels_last(True)
        net = torch.compile(model)

    autoencoder = None
    if info["latent"] is not None and accelerator.is_main_process:
        from medgen.models.autoencoder import load_autoencoder

        autoencoder = load_autoencoder(info["autoencoder_dir"], accelerator.device).requires_grad_(False)

    ckpt = CheckpointManager(run_dir, keep_last=int(tcfg.keep_last))
    start = int(ckpt.resume(accelerator, resume)["step"]) if resume else 0
    metrics_log = MetricsLogger(run_dir, accelerator, truncate_after=start if resume else None)
    init_tracker(accelerator, cfg, run_dir)
    if accelerator.is_main_process and start == 0:
        log.info("denoiser: %s, %.2fM parameters, %s mode, sample shape %s, %d classes",
                 type(raw).__name__, count_parameters(raw) / 1e6, "latent" if info["latent"] else "pixel", shape, num_classes)

    loss_fn = DiffusionLoss(schedule.alphas_cumprod().to(accelerator.device), prediction=schedule.prediction,
                            loss=str(cfg.loss.type), min_snr_gamma=cfg_get(cfg.loss, "min_snr_gamma"),
                            cond_drop_prob=float(cfg.loss.cond_drop_prob))
    accum = int(cfg_get(tcfg, "gradient_accumulation_steps", 1))
    batches = infinite_batches(accelerator, loader, sampler, start * accum, seed=seed)
    max_steps = int(tcfg.max_steps)
    max_norm = cfg_get(tcfg, "max_grad_norm")
    null_label = raw.null_label if num_classes > 0 else None
    bar = progress_bar(accelerator, max_steps, start, desc="diffusion")
    tic = time.perf_counter()

    step = start
    while step < max_steps:
        step += 1
        logs: dict[str, Any] = {}
        for _ in range(accum):
            batch = next(batches)
            x, labels = batch["image"], batch["label"] if num_classes > 0 else None
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = loss_fn(net, x, labels, null_label)
                check_finite(loss, step, "diffusion loss", accelerator)
                accelerator.backward(loss)
                if max_norm and accelerator.sync_gradients:
                    logs["grad_norm"] = accelerator.clip_grad_norm_(model.parameters(), float(max_norm))
                opt.step()
                lr_sched.step()
                opt.zero_grad(set_to_none=True)
        ema.step(raw.parameters())
        logs["loss"] = accelerator.reduce(loss.detach(), reduction="mean")
        if step % int(tcfg.log_every) == 0 or step == max_steps or step == start + 1:
            row = dict(logs, lr=lr_sched.get_last_lr()[0], ema_decay=ema.cur_decay_value or 0.0,
                       steps_per_s=(step - start) / max(time.perf_counter() - tic, 1e-9))
            metrics_log.log(step, row)
            bar.set_postfix(loss=f"{logs['loss'].item():.4f}")
        bar.update(1)
        if accelerator.is_main_process and (step % int(tcfg.preview_every) == 0 or step == max_steps):
            with preserved_rng():  # previews leave the training RNG untouched (resume stays identical)
                write_preview(run_dir / "samples" / f"step_{step}.png", raw, ema, schedule, shape, cfg, num_classes,
                              autoencoder, info, accelerator.device)
        if step % int(tcfg.checkpoint_every) == 0 or step == max_steps:
            ckpt.save(accelerator, step, {"max_steps": max_steps})
    bar.close()
    if accelerator.is_main_process:
        _save_model(run_dir, raw, ema, schedule, info, step)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


def _ema_copy(raw, ema) -> torch.nn.Module:
    """A fresh denoiser (from its config, channels-first, no checkpointing) holding the EMA weights."""
    from medgen.models.unet import denoiser_from_config

    params = dict(raw.config)
    if params.get("backbone", "medgen") == "medgen":
        params.update(gradient_checkpointing=False, channels_last=False)
    net = denoiser_from_config(params)
    ema.copy_to(net.parameters())
    return net.eval()


@torch.no_grad()
def write_preview(path: Path, raw, ema, schedule, shape, cfg, num_classes, autoencoder, info, device) -> None:
    """EMA samples (labels cycling through the classes) as a PNG grid; 3D: three mid slices."""
    net = _ema_copy(raw, ema).to(device)
    n = int(cfg.sample.n_preview)
    labels = torch.arange(n) % num_classes if num_classes > 0 else None
    sampler, steps = default_sampler(latent=autoencoder is not None)
    z = sample_loop(net, schedule, shape, generators(range(n)), sampler=str(cfg.sample.sampler or sampler),
                    steps=int(cfg.sample.steps or steps), labels=labels, guidance=float(cfg.sample.guidance),
                    null_label=net.null_label if num_classes > 0 else None, clip_x0=autoencoder is None, device=device)
    x = decode(autoencoder, z, info["latent"]) if autoencoder is not None else z
    atomic_write_bytes(path, grid_png(x.clamp(-1, 1)))


def decode(autoencoder, z: torch.Tensor, latent: dict, batch_size: int = 8) -> torch.Tensor:
    """Scaled latents -> images through the frozen autoencoder (z / scale_factor first)."""
    scale = float(latent["scale_factor"])
    out = []
    for chunk in z.split(batch_size):
        p = next(autoencoder.parameters())
        out.append(autoencoder.decode((chunk / scale).to(p.device, p.dtype)).float())
    return torch.cat(out)


def _save_model(run_dir: Path, raw, ema, schedule, info, step: int) -> None:
    net = _ema_copy(raw, ema)
    save_inference_model(net, run_dir / "model", model_config_json(net, schedule, info, step))
    if info["latent"] is not None:  # the run carries its own decoder
        dst = run_dir / "autoencoder"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(info["autoencoder_dir"], dst)
    log.info("diffusion model (EMA) saved to %s", run_dir / "model")


def estimate_memory(cfg, steps: int = 2) -> dict[str, Any]:
    """Peak tensor memory of training steps (denoiser forward + backward, AdamW, EMA) at the
    config's batch size, measured on the CPU with medgen.profiling.TensorMemory; nothing is read
    but the autoencoder's config.

    The denoiser's input shape: latent mode (`autoencoder.run`) `data.shape` divided by the
    autoencoder's downsampling, with its latent channels; pixel mode `data.shape` x `data.channels`.
    To size a latent model before stage 1 exists, describe the latents directly, e.g.
    `autoencoder.run=null data.shape=[32,32,32] data.channels=8`.
    """
    from diffusers.training_utils import EMAModel

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
    downsample = 2 ** getattr(model, "downsample_levels", 0)
    if any(s % downsample for s in shape):
        raise ConfigError(f"sample shape {shape} is not divisible by {downsample} (2^(levels-1) of model.channels)")
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    loss_fn = DiffusionLoss(schedule.alphas_cumprod(), prediction=schedule.prediction, loss=str(cfg.loss.type),
                            min_snr_gamma=cfg_get(cfg.loss, "min_snr_gamma"), cond_drop_prob=float(cfg.loss.cond_drop_prob))
    batch = int(cfg.train.batch_size)
    x = torch.randn(batch, channels, *shape)
    labels = torch.randint(0, num_classes, (batch,)) if num_classes else None
    null_label = model.null_label if num_classes else None
    ema = EMAModel(model.parameters(), decay=float(cfg.ema.decay))
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg.train.lr), betas=tuple(float(b) for b in cfg.train.betas),
                            weight_decay=float(cfg.train.weight_decay))

    def step() -> None:
        with autocast:
            loss = loss_fn(model, x, labels, null_label)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(model.parameters())

    # persistent: parameters, AdamW moments, EMA weights
    return {**measure_steps(step, [model], inputs=[x, labels], state=ema.shadow_params, steps=steps),
            "batch": batch, "shape": shape, "channels": channels, "precision": str(cfg.train.mixed_precision),
            "gradient_checkpointing": bool(cfg.model.gradient_checkpointing)}


def train_from_args(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config, args.out, args.resume, args.overrides, DEFAULTS)
    train_diffusion(cfg, args.out, args.resume)
    return 0


# ----------------------------------------------------------------------------- demo


def demo_stage(ctx) -> None:
    """Train the demo denoiser (latent mode on ctx.state["autoencoder_run"], else pixel mode), then sample.

    Sets ctx.state["diffusion_run"] and ctx.state["samples"] (a sample directory).
    """
    from medgen.config import load_config
    from medgen.demo import demo_config
    from medgen.sample.pipeline import load_pipeline, write_samples

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
        steps = 80 if ctx.dims == 2 else 40
        overrides += [f"train.max_steps={steps}", f"train.checkpoint_every={steps}", f"train.preview_every={steps}",
                      "train.log_every=10", "sample.n_preview=4"]
    cfg = load_config(demo_config(name), overrides, DEFAULTS)
    run = train_diffusion(cfg, Path(ctx.out) / "diffusion")
    ctx.state["diffusion_run"] = run
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    pipe = load_pipeline(run, device="cpu" if not torch.cuda.is_available() else None)
    n = (8 if ctx.dims == 2 else 4) if ctx.quick else (64 if ctx.dims == 2 else 16)
    samples = write_samples(pipe, Path(ctx.out) / "samples", n, overwrite=True)
    ctx.state["samples"] = samples
    print(f"  diffusion: {run} ({'latent' if ae_run else 'pixel'} mode), loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"  samples: {n} in {samples} (grid: {samples / 'grid.png'})")
