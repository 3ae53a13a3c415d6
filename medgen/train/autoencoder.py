"""`medgen train autoencoder`: stage 1 of latent diffusion (VQ-GAN or KL-VAE), trained with accelerate.

Generator loss (Esser et al. 2021, VQGAN; Rombach et al. 2022, LDM):

    L_G = w_rec * |x - x^|_1 + w_perc * LPIPS(x, x^) + L_latent
          + [step > disc_start] * (w_adv * lambda * L_hinge_G + w_fm * L_featmatch)

with L_latent = beta-commitment (VQ; codebook by EMA) or w_kl * KL (KL-VAE) and lambda the
adaptive weight. Discriminator: hinge loss on a 3D PatchGAN (whole volume) and/or a 2D PatchGAN
(images, or random slices of volumes) as in Medical Diffusion (Khader et al. 2023).

The run directory follows ARCHITECTURE.md; `model/` rebuilds with `load_autoencoder`.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from medgen.config import to_dict
from medgen.errors import ConfigError
from medgen.models.autoencoder import Autoencoder, to_channels_last
from medgen.models.discriminator import GANDiscriminator
from medgen.train.common import (
    CheckpointManager,
    EpochSampler,
    MetricsLogger,
    build_accelerator,
    cfg_get,
    check_finite,
    cpu_autocast,
    infinite_batches,
    init_tracker,
    load_run_config,
    make_loader,
    prepare_run_dir,
    preserved_rng,
    progress_bar,
    removes_failed_run,
    save_inference_model,
)
from medgen.train.schema import AutoencoderConfig
from medgen.train.preview import grid_png, mid_slices
from medgen.train.losses import (
    adaptive_gan_weight,
    feature_matching_loss,
    hinge_d_loss,
    hinge_g_loss,
    reconstruction_loss,
)

log = logging.getLogger(__name__)

# Every key a config may set: the schema (types, defaults, allowed values, docs) in medgen/train/schema.py.
DEFAULTS = AutoencoderConfig


# ----------------------------------------------------------------------------- builders


def build_autoencoder(model_cfg: Any, spatial_dims: int, in_channels: int) -> Autoencoder:
    m = dict(to_dict(model_cfg))
    downsample = m.get("downsample", 4)
    try:
        return Autoencoder(
            spatial_dims=spatial_dims, in_channels=in_channels, latent_channels=int(m["latent_channels"]),
            channels=list(m["channels"]), downsample=downsample if isinstance(downsample, int) else list(downsample),
            num_res_blocks=int(m["num_res_blocks"]), attention=bool(m["attention"]), latent=m["latent"],
            num_codes=int(m["num_codes"]), commitment=float(m["commitment"]), ema_decay=float(m["ema_decay"]),
            dead_threshold=float(m["dead_threshold"]), norm_groups=int(m["norm_groups"]),
            gradient_checkpointing=bool(m["gradient_checkpointing"]))
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def build_discriminator(disc_cfg: Any, spatial_dims: int, in_channels: int) -> GANDiscriminator | None:
    d = dict(to_dict(disc_cfg))
    if not d.get("enabled", True):
        return None
    try:
        return GANDiscriminator(spatial_dims, in_channels, int(d["channels"]), int(d["num_layers"]), d["norm"],
                                volume=bool(d["volume"]), slices=bool(d["slices"]),
                                slices_per_volume=int(d["slices_per_volume"]))
    except ValueError as e:
        raise ConfigError(f"discriminator: {e}") from None


def build_perceptual(loss_cfg: Any, spatial_dims: int):
    name = str(cfg_get(loss_cfg, "perceptual", "none"))
    if name == "none" or float(cfg_get(loss_cfg, "perceptual_weight", 1.0)) == 0:
        return None
    from medgen.models.perceptual import PerceptualLoss

    return PerceptualLoss(name, cfg_get(loss_cfg, "perceptual_weights", None), spatial_dims,
                          int(cfg_get(loss_cfg, "perceptual_slices", 2)))


# ----------------------------------------------------------------------------- one step


@dataclass(frozen=True)
class LossWeights:
    """The `loss:` config resolved for one model (VQ: commitment weight; KL: KL weight)."""

    reconstruction: str
    rec: float
    perceptual: float
    latent: float
    adversarial: float
    feature_matching: float
    adaptive: bool

    @classmethod
    def from_config(cls, lcfg: Any, is_vq: bool) -> LossWeights:
        return cls(str(lcfg.reconstruction), float(lcfg.reconstruction_weight), float(lcfg.perceptual_weight),
                   float(lcfg.latent_weight) if is_vq else float(lcfg.kl_weight), float(lcfg.adversarial_weight),
                   float(lcfg.feature_matching_weight), bool(lcfg.adaptive_weight))


def generator_loss(model, x: torch.Tensor, w: LossWeights, perceptual=None, disc: GANDiscriminator | None = None,
                   last_layer: torch.Tensor | None = None):
    """The generator objective of one batch (call under autocast).

    `disc` is the plain (not DDP-wrapped) discriminator, given once the GAN terms are on; its
    parameters are frozen for this pass, so its DDP wrapper sees only the discriminator step.
    Returns (loss, recon, aux, logs, slice_index); `slice_index` feeds `discriminator_loss`.
    """
    logs: dict[str, torch.Tensor] = {}
    recon, aux = model(x)
    rec = reconstruction_loss(recon, x, w.reconstruction)
    nll = w.rec * rec
    if perceptual is not None:
        perc = perceptual(recon, x)
        nll = nll + w.perceptual * perc
        logs["loss/perceptual"] = perc.detach()
    loss = nll + w.latent * aux["latent_loss"]
    slice_index = None
    if disc is not None:
        disc.requires_grad_(False)
        slice_index = disc.draw_slices(x)
        fake_feats = disc(recon, slice_index)
        adv = sum(hinge_g_loss(f[-1]) for f in fake_feats.values())
        lam = adaptive_gan_weight(nll, adv, last_layer) if w.adaptive else torch.ones((), device=x.device)
        loss = loss + w.adversarial * lam * adv
        if w.feature_matching > 0:
            with torch.no_grad():
                real_feats = disc(x, slice_index)
            fm = sum(feature_matching_loss(fake_feats[k], real_feats[k]) for k in fake_feats)
            loss = loss + w.feature_matching * fm
            logs["loss/feature_matching"] = fm.detach()
        disc.requires_grad_(True)
        logs["loss/g_adv"], logs["gan_weight"] = adv.detach(), lam
    logs.update({"loss/total": loss.detach(), "loss/reconstruction": rec.detach(),
                 "loss/latent": aux["latent_loss"].detach()})
    return loss, recon, aux, logs, slice_index


def discriminator_loss(disc, x: torch.Tensor, recon: torch.Tensor, slice_index, w: LossWeights) -> torch.Tensor:
    """Hinge loss of the discriminator(s) on real `x` and detached `recon` (call under autocast)."""
    real_out = disc(x, slice_index)
    fake_out = disc(recon.detach(), slice_index)
    return w.adversarial * sum(hinge_d_loss(real_out[k][-1], fake_out[k][-1]) for k in real_out)


def plain_train_step(model, x: torch.Tensor, weights: LossWeights, opt_g, autocast, perceptual=None, disc=None,
                     opt_d=None, last_layer: torch.Tensor | None = None) -> Callable[[], None]:
    """One training step on a fixed batch without accelerate (benchmarks, memory estimates): the
    generator step, then, with `disc`, the discriminator step (the GAN terms on)."""

    def step() -> None:
        with autocast:
            g_loss, recon, _, _, slice_index = generator_loss(model, x, weights, perceptual, disc, last_layer)
        g_loss.backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        if disc is not None:
            with autocast:
                d_loss = discriminator_loss(disc, x, recon, slice_index, weights)
            d_loss.backward()
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
    return step


def estimate_memory(cfg, steps: int = 2) -> dict[str, Any]:
    """Peak tensor memory of training steps at the config's batch size and `data.shape`, measured
    on the CPU (medgen.profiling.TensorMemory), with every network the config builds and the GAN
    terms on (the costliest phase). Nothing is read or written; a missing perceptual weights file
    is replaced by a random backbone of the same architecture (same memory).

    The figure is what `torch.cuda.max_memory_allocated` would report, less cuDNN workspaces and
    allocator overhead; add the CUDA context (~0.5 GiB) for the card's total.
    """
    import torchvision

    from medgen.errors import WeightsError
    from medgen.profiling import measure_steps

    shape = cfg_get(cfg.data, "shape", None)
    if not shape:
        raise ConfigError("--estimate-memory needs data.shape, e.g. data.shape=[128,128,128]")
    shape = [int(s) for s in shape]
    in_channels = int(cfg_get(cfg.data, "channels", None) or 1)
    spatial_dims = len(shape)
    batch = int(cfg.train.batch_size)
    precision = str(cfg.train.mixed_precision)
    autocast = cpu_autocast(precision)
    torch.manual_seed(int(cfg.train.seed))
    model = build_autoencoder(cfg.model, spatial_dims, in_channels)
    if any(s % f for s, f in zip(shape, model.downsample_factors)):
        raise ConfigError(f"data.shape {shape} is not divisible by model.downsample {list(model.downsample_factors)}")
    disc = build_discriminator(cfg.discriminator, spatial_dims, in_channels)
    try:
        perceptual = build_perceptual(cfg.loss, spatial_dims)
    except WeightsError:
        from medgen.models.perceptual import PerceptualLoss

        name = str(cfg.loss.perceptual)
        perceptual = PerceptualLoss(name, getattr(torchvision.models, name)(weights=None).state_dict(), spatial_dims,
                                    int(cfg_get(cfg.loss, "perceptual_slices", 2)))
    weights = LossWeights.from_config(cfg.loss, model.latent == "vq")
    betas = tuple(float(b) for b in cfg.train.betas)
    opt_g = torch.optim.Adam(model.parameters(), lr=float(cfg.train.lr), betas=betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=float(cfg.train.lr), betas=betas) if disc is not None else None
    x = torch.rand(batch, in_channels, *shape) * 2 - 1
    step = plain_train_step(model, x, weights, opt_g, autocast, perceptual, disc, opt_d, model.last_layer)
    modules = [m for m in (model, disc, perceptual) if m is not None]
    return {**measure_steps(step, modules, inputs=[x], steps=steps),
            "batch": batch, "shape": shape, "channels": in_channels, "precision": precision,
            "discriminator": disc is not None, "perceptual": perceptual is not None,
            "gradient_checkpointing": bool(cfg.model.gradient_checkpointing)}


# ----------------------------------------------------------------------------- validation


def msssim_settings(spatial_shape) -> tuple[int, list[float]]:
    """Kernel size and scale weights for MS-SSIM that fit the image (Wang et al. 2003).

    MONAI needs size // 2^(scales-1) > kernel - 1 on every axis: kernel 7 gives 5 scales at
    128^3, 4 at 64^3, 3 at 32^3; the standard 5 weights are truncated and renormalised.
    """
    weights = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    m = min(spatial_shape)
    kernel = 7 if m >= 16 else 3
    scales = 1
    while scales < 5 and m // 2 ** scales > kernel - 1:
        scales += 1
    w = weights[:scales]
    return kernel, [x / sum(w) for x in w]


class ReconstructionMetrics:
    """PSNR, SSIM, MS-SSIM (monai) on images mapped from [-1, 1] to [0, 1]; per-sample values."""

    def __init__(self, spatial_dims: int, spatial_shape):
        from monai.metrics import MultiScaleSSIMMetric, PSNRMetric, SSIMMetric

        kernel, weights = msssim_settings(spatial_shape)
        self.psnr = PSNRMetric(max_val=1.0, reduction="none")
        self.ssim = SSIMMetric(spatial_dims, data_range=1.0, win_size=kernel, reduction="none")
        self.msssim = (MultiScaleSSIMMetric(spatial_dims, data_range=1.0, kernel_size=kernel, weights=weights,
                                            reduction="none") if len(weights) > 1 else None)

    def __call__(self, recon: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        a = ((recon.float() + 1) / 2).clamp(0, 1)
        b = ((target.float() + 1) / 2).clamp(0, 1)
        out = {"psnr": self.psnr(a, b).view(-1), "ssim": self.ssim(a, b).view(-1)}
        if self.msssim is not None:
            out["ms_ssim"] = self.msssim(a, b).view(-1)
        return out


@torch.no_grad()
def validate(accelerator, model, loader, metrics: ReconstructionMetrics, max_batches: int) -> dict[str, float]:
    """Deterministic reconstructions (KL: posterior mean) of the val split on all processes."""
    model.eval()
    values: dict[str, list[torch.Tensor]] = {}
    perplexities = []
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        x = batch["image"]
        with accelerator.autocast():
            recon, aux = model(x, sample_posterior=False)
        for k, v in metrics(recon, x).items():
            values.setdefault(k, []).append(accelerator.gather_for_metrics(v))
        if "perplexity" in aux:
            perplexities.append(aux["perplexity"])
    model.train()
    out = {f"val/{k}": torch.cat(v).float().mean().item() for k, v in values.items()}
    if perplexities:
        out["val/perplexity"] = torch.stack(perplexities).mean().item()
    return out


# ----------------------------------------------------------------------------- previews


def write_preview(path: Path, real: torch.Tensor, recon: torch.Tensor, n: int = 4) -> None:
    """PNG: top row inputs, bottom row reconstructions (3D: mid slices along each axis)."""
    from medgen.io import atomic_write_bytes

    real, recon = real[:n].detach().float().cpu(), recon[:n].detach().float().cpu()
    if real.ndim == 5:
        real, recon = mid_slices(real), mid_slices(recon)
    atomic_write_bytes(path, grid_png(torch.cat([real, recon]), ncol=real.shape[0]))


# ----------------------------------------------------------------------------- training


def _loader_datasets(cfg, run_dir, accelerator):
    from medgen.data import datasets_from_config

    with accelerator.main_process_first():  # the main process writes split.json first
        return datasets_from_config(cfg.data, run_dir)


@removes_failed_run
def train_autoencoder(cfg, out: str | Path, resume: str | None = None) -> Path:
    """Train per `cfg` (see DEFAULTS) into run directory `out`; returns the run directory."""
    if cfg_get(cfg.data, "path") is None:
        raise ConfigError("data.path is not set; pass data.path=DIR (a dataset folder or manifest.csv)")
    return _train(cfg, prepare_run_dir(out, cfg, resume), resume)


def _train(cfg, run_dir: Path, resume: str | None) -> Path:
    tcfg, lcfg = cfg.train, cfg.loss
    accelerator = build_accelerator(tcfg, run_dir)
    splits = _loader_datasets(cfg, run_dir, accelerator)
    train_ds, val_ds = splits["train"], splits["val"]
    if len(train_ds) == 0:
        raise ConfigError(f"the training split of {cfg.data.path} is empty")
    probe = train_ds[0]["image"]  # (C, *S)
    in_channels, spatial_dims, shape = probe.shape[0], probe.ndim - 1, tuple(probe.shape[1:])

    model = build_autoencoder(cfg.model, spatial_dims, in_channels)
    if any(s % f for s, f in zip(shape, model.downsample_factors)):
        raise ConfigError(f"image shape {list(shape)} is not divisible by model.downsample "
                          f"{list(model.downsample_factors)}; set data.shape to a multiple")
    disc = build_discriminator(cfg.discriminator, spatial_dims, in_channels)
    perceptual = build_perceptual(lcfg, spatial_dims)
    lr = float(tcfg.lr)
    betas = tuple(float(b) for b in tcfg.betas)
    opt_g = torch.optim.Adam(model.parameters(), lr=lr, betas=betas, weight_decay=float(tcfg.weight_decay))
    opt_d = (torch.optim.Adam(disc.parameters(), lr=float(cfg_get(tcfg, "disc_lr", lr)), betas=betas)
             if disc is not None else None)

    seed = int(tcfg.seed)
    batch_size = int(tcfg.batch_size)
    sampler = EpochSampler(len(train_ds), shuffle=True, seed=seed)
    train_loader = make_loader(train_ds, batch_size, sampler, int(tcfg.num_workers), drop_last=True, seed=seed)
    val_loader = (make_loader(val_ds, batch_size, EpochSampler(len(val_ds), shuffle=False), int(tcfg.num_workers),
                              drop_last=False) if len(val_ds) else None)
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if bool(tcfg.channels_last):
            to_channels_last(model)
            if disc is not None:
                to_channels_last(disc)  # 3D runs mix 3D (volume) and 2D (slice) convs

    objects = [model, opt_g] + ([disc, opt_d] if disc is not None else [])
    prepared = accelerator.prepare(*objects, train_loader)
    model, opt_g = prepared[0], prepared[1]
    if disc is not None:
        disc, opt_d = prepared[2], prepared[3]
    train_loader = prepared[-1]
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    if perceptual is not None:
        perceptual.to(accelerator.device)
    raw_model = accelerator.unwrap_model(model)
    raw_disc = accelerator.unwrap_model(disc) if disc is not None else None

    ckpt = CheckpointManager(run_dir, keep_last=int(tcfg.keep_last))
    start = int(ckpt.resume(accelerator, resume)["step"]) if resume else 0
    metrics_log = MetricsLogger(run_dir, accelerator, truncate_after=start if resume else None)
    init_tracker(accelerator, cfg, run_dir)
    val_metrics = ReconstructionMetrics(spatial_dims, shape)

    accum = int(cfg_get(tcfg, "gradient_accumulation_steps", 1))
    batches = infinite_batches(accelerator, train_loader, sampler, start * accum, seed=seed)
    max_steps = int(tcfg.max_steps)
    disc_start = int(lcfg.disc_start)
    is_vq = raw_model.latent == "vq"
    weights = LossWeights.from_config(lcfg, is_vq)
    max_norm = cfg_get(tcfg, "max_grad_norm", None)
    samples_dir = run_dir / "samples"
    bar = progress_bar(accelerator, max_steps, start, desc="autoencoder")
    tic = time.perf_counter()

    step = start
    while step < max_steps:
        step += 1
        gan_on = disc is not None and step > disc_start
        logs: dict[str, torch.Tensor] = {}
        for _ in range(accum):
            batch = next(batches)
            x = batch["image"]
            if bool(tcfg.channels_last) and x.is_cuda:
                x = x.contiguous(memory_format=torch.channels_last if spatial_dims == 2 else torch.channels_last_3d)
            # one accumulate block per micro-batch for both networks: accelerate counts micro-batches
            # per block, and a second block would shift the generator's and discriminator's sync
            with accelerator.accumulate(*([model, disc] if disc is not None else [model])):
                # ---- generator
                with accelerator.autocast():
                    g_loss, recon, aux, step_logs, slice_idx = generator_loss(
                        model, x, weights, perceptual, raw_disc if gan_on else None, raw_model.last_layer)
                check_finite(g_loss, step, "generator loss", accelerator)
                accelerator.backward(g_loss)
                if max_norm and accelerator.sync_gradients:
                    logs["grad_norm"] = accelerator.clip_grad_norm_(model.parameters(), float(max_norm))
                opt_g.step()
                opt_g.zero_grad(set_to_none=True)
                # ---- discriminator
                if gan_on:
                    with accelerator.autocast():
                        d_loss = discriminator_loss(disc, x, recon, slice_idx, weights)
                    check_finite(d_loss, step, "discriminator loss", accelerator)
                    accelerator.backward(d_loss)
                    opt_d.step()
                    opt_d.zero_grad(set_to_none=True)
                    logs["loss/d"] = d_loss.detach()
            logs.update(step_logs)
            for k in ("perplexity", "usage", "restarted"):
                if k in aux:
                    logs[f"codebook/{k}"] = aux[k]

        if step % int(tcfg.log_every) == 0 or step == max_steps or step == start + 1:
            elapsed = time.perf_counter() - tic
            row = {k: v for k, v in logs.items()}
            row["steps_per_s"] = (step - start) / max(elapsed, 1e-9)
            metrics_log.log(step, row)
            bar.set_postfix(loss=f"{logs['loss/total'].item():.4f}", rec=f"{logs['loss/reconstruction'].item():.4f}")
        bar.update(1)
        # validation and previews leave the training RNG untouched (a resumed run stays identical)
        if val_loader is not None and (step % int(tcfg.val_every) == 0 or step == max_steps):
            with preserved_rng():
                metrics_log.log(step, validate(accelerator, model, val_loader, val_metrics, int(tcfg.val_batches)))
        if accelerator.is_main_process and (step % int(tcfg.preview_every) == 0 or step == max_steps):
            with preserved_rng():
                write_preview(samples_dir / f"recon_step_{step}.png", x, recon)
        if step % int(tcfg.checkpoint_every) == 0 or step == max_steps:
            ckpt.save(accelerator, step, {"max_steps": max_steps})
    bar.close()
    if accelerator.is_main_process:
        config = raw_model.config()
        config.update({"data": to_dict(cfg.data), "step": step,
                       "kind": "vqgan" if is_vq else "kl-vae"})
        save_inference_model(raw_model, run_dir / "model", config)
        log.info("autoencoder saved to %s", run_dir / "model")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


def train_from_args(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config, args.out, args.resume, args.overrides, DEFAULTS)
    train_autoencoder(cfg, args.out, args.resume)
    return 0


# ----------------------------------------------------------------------------- demo


def demo_stage(ctx) -> None:
    """Train the tiny demo autoencoder on the cohort (quick: 20-24 steps) -> ctx.state["autoencoder_run"]."""
    from medgen.config import load_config
    from medgen.demo import demo_config
    from medgen.train.common import read_metrics

    size = ctx.cohort_settings()["size"]
    overrides = [f"data.path={ctx.cohort}", f"data.shape={[size] * ctx.dims}", "train.tracker=none"]
    if ctx.quick:
        steps = 20 if ctx.dims == 2 else 24
        overrides += [f"train.max_steps={steps}", f"loss.disc_start={steps // 2}", f"train.val_every={steps}",
                      f"train.checkpoint_every={steps}", f"train.preview_every={steps}"]
    cfg = load_config(demo_config(f"demo_autoencoder_{ctx.dims}d.yaml"), overrides, DEFAULTS)
    run = train_autoencoder(cfg, Path(ctx.out) / "autoencoder")
    ctx.state["autoencoder_run"] = run
    val = [r for r in read_metrics(run) if "val/psnr" in r]
    if val:
        v = val[-1]
        ctx.state["autoencoder_val"] = {k: round(v[k], 4) for k in v if k.startswith("val/")}
        print(f"  autoencoder: {run} (step {v['step']}): val PSNR {v['val/psnr']:.2f} dB, SSIM {v['val/ssim']:.3f}"
              + (f", MS-SSIM {v['val/ms_ssim']:.3f}" if "val/ms_ssim" in v else "")
              + (f", codebook perplexity {v['val/perplexity']:.1f}" if "val/perplexity" in v else ""))
    print(f"  previews: {run / 'samples'}")
