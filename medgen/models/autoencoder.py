"""Stage-1 autoencoders for latent diffusion, one family for 2D images and 3D volumes.

`Autoencoder(latent="vq")` is the VQ-GAN generator of Esser et al. 2021 as used in 3D by
Khader et al. 2023 (Medical Diffusion); `Autoencoder(latent="kl")` is the KL-regularised VAE of
Rombach et al. 2022 as used in 2D by Mueller-Franzes et al. 2023 (Medfusion). Encoder and decoder
are residual GroupNorm conv stacks (LDM layout) with per-axis downsampling, so an anisotropic
volume (e.g. 256x256x32 knee MRI with factors (4, 4, 1)) keeps its thin axis.

Rebuild from `model/config.json` alone with `load_autoencoder(path)`; no training code needed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from medgen.models.layers import GroupNorm
from medgen.models.quantizer import VectorQuantizer


def conv_nd(spatial_dims: int, *args, **kwargs) -> nn.Module:
    return (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(*args, **kwargs)


def to_channels_last(module: nn.Module) -> nn.Module:
    """Channels-last weights per conv (NHWC for 2D, NDHWC for 3D): cuDNN's fast bf16 layout.

    `module.to(memory_format=channels_last_3d)` fails on a module that mixes 2D and 3D convs
    (the VQ-GAN's slice and volume discriminators), so each conv gets its own format.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            m.to(memory_format=torch.channels_last_3d)
        elif isinstance(m, nn.Conv2d):
            m.to(memory_format=torch.channels_last)
    return module


def _groups(channels: int, groups: int) -> int:
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


def normalization(channels: int, groups: int = 32) -> nn.GroupNorm:
    # GroupNorm: batch-size independent and identical under DDP (no running stats to sync).
    # It runs in the activation dtype under autocast (see layers.GroupNorm): at 128^3 each
    # full-resolution norm output is 16 x 2M voxels, 128 MiB in fp32 and 64 MiB in bf16.
    return GroupNorm(_groups(channels, groups), channels, eps=1e-6)


def plan_downsampling(factors: Sequence[int], levels: int) -> list[tuple[int, ...]]:
    """Split per-axis total factors (powers of two) into `levels - 1` stride tuples of 1 or 2.

    (4, 4, 1) over 3 levels -> [(2, 2, 1), (2, 2, 1)]; (8, 8, 2) over 4 -> [(2, 2, 1), (2, 2, 1), (2, 2, 2)]:
    an axis with a smaller factor is reduced at the coarsest stages, where it matters least.
    """
    stages = levels - 1
    out = [[1] * len(factors) for _ in range(stages)]
    for axis, f in enumerate(factors):
        n = int(round(math.log2(f))) if f >= 1 else -1
        if f < 1 or 2 ** n != f:
            raise ValueError(f"downsampling factor {f} is not a power of two")
        if n > stages:
            raise ValueError(f"downsampling factor {f} needs {n} stages but channel_mult gives {stages}; "
                             f"add levels to channel_mult")
        for s in range(stages - n, stages):
            out[s][axis] = 2
    return [tuple(s) for s in out]


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv x2 with a (1x1 conv) skip; the LDM residual block."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, groups: int = 32):
        super().__init__()
        self.norm1 = normalization(cin, groups)
        self.conv1 = conv_nd(spatial_dims, cin, cout, 3, padding=1)
        self.norm2 = normalization(cout, groups)
        self.conv2 = conv_nd(spatial_dims, cout, cout, 3, padding=1)
        self.skip = conv_nd(spatial_dims, cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over all positions (lowest resolution only); SDPA kernels."""

    def __init__(self, spatial_dims: int, channels: int, groups: int = 32):
        super().__init__()
        self.norm = normalization(channels, groups)
        self.qkv = conv_nd(spatial_dims, channels, 3 * channels, 1)
        self.proj = conv_nd(spatial_dims, channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        # (B, 3C, *S) -> 3 x (B, 1, N, C)
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, -1).transpose(-1, -2).unsqueeze(2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, N, C)
        return x + self.proj(h.squeeze(1).transpose(-1, -2).reshape(x.shape))


class Downsample(nn.Module):
    def __init__(self, spatial_dims: int, channels: int, stride: tuple[int, ...]):
        super().__init__()
        self.conv = conv_nd(spatial_dims, channels, channels, 3, stride=stride, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest upsampling, then a 3x3(x3) conv straight to the finer level's width.

    LDM keeps the coarse width in this conv; at 128^3 that one full-resolution conv (32 -> 32
    channels) was ~40% of the decoder's FLOPs. Narrowing it here (32 -> 16) halves its cost.
    """

    def __init__(self, spatial_dims: int, cin: int, cout: int, scale: tuple[int, ...]):
        super().__init__()
        self.scale = tuple(float(s) for s in scale)
        self.conv = conv_nd(spatial_dims, cin, cout, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))


class _Stack(nn.Module):
    """Blocks run in order, each optionally under activation checkpointing (saves memory at 128^3)."""

    def __init__(self, blocks: list[nn.Module], checkpointing: bool):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.checkpointing = checkpointing

    def forward(self, x, taps: Sequence[int] = ()):
        """-> x, or (x, [output of block i for i in taps]) when `taps` is given."""
        tapped = []
        for i, block in enumerate(self.blocks):
            if self.checkpointing and self.training and torch.is_grad_enabled() and isinstance(block, ResBlock):
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in taps:
                tapped.append(x)
        return (x, tapped) if taps else x


class Encoder(nn.Module):
    """x (B, in, *S) -> (B, out, *S / factors)."""

    def __init__(self, spatial_dims, in_channels, out_channels, channels, num_res_blocks, strides,
                 attention, groups, checkpointing):
        super().__init__()
        blocks: list[nn.Module] = [conv_nd(spatial_dims, in_channels, channels[0], 3, padding=1)]
        cin = channels[0]
        for level, ch in enumerate(channels):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(spatial_dims, cin, ch, groups))
                cin = ch
            if level < len(strides):
                blocks.append(Downsample(spatial_dims, ch, strides[level]))
        blocks.append(ResBlock(spatial_dims, cin, cin, groups))
        if attention:
            blocks.append(SelfAttention(spatial_dims, cin, groups))
        blocks += [ResBlock(spatial_dims, cin, cin, groups), normalization(cin, groups), nn.SiLU(),
                   conv_nd(spatial_dims, cin, out_channels, 3, padding=1)]
        self.net = _Stack(blocks, checkpointing)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """z (B, latent, *S / factors) -> (B, out, *S).

    `deep_supervision` = k adds 1x1 output heads (zero-initialised) on the features of the k
    levels above the finest, at their resolution (level l: S / 2^l per downsampled axis), as
    Medfusion's VAE (`outc_ver`); `forward(z, aux=True)` also returns their images, finest first.
    """

    def __init__(self, spatial_dims, latent_channels, out_channels, channels, num_res_blocks, strides,
                 attention, groups, checkpointing, deep_supervision: int = 0):
        super().__init__()
        if not 0 <= deep_supervision < len(channels):
            raise ValueError(f"deep_supervision must be in 0..{len(channels) - 1} (levels above the finest), "
                             f"got {deep_supervision}")
        cin = channels[-1]
        blocks: list[nn.Module] = [conv_nd(spatial_dims, latent_channels, cin, 3, padding=1),
                                   ResBlock(spatial_dims, cin, cin, groups)]
        if attention:
            blocks.append(SelfAttention(spatial_dims, cin, groups))
        blocks.append(ResBlock(spatial_dims, cin, cin, groups))
        taps: dict[int, int] = {}  # level -> index of its last block before the upsampling
        for level in reversed(range(len(channels))):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(spatial_dims, cin, channels[level], groups))
                cin = channels[level]
            if level > 0:
                taps[level] = len(blocks) - 1
                blocks.append(Upsample(spatial_dims, cin, channels[level - 1], strides[level - 1]))
                cin = channels[level - 1]
        blocks += [normalization(cin, groups), nn.SiLU()]
        self.net = _Stack(blocks, checkpointing)
        self.conv_out = conv_nd(spatial_dims, cin, out_channels, 3, padding=1)
        self.aux_taps = [taps[level] for level in range(1, deep_supervision + 1)]
        self.aux_out = nn.ModuleList(conv_nd(spatial_dims, channels[level], out_channels, 1)
                                     for level in range(1, deep_supervision + 1))
        for head in self.aux_out:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, z, aux: bool = False):
        if not (aux and self.aux_taps):
            x = self.conv_out(self.net(z))
            return (x, []) if aux else x
        h, feats = self.net(z, taps=self.aux_taps)  # feats in block order: coarsest level first
        return self.conv_out(h), [head(f) for head, f in zip(self.aux_out, reversed(feats))]


class Autoencoder(nn.Module):
    """VQ-GAN generator (`latent="vq"`) or KL-VAE (`latent="kl"`) for 2D/3D.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (1 for MRI/CT, 3 for RGB).
        latent_channels: channels of z (VQ: code dimension).
        channels: width per resolution level; `len(channels) - 1` downsampling stages.
        downsample: total factor per spatial axis (int or tuple of powers of two).
        num_res_blocks: residual blocks per level.
        attention: self-attention at the lowest resolution.
        num_codes, commitment, ema_decay, dead_threshold: VQ codebook (see `VectorQuantizer`).
        gradient_checkpointing: recompute residual blocks in backward (less memory, ~30% slower).
        deep_supervision: extra decoder output heads on the k coarser levels (training only;
            Medfusion's VAE uses 1), see `Decoder`.

    `forward(x) -> (recon, aux)`; aux has `latent_loss` (beta-commitment for VQ, KL for KL;
    weight it in the trainer), `z`, `deep` (the deep-supervision images, finest first) and VQ
    statistics. `encode`/`decode` are deterministic.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, latent_channels: int = 4,
                 channels: Sequence[int] = (64, 128, 256), downsample: int | Sequence[int] = 4,
                 num_res_blocks: int = 1, attention: bool = False, latent: str = "vq",
                 num_codes: int = 1024, commitment: float = 0.25, ema_decay: float = 0.99,
                 dead_threshold: float = 1e-2, norm_groups: int = 32, gradient_checkpointing: bool = False,
                 deep_supervision: int = 0):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if latent not in ("vq", "kl"):
            raise ValueError(f"latent must be 'vq' or 'kl', got {latent!r}")
        factors = (downsample,) * spatial_dims if isinstance(downsample, int) else tuple(int(f) for f in downsample)
        if len(factors) != spatial_dims:
            raise ValueError(f"downsample {downsample} needs one factor per spatial axis ({spatial_dims})")
        self.params = dict(spatial_dims=spatial_dims, in_channels=in_channels, latent_channels=latent_channels,
                           channels=list(channels), downsample=list(factors), num_res_blocks=num_res_blocks,
                           attention=attention, latent=latent, num_codes=num_codes, commitment=commitment,
                           ema_decay=ema_decay, dead_threshold=dead_threshold, norm_groups=norm_groups,
                           gradient_checkpointing=gradient_checkpointing, deep_supervision=deep_supervision)
        self.spatial_dims, self.in_channels, self.latent_channels = spatial_dims, in_channels, latent_channels
        self.latent = latent
        self.downsample_factors = factors
        strides = plan_downsampling(factors, len(channels))
        enc_out = latent_channels * (2 if latent == "kl" else 1)
        common = dict(channels=list(channels), num_res_blocks=num_res_blocks, strides=strides, attention=attention,
                      groups=norm_groups, checkpointing=gradient_checkpointing)
        self.encoder = Encoder(spatial_dims, in_channels, enc_out, **common)
        self.decoder = Decoder(spatial_dims, latent_channels, in_channels, **common, deep_supervision=deep_supervision)
        self.quantizer = (VectorQuantizer(num_codes, latent_channels, commitment, ema_decay, dead_threshold=dead_threshold)
                          if latent == "vq" else None)

    # ------------------------------------------------------------------ config round trip
    def config(self) -> dict:
        """What `save_inference_model` writes to config.json (rebuilds the network alone)."""
        return {"target": f"{type(self).__module__}.{type(self).__name__}", "params": dict(self.params),
                "spatial_dims": self.spatial_dims, "latent_channels": self.latent_channels,
                "downsample_factors": list(self.downsample_factors)}

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's output conv (adaptive GAN weight, Esser et al. 2021)."""
        return self.decoder.conv_out.weight

    # ------------------------------------------------------------------ stage-2 interface
    def latent_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        return (self.latent_channels, *(s // f for s, f in zip(spatial_shape, self.downsample_factors)))

    def check_shape(self, x: torch.Tensor) -> None:
        bad = [s for s, f in zip(x.shape[2:], self.downsample_factors) if s % f]
        if x.ndim != self.spatial_dims + 2 or bad:
            raise ValueError(f"input shape {tuple(x.shape)}: expected (B, {self.in_channels}, *spatial) with "
                             f"{self.spatial_dims} spatial axes divisible by {self.downsample_factors}")

    def encode(self, x: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """x (B, C, *S) in [-1, 1] -> z (B, latent_channels, *S / factors), deterministic.

        VQ: the quantized code vectors, or with `quantize=False` the encoder's continuous output
        before the codebook (Medical Diffusion's DDPM trains on these, scaled to [-1, 1] by
        `codebook_range`); KL: the posterior mean, never a draw, whatever `quantize` (`posterior`
        gives the mean and log-variance).
        """
        self.check_shape(x)
        h = self.encoder(x)
        if self.latent == "kl":
            return h.chunk(2, dim=1)[0]
        return self.quantizer.lookup(self.quantizer.indices(h)) if quantize else h

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """KL only: (mean, logvar) of q(z | x), float32, logvar clamped as in `forward`."""
        if self.latent != "kl":
            raise ValueError("posterior() needs a KL autoencoder (latent='kl')")
        self.check_shape(x)
        mean, logvar = self.encoder(x).float().chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def codebook_range(self) -> tuple[float, float]:
        """(min, max) over every entry of the VQ codebook (Medical Diffusion maps pre-quantisation
        latents to [-1, 1] with it: 2 (z - min) / (max - min) - 1)."""
        if self.quantizer is None:
            raise ValueError("codebook_range needs a VQ autoencoder (latent='vq'), this one is 'kl'")
        embed = self.quantizer.embed
        return embed.min().item(), embed.max().item()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent_channels, *S') -> x (B, C, *S). VQ re-quantizes z to the nearest codes first,
        so a diffusion model's continuous output decodes like a code map."""
        if self.latent == "vq":
            z = self.quantizer.lookup(self.quantizer.indices(z)).to(z.dtype)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True) -> tuple[torch.Tensor, dict]:
        self.check_shape(x)
        h = self.encoder(x)  # (B, C_enc, *S')
        if self.latent == "vq":
            z, loss, stats = self.quantizer(h)
            aux = {"latent_loss": loss, **stats}
        else:
            mean, logvar = h.float().chunk(2, dim=1)
            logvar = logvar.clamp(-30.0, 20.0)
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample_posterior else mean
            # KL(N(mean, var) || N(0, 1)) summed over latent elements, mean over the batch (Kingma & Welling 2014)
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()
            aux = {"latent_loss": kl}
            z = z.to(h.dtype)
        aux["z"] = z
        recon, aux["deep"] = self.decoder(z, aux=True)
        return recon, aux


def load_autoencoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> Autoencoder:
    """Load an autoencoder (eval mode) from a run directory (uses `path/model/`) or a model folder."""
    from medgen.errors import RunError
    from medgen.models.serialization import load_inference_model

    path = Path(path)
    model_dir = path / "model" if (path / "model" / "config.json").is_file() else path
    if not (model_dir / "config.json").is_file():
        raise RunError(f"{path} holds no autoencoder: expected {path}/model/config.json (a finished "
                       f"`medgen train autoencoder` run) or a model folder with config.json")
    model = load_inference_model(model_dir, device)
    if not isinstance(model, Autoencoder):
        raise RunError(f"{model_dir} holds a {type(model).__name__}, not an autoencoder")
    return model
