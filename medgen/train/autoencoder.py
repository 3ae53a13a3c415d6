"""`medgen train autoencoder`: stage 1 of latent diffusion (VQ-GAN or KL-VAE), trained with accelerate.

Generator loss (Esser et al. 2021, VQGAN; Rombach et al. 2022, LDM; Mueller-Franzes et al. 2023,
Medfusion), for the output x^ and each deep-supervision output (against the input resized to it):

    L_img = R( w_rec * |x - x^|_p + w_perc * LPIPS(x, x^) + w_ssim * (1 - SSIM(x, x^)) )
    L_G   = sum over outputs of L_img + L_latent
            + [step > disc_start] * (w_adv * lambda * L_hinge_G + w_fm * L_featmatch)

R is the reduction (`loss.reduction`): `mean` over pixels, or `sum` over each image's C x prod(S)
elements and mean over the batch (LDM and Medfusion sum per sample, broadcasting the per-image
LPIPS and SSIM over the pixels; their KL weight 1e-6 is calibrated for this). L_latent is
w_latent * beta-commitment (VQ, a mean over latent elements; codebook by EMA) or w_kl * KL (KL-VAE,
summed over latent elements, mean over the batch); lambda is the adaptive weight. Discriminator:
hinge loss on a 3D PatchGAN (whole volume) and/or a 2D PatchGAN (images, or random slices of
volumes) as in Medical Diffusion (Khader et al. 2023); feature matching sums the layers of both.

The run directory follows docs/ARCHITECTURE.md; `model/` rebuilds with `load_autoencoder`.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

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
from medgen.train.schema import AutoencoderConfig
from medgen.train.losses import (
    adaptive_gan_weight,
    feature_matching_loss,
    hinge_d_loss,
    hinge_g_loss,
    reconstruction_loss,
    ssim_loss,
)
from medgen.train.preview import reconstruction_png

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
            gradient_checkpointing=bool(m["gradient_checkpointing"]), deep_supervision=int(m["deep_supervision"]))
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


def build_perceptual(loss_cfg: Any, spatial_dims: int, weights=None):
    """The `loss.perceptual` network, or None; `weights` (a state_dict) overrides the file lookup."""
    name = str(cfg_get(loss_cfg, "perceptual", "none"))
    if name == "none" or float(cfg_get(loss_cfg, "perceptual_weight", 1.0)) == 0:
        return None
    from medgen.models.perceptual import PerceptualLoss

    try:
        return PerceptualLoss(name, weights if weights is not None else cfg_get(loss_cfg, "perceptual_weights", None),
                              spatial_dims, int(cfg_get(loss_cfg, "perceptual_slices", 1)),
                              tuple(int(a) for a in cfg_get(loss_cfg, "perceptual_axes", [0])))
    except ValueError as e:
        raise ConfigError(f"loss: {e}") from None


# ----------------------------------------------------------------------------- one step


@dataclass(frozen=True)
class LossWeights:
    """The `loss:` config resolved for one model (latent: VQ commitment weight or KL weight)."""

    reconstruction: str
    reduction: str
    rec: float
    perceptual: float
    ssim: float
    latent: float
    adversarial: float
    feature_matching: float
    adaptive: bool

    @classmethod
    def from_config(cls, lcfg: Any, is_vq: bool) -> LossWeights:
        reduction = str(cfg_get(lcfg, "reduction", "auto"))
        if reduction == "auto":
            reduction = "mean" if is_vq else "sum"
        if reduction not in ("mean", "sum") or str(lcfg.reconstruction) not in ("l1", "l2"):
            raise ConfigError(f"loss.reduction must be auto, mean or sum (got {reduction!r}) and "
                              f"loss.reconstruction l1 or l2 (got {lcfg.reconstruction!r})")
        return cls(str(lcfg.reconstruction), reduction, float(lcfg.reconstruction_weight),
                   float(lcfg.perceptual_weight) if str(cfg_get(lcfg, "perceptual", "none")) != "none" else 0.0,
                   float(cfg_get(lcfg, "ssim_weight", 0.0)),
                   float(lcfg.latent_weight) if is_vq else float(lcfg.kl_weight), float(lcfg.adversarial_weight),
                   float(lcfg.feature_matching_weight), bool(lcfg.adaptive_weight))


def image_loss(recon: torch.Tensor, target: torch.Tensor, w: LossWeights, perceptual=None):
    """L_img of one output: (weighted, reduced loss; unweighted per-element means for the log).

    `sum` multiplies the means by the C x prod(S) elements of one image: the per-pixel terms
    summed per image, and the per-image LPIPS and 1 - SSIM counted once per pixel, as LDM's and
    Medfusion's broadcast (B, 1, 1, 1) + (B, C, H, W) does before their sum / B.
    """
    terms = {"reconstruction": reconstruction_loss(recon, target, w.reconstruction)}
    loss = w.rec * terms["reconstruction"]
    if perceptual is not None and w.perceptual:
        terms["perceptual"] = perceptual(recon, target)
        loss = loss + w.perceptual * terms["perceptual"]
    if w.ssim:
        terms["ssim"] = ssim_loss(recon, target)
        loss = loss + w.ssim * terms["ssim"]
    scale = recon[0].numel() if w.reduction == "sum" else 1
    return scale * loss, terms


def generator_loss(model, x: torch.Tensor, w: LossWeights, perceptual=None, disc: GANDiscriminator | None = None,
                   last_layer: torch.Tensor | None = None):
    """The generator objective of one batch (call under autocast); see the module docstring.

    `disc` is the plain (not DDP-wrapped) discriminator, given once the GAN terms are on; its
    parameters are frozen for this pass, so its DDP wrapper sees only the discriminator step.
    Returns (loss, recon, aux, logs, slice_index); `slice_index` feeds `discriminator_loss`.
    """
    recon, aux = model(x)
    nll, terms = image_loss(recon, x, w, perceptual)
    logs: dict[str, torch.Tensor] = {f"loss/{k}": v.detach() for k, v in terms.items()}
    if aux["deep"]:
        # Medfusion: each deep-supervision output against the input resized to it (nearest-exact)
        deep = sum(image_loss(d, F.interpolate(x, size=d.shape[2:], mode="nearest-exact"), w, perceptual)[0]
                   for d in aux["deep"])
        nll = nll + deep
        logs["loss/deep_supervision"] = deep.detach()
    loss = nll + w.latent * aux["latent_loss"]
    slice_index = None
    if disc is not None:
        disc.requires_grad_(False)
        slice_index = disc.draw_slices(x)
        fake_feats = disc(recon, slice_index)
        adv = sum(hinge_g_loss(f[-1]) for f in fake_feats.values())  # Medical Diffusion: image + video terms
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
    logs.update({"loss/total": loss.detach(), "loss/latent": aux["latent_loss"].detach()})
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
    terms on (the costliest phase). Nothing is read or written: the perceptual backbone is a
    random one of the same architecture (same memory).

    The figure is what `torch.cuda.max_memory_allocated` would report, less cuDNN workspaces and
    allocator overhead; add the CUDA context (~0.5 GiB) for the card's total.
    """
    from medgen.models.perceptual import random_backbone_state
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
    name = str(cfg.loss.perceptual)
    perceptual = build_perceptual(cfg.loss, spatial_dims, random_backbone_state(name) if name != "none" else None)
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
    """PNG: a row of inputs labelled "input", their reconstructions under them (3D: three planes each)."""
    from medgen.io import atomic_write_bytes

    atomic_write_bytes(path, reconstruction_png(real[:n], recon[:n]))


# ----------------------------------------------------------------------------- training


@dataclass
class _Stage1:
    """The networks, optimizers and loaders of one run, after `accelerator.prepare`."""

    accelerator: Any
    model: Any
    opt_g: Any
    disc: Any | None
    opt_d: Any | None
    perceptual: Any | None
    train_loader: Any
    sampler: EpochSampler
    val_loader: Any | None
    spatial_dims: int
    shape: tuple[int, ...]

    @property
    def raw_model(self) -> Autoencoder:
        return self.accelerator.unwrap_model(self.model)

    @property
    def raw_disc(self) -> GANDiscriminator | None:
        return self.accelerator.unwrap_model(self.disc) if self.disc is not None else None


def _prepare(cfg, run_dir: Path) -> _Stage1:
    """Data (split.json written by the main process first), networks, optimizers, loaders."""
    from medgen.data import datasets_from_config

    tcfg = cfg.train
    accelerator = build_accelerator(tcfg, run_dir)
    with accelerator.main_process_first():
        splits = datasets_from_config(cfg.data, run_dir)
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
    perceptual = build_perceptual(cfg.loss, spatial_dims)
    lr = float(tcfg.lr)
    betas = tuple(float(b) for b in tcfg.betas)
    opt_g = torch.optim.Adam(model.parameters(), lr=lr, betas=betas, weight_decay=float(tcfg.weight_decay))
    opt_d = (torch.optim.Adam(disc.parameters(), lr=float(cfg_get(tcfg, "disc_lr", lr)), betas=betas)
             if disc is not None else None)

    seed = int(tcfg.seed)
    sampler = EpochSampler(len(train_ds), shuffle=True, seed=seed)
    train_loader = make_loader(train_ds, int(tcfg.batch_size), sampler, int(tcfg.num_workers), drop_last=True,
                               seed=seed)
    val_loader = (make_loader(val_ds, int(tcfg.batch_size), EpochSampler(len(val_ds), shuffle=False),
                              int(tcfg.num_workers), drop_last=False) if len(val_ds) else None)
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if bool(tcfg.channels_last):
            to_channels_last(model)
            if disc is not None:
                to_channels_last(disc)  # 3D runs mix 3D (volume) and 2D (slice) convs

    if disc is not None:
        model, opt_g, disc, opt_d, train_loader = accelerator.prepare(model, opt_g, disc, opt_d, train_loader)
    else:
        model, opt_g, train_loader = accelerator.prepare(model, opt_g, train_loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    if perceptual is not None:
        perceptual.to(accelerator.device)
    return _Stage1(accelerator, model, opt_g, disc, opt_d, perceptual, train_loader, sampler, val_loader,
                   spatial_dims, shape)


def _train_step(run: _Stage1, batches, step: int, weights: LossWeights, gan_on: bool, tcfg):
    """One optimizer step of the generator (and, with the GAN on, of the discriminator) over
    `gradient_accumulation_steps` micro-batches; returns (logs, last input, last reconstruction)."""
    accelerator = run.accelerator
    grad_clip = cfg_get(tcfg, "grad_clip", None)
    logs: dict[str, torch.Tensor] = {}
    for _ in range(int(cfg_get(tcfg, "gradient_accumulation_steps", 1))):
        x = next(batches)["image"]
        if bool(tcfg.channels_last) and x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last if run.spatial_dims == 2 else torch.channels_last_3d)
        # one accumulate block per micro-batch for both networks: accelerate counts micro-batches
        # per block, and a second block would shift the generator's and discriminator's sync
        with accelerator.accumulate(*([run.model, run.disc] if run.disc is not None else [run.model])):
            # ---- generator
            with accelerator.autocast():
                g_loss, recon, aux, step_logs, slice_idx = generator_loss(
                    run.model, x, weights, run.perceptual, run.raw_disc if gan_on else None, run.raw_model.last_layer)
            check_finite(g_loss, step, "generator loss", accelerator)
            accelerator.backward(g_loss)
            if grad_clip and accelerator.sync_gradients:
                logs["grad_norm"] = accelerator.clip_grad_norm_(run.model.parameters(), float(grad_clip))
            run.opt_g.step()
            run.opt_g.zero_grad(set_to_none=True)
            # ---- discriminator
            if gan_on:
                with accelerator.autocast():
                    d_loss = discriminator_loss(run.disc, x, recon, slice_idx, weights)
                check_finite(d_loss, step, "discriminator loss", accelerator)
                accelerator.backward(d_loss)
                if grad_clip and accelerator.sync_gradients:
                    logs["grad_norm_d"] = accelerator.clip_grad_norm_(run.disc.parameters(), float(grad_clip))
                run.opt_d.step()
                run.opt_d.zero_grad(set_to_none=True)
                logs["loss/d"] = d_loss.detach()
        logs.update(step_logs)
        for k in ("perplexity", "usage", "restarted"):
            if k in aux:
                logs[f"codebook/{k}"] = aux[k]
    return logs, x, recon


@removes_failed_run
def train_autoencoder(cfg, out: str | Path, resume: str | None = None) -> Path:
    """Train per `cfg` (see DEFAULTS) into run directory `out`; returns the run directory."""
    if cfg_get(cfg.data, "path") is None:
        raise ConfigError("data.path is not set; pass data.path=DIR (a dataset folder or manifest.csv)")
    return _train(cfg, prepare_run_dir(out, cfg, resume), resume)


def _train(cfg, run_dir: Path, resume: str | None) -> Path:
    tcfg = cfg.train
    weights = LossWeights.from_config(cfg.loss, str(cfg.model.latent) == "vq")
    run = _prepare(cfg, run_dir)
    accelerator = run.accelerator
    ckpt = CheckpointManager(run_dir, keep_last=int(tcfg.keep_last))
    start = int(ckpt.resume(accelerator, resume)["step"]) if resume else 0
    metrics_log = MetricsLogger(run_dir, accelerator, truncate_after=start if resume else None)
    init_tracker(accelerator, cfg, run_dir)
    val_metrics = ReconstructionMetrics(run.spatial_dims, run.shape)

    accum = int(cfg_get(tcfg, "gradient_accumulation_steps", 1))
    batches = infinite_batches(accelerator, run.train_loader, run.sampler, start * accum, seed=int(tcfg.seed))
    max_steps, disc_start = int(tcfg.max_steps), int(cfg.loss.disc_start)
    bar = progress_bar(accelerator, max_steps, start, desc="autoencoder")
    tic = time.perf_counter()

    step = start
    while step < max_steps:
        step += 1
        logs, x, recon = _train_step(run, batches, step, weights, run.disc is not None and step > disc_start, tcfg)
        if step % int(tcfg.log_every) == 0 or step == max_steps or step == start + 1:
            metrics_log.log(step, {**logs, "steps_per_s": (step - start) / max(time.perf_counter() - tic, 1e-9)})
            bar.set_postfix(loss=f"{logs['loss/total'].item():.4f}", rec=f"{logs['loss/reconstruction'].item():.4f}")
        bar.update(1)
        # validation and previews leave the training RNG untouched (a resumed run stays identical)
        if run.val_loader is not None and (step % int(tcfg.val_every) == 0 or step == max_steps):
            with preserved_rng():
                metrics_log.log(step, validate(accelerator, run.model, run.val_loader, val_metrics,
                                               int(tcfg.val_batches)))
        if accelerator.is_main_process and (step % int(tcfg.preview_every) == 0 or step == max_steps):
            with preserved_rng():
                write_preview(run_dir / "samples" / f"recon_step_{step}.png", x, recon)
            log_preview(accelerator, "samples/reconstruction", run_dir / "samples" / f"recon_step_{step}.png", step)
        if step % int(tcfg.checkpoint_every) == 0 or step == max_steps:
            ckpt.save(accelerator, step, {"max_steps": max_steps})
    bar.close()
    if accelerator.is_main_process:
        config = run.raw_model.config()
        config.update({"data": to_dict(cfg.data), "step": step,
                       "kind": "vqgan" if run.raw_model.latent == "vq" else "kl-vae"})
        save_inference_model(run.raw_model, run_dir / "model", config)
        log.info("autoencoder saved to %s", run_dir / "model")
    accelerator.wait_for_everyone()
    end_training(accelerator, run_dir)
    return run_dir


def train_from_args(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config, args.out, args.resume, args.overrides, DEFAULTS)
    train_autoencoder(cfg, args.out, args.resume)
    return 0


# ----------------------------------------------------------------------------- demo


def demo_stage(ctx) -> None:
    """Train the tiny demo autoencoder on the cohort (quick: 60 steps in 2D, 24 in 3D) -> ctx.state["autoencoder_run"].

    Quick 2D trains long enough (with the diffusion stage's 120 steps) that most samples are
    anatomy, so the audit can judge them and the quick demo ends with a release."""
    from medgen.config import load_config
    from medgen.demo import demo_config
    from medgen.train.common import read_metrics

    settings = ctx.cohort_settings()
    overrides = [f"data.path={ctx.cohort}", f"data.shape={[settings['size']] * ctx.dims}", "train.tracker=none",
                 f"data.split.val={settings['val']}", f"data.split.holdout={settings['holdout']}"]
    if ctx.quick:
        steps = 200 if ctx.dims == 2 else 24
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
