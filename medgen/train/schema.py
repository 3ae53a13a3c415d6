"""The config schema of each training stage: every key, its type, default and allowed values.

One dataclass per config section; a stage's schema (`AutoencoderConfig`, `DiffusionConfig`) lists
its sections and is the `DEFAULTS` of its trainer module. The comment on a key's line is its
documentation (`medgen config show STAGE` prints it), `setting(default, ge=..., choices=...)`
says what is allowed, and medgen/config.py checks every loaded config against it: unknown keys,
wrong types and values out of range are errors before anything runs.

Adding a key: one line in its section, e.g. in `DiffusionTrain`
    grad_clip: float | None = setting(None, gt=0)  # clip the global gradient norm; null: off
and the code reads `cfg.train.grad_clip`. A new section: a dataclass here and a `section(...)`
field in the stage's schema. The `data:` section is `medgen.data.config.DataConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medgen.config import optional_view, section, setting, show_value
from medgen.data.config import DataConfig
from medgen.diffusion.schedule import _BETA_SCHEDULES as BETA_SCHEDULES
from medgen.diffusion.schedule import PREDICTION_TYPES, NoiseSchedule
from medgen.errors import ConfigError

# ----------------------------------------------------------------------------- shared


@dataclass
class TrainConfig:
    """`train:` keys every stage understands (optimisation, precision, logging, checkpoints)."""

    max_steps: int = setting(100_000, ge=1)  # optimizer steps of the whole run (extend a run with --resume latest)
    batch_size: int = setting(16, ge=1)  # images per process and micro-batch
    lr: float = setting(1.0e-4, gt=0)  # learning rate
    betas: list[float] = setting([0.9, 0.999], ge=0, lt=1, length=2)  # Adam betas
    weight_decay: float = setting(0.0, ge=0)  # AdamW's decoupled decay (diffusion); Adam's L2 (autoencoder); 0: none
    grad_clip: float | None = setting(None, gt=0)  # max global gradient norm (each network separately); null: no clipping
    mixed_precision: str = setting("no", choices=("no", "fp16", "bf16"))
    gradient_accumulation_steps: int = setting(1, ge=1)  # micro-batches per optimizer step
    tracker: str = setting("none", choices=("none", "wandb", "tensorboard"))  # metrics + previews (wandb: + the model) in RUN/<tracker>; wandb offline without a login
    seed: int = setting(0, ge=0)
    cpu: bool = False  # train on the CPU even when a GPU is present
    num_workers: int = setting(0, ge=0)  # DataLoader worker processes
    log_every: int = setting(10, ge=1)  # steps between metrics.jsonl lines
    checkpoint_every: int = setting(1000, ge=1)  # steps between checkpoints/step_N (and at the end)
    keep_last: int = setting(3, ge=1)  # checkpoints kept
    preview_every: int = setting(1000, ge=1)  # steps between preview PNGs in samples/


# ----------------------------------------------------------------------------- stage 1: autoencoder


@dataclass
class AutoencoderModel:
    """`model:` of `medgen train autoencoder` (medgen.models.autoencoder.Autoencoder)."""

    latent: str = setting("vq", choices=("vq", "kl"))  # vq: VQ-GAN (Esser et al. 2021); kl: KL-VAE (LDM, Medfusion)
    latent_channels: int = setting(4, ge=1)  # channels of z; VQ: code dimension
    channels: list[int] = setting([64, 128, 256], ge=1)  # width per level; len-1 downsampling stages
    downsample: Any = setting(4, allowed="an integer >= 1 or a list of one per axis")  # total factor, e.g. 4 or [4, 4, 1]
    num_res_blocks: int = setting(1, ge=1)
    attention: bool = False  # self-attention at the lowest resolution
    num_codes: int = setting(1024, ge=2)  # VQ codebook size
    commitment: float = setting(0.25, ge=0)  # beta (van den Oord et al. 2017)
    ema_decay: float = setting(0.99, ge=0, lt=1)  # EMA codebook update
    dead_threshold: float = setting(0.01, ge=0)  # EMA uses/step below which a code moves to a batch encoding, each step until it reaches it
    norm_groups: int = setting(32, ge=1)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower
    deep_supervision: int = setting(0, ge=0)  # decoder output heads on this many coarser levels, trained too (Medfusion: 1)

    def validate(self) -> None:
        if self.deep_supervision >= len(self.channels):
            raise ConfigError(f"model.deep_supervision={self.deep_supervision}: expected at most {len(self.channels) - 1} "
                              f"(the levels above the finest of model.channels={show_value(self.channels)})")
        factors = self.downsample if isinstance(self.downsample, list) else [self.downsample]
        if not factors or len(factors) > 3 or not all(isinstance(f, int) and not isinstance(f, bool) and f >= 1 for f in factors):
            raise ConfigError(f"model.downsample={show_value(self.downsample)}: expected an integer >= 1 or a list of one per axis, e.g. [4, 4, 1]")


@dataclass
class DiscriminatorConfig:
    """`discriminator:` PatchGAN(s) of Medical Diffusion (Khader et al. 2023)."""

    enabled: bool = True  # false: no GAN terms (a plain VQ-VAE / KL-VAE)
    volume: bool = True  # 3D PatchGAN on whole volumes (3D data)
    slices: bool = True  # 2D PatchGAN on random slices (3D) / on the images (2D)
    slices_per_volume: int = setting(1, ge=1)
    channels: int = setting(64, ge=1)
    num_layers: int = setting(3, ge=1)
    norm: str = setting("group", choices=("group", "instance"))  # both DDP-safe; no BatchNorm


@dataclass
class AutoencoderLoss:
    """`loss:` L = w_rec |x - x^| + w_perc LPIPS + L_latent + GAN terms after disc_start."""

    reconstruction: str = setting("l1", choices=("l1", "l2"))  # l2: squared error
    reconstruction_weight: float = setting(1.0, ge=0)
    # image terms (reconstruction, perceptual, SSIM) averaged over pixels (mean), or summed over each
    # image's elements and averaged over the batch (sum); auto: sum for kl (LDM, Medfusion), mean for vq
    reduction: str = setting("auto", choices=("auto", "mean", "sum"))
    perceptual: str = setting("none", choices=("none", "lpips", "vgg16", "resnet18", "resnet50"))  # lpips: learned, VGG16 (models/perceptual.py)
    perceptual_weights: str | None = setting(None, exists=True)  # safetensors; null: $MEDGEN_WEIGHTS_DIR/<arch>.safetensors, then torchvision's cache
    perceptual_weight: float = setting(1.0, ge=0)
    perceptual_slices: int = setting(1, ge=1)  # 3D: random 2D slices per volume and axis scored by the 2D backbone
    perceptual_axes: list[int] = setting([0], ge=0, le=2)  # 3D: axes to slice along (0 = depth, Medical Diffusion; [0, 1, 2] = all)
    ssim_weight: float = setting(0.0, ge=0)  # 1 - SSIM term (Medfusion: 1)
    latent_weight: float = setting(1.0, ge=0)  # multiplies the VQ commitment loss
    kl_weight: float = setting(1.0e-6, ge=0)  # KL-VAE
    adversarial_weight: float = setting(0.5, ge=0)
    adaptive_weight: bool = True  # lambda of Esser et al. 2021
    feature_matching_weight: float = setting(0.0, ge=0)
    disc_start: int = setting(10_000, ge=0)  # generator step after which the GAN terms switch on


@dataclass
class AutoencoderTrain(TrainConfig):
    """`train:` of `medgen train autoencoder`."""

    batch_size: int = setting(4, ge=1)
    betas: list[float] = setting([0.5, 0.9], ge=0, lt=1, length=2)
    disc_lr: float | None = setting(None, gt=0)  # discriminator learning rate; null: lr
    val_every: int = setting(1000, ge=1)  # steps between validation PSNR / SSIM / MS-SSIM
    val_batches: int = setting(16, ge=1)  # at most this many validation batches per evaluation
    channels_last: bool = True  # NDHWC/NHWC memory format: faster cuDNN kernels on GPU


@dataclass
class AutoencoderConfig:
    """`medgen train autoencoder`: stage 1, a VQ-GAN or KL-VAE (2D/3D)."""

    data: DataConfig = section(DataConfig)
    model: AutoencoderModel = section(AutoencoderModel)
    discriminator: DiscriminatorConfig = section(DiscriminatorConfig)
    loss: AutoencoderLoss = section(AutoencoderLoss)
    train: AutoencoderTrain = section(AutoencoderTrain)


# ----------------------------------------------------------------------------- stage 2: diffusion

# Latent mode takes the data section of the autoencoder run; keys set here replace its values.
# `channels` also describes the latents for --estimate-memory without an autoencoder run (any
# count); images still need 1 or 3, checked when the data loads.
DiffusionData = optional_view(DataConfig, "DiffusionData",
                              "`data:` of `medgen train diffusion`: null keys come from the autoencoder run "
                              "(latent mode) or DataConfig's defaults (pixel mode).",
                              channels=setting(None, ge=1))


@dataclass
class AutoencoderRef:
    """`autoencoder:` the stage-1 run of latent mode."""

    run: str | None = setting(None, exists=True)  # stage-1 run dir (or model folder): latent mode; null: pixel mode
    cache: str | None = setting(None, exists=True)  # an existing `medgen encode` folder (its training subjects are used); null: encode them into RUN/latents
    encode_batch_size: int = setting(8, ge=1)


@dataclass
class LatentConfig:
    """`latent:` what the denoiser trains on in latent mode (medgen.diffusion.latents)."""

    # VQ: quantized (code vectors) | encoder (output before quantization, Medical Diffusion);
    # KL: the posterior mean for both, or posterior_sample (a fresh draw per item, Medfusion)
    source: str = setting("quantized", choices=("quantized", "encoder", "posterior_sample"))
    # std (1/std, Rombach et al. 2022) | codebook_minmax (the VQ codebook's range -> [-1, 1], and
    # samplers clip x0; Medical Diffusion) | none (Medfusion)
    scaling: str = setting("std", choices=("std", "codebook_minmax", "none"))


@dataclass
class DenoiserModel:
    """`model:` of `medgen train diffusion` (medgen.models.unet)."""

    backbone: str = setting("medgen", choices=("medgen", "monai"))  # medgen (ours) | monai (DiffusionModelUNet, the reference)
    channels: list[int] = setting([64, 128, 256, 512], ge=1)  # width per level; each level after the first halves the size
    num_res_blocks: int = setting(2, ge=1)
    attention_levels: list[bool] = setting([False, False, True, True])  # self-attention per level
    head_channels: int = setting(64, ge=1)
    norm_groups: int = setting(32, ge=1)
    dropout: float = setting(0.0, ge=0, lt=1)
    gradient_checkpointing: bool = False
    conditional: bool | str = setting("auto", choices=("auto", True, False))  # auto: class-conditional when the data has labels
    num_classes: int | None = setting(None, ge=1)  # null: max label + 1

    def validate(self) -> None:
        if len(self.attention_levels) != len(self.channels):
            raise ConfigError(f"model.attention_levels={show_value(self.attention_levels)} needs one entry per level of "
                              f"model.channels={show_value(self.channels)}")


@dataclass
class DiffusionSchedule(NoiseSchedule):
    """`diffusion:` the noise schedule and target (medgen.diffusion.NoiseSchedule; defaults there)."""

    schedule: str = setting(NoiseSchedule.schedule, choices=tuple(BETA_SCHEDULES))
    num_train_timesteps: int = setting(NoiseSchedule.num_train_timesteps, ge=1)
    beta_start: float = setting(NoiseSchedule.beta_start, gt=0, lt=1)
    beta_end: float = setting(NoiseSchedule.beta_end, gt=0, lt=1)
    prediction: str = setting(NoiseSchedule.prediction, choices=tuple(PREDICTION_TYPES))


@dataclass
class DiffusionLossConfig:
    """`loss:` of the denoiser (medgen.diffusion.DiffusionLoss)."""

    type: str = setting("l2", choices=("l2", "l1"))
    min_snr_gamma: float | None = setting(None, gt=0)  # e.g. 5.0 (Hang et al. 2023); null: uniform weights
    cond_drop_prob: float = setting(0.1, ge=0, le=1)  # label dropout for classifier-free guidance
    cond_drop_mode: str = setting("sample", choices=("sample", "batch"))  # sample: each label on its own; batch: the whole batch at once (Medfusion)


@dataclass
class EMAConfig:
    """`ema:` of the denoiser weights (diffusers EMAModel); `model/` holds the EMA weights."""

    enabled: bool = True  # false: previews and model/ use the trained weights themselves (Medfusion)
    decay: float = setting(0.9999, ge=0, le=1)
    warmup: bool = True  # true: decay 1 - (1 + k)^-power after the start (diffusers); false: constant decay
    power: float = setting(0.6667, gt=0)
    update_after: int = setting(0, ge=0)  # the EMA copies the weights through this optimizer step (at least step 1), then averages
    every: int = setting(1, ge=1)  # update after optimizer steps 1, 1 + every, 1 + 2 every, ... (Medical Diffusion: 10)


@dataclass
class PreviewSampling:
    """`sample:` how previews are sampled, and the default sampler of `medgen sample` /
    `load_pipeline(run).sample()` for this run (saved in model/config.json)."""

    # null: the measured default for the run's space (medgen.diffusion.default_sampler: dpmpp, 25 steps; ddpm for 3D pixel runs)
    sampler: str | None = setting(None, choices=("ddpm", "ddim", "dpmpp", "euler"))
    steps: int | None = setting(None, ge=1)  # null: the measured default (25)
    guidance: float = setting(1.0, ge=0)  # classifier-free guidance scale; 1: none
    eta: float = setting(0.0, ge=0, le=1)  # DDIM: 0 deterministic, 1 ~ ancestral
    n_preview: int = setting(8, ge=1)  # samples per preview PNG


@dataclass
class DiffusionTrain(TrainConfig):
    """`train:` of `medgen train diffusion`."""

    grad_clip: float | None = setting(1.0, gt=0)  # max global gradient norm; null: no clipping
    lr_warmup_steps: int = setting(0, ge=0)  # linear learning-rate warm-up over this many optimizer steps
    # after the warm-up: constant (the papers' released code), or a cosine / linear decay to 0 at lr_decay_steps
    lr_schedule: str = setting("constant", choices=("constant", "cosine", "linear"))
    lr_decay_steps: int | None = setting(None, ge=1)  # where the decay reaches 0 (optimizer steps); null: train.max_steps
    compile: bool = False  # torch.compile the denoiser's repeated blocks (GPU; runs it channels-last)


@dataclass
class DiffusionConfig:
    """`medgen train diffusion`: stage 2, a latent or pixel denoiser (2D/3D)."""

    data: DiffusionData = section(DiffusionData)
    autoencoder: AutoencoderRef = section(AutoencoderRef)
    latent: LatentConfig = section(LatentConfig)
    model: DenoiserModel = section(DenoiserModel)
    diffusion: DiffusionSchedule = section(DiffusionSchedule)
    loss: DiffusionLossConfig = section(DiffusionLossConfig)
    ema: EMAConfig = section(EMAConfig)
    sample: PreviewSampling = section(PreviewSampling)
    train: DiffusionTrain = section(DiffusionTrain)
